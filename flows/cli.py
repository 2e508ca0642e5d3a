"""`pixart-pipeline`: run the style run (or the demo) from a shell, under a real Prefect server.

    pixart-pipeline demo [--workdir DIR] [--keep-server]
    pixart-pipeline run CONFIG.yaml [--workdir DIR] [--keep-server]
    pixart-pipeline recaption CONFIG.yaml [--workdir DIR] [--keep-server]
    pixart-pipeline validate CONFIG.yaml
    pixart-pipeline serve [CONFIG.yaml] [--workdir DIR] [--gpu-slots N]   (deployments for the Prefect UI)
    pixart-pipeline runs [--workdir DIR] [--limit N]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

from configs import CONFIG_DIR, ConfigError, load_config
from flows.server import configure_environment, prefect_server

DEFAULT_WORKDIR = "pixart-work"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="pixart-pipeline", description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)

    def add_run_options(sub: argparse.ArgumentParser) -> None:
        sub.add_argument("--workdir", default=DEFAULT_WORKDIR, help="caches, local repos and run outputs")
        sub.add_argument("--keep-server", action="store_true", help="leave the local Prefect UI running")

    run = commands.add_parser("run", help="run a style run from a config file")
    run.add_argument("config", help="YAML file (see configs/)")
    add_run_options(run)
    demo = commands.add_parser("demo", help="the bundled demo: tiny models on CPU (configs/demo.yaml)")
    add_run_options(demo)
    recaption = commands.add_parser("recaption", help="caption new dataset images, commit to the captions branch")
    recaption.add_argument("config", help="YAML file (see configs/)")
    add_run_options(recaption)
    validate = commands.add_parser("validate", help="check a config file and print its resolved settings")
    validate.add_argument("config")
    serve = commands.add_parser("serve", help="serve the style-run and recaption deployments (Prefect UI)")
    serve.add_argument("config", nargs="?", default=str(CONFIG_DIR / "demo.yaml"), help="UI form defaults")
    serve.add_argument("--workdir", default=DEFAULT_WORKDIR, help="caches, local repos and run outputs")
    serve.add_argument("--gpu-slots", type=int, default=1, help="GPU stages that may run at once")
    serve.add_argument("--paused", action="store_true", help="register the recaption schedule paused")
    serve.add_argument("--limit", type=int, default=None, help="flow runs this process executes at once")
    serve.add_argument("--image-host", default="127.0.0.1", help="address of the image server for the UI")
    serve.add_argument("--image-port", type=int, default=4280, help="its port (0: any free one)")
    serve.add_argument("--image-url", default=None, help="its address as browsers reach it, if not host:port")
    runs = commands.add_parser("runs", help="recent style and recaption runs: state and results commit")
    runs.add_argument("--workdir", default=DEFAULT_WORKDIR, help="whose local Prefect server to ask")
    runs.add_argument("--limit", type=int, default=20)
    return parser


def run_style(config_path: Path, workdir: Path, keep_server: bool) -> int:
    start = time.perf_counter()
    config = load_config(config_path)  # before the server starts: a bad config costs nothing
    configure_environment(workdir / "prefect")
    with prefect_server(workdir / "prefect", keep=keep_server) as server:
        from flows.style_run import style_run  # imports torch & co. while the server boots

        print(f"Prefect API: {server.wait_ready()} (ready {time.perf_counter() - start:.1f} s after start)")
        flow_start = time.perf_counter()
        result = style_run(config=config, workdir=str(workdir))
        flow_end = time.perf_counter()
    print(json.dumps(result, indent=2))
    stopped = time.perf_counter() - flow_end
    print(f"flow {flow_end - flow_start:.1f} s; logs flushed and server stopped in {stopped:.1f} s", file=sys.stderr)
    return 0


def run_recaption(config_path: Path, workdir: Path, keep_server: bool) -> int:
    config = load_config(config_path)
    configure_environment(workdir / "prefect")
    with prefect_server(workdir / "prefect", keep=keep_server) as server:
        from flows.recaption import recaption_flow

        print(f"Prefect API: {server.wait_ready()}")
        result = recaption_flow(config=config, workdir=str(workdir))
    print(json.dumps(result, indent=2))
    return 0


def run_serve(args: argparse.Namespace) -> int:
    from flows.serve import serve

    config = load_config(args.config)
    return serve(
        config, Path(args.workdir).resolve(), gpu_slots=args.gpu_slots, image_host=args.image_host,
        image_port=args.image_port, image_url=args.image_url, paused=args.paused, limit=args.limit,
    )  # fmt: skip


def list_runs(workdir: Path, limit: int) -> int:
    """Ask the configured server, else the work dir's running `serve`, else start its local one."""
    from flows.serve import read_info
    from flows.server import wait_healthy

    info = read_info(workdir)
    if "PREFECT_API_URL" not in os.environ and info is not None:
        try:  # a serve that was killed leaves its file behind
            wait_healthy(info["api_url"], None, 3.0, workdir / "prefect" / "server.log")
            os.environ["PREFECT_API_URL"] = info["api_url"]
        except RuntimeError:
            pass
    configure_environment(workdir / "prefect")
    with prefect_server(workdir / "prefect") as server:
        from flows.serve import format_runs, recent_runs

        server.wait_ready()
        print(format_runs(recent_runs(limit)))
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["prefect"]:
        # The Docker image's ENTRYPOINT is pixart-pipeline, so a docker work pool's
        # `prefect flow-run execute` arrives here (prefect.yaml); hand it to Prefect's own CLI.
        os.execv(sys.executable, [sys.executable, "-m", "prefect", *argv[1:]])
    args = build_parser().parse_args(argv)
    try:
        if args.command == "validate":
            config = load_config(args.config)
            print(json.dumps(config.model_dump(mode="json"), indent=2))
            return 0
        if args.command == "serve":
            return run_serve(args)
        if args.command == "runs":
            return list_runs(Path(args.workdir).resolve(), args.limit)
        if args.command == "recaption":
            return run_recaption(Path(args.config), Path(args.workdir).resolve(), args.keep_server)
        config_path = CONFIG_DIR / "demo.yaml" if args.command == "demo" else Path(args.config)
        return run_style(config_path, Path(args.workdir).resolve(), args.keep_server)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except Exception as exc:  # the flow's own logs hold the traceback; the shell gets one line
        print(f"error: {args.command} failed: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())

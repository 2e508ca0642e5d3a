"""`pixart-pipeline`: run the style run (or the demo) from a shell, under a real Prefect server.

    pixart-pipeline demo [--workdir DIR] [--keep-server]
    pixart-pipeline run CONFIG.yaml [--workdir DIR] [--keep-server]
    pixart-pipeline validate CONFIG.yaml
"""

from __future__ import annotations

import argparse
import json
import sys
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
    validate = commands.add_parser("validate", help="check a config file and print its resolved settings")
    validate.add_argument("config")
    return parser


def run_style(config_path: Path, workdir: Path, keep_server: bool) -> int:
    config = load_config(config_path)  # before the server starts: a bad config costs nothing
    configure_environment(workdir / "prefect")
    with prefect_server(workdir / "prefect", keep=keep_server) as server:
        from flows.style_run import style_run  # imports torch & co. while the server boots

        print(f"Prefect API: {server.wait_ready()}")
        result = style_run(config=config, workdir=str(workdir))
    print(json.dumps(result, indent=2))
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.command == "validate":
            config = load_config(args.config)
            print(json.dumps(config.model_dump(mode="json"), indent=2))
            return 0
        config_path = CONFIG_DIR / "demo.yaml" if args.command == "demo" else Path(args.config)
        return run_style(config_path, Path(args.workdir).resolve(), args.keep_server)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except Exception as exc:  # the flow's own logs hold the traceback; the shell gets one line
        print(f"error: style run failed: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())

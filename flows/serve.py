"""`pixart-pipeline serve`: the pipeline as Prefect deployments, run from the Prefect UI.

Registers two deployments and executes their runs until stopped (Ctrl-C or SIGTERM):

    style-run/style-run   the style run; its parameters are the run config, so the UI shows a
                          typed form, filled with the chosen config file's values as defaults
    recaption/recaption   the recaption job, on the config's `recaption.schedule` cron (pausable
                          in the UI, and kept paused across restarts once paused)

With PREFECT_API_URL set, that server is used (a team's Postgres-backed server); without it, a
local server is started (SQLite under <workdir>/prefect/, analytics off) and its UI address is
printed. Serve also creates the `gpu` concurrency limit (flows/gpu.py) and starts a small image
server so the UI can show the run's images (tasks/artifacts.py); both addresses and the UI's
are written to <workdir>/prefect/serve.json while serving.

Work pools instead of this process: see prefect.yaml (a `process` pool and a `docker` pool).
"""

from __future__ import annotations

import contextlib
import http.server
import importlib.util
import json
import os
import threading
from collections.abc import Iterator
from datetime import UTC, datetime
from functools import partial
from pathlib import Path

from configs import RunConfig
from flows.server import configure_environment, free_port, prefect_server
from tasks.atomic import write_text

RECAPTION_DEPLOYMENT = "recaption/recaption"
# A fixed port, so image artifacts of earlier runs still load after serve restarts.
IMAGE_PORT = 4280


class PngHandler(http.server.SimpleHTTPRequestHandler):
    """Serves PNG files below one folder, and nothing else: no listings, no other files."""

    def send_head(self):
        path = Path(self.translate_path(self.path))
        root = Path(self.directory).resolve()
        if path.suffix.lower() != ".png" or not path.resolve().is_relative_to(root) or not path.is_file():
            self.send_error(404, "not found")
            return None
        return super().send_head()

    def end_headers(self) -> None:
        # The Prefect UI is served from another origin; <img> needs no CORS, fetch() would.
        self.send_header("Access-Control-Allow-Origin", "*")
        super().end_headers()

    def log_message(self, format: str, *args) -> None:  # one line per image is noise in the serve log
        pass


@contextlib.contextmanager
def image_server(root: Path, host: str, port: int, public_url: str | None) -> Iterator[str]:
    """Serve PNGs under `root`; flow runs started by this process find the address in the
    PIXART_IMAGE_ROOT / PIXART_IMAGE_URL environment variables."""
    handler = partial(PngHandler, directory=str(root))
    try:
        server = http.server.ThreadingHTTPServer((host, port or free_port()), handler)
    except OSError as exc:  # the usual port is taken (another serve): any free one will do
        print(f"image server: port {port} unavailable ({exc.strerror}); using a free one")
        server = http.server.ThreadingHTTPServer((host, free_port()), handler)
    url = public_url or f"http://{host}:{server.server_address[1]}"
    os.environ.update(PIXART_IMAGE_ROOT=str(root), PIXART_IMAGE_URL=url)
    thread = threading.Thread(target=server.serve_forever, name="image-server", daemon=True)
    thread.start()
    try:
        yield url
    finally:
        server.shutdown()
        server.server_close()


def default_parameters(config: RunConfig, workdir: Path) -> dict:
    return {"config": config.model_dump(mode="json"), "workdir": str(workdir)}


def is_paused(deployment_name: str) -> bool:
    """Whether the deployment, or its schedule, was switched off (in the UI) before this serve."""
    from prefect.client.orchestration import get_client
    from prefect.exceptions import ObjectNotFound

    with get_client(sync_client=True) as client:
        try:
            deployment = client.read_deployment_by_name(deployment_name)
        except ObjectNotFound:
            return False
    return bool(deployment.paused) or any(not schedule.active for schedule in deployment.schedules or [])


def build_deployments(config: RunConfig, workdir: Path, paused: bool) -> list:
    """The deployments this process serves: style-run, and recaption when its flow exists."""
    from prefect.deployments.runner import EntrypointType

    from flows.style_run import style_run

    parameters = default_parameters(config, workdir)
    # Module entrypoints: runs import flows.* from the installed package, whatever the cwd.
    common = {
        "parameters": parameters,
        "tags": ["pixart", config.run_name],
        "entrypoint_type": EntrypointType.MODULE_PATH,
    }
    deployments = [
        style_run.to_deployment(
            name="style-run", description=f"Style run; defaults from config '{config.run_name}'.", **common
        )
    ]
    if importlib.util.find_spec("flows.recaption") is None:  # written under another issue; optional here
        print("flows/recaption.py not found: serving style-run only")
        return deployments
    from flows.recaption import recaption_flow

    schedule = config.recaption.schedule
    deployments.append(
        recaption_flow.to_deployment(
            name="recaption",
            description=f"Caption new dataset images ({schedule or 'no schedule: run it by hand'}).",
            cron=schedule,
            paused=paused or is_paused(RECAPTION_DEPLOYMENT),
            **common,
        )
    )
    return deployments


def serve(
    config: RunConfig,
    workdir: Path,
    gpu_slots: int = 1,
    image_host: str = "127.0.0.1",
    image_port: int = IMAGE_PORT,
    image_url: str | None = None,
    paused: bool = False,
    limit: int | None = None,
) -> int:
    """Serve the deployments until stopped; returns the exit code."""
    configure_environment(workdir / "prefect")
    info_path = workdir / "prefect" / "serve.json"
    with prefect_server(workdir / "prefect") as server:
        import prefect

        from flows.gpu import ensure_gpu_limit

        api_url = server.wait_ready()
        ensure_gpu_limit(gpu_slots)
        with image_server(workdir, image_host, image_port, image_url) as images:
            deployments = build_deployments(config, workdir, paused)
            for deployment in deployments:  # registered before serve.json says we are ready
                deployment.apply()
            names = [f"{d.flow_name}/{d.name}" for d in deployments]
            info = {"api_url": api_url, "ui_url": api_url.removesuffix("/api"), "image_url": images,
                    "pid": os.getpid(), "deployments": names}  # fmt: skip
            write_info(info_path, info)
            print(
                f"Prefect UI: {info['ui_url']}  (deployments: {', '.join(info['deployments'])})", flush=True
            )
            try:
                prefect.serve(*deployments, limit=limit, pause_on_shutdown=False)
            finally:
                info_path.unlink(missing_ok=True)
    return 0


def write_info(path: Path, info: dict) -> None:
    write_text(path, json.dumps(info, indent=2) + "\n")


def read_info(workdir: Path) -> dict | None:
    """What a running `serve` for this work dir wrote, if one runs."""
    path = workdir / "prefect" / "serve.json"
    try:
        return json.loads(path.read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return None


# ---- `pixart-pipeline runs` ------------------------------------------------------------------------


def recent_runs(limit: int = 20) -> list[dict]:
    """The newest style and recaption runs: name, state, start, and the results commit if pushed.

    The results commit comes from the run's `<run name>-results` table artifact (flows/style_run.py)."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import (
        ArtifactFilter,
        ArtifactFilterFlowRunId,
        ArtifactFilterType,
        FlowFilter,
        FlowFilterName,
        FlowRunFilter,
        FlowRunFilterExpectedStartTime,
    )
    from prefect.client.schemas.sorting import FlowRunSort

    due = FlowRunFilter(expected_start_time=FlowRunFilterExpectedStartTime(before_=datetime.now(UTC)))
    with get_client(sync_client=True) as client:
        runs = client.read_flow_runs(
            flow_filter=FlowFilter(name=FlowFilterName(any_=["style-run", "recaption"])),
            flow_run_filter=due,  # not the schedule's future runs
            sort=FlowRunSort.EXPECTED_START_TIME_DESC,
            limit=limit,
        )
        flow_names = {flow_id: client.read_flow(flow_id).name for flow_id in {run.flow_id for run in runs}}
        tables = client.read_artifacts(
            artifact_filter=ArtifactFilter(
                flow_run_id=ArtifactFilterFlowRunId(any_=[run.id for run in runs]),
                type=ArtifactFilterType(any_=["table"]),
            )
        ) if runs else []  # fmt: skip
    results = {}
    for artifact in tables:
        if artifact.key and artifact.key.endswith("-results") and artifact.data:
            rows = json.loads(artifact.data) if isinstance(artifact.data, str) else artifact.data
            results[artifact.flow_run_id] = rows[0] if rows else {}
    return [
        {
            "id": str(run.id),
            "flow": flow_names[run.flow_id],
            "name": run.name,
            "state": run.state_name or "-",
            "started": run.start_time.isoformat(timespec="seconds") if run.start_time else "-",
            "seconds": round(run.total_run_time.total_seconds()) if run.total_run_time else 0,
            "results": results.get(run.id),
        }
        for run in runs
    ]


def format_runs(runs: list[dict]) -> str:
    header = ("started", "flow", "name", "state", "secs", "results commit")
    rows = [header] + [
        (
            run["started"], run["flow"], run["name"], run["state"], str(run["seconds"]),
            f"{run['results']['branch']} {run['results']['commit_id']}" if run["results"] else "-",
        )
        for run in runs
    ]  # fmt: skip
    widths = [max(len(row[i]) for row in rows) for i in range(len(header) - 1)]
    return "\n".join(
        "  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=False)) + "  " + row[-1]
        for row in rows
    )

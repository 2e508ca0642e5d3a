"""Shared by tests/test_serve.py and tests/test_browser.py: a `pixart-pipeline serve` process and
the REST calls the Prefect UI makes, each wait bounded by a timeout."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import yaml

from configs import CONFIG_DIR
from flows.serve import read_info

ROOT = Path(__file__).resolve().parent.parent
CRON = "0 3 * * *"


def fast_config(path: Path, run_name: str) -> dict:
    """The demo config, cut to seconds of CPU: 10 training steps, 2 seeds of 4 sampling steps."""
    data = yaml.safe_load((CONFIG_DIR / "demo.yaml").read_text())
    data["run_name"] = run_name
    data["train"]["max_steps"] = 10
    data["evaluate"].update(seeds=[0, 1], num_inference_steps=4)
    data["recaption"]["schedule"] = CRON
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return data


def start_serve(config_path: Path, workdir: Path, env: dict, log_path: Path) -> subprocess.Popen:
    command = [sys.executable, "-m", "flows.cli", "serve", str(config_path), "--workdir", str(workdir),
               "--image-port", "0"]  # fmt: skip
    env = {**env, "OMP_NUM_THREADS": "1", "PREFECT_RUNNER_POLL_FREQUENCY": "2"}
    with open(log_path, "wb") as log:
        return subprocess.Popen(command, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)


def wait_for_serve(process: subprocess.Popen, workdir: Path, log_path: Path, timeout_s: float = 240) -> dict:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise AssertionError(f"serve exited with {process.returncode}:\n{log_path.read_text()[-3000:]}")
        info = read_info(workdir)
        if info is not None:
            return info
        time.sleep(1)
    raise AssertionError(f"serve did not start within {timeout_s:.0f} s:\n{log_path.read_text()[-3000:]}")


def stop_serve(process: subprocess.Popen) -> None:
    process.send_signal(signal.SIGTERM)  # serve stops its runner, image server and any local server
    try:
        process.wait(timeout=60)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait(timeout=10)


def call(method: str, url: str, **kwargs) -> httpx.Response:
    """One API call, retried while SQLite is busy (503), as Prefect's own client does."""
    for attempt in range(6):
        response = httpx.request(method, url, timeout=30, **kwargs)
        if response.status_code != 503:
            break
        time.sleep(0.5 * 2**attempt)
    response.raise_for_status()
    return response


def create_run(api: str, deployment: str, parameters: dict | None = None) -> str:
    deployment_id = call("GET", f"{api}/deployments/name/{deployment}").json()["id"]
    url = f"{api}/deployments/{deployment_id}/create_flow_run"
    return call("POST", url, json={"parameters": parameters or {}}).json()["id"]


def wait_for_state(api: str, run_id: str, name: str, log_path: Path, timeout_s: float = 300) -> dict:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        run = call("GET", f"{api}/flow_runs/{run_id}").json()
        state = run["state"]
        if state["name"] == name:
            return run
        if state["type"] in ("FAILED", "CRASHED", "CANCELLED"):
            raise AssertionError(
                f"run {run_id} {state['name']}: {state['message']}\n{log_path.read_text()[-3000:]}"
            )
        time.sleep(1)
    raise AssertionError(f"run {run_id} not {name} within {timeout_s:.0f} s\n{log_path.read_text()[-3000:]}")


def run_artifacts(api: str, run_id: str) -> dict[str, dict]:
    query = {"artifacts": {"flow_run_id": {"any_": [run_id]}}}
    return {a["key"]: a for a in call("POST", f"{api}/artifacts/filter", json=query).json()}

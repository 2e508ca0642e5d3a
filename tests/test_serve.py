"""`pixart-pipeline serve` against a real Prefect server: runs started through the REST API, as
the UI starts them, with caching, artifacts, the GPU slot, `runs` and prefect.yaml."""

from __future__ import annotations

import asyncio
import base64
import json
import os
import re
import subprocess
import sys
import urllib.request
from pathlib import Path

import httpx
import pytest
import yaml

from configs import CONFIG_DIR, load_config, parse_config
from flows.serve import image_server
from tests import serve_harness as harness
from tests.serve_harness import CRON, ROOT, call, create_run, run_artifacts, wait_for_state

STAGE_OF_TASK = {"pull": "pull", "recaption": "recaption", "embed": "embed", "train-lora": "train",
                 "evaluate": "evaluate", "push": "push"}  # fmt: skip


def stage_states(api: str, run_id: str) -> dict[str, str]:
    task_runs = call("POST", f"{api}/task_runs/filter", json={"flow_runs": {"id": {"any_": [run_id]}}}).json()
    return {STAGE_OF_TASK[t["name"].rsplit("-", 1)[0]]: t["state"]["name"] for t in task_runs}


@pytest.fixture(scope="module")
def served(tmp_path_factory, prefect_server, tiny_models):
    """serve on the session's test server, and three style runs started through the API:
    defaults, defaults again, and a changed learning rate while another run holds the GPU."""
    from prefect.concurrency.sync import concurrency
    from prefect.settings import PREFECT_API_URL

    api = PREFECT_API_URL.value()
    root = tmp_path_factory.mktemp("serve")
    config = harness.fast_config(root / "fast.yaml", "served")
    workdir, log_path = root / "work", root / "serve.log"
    process = harness.start_serve(
        root / "fast.yaml", workdir, {**os.environ, "PREFECT_API_URL": api}, log_path
    )
    try:
        info = harness.wait_for_serve(process, workdir, log_path)
        runs = {"first": create_run(api, "style-run/style-run")}
        wait_for_state(api, runs["first"], "Completed", log_path)
        runs["again"] = create_run(api, "style-run/style-run")
        wait_for_state(api, runs["again"], "Completed", log_path)

        changed = json.loads(json.dumps(config))
        changed["train"]["learning_rate"] = 5e-4
        with concurrency("gpu", occupy=1, strict=True):  # another run's GPU stage holds the card
            runs["changed"] = create_run(api, "style-run/style-run", {"config": changed})
            waiting = wait_for_state(api, runs["changed"], "AwaitingGPU", log_path)
        wait_for_state(api, runs["changed"], "Completed", log_path)
        yield {
            "api": api,
            "info": info,
            "workdir": workdir,
            "runs": runs,
            "waiting": waiting,
            "log": log_path,
        }
    finally:
        harness.stop_serve(process)


def test_deployments_carry_the_config_as_a_typed_form_and_the_cron(served):
    api = served["api"]
    style = call("GET", f"{api}/deployments/name/style-run/style-run").json()
    expected = load_config(served["workdir"].parent / "fast.yaml").model_dump(mode="json")
    assert style["parameters"] == {"config": expected, "workdir": str(served["workdir"])}
    schema = style["parameter_openapi_schema"]
    assert schema["properties"]["config"]["$ref"].endswith("RunConfig")  # the UI renders RunConfig's fields
    assert "train" in schema["definitions"]["RunConfig"]["properties"]

    recaption = call("GET", f"{api}/deployments/name/recaption/recaption").json()
    assert [s["schedule"]["cron"] for s in recaption["schedules"]] == [CRON]
    assert recaption["schedules"][0]["active"] and not recaption["paused"]
    assert call("GET", f"{api}/v2/concurrency_limits/gpu").json()["limit"] == 1


def test_style_run_from_the_api_completes_with_its_artifacts(served):
    api, first = served["api"], served["runs"]["first"]
    assert set(stage_states(api, first).values()) == {"Completed"}
    found = run_artifacts(api, first)
    names = ("progress", "captions", "loss-curve", "lora-grid", "style-shift", "results")
    assert set(found) == {f"served-{name}" for name in names}
    assert found["served-progress"]["data"] == 100.0
    captions = json.loads(found["served-captions"]["data"])
    assert len(captions) == 20 and {"original", "generated", "trained on"} <= set(captions[0])
    results = json.loads(found["served-results"]["data"])[0]
    # Oxen writes a commit id as a 128-bit hex number without leading zeros: 32 digits or fewer.
    assert results["branch"].startswith("runs/served-") and re.fullmatch(r"[0-9a-f]{24,32}", results["commit_id"])
    grid = found["served-lora-grid"]
    if grid["type"] == "image":  # too large to inline: served by serve's image server
        assert grid["data"].startswith(served["info"]["image_url"])
        png = call("GET", grid["data"]).content
    else:  # small enough: inlined in markdown as a data URI
        png = base64.b64decode(grid["data"].split("data:image/png;base64,", 1)[1].split(")", 1)[0])
    assert png.startswith(b"\x89PNG") and "prompts, seeds 0" in grid["description"]
    assert "latent FD ratio" in found["served-style-shift"]["data"]


def test_rerun_with_nothing_changed_is_all_cached_and_quick(served):
    api, again = served["api"], served["runs"]["again"]
    assert stage_states(api, again) == {stage: "Cached" for stage in STAGE_OF_TASK.values()}
    assert call("GET", f"{api}/flow_runs/{again}").json()["total_run_time"] < 30


def test_changing_a_train_setting_reruns_only_train_evaluate_and_push(served):
    assert stage_states(served["api"], served["runs"]["changed"]) == {
        "pull": "Cached", "recaption": "Cached", "embed": "Cached",
        "train": "Completed", "evaluate": "Completed", "push": "Completed",
    }  # fmt: skip


def test_a_run_waiting_for_the_gpu_says_so(served):
    state = served["waiting"]["state"]
    assert state["type"] == "RUNNING"
    assert "train is waiting for a GPU" in state["message"] and "'gpu'" in state["message"]


def test_runs_lists_recent_runs_with_their_results_commit(served):
    env = {**os.environ, "PREFECT_API_URL": served["api"]}
    result = subprocess.run(
        [sys.executable, "-m", "flows.cli", "runs", "--workdir", str(served["workdir"])],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-2000:]
    assert "Scheduled" not in result.stdout  # the recaption schedule's future runs are not "recent"
    lines = [line for line in result.stdout.splitlines() if "style-run" in line]
    assert len(lines) >= 3 and all("Completed" in line for line in lines[:3])
    commits = {json.loads(run_artifacts(served["api"], run)["served-results"]["data"])[0]["commit_id"]
               for run in served["runs"].values()}  # fmt: skip
    assert len(commits) == 2 and all(commit in result.stdout for commit in commits)


def test_image_server_serves_pngs_below_its_folder_only(tmp_path: Path):
    (tmp_path / "runs").mkdir()
    (tmp_path / "runs" / "grid.png").write_bytes(b"\x89PNG fake")
    (tmp_path / "secret.yaml").write_text("token: x")
    with image_server(tmp_path, "127.0.0.1", 0, None) as url:
        with urllib.request.urlopen(f"{url}/runs/grid.png", timeout=5) as response:
            assert response.read() == b"\x89PNG fake"
        for path in ("/secret.yaml", "/runs/", "/../etc/passwd.png", "/runs/missing.png"):
            with pytest.raises(urllib.error.HTTPError) as error:
                urllib.request.urlopen(url + path, timeout=5)
            assert error.value.code == 404, path


def test_prefect_yaml_deploys_both_flows_to_both_pools(prefect_server):
    spec = yaml.safe_load((ROOT / "prefect.yaml").read_text())
    demo = yaml.safe_load((CONFIG_DIR / "demo.yaml").read_text())
    assert spec["definitions"]["demo_config"] == demo, (
        "copy configs/demo.yaml into prefect.yaml's demo_config"
    )
    parse_config(spec["definitions"]["demo_config"])

    from prefect.settings import PREFECT_API_URL
    from prefect.workers.utilities import get_default_base_job_template_for_infrastructure_type as template

    api = PREFECT_API_URL.value()
    for pool, kind in (("gpu-process", "process"), ("gpu-docker", "docker")):  # as `prefect work-pool create`
        pool_spec = {"name": pool, "type": kind, "base_job_template": asyncio.run(template(kind))}
        response = httpx.post(f"{api}/work_pools/", json=pool_spec, timeout=30)
        assert response.status_code in (201, 409), response.text
    result = subprocess.run(
        [sys.executable, "-m", "prefect", "--no-prompt", "deploy", "--all"],
        cwd=ROOT, env={**os.environ, "PREFECT_API_URL": api}, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    for flow in ("style-run", "recaption"):
        for pool in ("process", "docker"):
            deployment = call("GET", f"{api}/deployments/name/{flow}/{flow}-{pool}").json()
            assert deployment["work_pool_name"] == f"gpu-{pool}"
            assert deployment["parameters"]["config"] == demo
    docker = call("GET", f"{api}/deployments/name/recaption/recaption-docker").json()
    assert docker["job_variables"]["image"] == "pixart-pipeline:latest"
    assert docker["pull_steps"][0]["prefect.deployments.steps.set_working_directory"]["directory"] == "/app"
    assert [(s["schedule"]["cron"], s["active"]) for s in docker["schedules"]] == [(CRON, False)]


def test_a_paused_recaption_schedule_stays_paused_when_serve_restarts(prefect_server, tmp_path: Path):
    from prefect.settings import PREFECT_API_URL

    from flows.serve import build_deployments

    api = PREFECT_API_URL.value()
    harness.fast_config(tmp_path / "fast.yaml", "paused")
    config = load_config(tmp_path / "fast.yaml")
    for deployment in build_deployments(config, tmp_path, paused=False):
        deployment.apply()
    recaption = call("GET", f"{api}/deployments/name/recaption/recaption").json()
    call("POST", f"{api}/deployments/{recaption['id']}/pause_deployment")  # the UI's switch

    restarted = {d.name: d for d in build_deployments(config, tmp_path, paused=False)}
    assert restarted["recaption"].paused is True
    restarted["recaption"].apply()
    assert call("GET", f"{api}/deployments/name/recaption/recaption").json()["paused"] is True
    call("POST", f"{api}/deployments/{recaption['id']}/resume_deployment")

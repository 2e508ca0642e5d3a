"""The style run end to end: the demo config under a real Prefect server, real Oxen repos."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import oxen
import pytest

from configs import CONFIG_DIR, load_config
from tasks.contracts import RESULT_FIELDS

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory, prefect_server):
    from flows.style_run import style_run

    workdir = tmp_path_factory.mktemp("style-run")
    config = load_config(CONFIG_DIR / "demo.yaml")
    first = style_run(config=config, workdir=str(workdir))
    second = style_run(config=config, workdir=str(workdir))
    return workdir, first, second


def test_demo_run_pushes_results_with_lineage(demo_run):
    workdir, first, _ = demo_run
    summary = json.loads(Path(first["summary"]).read_text())
    stages = summary["stages"]
    assert stages["pull"]["rows"] == 32 and stages["pull"]["skipped"] == 0
    assert stages["recaption"]["rows"] == 32
    assert stages["train"]["steps"] == 200
    assert stages["train"]["final_loss"] < stages["train"]["first_loss"]

    pushed = first["results"]
    repo = oxen.Repo(pushed["repo"])
    repo.checkout(pushed["branch"])
    try:
        commit = repo.log()[0]
        assert commit.id == pushed["commit_id"] and first["run_id"] in commit.message
        root = Path(pushed["repo"])
        rows = [json.loads(line) for line in (root / "results.jsonl").read_text().splitlines()]
        prompts = (ROOT / "data" / "demo_eval_prompts.jsonl").read_text().splitlines()
        assert len(rows) == 2 * len(prompts) * len(load_config(CONFIG_DIR / "demo.yaml").evaluate.seeds)
        assert {row["model"] for row in rows} == {"base", "lora"}
        for row in rows:
            assert tuple(row) == RESULT_FIELDS
            assert (root / row["image_path"]).is_file()
            assert row["run_id"] == first["run_id"]
            assert row["dataset_commit"] == stages["pull"]["commit_id"]
        for name in ("lora/adapter_model.safetensors", "lora/adapter_config.json", "config.yaml",
                     "lineage.json", "train_log.jsonl", "report.md", "grids/000.png"):  # fmt: skip
            assert (root / name).is_file(), name
    finally:
        repo.checkout("main")


def test_lora_moves_generated_latents_toward_the_style(demo_run):
    _, first, _ = demo_run
    metrics = json.loads(Path(first["summary"]).read_text())["stages"]["evaluate"]["metrics"]
    assert metrics["latent_fd_ratio"] >= 10  # measured ~15 (tasks/style_metrics.py, configs/demo.yaml)


def test_rerun_with_nothing_changed_recomputes_nothing(demo_run):
    _, first, second = demo_run
    assert second["run_id"] == first["run_id"]
    stages = json.loads(Path(second["summary"]).read_text())["stages"]
    # Every stage is a Prefect cache hit (flows/caching.py): its result is the first run's.
    assert {name: stage["state"] for name, stage in stages.items()} == dict.fromkeys(stages, "Cached")
    assert len(stages) == 6 and second["states"] == dict.fromkeys(stages, "Cached")
    assert second["results"]["commit_id"] == first["results"]["commit_id"]


@pytest.fixture(scope="module")
def renamed_run(demo_run):
    """The demo again under another run name: new lineage, the same images."""
    from flows.style_run import style_run

    workdir, _, _ = demo_run
    config = load_config(CONFIG_DIR / "demo.yaml")
    config.run_name = "demo-renamed"
    return style_run(config=config, workdir=str(workdir))


def test_a_renamed_run_reuses_the_evaluation_and_pushes_its_own_lineage(demo_run, renamed_run):
    _, first, _ = demo_run
    assert renamed_run["run_id"] != first["run_id"]
    stages = json.loads(Path(renamed_run["summary"]).read_text())["stages"]
    assert stages["evaluate"]["state"] == "Cached" and stages["push"]["state"] == "Completed"
    pushed = renamed_run["results"]
    repo = oxen.Repo(pushed["repo"])
    repo.checkout(pushed["branch"])
    try:
        root = Path(pushed["repo"])
        rows = [json.loads(line) for line in (root / "results.jsonl").read_text().splitlines()]
        assert rows and {row["run_id"] for row in rows} == {renamed_run["run_id"]}
        assert f"| run | {renamed_run['run_id']} |" in (root / "report.md").read_text()
    finally:
        repo.checkout("main")


def test_cli_demo_runs_under_its_own_prefect_server(tmp_path: Path):
    """README command 1, minus set-up: a fresh work dir, a local Prefect server started and stopped."""
    env = {k: v for k, v in os.environ.items() if k != "PREFECT_API_URL"}
    result = subprocess.run(
        [sys.executable, "-m", "flows.cli", "demo", "--workdir", str(tmp_path / "work")],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Error logging to API" not in result.stdout + result.stderr
    summary = json.loads(result.stdout[result.stdout.rindex("{\n  \"run_id\"") :])
    assert summary["results"]["branch"].startswith("runs/demo-")
    assert (tmp_path / "work" / "prefect" / "prefect.db").is_file()


def test_cli_rejects_a_bad_config_before_any_work(tmp_path: Path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("dataset: {repo: x}\ntrain: {rank: -4, learning_rat: 1}\n")
    result = subprocess.run(
        [sys.executable, "-m", "flows.cli", "run", str(bad), "--workdir", str(tmp_path / "work")],
        cwd=ROOT, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert result.returncode == 2
    assert "train.rank" in result.stderr and "train.learning_rat" in result.stderr
    assert not (tmp_path / "work").exists()

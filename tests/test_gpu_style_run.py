"""bench/gpu_style_run.py: the GPU style-run benchmark checked on the CPU with tiny models, and the
per-stage measurements it reads (flows.style_run.RunBoard.measure, tasks.lineage.write_run_summary)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from PIL import Image

from configs import load_config
from data.make_demo_dataset import palette_fraction
from flows.style_run import RunBoard
from tasks.artifacts import STAGES
from tasks.lineage import write_run_summary

ROOT = Path(__file__).resolve().parent.parent
GPU_FIELDS = ("peak_gib", "peak_reserved_gib", "allocated_before_gib", "allocated_after_gib")


@pytest.fixture(scope="module")
def bench():
    """The script as a module (it imports its neighbour bench/common.py by name)."""
    sys.path.insert(0, str(ROOT / "bench"))
    try:
        import gpu_style_run

        yield gpu_style_run
    finally:
        sys.path.remove(str(ROOT / "bench"))


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory, tiny_models):
    """`python bench/gpu_style_run.py --tiny` end to end: the real CLI, its own Prefect server."""
    tmp = tmp_path_factory.mktemp("gpu-style-run")
    env = {k: v for k, v in os.environ.items() if k != "PREFECT_API_URL"}
    start = time.perf_counter()
    result = subprocess.run(
        [sys.executable, "bench/gpu_style_run.py", "--tiny", "--workdir", str(tmp / "bench"),
         "--out", str(tmp / "report.json")],
        check=False, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert result.returncode == 0, (result.stdout + result.stderr)[-3000:]
    lines = [
        json.loads(line[len("RESULT ") :])
        for line in result.stdout.splitlines()
        if line.startswith("RESULT ")
    ]
    return {"lines": lines, "report": json.loads((tmp / "report.json").read_text()), "root": tmp / "bench",
            "wall": time.perf_counter() - start}  # fmt: skip


def test_tiny_run_reports_every_stage(tiny_run):
    stages = [line for line in tiny_run["lines"] if "stage" in line]
    assert [row["stage"] for row in stages] == list(STAGES)
    cpu_only = not torch.cuda.is_available()
    for row in stages:
        assert row["state"] == "Completed", row
        assert row["wall_s"] > 0, row
        if cpu_only:  # the tiny run is on the CPU; with a GPU present the fields read 0.0
            assert all(row[field] is None for field in (*GPU_FIELDS, "baseline_gib", "back_to_baseline")), row
    total = next(line["total"] for line in tiny_run["lines"] if "total" in line)
    assert total["stages_wall_s"] == pytest.approx(sum(row["wall_s"] for row in stages), abs=0.01)
    assert tiny_run["wall"] > total["cli_wall_s"] > total["stages_wall_s"] > 0
    assert total["all_back_to_baseline"] is True
    assert tiny_run["report"]["stages"] == stages and tiny_run["report"]["total"] == total


def test_tiny_run_trains_and_extrapolates(tiny_run):
    train = next(line["train"] for line in tiny_run["lines"] if "train" in line)
    # 8 images, batch 4, 2 epochs (the tiny defaults); 100 epochs would be 200 updates.
    assert (train["train_rows"], train["steps"], train["samples"]) == (8, 4, 16)
    assert train["target_steps"] == 200
    assert train["samples_per_s"] > 0 and train["step_s"] > 0
    assert train["missing_steps_s"] == pytest.approx(train["step_s"] * 196, rel=0.01, abs=0.1)
    total = tiny_run["report"]["total"]
    assert total["stages_wall_at_100_epochs_s"] == pytest.approx(
        total["stages_wall_s"] + train["missing_steps_s"], abs=0.1
    )


def test_tiny_run_used_the_generated_data_and_config(tiny_run):
    report, root = tiny_run["report"], tiny_run["root"]
    config = load_config(report["config"])
    assert (config.device, config.train.epochs, config.train.batch_size) == ("cpu", 2, 4)
    rows = [json.loads(line) for line in (root / "data-64px-8" / "metadata.jsonl").read_text().splitlines()]
    assert len(rows) == 8 and all(row["text"] for row in rows)
    assert len((root / "prompts-4.jsonl").read_text().splitlines()) == 4
    # The run summary users see holds the same per-stage usage.
    (summary_path,) = Path(report["config"]).parent.glob("work/runs/*/run_summary.json")
    usage = json.loads(summary_path.read_text())["usage"]["stages"]
    assert {name: usage[name]["wall_s"] for name in STAGES} == {
        r["stage"]: r["wall_s"] for r in report["stages"]
    }


def test_full_size_and_small_card_configs_validate(bench, tmp_path):
    models = {"pixart": "/models/PixArt-XL-2-512x512", "llava": "/models/llava-1.5-7b-hf"}
    full = bench.write_config(
        tmp_path / "full.yaml", "full", models, tmp_path / "data", tmp_path / "p.jsonl", 100
    )
    assert (full.device, full.dtype, full.models.pixart, full.train.epochs) == (
        "cuda",
        "bfloat16",
        models["pixart"],
        100,
    )
    assert (full.train.batch_size, full.train.gradient_checkpointing, full.train.compile) == (32, False, True)
    assert (full.evaluate.seeds, full.evaluate.num_inference_steps, full.train.max_steps) == ([0], 20, None)
    assert full.dataset.import_from == str(tmp_path / "data") and not full.dataset.is_remote
    assert not full.results.is_remote
    small = bench.write_config(
        tmp_path / "small.yaml", "small-card", models, tmp_path / "d", tmp_path / "p", 10
    )
    assert (small.recaption.quantization, small.train.use_8bit_adam) == ("4bit", True)
    assert (small.train.batch_size, small.train.gradient_checkpointing, small.train.max_steps) == (
        2,
        True,
        60,
    )
    assert small.evaluate.batch_size < full.evaluate.batch_size


def test_dataset_keeps_the_demo_style_at_512_px(bench, tmp_path):
    folder = bench.make_dataset(tmp_path / "data", 3, 512)
    rows = [json.loads(line) for line in (folder / "metadata.jsonl").read_text().splitlines()]
    assert len(rows) == 3
    for row in rows:
        image = Image.open(folder / row["file_name"])
        assert image.size == (512, 512)
        assert palette_fraction(image, tolerance=0) == 1.0  # only the five flat colours, no blending
    prompts = bench.make_prompts(tmp_path / "prompts.jsonl", 120)
    lines = [json.loads(line) for line in prompts.read_text().splitlines()]
    assert len(lines) == 120 == len({line["prompt"] for line in lines})


def test_measure_records_wall_time_and_gpu_fields():
    with RunBoard.measure() as usage:
        time.sleep(0.05)
    assert usage["wall_s"] >= 0.05
    assert set(usage) == {"wall_s", *GPU_FIELDS}
    if not torch.cuda.is_available():
        assert all(usage[field] is None for field in GPU_FIELDS)


def test_run_summary_gathers_stage_usage(tmp_path):
    usage = {"wall_s": 1.5, **dict.fromkeys(GPU_FIELDS)}
    stages = {"pull": {"rows": 3, "state": "Completed", "usage": usage},
              "push": {"commit_id": "c", "state": "Cached", "usage": {**usage, "wall_s": 0.25}}}  # fmt: skip
    summary = json.loads(write_run_summary(tmp_path, stages, "run-1").read_text())
    assert summary["stages"] == {
        "pull": {"rows": 3, "state": "Completed"},
        "push": {"commit_id": "c", "state": "Cached"},
    }
    assert summary["usage"] == {"stages": {"pull": usage, "push": {**usage, "wall_s": 0.25}}, "wall_s": 1.75}
    plain = json.loads(write_run_summary(tmp_path, {"pull": {"rows": 3}}, "run-1").read_text())
    assert "usage" not in plain and plain["stages"] == {"pull": {"rows": 3}}

"""bench/multi_gpu_train.py --tiny: the multi-GPU training benchmark, proven on the CPU.

Runs a (1 process, batch 4) and c (2 gloo processes, batch 2 each: a's global batch) of the real
script, each an `accelerate launch -m tasks.train` subprocess on the tiny PixArt; run b differs
from c only in its batch size. Plus the pure measures of bench/train_metrics.py.
"""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from tasks.cache import ShardedCache
from tasks.contracts import LATENTS, TEXT_EMBEDDINGS, TRAIN_SET, read_table

ROOT = Path(__file__).resolve().parents[1]
# By path: putting bench/ on sys.path would let its `common` shadow other modules of that name.
_spec = importlib.util.spec_from_file_location("train_metrics", ROOT / "bench" / "train_metrics.py")
train_metrics = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(train_metrics)
compare_losses, throughput = train_metrics.compare_losses, train_metrics.throughput

UPDATES = 6  # 16 rows at a global batch of 4: four updates an epoch, so the log crosses an epoch


@pytest.fixture(scope="module")
def bench(tiny_models, tmp_path_factory) -> dict:
    folder = tmp_path_factory.mktemp("multi_gpu")
    out = folder / "bench.json"
    cmd = [sys.executable, "bench/multi_gpu_train.py", "--tiny", "--runs", "a,c", "--max-steps", str(UPDATES),
           "--out", str(out), "--workdir", str(folder / "work"), "--run-timeout", "240"]  # fmt: skip
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=420, check=False)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    printed = [
        json.loads(line[len("RESULT ") :]) for line in proc.stdout.splitlines() if line.startswith("RESULT ")
    ]
    return {"report": json.loads(out.read_text()), "printed": printed, "work": folder / "work"}


def test_one_and_two_process_runs_train_the_same_updates(bench):
    results = bench["report"]["results"]
    a, c = results["run_a"], results["run_c"]
    assert (a["processes"], a["batch_per_process"], c["processes"], c["batch_per_process"]) == (1, 4, 2, 2)
    assert a["global_batch"] == c["global_batch"] == 4
    assert a["updates"] == c["updates"] == UPDATES
    # Epoch numbers come from each launch's StepPlan: two ranks of batch 2 share 4 updates an epoch
    # with one rank of batch 4; had c started a single process, it would count 8 and stay in epoch 0.
    assert a["epochs"] == c["epochs"] == [0, 0, 0, 0, 1, 1]
    for run in (a, c):
        assert run["timing"] == "train_log elapsed" and run["samples_per_s"] > 0
        assert run["timed_updates"] == UPDATES - 1
    comparison = results["loss_a_vs_c"]
    assert comparison["same_samples"] and comparison["same_epochs"]
    assert len(comparison["losses"]["a"]) == len(comparison["losses"]["c"]) == UPDATES
    assert all(np.isfinite(comparison["losses"]["a"] + comparison["losses"]["c"]))
    assert [r["result"] for r in bench["printed"]] == ["setup", "run_a", "run_c", "loss_a_vs_c"]
    assert (bench["work"] / "train" / "c" / "done.json").is_file()  # both ranks finished; rank 0 saved


def test_synthetic_train_set_is_in_the_embed_caches(bench):
    work = bench["work"]
    rows = read_table(next((work / "runs").glob("*/train_set.parquet")), TRAIN_SET).to_pylist()
    assert len(rows) == 16 and len({r["image_id"] for r in rows}) == 16
    texts = ShardedCache(work / "cache" / "text", TEXT_EMBEDDINGS).read([r["text_key"] for r in rows])
    latents = ShardedCache(work / "cache" / "latents", LATENTS).read([r["latent_key"] for r in rows])
    assert set(texts.column("dtype").to_pylist()) == set(latents.column("dtype").to_pylist()) == {"bfloat16"}
    assert all(9 <= n <= 16 for n in texts.column("length").to_pylist())  # 58-100 % of max_length 16
    shapes = set(zip(*(latents.column(k).to_pylist() for k in ("channels", "height", "width")), strict=True))
    assert shapes == {(4, 8, 8)}
    assert (next((work / "runs").iterdir()) / "train_view" / "view.json").is_file()


def test_throughput_counts_updates_after_warmup_from_elapsed_or_arrivals():
    records = [{"step": s, "elapsed": e} for s, e in [(1, 20.0), (2, 21.0), (3, 21.5), (4, 22.0)]]
    measured = throughput(records, {}, global_batch=8, warmup=1)
    assert measured["samples_per_s"] == pytest.approx(3 * 8 / 2.0) and measured["warmup_s"] == 20.0
    bare = [{"step": r["step"]} for r in records]
    arrivals = {1: 100.0, 2: 101.0, 3: 101.5, 4: 102.0}
    assert throughput(bare, arrivals, 8, 1)["samples_per_s"] == measured["samples_per_s"]
    with pytest.raises(ValueError, match="too few"):
        throughput(records[:2], {}, 8, 1)


def test_loss_comparison_tells_noise_from_a_shift():
    rng = np.random.default_rng(0)
    trend = 1.0 + 0.5 * np.exp(-np.arange(60) / 15)
    first, second = trend + rng.normal(0, 0.1, 60), trend + rng.normal(0, 0.1, 60)
    same = compare_losses({"a": first.tolist(), "c": second.tolist()}, window=10)
    assert same["same_within_noise"] and same["sigma_single_update"] == pytest.approx(0.1, rel=0.25)
    shifted = compare_losses({"a": first.tolist(), "c": (second + 0.15).tolist()}, window=10)
    assert not shifted["same_within_noise"] and shifted["offset_z"] < -3
    assert len(shifted["moving_average"]["a"]) == 60 - 10 + 1


def test_log_arrivals_note_each_complete_record_once(tmp_path):
    log = tmp_path / "train_log.jsonl"
    arrivals = train_metrics.LogArrivals(log)
    arrivals.poll()  # no log yet
    log.write_text('{"step": 1}\n{"step": 2')  # the second record half written
    arrivals.poll()
    assert list(arrivals.seen) == [1]
    with open(log, "a") as handle:
        handle.write(', "loss": 1.0}\n')
    arrivals.poll()
    first = dict(arrivals.seen)
    assert list(first) == [1, 2] and first[1] <= first[2]
    log.write_text('{"step": 1}\n')  # rewritten shorter (a resumed run): read again from its start
    arrivals.poll()
    assert arrivals.seen == first  # a step keeps the time it first appeared

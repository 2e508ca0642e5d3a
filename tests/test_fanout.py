"""Distributed re-captioning and embedding (flows/fanout.py, tasks/shards.py): real local Dask clusters
of two worker processes, tiny models on CPU, the real recaption and style-run flows under a real
Prefect server, compared with a single-process style run."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import dask
import numpy as np
import pyarrow as pa
import pytest

from configs import (
    ConfigError,
    DatasetConfig,
    DistributedConfig,
    EmbedConfig,
    EvaluateConfig,
    ModelsConfig,
    RecaptionConfig,
    RunConfig,
    TrainConfig,
    parse_config,
)
from flows import fanout
from tasks import contracts
from tasks.cache import ShardedCache
from tasks.pull import pull_dataset
from tasks.shards import split_rows
from tasks.workdir import WorkDir
from tests.forking import fork_context

DEMO = Path(__file__).resolve().parent.parent / "data" / "demo"
IMAGES = 6
PROMPT_TEXTS = 7  # the six demo evaluation prompts, styled, and the empty text
TENSORS = {"embedding", "mean", "std"}  # cache columns of raw float32 bytes


def _config(repo: Path, engine: str) -> RunConfig:
    return RunConfig(
        run_name="fanout", device="cpu", dtype="float32", dataset=DatasetConfig(repo=str(repo)),
        models=ModelsConfig(pixart="tiny:pixart", llava="tiny:llava"),
        recaption=RecaptionConfig(batch_size=2, max_new_tokens=6), embed=EmbedConfig(resolution=64, batch_size=2),
        train=TrainConfig(rank=4, batch_size=2, max_steps=2, checkpointing_steps=2, lr_scheduler="constant"),
        evaluate=EvaluateConfig(prompts_file="data/demo_eval_prompts.jsonl", num_inference_steps=2,
                                sampler="ddim", batch_size=12),
        distributed=DistributedConfig(engine=engine, workers=2),
    )  # fmt: skip


@pytest.fixture(scope="module")
def forked_workers():
    """Dask workers forked from the tests' forkserver, which imports torch, transformers and diffusers
    once: on 2 cores, two spawned workers importing them each take longer than the shards' work."""
    from multiprocessing import forkserver

    fork_context()  # the preload list
    forkserver.ensure_running()
    with dask.config.set({"distributed.worker.multiprocessing-method": "forkserver"}):
        yield


@pytest.fixture(scope="module")
def runs(tmp_path_factory, prefect_server, tiny_models, forked_workers) -> dict:
    """A single-process style run; then, in another work dir, the recaption job and the style run
    with engine dask (captions fanned out by the first, embeddings by the second), and the style
    run again. Every fan_out's shards are recorded as the flows get them."""
    from flows import recaption, style_run

    root = tmp_path_factory.mktemp("fanout")
    source = root / "source"
    (source / "images").mkdir(parents=True)
    rows = [json.loads(line) for line in (DEMO / "metadata.jsonl").read_text().splitlines()][:IMAGES]
    for row in rows:
        shutil.copy(DEMO / row["file_name"], source / row["file_name"])
    (source / "metadata.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    repo = root / "dataset"
    pull_dataset(DatasetConfig(repo=str(repo), import_from=str(source)), WorkDir(root / "import"))

    shards: list[list[dict]] = []

    def recorded(*args, **kwargs) -> list[dict]:
        shards.append(fanout.fan_out(*args, **kwargs))
        return shards[-1]

    single, fanned = str(root / "single"), str(root / "fanned")
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(style_run, "fan_out", recorded)
        patch.setattr(recaption, "fan_out", recorded)
        results = {
            "single": style_run.style_run(config=_config(repo, "none"), workdir=single),
            "recaption": recaption.recaption_flow(config=_config(repo, "dask"), workdir=fanned),
            "fanned": style_run.style_run(config=_config(repo, "dask"), workdir=fanned),
            "again": style_run.style_run(config=_config(repo, "dask"), workdir=fanned),
        }
    assert len(shards) == len(results), "each flow calls fan_out once, before its recaption stage"
    return {**results, "shards": dict(zip(results, shards, strict=True)), "root": root}


def _summary(run: dict) -> dict:
    return json.loads(Path(run["summary"]).read_text())["stages"]


def _cache_rows(folder: Path, schema: pa.Schema) -> dict[str, list[dict]]:
    """key -> its rows in a cache folder: two shards that met one text (tiny LLaVA repeats captions)
    both store it."""
    rows: dict[str, list[dict]] = {}
    for shard in ShardedCache(folder, schema).shards():
        for row in contracts.read_table(shard, schema).to_pylist():
            rows.setdefault(row["key"], []).append(row)
    return rows


def _assert_same_value(row: dict, expected: dict, where: str) -> None:
    assert {c: v for c, v in row.items() if c not in TENSORS} == {
        c: v for c, v in expected.items() if c not in TENSORS
    }, where
    # Tensors to float32 rounding: a worker's batches hold other rows, and its torch other threads,
    # than the single process's (captions, greedy tokens, are exact).
    for column in TENSORS & row.keys():
        np.testing.assert_allclose(
            np.frombuffer(row[column], dtype=row["dtype"]), np.frombuffer(expected[column], dtype=row["dtype"]),
            rtol=1e-5, atol=1e-5, err_msg=f"{where} {column}",
        )  # fmt: skip


def test_shards_run_on_two_worker_processes(runs):
    for flow, done in (("recaption", runs["shards"]["recaption"]), ("style run", runs["shards"]["fanned"])):
        assert sorted(s["shard"] for s in done) == [0, 1], flow
        assert sorted(s["rows"] for s in done) == [IMAGES // 2, IMAGES // 2], flow
        assert len({s["worker"] for s in done}) == 2, flow
        pids = {s["pid"] for s in done}
        assert len(pids) == 2 and os.getpid() not in pids, flow  # two worker processes, not this one
        assert all(s["device"] == "cpu" for s in done), flow
    captioning, embedding = runs["shards"]["recaption"], runs["shards"]["fanned"]
    assert sum(s["captions"] for s in captioning) == IMAGES and sum(s["latents"] for s in captioning) == 0
    assert sum(s["captions"] for s in embedding) == 0  # the recaption job's fan-out cached them all
    assert sum(s["latents"] for s in embedding) == IMAGES
    texts = {s["shard"]: s["texts"] for s in embedding}
    assert texts[0] >= PROMPT_TEXTS + 1 and texts[1] >= 1  # the prompts ride with shard 0


def test_the_stages_after_a_fan_out_compute_nothing(runs):
    assert runs["shards"]["single"] == [] and _summary(runs["single"])["recaption"]["generated"] == IMAGES
    assert runs["recaption"]["recaption"]["generated"] == 0 and runs["recaption"]["captions"]["committed"]
    stages = _summary(runs["fanned"])
    assert stages["recaption"]["generated"] == 0
    assert (stages["embed"]["texts_computed"], stages["embed"]["latents_computed"]) == (0, 0)
    assert runs["fanned"]["run_id"] == runs["single"]["run_id"]  # where work runs is not in the run id
    single = _summary(runs["single"])
    for stage, name, schema in (("recaption", "captions", contracts.CAPTIONS),
                                ("embed", "train_set", contracts.TRAIN_SET),
                                ("embed", "prompt_set", contracts.PROMPT_SET)):  # fmt: skip
        tables = [contracts.read_table(Path(s[stage][name]), schema) for s in (single, stages)]
        assert tables[1].equals(tables[0]), name


def test_caches_hold_the_single_process_values(runs):
    root = runs["root"]
    for cache, schema in (("captions", contracts.CAPTION_CACHE), ("text", contracts.TEXT_EMBEDDINGS),
                          ("latents", contracts.LATENTS)):  # fmt: skip
        single = _cache_rows(root / "single" / "cache" / cache, schema)
        fanned = _cache_rows(root / "fanned" / "cache" / cache, schema)
        assert single and set(fanned) == set(single), cache
        for key, (expected,) in single.items():
            for row in fanned[key]:
                _assert_same_value(row, expected, f"{cache} {key}")


def test_a_rerun_with_everything_cached_starts_no_cluster(runs):
    assert runs["shards"]["again"] == []
    assert set(runs["again"]["states"].values()) == {"Cached"}


def test_rows_split_evenly_and_the_settings_are_checked():
    assert split_rows(list(range(7)), 3) == [[0, 1, 2], [3, 4], [5, 6]]
    assert split_rows([4, 9], 8) == [[4], [9]] and split_rows([], 2) == []
    with pytest.raises(ConfigError, match="distributed: .*engine: dask"):
        parse_config({"dataset": {"repo": "x"}, "distributed": {"address": "tcp://127.0.0.1:8786"}})
    with pytest.raises(ConfigError, match="distributed.workers"):
        parse_config({"dataset": {"repo": "x"}, "distributed": {"engine": "dask", "workers": 0}})
    base = parse_config({"dataset": {"repo": "x"}})
    fanned = parse_config({"dataset": {"repo": "x"}, "distributed": {"engine": "dask", "workers": 8}})
    assert fanned.fingerprint() == base.fingerprint()  # where work runs never changes the run id

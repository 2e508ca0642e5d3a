"""Reproducibility: the same config, seed and inputs on CPU give bit-identical outputs.

Two shortened demo runs of the stage functions, wired as flows/style_run.py wires them: one in
this process, one in a fresh interpreter with another PYTHONHASHSEED (so no set or dict order can
hide), each in its own work dir with its own Oxen import. Captions, every cache row, the train and
prompt sets, the training log, the adapter files and every evaluation image must match byte for
byte. Only what names the run's time or place may differ: Oxen commit ids (they hash the commit
time), hence run ids, and absolute paths. Both use one torch thread, as the tests do.

`run_stages` and `baseline` are shared with tests/test_kills.py.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pyarrow as pa
import pytest

from configs import CONFIG_DIR, RunConfig, load_config
from tasks import contracts
from tasks.workdir import WorkDir

ROOT = Path(__file__).resolve().parent.parent
# Fields of results.jsonl that name the run's time or place, not its content.
RUN_FIELDS = {"run_id", "dataset_commit", "lora_path", "created_at", "code_version", "dataset_repo"}


def short_demo() -> RunConfig:
    """The demo, shortened: several batches per stage (so a kill can land between cache shards),
    20 training steps with a checkpoint every 10, 4 sampling steps."""
    config = load_config(CONFIG_DIR / "demo.yaml")
    config.recaption.batch_size = 4
    config.embed.batch_size = 4
    config.train.max_steps, config.train.checkpointing_steps = 20, 10
    config.evaluate.num_inference_steps = 4
    return config


def run_stages(config: RunConfig, workdir: Path) -> dict:
    """pull -> recaption -> embed -> train -> evaluate -> push through each Prefect task's function,
    exactly as flows/style_run.py passes paths between them (without the server and its caching)."""
    from prefect.logging import disable_run_logger

    from tasks.embed import embed_task
    from tasks.evaluate import evaluate_task
    from tasks.lineage import build_lineage, make_run_id, write_run_files, write_run_summary
    from tasks.pull import pull_task
    from tasks.push import push_task
    from tasks.recaption import recaption_task
    from tasks.train import train_task

    wd = str(Path(workdir).resolve())
    with disable_run_logger():
        pulled = pull_task.fn(config, wd)
        run_id = make_run_id(config, pulled["commit_id"])
        run_dir = str(Path(wd) / "runs" / run_id)
        captions = recaption_task.fn(pulled["manifest"], config, wd, run_dir)
        embedded = embed_task.fn(pulled["manifest"], captions["captions"], config, wd, run_dir)
        caches = embedded["text_cache"], embedded["latent_cache"]
        trained = train_task.fn(embedded["train_set"], *caches, config, wd)
        lineage = build_lineage(config, run_id, pulled["commit_id"], trained["adapter_dir"])
        evaluated = evaluate_task.fn(
            embedded["prompt_set"], embedded["train_set"], *caches, embedded["empty_text_key"],
            trained["adapter_dir"], config, wd, lineage,
        )  # fmt: skip
        extra = {name: str(path) for name, path in write_run_files(config, Path(run_dir), lineage).items()}
        extra["train_log.jsonl"] = str(Path(trained["output_dir"]) / "train_log.jsonl")
        pushed = push_task.fn(config, wd, run_id, evaluated["eval_dir"], trained["adapter_dir"], extra)
    stages = {"pull": pulled, "recaption": captions, "embed": embedded, "train": trained,
              "evaluate": evaluated, "push": pushed}  # fmt: skip
    write_run_summary(Path(run_dir), stages, run_id)
    return {"run_id": run_id, "run_dir": run_dir, "workdir": wd, **stages}


_RUNS: dict[str, dict] = {}


def baseline(tmp_path_factory) -> dict:
    """One uninterrupted short demo per test session (tests/test_kills.py compares with it too)."""
    if "baseline" not in _RUNS:
        _RUNS["baseline"] = run_stages(short_demo(), tmp_path_factory.mktemp("baseline"))
    return _RUNS["baseline"]


# --- What is compared ----------------------------------------------------------------------------


def cache_rows(folder: Path, schema: pa.Schema) -> dict[str, dict]:
    """key -> row of every valid shard in a cache folder; a key in two shards must hold one value."""
    rows: dict[str, dict] = {}
    for shard in sorted(Path(folder).glob("shard-*.parquet")):
        for row in contracts.read_table(shard, schema).to_pylist():
            assert rows.setdefault(row["key"], row) == row, (
                f"{shard}: key {row['key']} differs between shards"
            )
    return rows


def file_bytes(folder: Path, pattern: str) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(Path(folder).glob(pattern))}


def outputs(run: dict) -> dict:
    """Everything a run computed, in comparable form (no paths, no commit ids, no clocks)."""
    wd = WorkDir(Path(run["workdir"]))
    manifest = contracts.read_table(Path(run["pull"]["manifest"]), contracts.MANIFEST)
    train_dir = Path(run["train"]["output_dir"])
    eval_dir = Path(run["evaluate"]["eval_dir"])
    results = [json.loads(line) for line in (eval_dir / "results.jsonl").read_text().splitlines()]
    return {
        "manifest": manifest.drop_columns(["image_path", "source_repo", "source_commit"]).to_pylist(),
        "captions": contracts.read_table(Path(run["recaption"]["captions"]), contracts.CAPTIONS).to_pylist(),
        "caption cache": cache_rows(wd.captions_cache, contracts.CAPTION_CACHE),
        "text cache": cache_rows(wd.text_cache, contracts.TEXT_EMBEDDINGS),
        "latent cache": cache_rows(wd.latent_cache, contracts.LATENTS),
        "train set": contracts.read_table(Path(run["embed"]["train_set"]), contracts.TRAIN_SET).to_pylist(),
        "prompt set": contracts.read_table(
            Path(run["embed"]["prompt_set"]), contracts.PROMPT_SET
        ).to_pylist(),
        # Every field but `elapsed`, the wall clock of each step.
        "train log": [
            {k: v for k, v in json.loads(line).items() if k != "elapsed"}
            for line in (train_dir / "train_log.jsonl").read_text().splitlines()
        ],
        "adapter": file_bytes(train_dir / "adapter", "*"),
        "images": file_bytes(eval_dir, "**/*.png"),
        "metrics": (eval_dir / "metrics.json").read_bytes(),
        "results": [{k: v for k, v in row.items() if k not in RUN_FIELDS} for row in results],
    }


# --- The test ------------------------------------------------------------------------------------

SECOND_RUN = """
import sys, json
sys.path[:0] = [{root!r}, {tests!r}]
import torch
torch.set_num_threads(1)
from pathlib import Path
from test_reproducibility import run_stages, short_demo
run = run_stages(short_demo(), Path({workdir!r}))
print(json.dumps(run, default=str))
"""


@pytest.fixture(scope="module")
def two_runs(tmp_path_factory, tiny_models) -> tuple[dict, dict]:
    first = baseline(tmp_path_factory)
    workdir = tmp_path_factory.mktemp("second")
    script = SECOND_RUN.format(root=str(ROOT), tests=str(ROOT / "tests"), workdir=str(workdir))
    env = dict(os.environ, PYTHONHASHSEED="12345", OMP_NUM_THREADS="1")
    done = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(script)], cwd=ROOT, env=env, capture_output=True, text=True,
        timeout=400, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    second = json.loads(done.stdout.strip().splitlines()[-1])
    return first, second


@pytest.fixture(scope="module")
def compared(two_runs) -> tuple[dict, dict]:
    return outputs(two_runs[0]), outputs(two_runs[1])


def test_runs_are_separate(two_runs):
    first, second = two_runs
    assert first["workdir"] != second["workdir"]
    assert first["pull"]["commit_id"] != second["pull"]["commit_id"]  # two imports, two commits
    assert first["recaption"]["generated"] == second["recaption"]["generated"] == 32  # nothing shared


@pytest.mark.parametrize(
    "part",
    ["manifest", "captions", "caption cache", "text cache", "latent cache", "train set", "prompt set",
     "train log", "adapter", "images", "metrics", "results"],
)  # fmt: skip
def test_bit_identical(compared, part):
    first, second = (found[part] for found in compared)
    assert first, f"{part}: nothing to compare"
    if isinstance(first, dict):
        assert sorted(first) == sorted(second), part
        different = [name for name in first if first[name] != second[name]]
        assert not different, f"{part}: {len(different)} of {len(first)} differ, e.g. {different[:3]}"
    assert first == second, part


def test_adapter_and_images_are_not_trivially_equal(compared):
    """The comparison means something: training moved the adapter and the LoRA images differ from base."""
    found = compared[0]
    assert len(found["images"]) >= 12 and len(found["adapter"]) == 3
    base = {k: v for k, v in found["images"].items() if k.startswith("images/base/")}
    lora = {
        k.replace("/lora/", "/base/"): v for k, v in found["images"].items() if k.startswith("images/lora/")
    }
    assert base.keys() == lora.keys() and any(base[k] != lora[k] for k in base)
    log = found["train log"]
    assert [r["step"] for r in log] == list(range(1, 21))

"""A full disk, concurrent runs and Oxen's own lock: nothing corrupts, nothing crashes.

Disk full: a cache write that runs out of space fails with the OS's ENOSPC error, leaves no temp
file filling the disk, and every shard written before stays valid; freeing space and running again
completes the cache. Tested on a real 1 MiB tmpfs when the tests may mount one (root), and always
by a write that raises ENOSPC half-way.

Concurrency: two processes pulling the same dataset into the same work dir (both importing the
demo at once), embedding into the same caches and run dir, or pushing to the same results repo,
all finish with the same, valid outputs. A foreign process holding Oxen's own repo lock is waited
for, then reported by name, instead of crashing the run.

The Oxen host unreachable or answering 500 is tests/test_push.py's (issue 6):
test_failed_uploads_are_retried_in_a_fresh_workspace and
test_host_down_fails_naming_host_and_repo_and_keeps_the_local_copy.
"""

from __future__ import annotations

import errno
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import oxen
import pyarrow as pa
import pytest
import torch
from prefect.logging import disable_run_logger
from test_reproducibility import cache_rows, short_demo

from tasks import contracts
from tasks.cache import ShardedCache
from tasks.cached_dataset import CachedTrainView
from tasks.embed import embed_texts
from tasks.oxen_repos import OxenError, _checkout, commit_to_branch, repo_lock
from tasks.pull import pull_task
from tasks.recaption import recaption_task
from tasks.workdir import WorkDir
from tests.forking import fork_context

CPU, F32 = torch.device("cpu"), torch.float32


def in_parallel(target, *calls: tuple, timeout_s: float = 240.0) -> list[int | None]:
    """Start target(*args) for every args tuple at once, each in its own process; their exit codes."""
    context = fork_context()
    processes = [context.Process(target=target, args=args) for args in calls]
    for process in processes:
        process.start()
    deadline = time.monotonic() + timeout_s
    for process in processes:
        process.join(max(0.0, deadline - time.monotonic()))
        if process.exitcode is None:
            process.kill()
            process.join()
    return [process.exitcode for process in processes]


def one_thread() -> None:
    torch.set_num_threads(1)


def save_json(path: str, data: dict) -> None:
    Path(path).write_text(json.dumps(data, default=str))


# --- Disk full ---------------------------------------------------------------------------------


@pytest.fixture
def small_disk(tmp_path):
    """A 1 MiB tmpfs (needs root), unmounted afterwards."""
    mount = tmp_path / "disk"
    mount.mkdir()
    command = ["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mount)]
    done = subprocess.run(command, capture_output=True, check=False)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({done.stderr.decode().strip()}); the ENOSPC test covers it")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


def fill(folder: Path, leave_bytes: int) -> Path:
    stat = os.statvfs(folder)
    filler = folder / "filler"
    filler.write_bytes(b"\0" * max(0, stat.f_bavail * stat.f_frsize - leave_bytes))
    return filler


def texts(prefix: str, n: int) -> list[str]:
    return [
        f"{prefix} {i}: a flat {['red', 'teal', 'mustard'][i % 3]} shape outlined in black" for i in range(n)
    ]


def test_disk_full_during_a_cache_write_keeps_the_previous_cache(small_disk, tiny_models):
    """The text cache on a real full disk: the write fails with ENOSPC, earlier shards stay valid."""
    models, settings = short_demo().models, short_demo().embed
    cache_dir = small_disk / "cache" / "text"
    first = embed_texts(texts("first", 8), models, settings, cache_dir, CPU, F32)
    before = cache_rows(cache_dir, contracts.TEXT_EMBEDDINGS)
    filler = fill(small_disk, leave_bytes=4096)

    with pytest.raises(OSError) as raised:
        embed_texts(texts("second", 40), models, settings, cache_dir, CPU, F32)
    assert raised.value.errno == errno.ENOSPC or "No space left" in str(raised.value), raised.value
    assert cache_rows(cache_dir, contracts.TEXT_EMBEDDINGS) == before  # every earlier row, unchanged
    assert [p.name for p in cache_dir.iterdir() if not p.name.startswith("shard-")] == []  # no temp file
    cache = ShardedCache(cache_dir, contracts.TEXT_EMBEDDINGS)
    assert cache.missing(first) == []

    filler.unlink()
    second = embed_texts(texts("second", 40), models, settings, cache_dir, CPU, F32)
    assert cache.missing(first + second) == []
    assert all(
        before[k] == v for k, v in cache_rows(cache_dir, contracts.TEXT_EMBEDDINGS).items() if k in before
    )


def test_a_write_cut_short_by_enospc_leaves_no_shard_and_no_temp_file(tmp_path, monkeypatch):
    """The same without a mount: the parquet write puts half a file on disk, then fails."""
    schema = contracts.CAPTION_CACHE
    cache = ShardedCache(tmp_path / "captions", schema)
    rows = [{"key": f"k{i}", "image_id": f"i{i}", "model_id": "m", "prompt": "p", "generated_caption": "c" * 50,
             "flagged": False} for i in range(6)]  # fmt: skip
    cache.write(pa.Table.from_pylist(rows[:3], schema=schema))
    real = contracts.pq.write_table

    def disk_fills_up(table, where, **kwargs):
        real(table, where, **kwargs)
        data = Path(where).read_bytes()
        Path(where).write_bytes(data[: len(data) // 2])
        raise OSError(errno.ENOSPC, "No space left on device", str(where))

    monkeypatch.setattr(contracts.pq, "write_table", disk_fills_up)
    with pytest.raises(OSError, match="No space left"):
        cache.write(pa.Table.from_pylist(rows[3:], schema=schema))
    monkeypatch.undo()
    assert sorted(p.name for p in cache.folder.iterdir()) == [s.name for s in cache.shards()]  # no temp file
    assert sorted(cache.keys()) == ["k0", "k1", "k2"] and cache.read(["k0", "k2"]).num_rows == 2
    cache.write(pa.Table.from_pylist(rows[3:], schema=schema))
    assert cache.missing([r["key"] for r in rows]) == []


# --- Concurrent runs -----------------------------------------------------------------------------


def pull_child(workdir: str, out: str) -> None:
    one_thread()
    with disable_run_logger():
        save_json(out, pull_task.fn(short_demo(), workdir))


def test_two_first_pulls_at_once_share_one_import(tmp_path, tiny_models):
    work = tmp_path / "work"
    outs = [str(tmp_path / f"pull-{i}.json") for i in range(2)]
    assert in_parallel(pull_child, (str(work), outs[0]), (str(work), outs[1])) == [0, 0]
    first, second = (json.loads(Path(out).read_text()) for out in outs)
    assert first["commit_id"] == second["commit_id"] and first["rows"] == second["rows"] == 32
    manifest = contracts.read_table(Path(first["manifest"]), contracts.MANIFEST)
    assert manifest.equals(contracts.read_table(Path(second["manifest"]), contracts.MANIFEST))
    repo_path = WorkDir(work).resolve(short_demo().dataset.repo)
    assert [c.message for c in oxen.Repo(str(repo_path)).log()] == ["Import dataset from data/demo"]
    assert not [p for p in repo_path.parent.iterdir() if p.name.startswith(".")]  # no staging folder left
    stored = sorted(p.name for p in WorkDir(work).images.iterdir())
    assert len(stored) == 32 and not [name for name in stored if ".tmp" in name]


def embed_child(workdir: str, manifest: str, captions: str, run_dir: str, out: str) -> None:
    from tasks.embed import embed_task

    one_thread()
    with disable_run_logger():
        save_json(out, embed_task.fn(manifest, captions, short_demo(), workdir, run_dir))


def test_two_embeds_into_the_same_caches_and_run_dir(tmp_path, tiny_models):
    config, work = short_demo(), str(tmp_path / "work")
    with disable_run_logger():
        pulled = pull_task.fn(config, work)
        run_dir = str(Path(work) / "runs" / "same-run")
        captions = recaption_task.fn(pulled["manifest"], config, work, run_dir)
    outs = [str(tmp_path / f"embed-{i}.json") for i in range(2)]
    calls = [(work, pulled["manifest"], captions["captions"], run_dir, out) for out in outs]
    assert in_parallel(embed_child, *calls) == [0, 0]
    results = [json.loads(Path(out).read_text()) for out in outs]
    assert results[0]["train_set"] == results[1]["train_set"]
    train_set = contracts.read_table(Path(results[0]["train_set"]), contracts.TRAIN_SET)
    assert train_set.num_rows == 32
    wd = WorkDir(Path(work))
    texts_cached = cache_rows(wd.text_cache, contracts.TEXT_EMBEDDINGS)  # one value per key, all shards valid
    latents_cached = cache_rows(wd.latent_cache, contracts.LATENTS)
    assert set(train_set.column("text_key").to_pylist()) <= texts_cached.keys()
    assert (
        set(train_set.column("latent_key").to_pylist()) <= latents_cached.keys() and len(latents_cached) == 32
    )
    assert not list(Path(work, "cache").rglob("*.corrupt"))
    view = CachedTrainView(results[0]["train_view"])
    assert len(view) == 32


def push_child(repo: str, run: str, files: dict) -> None:
    commit_to_branch(Path(repo), f"runs/{run}", {k: Path(v) for k, v in files.items()}, f"Style run {run}")


def test_concurrent_pushes_to_one_results_repo(tmp_path):
    """Two pushes of run a and one of run b at once (the repo created by whichever comes first)."""
    files = {}
    for run in ("a", "b"):
        files[run] = {}
        for name in ("results.jsonl", "images/lora/000.png", f"images/lora/{run}.png"):
            path = tmp_path / run / name
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(f"{run}: {name}\n")
            files[run][name] = str(path)
    repo = tmp_path / "results"
    calls = [(str(repo), "a", files["a"]), (str(repo), "a", files["a"]), (str(repo), "b", files["b"])]
    assert in_parallel(push_child, *calls, timeout_s=120) == [0, 0, 0]
    handle = oxen.Repo(str(repo))
    assert handle.current_branch.name == "main"
    for run in ("a", "b"):
        _checkout(handle, f"runs/{run}")
        assert [c.message for c in handle.log()] == [f"Style run {run}", "Initialise results repository"]
        found = sorted(
            str(p.relative_to(repo)) for p in repo.rglob("*") if p.is_file() and ".oxen" not in p.parts
        )
        assert found == sorted(["README.md", *files[run]]), found
        assert (repo / "images/lora/000.png").read_text() == f"{run}: images/lora/000.png\n"
    _checkout(handle, "main")


HOLD_OXEN_LOCK = """
import fcntl, sys, time
handle = open(sys.argv[1], "r+")
fcntl.lockf(handle, fcntl.LOCK_EX)  # what RocksDB does while Oxen has the repo open
print("held", flush=True)
time.sleep(float(sys.argv[2]))
"""


def hold_oxen_lock(repo_path: Path, seconds: float) -> subprocess.Popen:
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLD_OXEN_LOCK, str(repo_path / ".oxen" / "refs" / "LOCK"), str(seconds)],
        stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    assert holder.stdout.readline().strip() == "held"
    return holder


def test_oxen_lock_held_by_another_process_is_waited_for_then_named(tmp_path, tiny_models):
    """Oxen keeps a repo's database open until its process exits, so a second process (a second
    run) finds it locked. Pulls run in child processes here: pytest itself must not hold the repo."""
    work, out = str(tmp_path / "work"), str(tmp_path / "pull.json")
    assert in_parallel(pull_child, (work, out)) == [0]  # imports the demo repo
    first = json.loads(Path(out).read_text())
    repo_path = WorkDir(Path(work)).resolve(short_demo().dataset.repo)
    holder = hold_oxen_lock(repo_path, 1.0)
    with pytest.raises(ValueError, match="LOCK"):  # what a run crashed on before it waited
        oxen.Repo(str(repo_path)).branches()
    holder.wait()

    holder = hold_oxen_lock(repo_path, 2.0)
    started = time.monotonic()
    assert in_parallel(pull_child, (work, out)) == [0]
    assert time.monotonic() - started > 1.5 and holder.poll() is not None  # it waited for the holder
    again = json.loads(Path(out).read_text())
    assert again["commit_id"] == first["commit_id"] and again["rows"] == 32

    holder = hold_oxen_lock(repo_path, 30)
    try:
        with (
            pytest.raises(OxenError, match=r"another Oxen process keeps the repo locked"),
            repo_lock(repo_path, 0.5),
        ):
            pass
    finally:
        holder.kill()
        holder.wait()

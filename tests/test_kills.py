"""Kills: SIGKILL inside every stage, then run again; nothing is lost, duplicated or half-written.

One work dir goes through the shortened demo (tests/test_reproducibility.py's run_stages) again and
again. Each test forks a child that runs the pipeline and sends itself SIGKILL at a chosen point of
one stage: between cache shards, in the middle of writing a shard, between training steps, while
saving a checkpoint, while writing evaluation images, while copying into and right after
committing to the results repo. The child re-runs everything before that point, so each kill also
checks that the stages before it recover from the previous kill. After every kill no visible cache
entry is invalid; at the end an ordinary run completes and its outputs are bit-identical to an
uninterrupted run's (tests/test_reproducibility.py's baseline), every row exactly once, and the
results repo holds exactly one commit for the run.
"""

from __future__ import annotations

import json
import os
import signal
from collections.abc import Callable
from pathlib import Path

import oxen
import pytest
from test_reproducibility import baseline, cache_rows, outputs, run_stages, short_demo

from tasks import contracts
from tasks.oxen_repos import _checkout, commit_to_branch  # _checkout: plain oxen checkouts mix branches
from tasks.push import commit_message
from tasks.workdir import WorkDir
from tests.forking import fork_context

CACHES = {
    "captions": contracts.CAPTION_CACHE,
    "text": contracts.TEXT_EMBEDDINGS,
    "latents": contracts.LATENTS,
}
KILLS: list[str] = []  # the kill points survived, for the README's figures


def die() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


def on_call(target, name: str, number: int, before: bool = True, when: Callable[..., bool] | None = None):
    """Replace target.name with a wrapper that SIGKILLs the process at its `number`-th matching
    call, before or after the real call runs. For the child process only."""
    real = getattr(target, name)
    count = [0]

    def wrapper(*args, **kwargs):
        matched = when is None or when(*args, **kwargs)
        count[0] += matched
        if matched and count[0] == number and before:
            die()
        result = real(*args, **kwargs)
        if matched and count[0] == number and not before:
            die()
        return result

    setattr(target, name, wrapper)


def write_half_then_die(real_write: Callable) -> Callable:
    """pyarrow's write_table, except that a latent shard gets half its bytes, then SIGKILL."""

    def write(table, where, **kwargs) -> None:
        real_write(table, where, **kwargs)
        if "/cache/latents/" in str(where):
            data = Path(where).read_bytes()
            Path(where).write_bytes(data[: len(data) // 2])
            die()

    return write


def arm(kill: str, workdir: Path) -> None:
    """Set the kill point named `kill` (one per test below) in this (child) process."""
    import shutil

    import tasks.contracts
    import tasks.embed
    import tasks.evaluate
    import tasks.pull
    import tasks.recaption
    import tasks.train

    if kill == "pull":
        on_call(tasks.pull, "store_image", 10)
    elif kill == "recaption":
        on_call(tasks.recaption, "caption_batch", 6)  # the 4th batch wrote a shard
    elif kill == "embed":
        on_call(tasks.embed, "_encode_image_batch", 6)
    elif kill == "shard-write":
        tasks.contracts.pq.write_table = write_half_then_die(tasks.contracts.pq.write_table)
    elif kill == "train-step":
        on_call(tasks.train, "_update", 13)  # checkpoint-10 is saved, steps 11 and 12 are lost
    elif kill == "checkpoint":
        on_call(tasks.train, "save_file", 1, before=False)  # lora.safetensors written, state.pt not
    elif kill == "evaluate":
        on_call(tasks.evaluate, "save_png", 5)
    elif kill == "push-copy":
        repo = str(results_repo_path(workdir))
        on_call(shutil, "copyfile", 20, when=lambda src, dst, **kw: str(dst).startswith(repo))
    elif kill == "push-commit":
        on_call(oxen.Repo, "commit", 1, before=False)
    else:
        raise ValueError(kill)


def child(workdir: str, kill: str) -> None:
    import torch

    torch.set_num_threads(1)
    arm(kill, Path(workdir))
    run_stages(short_demo(), Path(workdir))


def killed_child(workdir: Path, kill: str, timeout_s: float = 240.0) -> None:
    """Run the pipeline in a child with kill point `kill`; it must die of SIGKILL, not finish or fail."""
    context = fork_context()
    process = context.Process(target=child, args=(str(workdir), kill))
    process.start()
    process.join(timeout_s)
    if process.exitcode is None:
        process.kill()
        process.join()
        pytest.fail(f"the child ran past {timeout_s} s")
    assert process.exitcode == -signal.SIGKILL, (
        f"the child was not killed at {kill!r} (exit code {process.exitcode}; 1 means a stage raised: "
        "see the captured stderr)"
    )


def results_repo_path(workdir: Path) -> Path:
    return WorkDir(Path(workdir)).resolve(short_demo().results.repo)


def assert_no_half_written_entry(workdir: Path) -> None:
    """Every visible cache shard and contract file reads back whole; no shard was set aside."""
    root = Path(workdir)
    for name, schema in CACHES.items():
        folder = root / "cache" / name
        assert not list(folder.glob("*.corrupt")), f"{folder}: a shard failed its checks"
        for shard in folder.glob("shard-*.parquet"):
            contracts.read_table(shard, schema)
    for manifest in root.glob("cache/manifests/*/manifest.parquet"):
        contracts.read_table(manifest, contracts.MANIFEST)
    for checkpoint in root.glob("cache/train/*/checkpoints/checkpoint-*"):
        assert {p.name for p in checkpoint.iterdir()} == {"lora.safetensors", "state.pt"}, checkpoint


@pytest.fixture(scope="module")
def workdir(tmp_path_factory, tiny_models) -> Path:
    return tmp_path_factory.mktemp("killed")


def test_kill_during_pull(workdir):
    killed_child(workdir, "pull")
    assert_no_half_written_entry(workdir)
    KILLS.append("pull: between images")


def test_kill_during_recaption_between_shards(workdir):
    killed_child(workdir, "recaption")
    assert_no_half_written_entry(workdir)
    # The first shard: 4 batches of 4, less the captions still waiting for a full batch of retries
    # (fewer than one batch; they are generated again by the re-run).
    cached = len(cache_rows(Path(workdir) / "cache" / "captions", contracts.CAPTION_CACHE))
    assert 16 - 4 < cached <= 16
    KILLS.append("recaption: between cache shards")


def test_kill_during_embed_between_shards(workdir):
    killed_child(workdir, "embed")
    assert_no_half_written_entry(workdir)
    KILLS.append("embed: between latent batches")


def test_kill_while_writing_a_cache_shard(workdir):
    """SIGKILL with half of a shard's bytes on disk: only a temp file is left, never a shard."""
    killed_child(workdir, "shard-write")
    assert_no_half_written_entry(workdir)
    leftovers = list((Path(workdir) / "cache" / "latents").glob(".shard-*.tmp"))
    assert leftovers, "the kill should have left the half-written temp file"
    KILLS.append("embed: in the middle of writing a cache shard")


def test_kill_between_training_steps(workdir):
    killed_child(workdir, "train-step")
    assert_no_half_written_entry(workdir)
    (train_dir,) = (Path(workdir) / "cache" / "train").iterdir()
    assert sorted(p.name for p in (train_dir / "checkpoints").iterdir()) == ["checkpoint-10"]
    assert not (train_dir / "done.json").exists()
    KILLS.append("train: between steps")


def test_kill_while_saving_a_checkpoint(workdir):
    killed_child(workdir, "checkpoint")
    assert_no_half_written_entry(workdir)
    (train_dir,) = (Path(workdir) / "cache" / "train").iterdir()
    assert list(train_dir.glob("checkpoints/.checkpoint-20.tmp-*")), "the half-saved checkpoint folder"
    KILLS.append("train: while saving a checkpoint")


def test_kill_while_writing_evaluation_images(workdir):
    killed_child(workdir, "evaluate")
    assert_no_half_written_entry(workdir)
    (eval_dir,) = (Path(workdir) / "cache" / "eval").iterdir()
    # Killed on the 5th PNG write; the 4 before it run in other threads and may not all be done.
    assert not (eval_dir / "done.json").exists() and len(list(eval_dir.rglob("*.png"))) <= 4
    KILLS.append("evaluate: while writing images")


def test_kill_while_copying_into_the_results_repo(workdir):
    killed_child(workdir, "push-copy")
    KILLS.append("push: while copying files into the results repo")


def test_kill_right_after_the_results_commit(workdir):
    killed_child(workdir, "push-commit")
    KILLS.append("push: after the commit, before the branch switch back")


@pytest.fixture(scope="module")
def final(workdir) -> dict:
    """The re-run after every kill above: an ordinary run in this process."""
    return run_stages(short_demo(), workdir)


def test_the_rerun_completes_with_every_row_once(final, workdir):
    manifest = contracts.read_table(Path(final["pull"]["manifest"]), contracts.MANIFEST)
    captions = contracts.read_table(Path(final["recaption"]["captions"]), contracts.CAPTIONS)
    train_set = contracts.read_table(Path(final["embed"]["train_set"]), contracts.TRAIN_SET)
    for table in (manifest, captions, train_set):
        ids = table.column("image_id").to_pylist()
        assert len(ids) == len(set(ids)) == 32
    for name, schema in CACHES.items():
        shards = list((Path(workdir) / "cache" / name).glob("shard-*.parquet"))
        total = sum(contracts.read_table(shard, schema).num_rows for shard in shards)
        assert total == len(cache_rows(Path(workdir) / "cache" / name, schema)), (
            f"{name}: a row is in two shards"
        )
    log = [
        json.loads(line)
        for line in (Path(final["train"]["output_dir"]) / "train_log.jsonl").read_text().splitlines()
    ]
    assert [r["step"] for r in log] == list(range(1, 21))
    assert final["train"]["resumed_from"] == 10
    results = [json.loads(line) for line in Path(final["evaluate"]["results_path"]).read_text().splitlines()]
    keys = [(r["prompt"], r["model"], r["seed"]) for r in results]
    prompts = contracts.read_table(Path(final["embed"]["prompt_set"]), contracts.PROMPT_SET).num_rows
    assert len(keys) == len(set(keys)) == prompts * 2 * len(short_demo().evaluate.seeds)  # base and LoRA
    assert_no_half_written_entry(workdir)


def test_the_rerun_matches_an_uninterrupted_run(final, tmp_path_factory):
    killed, clean = outputs(final), outputs(baseline(tmp_path_factory))
    for part in clean:
        assert killed[part] == clean[part], part


def test_the_results_repo_has_exactly_one_commit_for_the_run(final, workdir):
    repo = oxen.Repo(str(results_repo_path(workdir)))
    pushed = final["push"]
    assert repo.current_branch.name == "main"
    _checkout(repo, pushed["branch"])
    try:
        messages = [commit.message for commit in repo.log()]
        assert messages.count(commit_message(final["run_id"])) == 1, messages
        assert repo.log()[0].id == pushed["commit_id"]
    finally:
        _checkout(repo, "main")


def push_child(repo: str, files: dict) -> None:
    """Commit run A's files to the results repo, killed at the second file copied into it."""
    import shutil

    on_call(shutil, "copyfile", 2, when=lambda src, dst, **kw: str(dst).startswith(repo))
    commit_to_branch(Path(repo), "runs/a", {k: Path(v) for k, v in files.items()}, "Style run a")


def test_a_push_killed_mid_copy_leaks_nothing_into_the_next_run(tmp_path):
    files = {}
    for name in ("results.jsonl", "images/lora/000.png", "images/lora/001.png"):
        files[name] = tmp_path / "run-a" / name
        files[name].parent.mkdir(parents=True, exist_ok=True)
        files[name].write_text(f"run a: {name}\n")
    repo = tmp_path / "results"
    context = fork_context()
    process = context.Process(target=push_child, args=(str(repo), {k: str(v) for k, v in files.items()}))
    process.start()
    process.join(120)
    assert process.exitcode == -signal.SIGKILL, process.exitcode
    assert (repo / "images/lora/000.png").is_file()  # left behind, uncommitted, on runs/a

    other = tmp_path / "run-b.txt"
    other.write_text("run b\n")
    commit_to_branch(repo, "runs/b", {"results.jsonl": other, "images/lora/000.png": other}, "Style run b")
    again = commit_to_branch(repo, "runs/a", files, "Style run a")
    handle = oxen.Repo(str(repo))
    assert handle.current_branch.name == "main"
    assert sorted(p.name for p in repo.iterdir() if p.name != ".oxen") == ["README.md"]
    _checkout(handle, "runs/b")
    try:
        assert sorted(
            str(p.relative_to(repo)) for p in repo.rglob("*") if ".oxen" not in p.parts and p.is_file()
        ) == ["README.md", "images/lora/000.png", "results.jsonl"]  # fmt: skip  (no 001.png of run a)
        assert (repo / "images/lora/000.png").read_text() == "run b\n"
        _checkout(handle, "runs/a")
        assert [c.message for c in handle.log()] == ["Style run a", "Initialise results repository"]
        assert (
            handle.log()[0].id == again
            and (repo / "images/lora/001.png").read_text() == "run a: images/lora/001.png\n"
        )
    finally:
        _checkout(handle, "main")
    KILLS.append("push: mid-copy, then another run's push")


def test_kill_points_survived(capsys):
    """The figures the README quotes; the rows-lost checks are the tests above."""
    with capsys.disabled():
        print(f"\n{len(KILLS)} kill points survived, 0 rows lost: " + "; ".join(KILLS))
    assert len(KILLS) == 10

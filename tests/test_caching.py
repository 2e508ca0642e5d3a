"""Stage cache keys (flows/caching.py): each hashes what its stage depends on, and nothing else.

The end-to-end check (a second run all Cached, a train-only change rerunning train/evaluate/push)
runs through the served deployment in tests/test_serve.py."""

from __future__ import annotations

from pathlib import Path

import oxen

from configs import CONFIG_DIR, load_config
from flows.caching import missing_files, stage_key
from tasks.embed import embed_task
from tasks.pull import pull_task
from tasks.recaption import recaption_task

DEMO = Path(__file__).resolve().parent.parent / "data" / "demo"


def _inputs(tmp_path: Path) -> dict:
    (tmp_path / "manifest.parquet").write_bytes(b"manifest bytes")
    (tmp_path / "captions.parquet").write_bytes(b"caption bytes")
    return {
        "manifest_path": str(tmp_path / "manifest.parquet"),
        "captions_path": str(tmp_path / "captions.parquet"),
        "config": load_config(CONFIG_DIR / "demo.yaml"),
        "workdir": str(tmp_path / "work"),
        "run_dir": str(tmp_path / "work" / "runs" / "one"),
    }


def test_train_settings_do_not_touch_the_caption_and_embedding_keys(tmp_path: Path):
    params = _inputs(tmp_path)
    recaption, embed = (
        stage_key("recaption", recaption_task.fn, params),
        stage_key("embed", embed_task.fn, params),
    )
    assert recaption.startswith("recaption-") and embed.startswith("embed-")

    changed = params | {"config": params["config"].model_copy(deep=True), "run_dir": "/elsewhere"}
    changed["config"].train.learning_rate = 5e-4
    changed["config"].results.branch_prefix = "other/"
    assert stage_key("recaption", recaption_task.fn, changed) == recaption
    assert stage_key("embed", embed_task.fn, changed) == embed

    changed["config"].recaption.max_new_tokens = 40
    assert stage_key("recaption", recaption_task.fn, changed) != recaption
    assert stage_key("embed", embed_task.fn, changed) == embed  # embed reads the captions file instead

    Path(params["captions_path"]).write_bytes(b"other captions")
    assert stage_key("embed", embed_task.fn, params) != embed
    assert stage_key("recaption", recaption_task.fn, params | {"workdir": str(tmp_path / "w2")}) != recaption


def test_pull_key_follows_the_branch_to_its_newest_commit(tmp_path: Path):
    config = load_config(CONFIG_DIR / "demo.yaml")
    config.dataset.import_from = str(DEMO)
    params = {"config": config, "workdir": str(tmp_path)}
    first = stage_key("pull", pull_task.fn, params)  # imports the demo folder on first use
    repo_path = tmp_path / config.dataset.repo
    assert (repo_path / ".oxen").is_dir()
    assert stage_key("pull", pull_task.fn, params) == first

    (repo_path / "extra.txt").write_text("a new file on main\n")
    repo = oxen.Repo(str(repo_path))
    repo.add(str(repo_path / "extra.txt"))
    commit = repo.commit("add a file").id
    assert stage_key("pull", pull_task.fn, params) != first

    config.dataset.revision = commit  # a commit id is its own head
    pinned = stage_key("pull", pull_task.fn, params)
    assert pinned != first and pinned == stage_key("pull", pull_task.fn, params)


def test_missing_files_names_deleted_outputs(tmp_path: Path):
    kept = tmp_path / "kept.parquet"
    kept.write_bytes(b"x")
    result = {"a": str(kept), "b": str(tmp_path / "gone.parquet"), "grids": [str(tmp_path / "g.png")],
              "rows": 3, "repo": "namespace/name"}  # fmt: skip
    assert missing_files(result) == [str(tmp_path / "gone.parquet"), str(tmp_path / "g.png")]

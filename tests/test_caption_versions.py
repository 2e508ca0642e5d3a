"""Versioned captions (tasks/caption_versions.py): the captions branch of a real local Oxen repo,
and training selecting it through pull."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import oxen
import pyarrow as pa
import pytest

from configs import ConfigError, DatasetConfig, ModelsConfig, RecaptionConfig, RunConfig, parse_config
from tasks.caption_versions import caption_rows, commit_captions, encode_metadata
from tasks.contracts import CAPTIONS, MANIFEST, read_table
from tasks.lineage import prompt_hash
from tasks.oxen_repos import OxenError, _checkout, import_folder
from tasks.pull import pull_dataset, read_metadata
from tasks.workdir import WorkDir

DEMO = Path(__file__).resolve().parent.parent / "data" / "demo"
DEMO_ROWS = [json.loads(line) for line in (DEMO / "metadata.jsonl").read_text().splitlines()]
BRANCH = "captions/tiny-llava"
UPLOADS = "uploads/2026-11"  # oxen 0.65 mixes branches in a nested folder under a new one


def _write_dataset(folder: Path, rows: list[dict]) -> None:
    (folder / "images").mkdir(parents=True, exist_ok=True)
    for row in rows:
        shutil.copy(DEMO / row["file_name"], folder / row["file_name"])
    (folder / "metadata.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))


def _commit_all(repo_path: Path, message: str) -> str:
    repo = oxen.Repo(str(repo_path))
    repo.add(str(repo_path / "images"))
    repo.add(str(repo_path / "metadata.jsonl"))
    return repo.commit(message).id


@pytest.fixture
def dataset_repo(tmp_path: Path) -> Path:
    """Five demo images with an extra `license` column the captions branch must keep."""
    source = tmp_path / "source"
    _write_dataset(source, [row | {"license": "CC0"} for row in DEMO_ROWS[:5]])
    import_folder(source, tmp_path / "dataset", "Import five demo images")
    return tmp_path / "dataset"


def _config(repo: Path, **recaption) -> RunConfig:
    return RunConfig(
        device="cpu", dtype="float32", dataset=DatasetConfig(repo=str(repo)),
        models=ModelsConfig(llava="tiny:llava"), recaption=RecaptionConfig(**recaption),
    )  # fmt: skip


def _fake_captions(manifest: pa.Table, flagged_names: tuple[str, ...] = ()) -> pa.Table:
    """A CAPTIONS table as the recaption stage writes it, without running a model."""
    rows = []
    for row in manifest.to_pylist():
        flagged = row["file_name"] in flagged_names
        generated = (
            "loop loop loop loop" if flagged else f"a detailed flat-style drawing of {row['file_name']}"
        )
        rows.append({
            "image_id": row["image_id"], "original_caption": row["original_caption"], "generated_caption": generated,
            "caption": row["original_caption"] if flagged else generated, "model_id": "tiny:llava",
            "prompt": "p", "flagged": flagged,
        })  # fmt: skip
    return pa.Table.from_pylist(rows, schema=CAPTIONS)


def _pull_and_commit(config: RunConfig, work: WorkDir, flagged_names: tuple[str, ...] = ()):
    pulled = pull_dataset(config.dataset, work)
    manifest = read_table(pulled.manifest_path, MANIFEST)
    captions = _fake_captions(manifest, flagged_names)
    committed = commit_captions(config, work, manifest, captions, pulled.commit_id, work.root / "run")
    return pulled, captions, committed


# ----------------------------------------------------------------------------- config


def test_branch_names_follow_the_template():
    assert RecaptionConfig().branch("llava-hf/llava-1.5-7b-hf") == "captions/llava-1.5-7b-hf"
    assert RecaptionConfig().branch("tiny:llava") == BRANCH
    assert RecaptionConfig().branch("/models/my llava/") == "captions/my-llava"
    assert RecaptionConfig(branch_template="llava/{model_name}/v2").branch("a/b") == "llava/b/v2"
    for bad in ("captions/{model}", "captions/{model_name}/", "../{model_name}", "a b/{model_name}", "{0}"):
        with pytest.raises(ValueError, match="branch_template"):
            RecaptionConfig(branch_template=bad)


def test_schedule_must_be_a_five_field_cron():
    assert RecaptionConfig(schedule="0 3 * * *").schedule == "0 3 * * *"
    assert RecaptionConfig(schedule="*/15 * * * MON-FRI").schedule == "*/15 * * * MON-FRI"
    assert RecaptionConfig().schedule is None
    for bad in ("61 * * * *", "0 3 * *", "@daily", "every night"):
        with pytest.raises(ValueError, match="schedule"):
            RecaptionConfig(schedule=bad)


def test_caption_column_and_quantization_are_checked_against_the_run():
    base = {"device": "cpu", "dataset": {"repo": "x"}}
    with pytest.raises(ConfigError, match="caption_column_out must differ"):
        parse_config(base | {"recaption": {"caption_column_out": "text"}})
    # Training from the captions branch (README): the same column is fine once re-captioning is off.
    selected = {"repo": "x", "revision": BRANCH, "caption_column": "llava_caption"}
    assert (
        parse_config(base | {"dataset": selected, "recaption": {"enabled": False}}).dataset.revision == BRANCH
    )
    with pytest.raises(ConfigError, match="recaption.caption_column_out"):
        parse_config(base | {"recaption": {"caption_column_out": "file_name"}})
    with pytest.raises(ConfigError, match="recaption.quantization needs a CUDA device"):
        parse_config(base | {"recaption": {"quantization": "4bit"}})
    assert (
        parse_config(base | {"device": "cuda", "recaption": {"quantization": "8bit"}}).recaption.quantization
        == "8bit"
    )
    with pytest.raises(ConfigError, match="recaption.quantization"):
        parse_config(base | {"recaption": {"quantization": "2bit"}})


# ----------------------------------------------------------------------------- metadata rows


def test_caption_rows_keep_original_columns_and_leave_out_skipped_rows():
    metadata = [
        {"_row": 1, "file_name": "images/a.png", "text": "a", "license": "CC0"},
        {"_row": 2, "file_name": "images/broken.png", "text": "skipped by pull"},
        {
            "_row": 3,
            "file_name": "images\\b.png",
            "text": "b",
            "license": "CC-BY",
        },  # pull normalises the path
        {"_row": 4, "file_name": "images/a.png", "text": "duplicate, ignored by pull"},
    ]
    manifest = pa.Table.from_pylist([
        {"image_id": "ia", "file_name": "images/a.png", "image_path": "x", "width": 1, "height": 1,
         "original_caption": "a", "source_repo": "r", "source_commit": "c"},
        {"image_id": "ib", "file_name": "images/b.png", "image_path": "y", "width": 1, "height": 1,
         "original_caption": "b", "source_repo": "r", "source_commit": "c"},
    ], schema=MANIFEST)  # fmt: skip
    captions = _fake_captions(manifest, flagged_names=("images/b.png",))
    rows = caption_rows(metadata, manifest, captions, "llava_caption")
    assert rows == [
        {"file_name": "images/a.png", "text": "a", "license": "CC0",
         "llava_caption": "a detailed flat-style drawing of images/a.png", "llava_caption_flagged": False},
        {"file_name": "images\\b.png", "text": "b", "license": "CC-BY",
         "llava_caption": "b", "llava_caption_flagged": True},  # flagged: the original caption, marked
    ]  # fmt: skip
    with pytest.raises(ValueError, match="not in the metadata file, e.g. images/b.png"):
        caption_rows(metadata[:1], manifest, captions, "llava_caption")


@pytest.mark.parametrize("metadata_file", ["metadata.jsonl", "metadata.csv", "metadata.parquet"])
def test_metadata_is_written_in_the_datasets_own_format(metadata_file):
    rows = [
        {"file_name": "images/a.png", "text": "a, with comma", "llava_caption": 'a "quoted" caption',
         "llava_caption_flagged": False},
        {"file_name": "images/b.png", "text": "b", "llava_caption": "ünïcode ✓", "llava_caption_flagged": True},
    ]  # fmt: skip
    read_back, problems = read_metadata(encode_metadata(rows, metadata_file), metadata_file)
    assert problems == []
    assert [{k: v for k, v in row.items() if k != "_row"} for row in read_back] == rows


# ----------------------------------------------------------------------------- the captions branch


def test_captions_branch_is_committed_once_and_training_selects_it(dataset_repo: Path, tmp_path: Path):
    config = _config(dataset_repo)
    work = WorkDir(tmp_path / "work")
    main_head = oxen.Repo(str(dataset_repo)).log()[0].id
    pulled, captions, first = _pull_and_commit(config, work, flagged_names=("images/0002_teal_star.png",))
    assert (first.branch, first.committed, first.rows, first.flagged) == (BRANCH, True, 5, 1)

    repo = oxen.Repo(str(dataset_repo))
    assert repo.current_branch.name == "main" and repo.log()[0].id == main_head  # main is untouched
    assert "llava_caption" not in (dataset_repo / "metadata.jsonl").read_text()
    assert oxen.Repo(str(dataset_repo)).status().modified_files() == []
    branch_log = _log(dataset_repo, BRANCH)
    assert [c.id for c in branch_log[:2]] == [
        first.commit_id,
        main_head,
    ]  # branched from the captioned commit
    message = branch_log[0].message
    assert "tiny:llava" in message and prompt_hash(config.recaption.prompt_template) in message
    assert "5 images (1 flagged)" in message and pulled.commit_id in message

    again = commit_captions(
        config,
        work,
        read_table(pulled.manifest_path, MANIFEST),
        captions,
        pulled.commit_id,
        work.root / "run",
    )
    assert (again.committed, again.commit_id) == (False, first.commit_id)
    assert len(_log(dataset_repo, BRANCH)) == len(branch_log)

    # Training reads the captions with two settings, through the ordinary pull.
    selected = DatasetConfig(repo=str(dataset_repo), revision=BRANCH, caption_column="llava_caption")
    trained_on = pull_dataset(selected, WorkDir(tmp_path / "train-work"))
    manifest = read_table(trained_on.manifest_path, MANIFEST)
    assert (trained_on.commit_id, trained_on.rows, trained_on.skipped) == (first.commit_id, 5, 0)
    assert manifest.column("original_caption").to_pylist() == captions.column("caption").to_pylist()
    assert manifest.column("image_id").to_pylist() == captions.column("image_id").to_pylist()
    committed_rows = [json.loads(line) for line in first.metadata_path.read_text().splitlines()]
    assert {row["license"] for row in committed_rows} == {"CC0"}
    assert [row["llava_caption_flagged"] for row in committed_rows] == [False, True, False, False, False]


def test_new_dataset_images_reach_the_captions_branch_in_one_commit(dataset_repo: Path, tmp_path: Path):
    config = _config(dataset_repo, caption_column_out="style_caption", branch_template="styles/{model_name}")
    work = WorkDir(tmp_path / "work")
    _, _, first = _pull_and_commit(config, work)
    assert first.branch == "styles/tiny-llava"

    _write_dataset(dataset_repo, [row | {"license": "CC0"} for row in DEMO_ROWS[:8]])
    _commit_all(dataset_repo, "Add three images")
    _, captions, second = _pull_and_commit(config, work)
    assert (second.committed, second.rows) == (True, 8)
    assert [c.id for c in _log(dataset_repo, "styles/tiny-llava")[:2]] == [second.commit_id, first.commit_id]

    selected = DatasetConfig(
        repo=str(dataset_repo), revision="styles/tiny-llava", caption_column="style_caption"
    )
    trained_on = pull_dataset(selected, WorkDir(tmp_path / "train-work"))
    assert (trained_on.rows, trained_on.skipped) == (8, 0)  # the three new images are on the branch too
    assert (
        read_table(trained_on.manifest_path, MANIFEST).column("original_caption").to_pylist()
        == captions.column("caption").to_pylist()
    )


def _add_batch(repo_path: Path, rows: list[dict], folder: str, message: str) -> list[dict]:
    """Commit demo images under `folder`/ with their metadata rows appended; returns the new rows."""
    added = [row | {"file_name": f"{folder}/{Path(row['file_name']).name}"} for row in rows]
    for row, new in zip(rows, added, strict=True):
        (repo_path / new["file_name"]).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(DEMO / row["file_name"], repo_path / new["file_name"])
    metadata = repo_path / "metadata.jsonl"
    metadata.write_text(metadata.read_text() + "".join(json.dumps(row) + "\n" for row in added))
    repo = oxen.Repo(str(repo_path))
    repo.add(str(repo_path / Path(folder).parts[0]))
    repo.add(str(metadata))
    repo.commit(message)
    return added


def _tree(repo_path: Path) -> dict[str, bytes]:
    return {
        str(path.relative_to(repo_path)): path.read_bytes()
        for path in repo_path.rglob("*")
        if path.is_file() and ".oxen" not in path.relative_to(repo_path).parts
    }


def test_captions_of_another_branch_leave_the_checkout_exactly_as_it_was(dataset_repo: Path, tmp_path: Path):
    """The job follows branch `incoming` while the repo is on main, and since they forked both
    branches added images to one new nested folder (UPLOADS). A plain oxen 0.65 checkout back to
    main leaves incoming's images in it; the update must leave main's files and the user's
    untracked files exactly as they were."""
    repo = oxen.Repo(str(dataset_repo))
    repo.checkout("incoming", create=True)
    incoming = _add_batch(dataset_repo, DEMO_ROWS[5:7], UPLOADS, "Two new images on incoming")
    _checkout(repo, "main")
    _add_batch(dataset_repo, DEMO_ROWS[7:8], UPLOADS, "Another new image on main")
    (dataset_repo / "notes.txt").write_text("the user's own, never committed\n")
    (dataset_repo / UPLOADS / "wip.png").write_bytes(b"an image the user is still working on")
    untracked = frozenset({Path("notes.txt"), Path(UPLOADS) / "wip.png"})
    main_tree = _tree(dataset_repo)

    config = RunConfig(
        device="cpu", dtype="float32", dataset=DatasetConfig(repo=str(dataset_repo), revision="incoming"),
        models=ModelsConfig(llava="tiny:llava"),
    )  # fmt: skip
    _, _, committed = _pull_and_commit(config, WorkDir(tmp_path / "work"))
    assert (committed.committed, committed.rows) == (True, 7)
    assert repo.current_branch.name == "main"
    assert _tree(dataset_repo) == main_tree  # no file of the captions branch left behind

    _checkout(repo, BRANCH, keep=untracked)
    try:
        on_branch = _tree(dataset_repo)
    finally:
        _checkout(repo, "main", keep=untracked)
    expected = {row["file_name"] for row in [*DEMO_ROWS[:5], *incoming]}
    assert set(on_branch) == expected | {"metadata.jsonl"} | {str(p) for p in untracked}
    assert on_branch["metadata.jsonl"] == committed.metadata_path.read_bytes()
    assert _tree(dataset_repo) == main_tree


def test_uncommitted_changes_and_remote_repos_are_refused(dataset_repo: Path, tmp_path: Path):
    config = _config(dataset_repo)
    work = WorkDir(tmp_path / "work")
    pulled = pull_dataset(config.dataset, work)
    manifest = read_table(pulled.manifest_path, MANIFEST)
    (dataset_repo / "metadata.jsonl").write_text("edited by hand\n")
    with pytest.raises(OxenError, match="uncommitted changes"):
        commit_captions(config, work, manifest, _fake_captions(manifest), pulled.commit_id, tmp_path / "run")
    assert not oxen.Repo(str(dataset_repo)).branch_exists(BRANCH)

    remote = config.model_copy(update={"dataset": DatasetConfig(repo="ox/lego", host="hub.oxen.ai")})
    with pytest.raises(OxenError, match="https://hub.oxen.ai/ox/lego: committing captions to a remote"):
        commit_captions(remote, work, manifest, _fake_captions(manifest), pulled.commit_id, tmp_path / "run")


def _log(repo_path: Path, branch: str) -> list:
    repo = oxen.Repo(str(repo_path))
    original = repo.current_branch.name
    repo.checkout(branch)
    try:
        return repo.log()
    finally:
        repo.checkout(original)

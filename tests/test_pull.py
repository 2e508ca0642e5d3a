"""Pull stage and Oxen round trips on real local Oxen repos."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import oxen
import pytest

from configs import DatasetConfig
from tasks.contracts import MANIFEST, read_table
from tasks.oxen_repos import OxenError, commit_to_branch, import_folder
from tasks.pull import DatasetError, pull_dataset, safe_relative_path
from tasks.workdir import WorkDir

DEMO = Path(__file__).resolve().parent.parent / "data" / "demo"


def _commit_all(repo_path: Path, message: str) -> str:
    repo = oxen.Repo(str(repo_path))
    for entry in repo_path.iterdir():
        if entry.name != ".oxen":
            repo.add(str(entry))
    return repo.commit(message).id


@pytest.fixture
def dataset_repo(tmp_path: Path) -> Path:
    repo_path = tmp_path / "dataset"
    import_folder(DEMO, repo_path, "import demo")
    return repo_path


def test_demo_import_and_pull(tmp_path: Path):
    cfg = DatasetConfig(repo="oxen/ds", import_from=str(DEMO))
    result = pull_dataset(cfg, WorkDir(tmp_path))
    manifest = read_table(result.manifest_path, MANIFEST)
    assert manifest.num_rows == 32 and result.skipped == 0
    row = manifest.to_pylist()[0]
    assert (row["width"], row["height"]) == (64, 64)
    assert Path(row["image_path"]).name.startswith(row["image_id"])
    assert row["source_commit"] == oxen.Repo(str(tmp_path / "oxen/ds")).log()[0].id
    # A second pull reads the existing repo (no re-import) and gives the same manifest.
    again = pull_dataset(cfg, WorkDir(tmp_path))
    assert again.commit_id == result.commit_id
    assert read_table(again.manifest_path, MANIFEST).equals(manifest)


def test_pull_at_older_revision_returns_older_data(dataset_repo: Path, tmp_path: Path):
    first = oxen.Repo(str(dataset_repo)).log()[0].id
    lines = (dataset_repo / "metadata.jsonl").read_text().splitlines()
    edited = json.loads(lines[0]) | {"text": "an edited caption"}
    (dataset_repo / "metadata.jsonl").write_text("\n".join([json.dumps(edited)] + lines[1:4]) + "\n")
    second = _commit_all(dataset_repo, "keep four rows, edit one caption")

    work = WorkDir(tmp_path / "work")
    old = pull_dataset(DatasetConfig(repo=str(dataset_repo), revision=first), work)
    new = pull_dataset(DatasetConfig(repo=str(dataset_repo), revision="main"), work)
    assert (old.commit_id, old.rows) == (first, 32)
    assert (new.commit_id, new.rows) == (second, 4)
    old_captions = read_table(old.manifest_path, MANIFEST).column("original_caption").to_pylist()
    new_captions = read_table(new.manifest_path, MANIFEST).column("original_caption").to_pylist()
    assert "an edited caption" not in old_captions and new_captions[0] == "an edited caption"
    # Reading the old commit left HEAD's files in the working tree.
    assert len((dataset_repo / "metadata.jsonl").read_text().splitlines()) == 4
    assert oxen.Repo(str(dataset_repo)).status().modified_files() == []


def test_bad_rows_are_reported_and_skipped(dataset_repo: Path, tmp_path: Path):
    images = dataset_repo / "images"
    (images / "empty.png").write_bytes(b"")
    (images / "notes.png").write_text("this is not an image")
    shutil.copy(images / "0001_mustard_star.png", images / "truncated.png")
    data = (images / "truncated.png").read_bytes()
    (images / "truncated.png").write_bytes(data[: len(data) // 2])
    good = json.loads((dataset_repo / "metadata.jsonl").read_text().splitlines()[0])
    rows = [
        json.dumps(good),
        json.dumps({"file_name": "images/missing.png", "text": "gone"}),
        json.dumps({"file_name": "images/0002_teal_star.png", "text": "   "}),
        json.dumps({"file_name": "images/0003_mustard_heart.png"}),
        json.dumps({"file_name": "../outside.png", "text": "escape"}),
        json.dumps({"file_name": "/etc/passwd", "text": "absolute"}),
        "{not json",
        json.dumps({"file_name": good["file_name"], "text": "duplicate name"}),
        json.dumps({"file_name": "images/empty.png", "text": "zero bytes"}),
        json.dumps({"file_name": "images/notes.png", "text": "text file"}),
        json.dumps({"file_name": "images/truncated.png", "text": "half a png"}),
        json.dumps({"file_name": "images/0004_mustard_circle.png", "text": "fine"}),
    ]
    (dataset_repo / "metadata.jsonl").write_text("\n".join(rows) + "\n")
    _commit_all(dataset_repo, "bad rows")
    result = pull_dataset(DatasetConfig(repo=str(dataset_repo)), WorkDir(tmp_path / "work"))
    assert result.rows == 2
    report = [json.loads(line) for line in result.report_path.read_text().splitlines()]
    problems = {(r["row"], r["problem"].split(":")[0]) for r in report}
    assert len(report) == 10
    assert (2, "image file is missing") in problems
    assert (5, "path escapes the dataset") in problems and (6, "path escapes the dataset") in problems
    assert (7, "malformed JSON") in problems
    assert (8, "duplicate file_name") in problems
    assert {r["row"] for r in report if r["problem"].startswith("image does not decode")} == {9, 10, 11}


def test_unusable_datasets_fail_naming_what(dataset_repo: Path, tmp_path: Path):
    work = WorkDir(tmp_path / "work")
    with pytest.raises(DatasetError, match="caption column 'caption' not found; columns: .*'text'"):
        pull_dataset(DatasetConfig(repo=str(dataset_repo), caption_column="caption"), work)
    with pytest.raises(OxenError, match=r"revision 'no-such-branch' does not exist"):
        pull_dataset(DatasetConfig(repo=str(dataset_repo), revision="no-such-branch"), work)
    with pytest.raises(DatasetError, match="no metadata.csv"):
        pull_dataset(DatasetConfig(repo=str(dataset_repo), metadata_file="metadata.csv"), work)
    with pytest.raises(DatasetError, match="does not exist"):
        pull_dataset(DatasetConfig(repo=str(tmp_path / "nowhere")), work)


def test_safe_relative_path():
    assert safe_relative_path("images/a.png") == "images/a.png"
    for bad in ("../a.png", "/abs.png", "a/../../b.png", "~/x.png", "", None, 3):
        with pytest.raises(ValueError):
            safe_relative_path(bad)


def test_commit_to_branch_is_one_commit_per_run(tmp_path: Path):
    payload = tmp_path / "results.jsonl"
    payload.write_text('{"model": "lora"}\n')
    repo_path = tmp_path / "results"
    first = commit_to_branch(repo_path, "runs/r1", {"results.jsonl": payload, "images/a.txt": payload}, "Run r1")
    again = commit_to_branch(repo_path, "runs/r1", {"results.jsonl": payload}, "Run r1")
    assert first == again
    repo = oxen.Repo(str(repo_path))
    assert repo.current_branch.name == "main"
    repo.checkout("runs/r1")
    assert (repo_path / "images" / "a.txt").read_text() == '{"model": "lora"}\n'
    assert [c.message for c in repo.log()][:1] == ["Run r1"]


def test_reading_an_older_commit_keeps_an_untracked_file_in_its_place(dataset_repo: Path):
    """The older commit has a file that HEAD lacks, and the user keeps an untracked file there."""
    from tasks.oxen_repos import open_revision

    name = "images/0001_mustard_star.png"
    original = (dataset_repo / name).read_bytes()
    first = oxen.Repo(str(dataset_repo)).log()[0].id
    repo = oxen.Repo(str(dataset_repo))
    (dataset_repo / name).unlink()
    repo.rm(name)
    repo.commit("drop one image")
    (dataset_repo / name).write_bytes(b"the user's own file")
    cfg = DatasetConfig(repo=str(dataset_repo), revision=first)
    with open_revision(cfg, first, dataset_repo) as revision:
        assert revision.read_bytes(name) == original
        assert revision.read_bytes("metadata.jsonl")  # a tracked file, the same at both commits
    assert (dataset_repo / name).read_bytes() == b"the user's own file"
    assert oxen.Repo(str(dataset_repo)).status().modified_files() == []


def test_a_read_killed_midway_is_put_back_by_the_next_reader(dataset_repo: Path):
    from tasks.oxen_repos import open_revision

    name = "images/0001_mustard_star.png"
    head = (dataset_repo / name).read_bytes()
    first = oxen.Repo(str(dataset_repo)).log()[0].id
    # What a SIGKILL between the restore and the rename back leaves: HEAD's file set aside and
    # another version in its place.
    (dataset_repo / name).rename(dataset_repo / "images" / ".0001_mustard_star.png.pixart-aside")
    (dataset_repo / name).write_bytes(b"an older version")
    with open_revision(DatasetConfig(repo=str(dataset_repo), revision=first), first, dataset_repo):
        pass  # refused as 'uncommitted changes' without the put-back
    assert (dataset_repo / name).read_bytes() == head
    assert not list(dataset_repo.rglob("*.pixart-aside"))

"""Reading a dataset from a remote Oxen host at a revision, through the loopback hub double."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from configs import DatasetConfig
from tasks import oxen_repos
from tasks.contracts import MANIFEST, read_table
from tasks.pull import pull_dataset
from tasks.workdir import WorkDir
from tests.oxen_hub_double import OxenHubDouble, content_hash

DEMO = Path(__file__).resolve().parent.parent / "data" / "demo"
DATASET = "pixart/demo-shapes"


@pytest.fixture(scope="module")
def hub(tmp_path_factory):
    """The demo dataset as commit 1; commit 2 keeps four rows and edits a caption."""
    with OxenHubDouble(tmp_path_factory.mktemp("hub")) as double:
        first = double.seed(DATASET, folder=DEMO, message="import demo")
        lines = (DEMO / "metadata.jsonl").read_text().splitlines()
        edited = json.loads(lines[0]) | {"text": "an edited caption"}
        metadata = "\n".join([json.dumps(edited), *lines[1:4]]) + "\n"
        second = double.seed(DATASET, {"metadata.jsonl": metadata.encode()}, message="keep four rows")
        yield double, first, second


def _dataset(host: str, revision: str, **kwargs) -> DatasetConfig:
    return DatasetConfig(repo=DATASET, host=host, scheme="http", revision=revision, **kwargs)


def test_pull_from_a_remote_host_at_a_revision(hub, tmp_path, monkeypatch):
    monkeypatch.delenv(oxen_repos.TOKEN_ENV, raising=False)
    double, first, second = hub
    work = WorkDir(tmp_path)
    old = pull_dataset(_dataset(double.host, first), work)
    new = pull_dataset(_dataset(double.host, "main"), work)
    assert (old.commit_id, old.rows, old.skipped) == (first, 32, 0)
    assert (new.commit_id, new.rows) == (second, 4)
    old_rows = read_table(old.manifest_path, MANIFEST).to_pylist()
    new_rows = read_table(new.manifest_path, MANIFEST).to_pylist()
    assert "an edited caption" not in {r["original_caption"] for r in old_rows}
    assert new_rows[0]["original_caption"] == "an edited caption"
    assert {r["source_repo"] for r in new_rows} == {f"http://{double.host}/{DATASET}"}
    image = DEMO / new_rows[0]["file_name"]  # downloaded bytes are the committed bytes
    assert Path(new_rows[0]["image_path"]).read_bytes() == image.read_bytes()
    paths = [r["path"] for r in double.requests() if "/file/" in r["path"]]
    assert any(f"/file/{first}/" in p for p in paths)  # read at the commit, not at main's head


def test_meta_reports_oxen_hashes(hub, monkeypatch):
    monkeypatch.delenv(oxen_repos.TOKEN_ENV, raising=False)
    double, _, second = hub
    remote = oxen_repos.connect(_dataset(double.host, "main"))
    entry = remote.metadata("metadata.jsonl")
    with oxen_repos.open_revision(_dataset(double.host, "main"), "main") as revision:
        assert revision.commit_id == second
        data = revision.read_bytes("metadata.jsonl")
    assert entry.hash == content_hash(data) == double.tree(DATASET, "main")["files"]["metadata.jsonl"]


def test_missing_revision_file_and_repo_fail_naming_them(hub, monkeypatch):
    monkeypatch.delenv(oxen_repos.TOKEN_ENV, raising=False)
    double, first, _ = hub
    with pytest.raises(oxen_repos.OxenError, match=r"revision 'no-such-branch' does not exist"):
        oxen_repos.RemoteRevision(_dataset(double.host, "main"), "no-such-branch")
    reading = oxen_repos.open_revision(_dataset(double.host, first), first)
    with reading as revision, pytest.raises(FileNotFoundError, match="metadata.csv: not in http://"):
        revision.read_bytes("metadata.csv")
    missing = DatasetConfig(repo="pixart/nothing-here", host=double.host, scheme="http")
    with pytest.raises(
        oxen_repos.OxenError, match=f"pixart/nothing-here: no such repository on {double.host}"
    ):
        oxen_repos.connect(missing)

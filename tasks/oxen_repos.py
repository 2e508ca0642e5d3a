"""Oxen repositories: read a dataset at a revision, commit a run's results to a branch.

A repo is a local folder or `namespace/name` on an Oxen host (config.OxenRepoConfig). Oxen lets
only one process open a local repo at a time, so every local operation holds an exclusive lock
file beside the repo; a second run waits for it instead of crashing on Oxen's own lock.

Reading a local repo at a commit restores the needed files from Oxen's store into the working
tree one at a time and restores HEAD's versions afterwards: the repo must have no uncommitted
changes, and nothing in it is lost, since every version lives in `.oxen/`.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import shutil
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import oxen

from configs import OxenRepoConfig

DEFAULT_USER = ("pixart-pipeline", "pixart-pipeline@localhost")


class OxenError(RuntimeError):
    """An Oxen operation that failed; the message names the repo (and host, revision)."""


def describe(cfg: OxenRepoConfig) -> str:
    return f"{cfg.scheme}://{cfg.host}/{cfg.repo}" if cfg.is_remote else cfg.repo


def ensure_user() -> None:
    """Oxen refuses to commit without a user; configure a neutral one if none is set."""
    # Checked by file: reading a missing user config panics inside Oxen's Rust core.
    if not (Path(oxen.util.get_oxen_config_dir()) / "user_config.toml").is_file():
        oxen.user.config_user(*DEFAULT_USER)


@contextlib.contextmanager
def repo_lock(repo_path: Path, timeout_s: float = 600.0) -> Iterator[None]:
    """Exclusive, process-wide lock on one local repo (Oxen allows one process at a time)."""
    lock_path = Path(f"{repo_path}.lock")
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    with open(lock_path, "w") as handle:
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    raise OxenError(f"{repo_path}: still locked by another run after {timeout_s:.0f} s") from None
                time.sleep(0.2)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def import_folder(folder: Path, repo_path: Path, message: str) -> str:
    """Commit `folder` as the first commit of a new local repo at `repo_path`; returns the commit id.

    Built in a temp folder and renamed into place, so a killed import leaves no half repo.
    """
    if repo_path.exists():
        raise OxenError(f"{repo_path}: already exists; not importing {folder} over it")
    if not folder.is_dir():
        raise OxenError(f"{folder}: dataset folder to import does not exist")
    ensure_user()
    repo_path.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{repo_path.name}.", dir=repo_path.parent))
    try:
        shutil.copytree(folder, staging, dirs_exist_ok=True)
        repo = oxen.Repo(str(staging))
        repo.init()
        for entry in sorted(staging.iterdir()):
            if entry.name != ".oxen":
                repo.add(str(entry))
        commit = repo.commit(message)
        os.replace(staging, repo_path)
        return commit.id
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def _open_local(path: Path) -> oxen.Repo:
    if not (path / ".oxen").is_dir():
        raise OxenError(f"{path}: not an Oxen repository (no .oxen folder)")
    return oxen.Repo(str(path))


def _local_commit_id(repo: oxen.Repo, revision: str, label: str) -> str:
    for branch in repo.branches():
        if branch.name == revision:
            return branch.commit_id
    return revision  # a commit id; checked when the first file is restored from it


class LocalRevision:
    """Files of a local repo at one commit, read without moving the repo's branch."""

    def __init__(self, path: Path, revision: str):
        self.path = path
        self.repo = _open_local(path)
        self.label = str(path)
        status = self.repo.status()
        changed = (
            status.added_files() + status.modified_files() + status.removed_files()
            + status.unstaged_modified_files() + status.unstaged_removed_files()
        )  # fmt: skip
        if changed:
            raise OxenError(f"{path}: has uncommitted changes ({changed[:3]}...); commit them before a pull")
        self.commit_id = _local_commit_id(self.repo, revision, self.label)
        self.revision = revision
        self._touched: list[tuple[Path, bool]] = []

    def read_bytes(self, rel_path: str) -> bytes:
        target = self.path / rel_path
        existed = target.exists()
        self._touched.append((target, existed))
        try:
            self.repo.restore(rel_path, source=self.commit_id)
        except ValueError as exc:
            if "Commit not found" in str(exc):
                raise OxenError(f"{self.label}: revision {self.revision!r} does not exist") from None
            raise FileNotFoundError(f"{rel_path}: not in {self.label} at {self.revision}") from None
        return target.read_bytes()

    def close(self) -> None:
        """Put HEAD's version of every file we touched back (or remove files HEAD lacks)."""
        for target, existed in reversed(self._touched):
            if existed:
                self.repo.restore(str(target.relative_to(self.path)))
            elif target.exists():
                target.unlink()
        self._touched.clear()


class RemoteRevision:
    """Files of a repo on an Oxen host at one revision, downloaded on demand."""

    def __init__(self, cfg: OxenRepoConfig, revision: str):
        self.label = describe(cfg)
        self.revision = revision
        self.remote = call_remote(lambda: oxen.RemoteRepo(cfg.repo, host=cfg.host, scheme=cfg.scheme), self.label)
        branch = call_remote(lambda: self.remote.get_branch(revision) if self.remote.branch_exists(revision) else None,
                              self.label)  # fmt: skip
        self.commit_id = branch.commit_id if branch is not None else revision
        self._tmp = Path(tempfile.mkdtemp(prefix="oxen-download-"))

    def read_bytes(self, rel_path: str) -> bytes:
        dest = self._tmp / "file"
        call_remote(lambda: self.remote.download(rel_path, str(dest), revision=self.commit_id), self.label)
        data = dest.read_bytes()
        dest.unlink()
        return data

    def close(self) -> None:
        shutil.rmtree(self._tmp, ignore_errors=True)


def call_remote(fn, label: str, attempts: int = 4, first_delay_s: float = 0.5):
    """Retry a remote Oxen call with exponential backoff, then fail naming the host and repo."""
    delay = first_delay_s
    for attempt in range(1, attempts + 1):
        try:
            return fn()
        except Exception as exc:  # the client raises plain ValueError/OSError for network faults
            if attempt == attempts:
                raise OxenError(f"{label}: unreachable or failing after {attempts} attempts: {exc}") from None
            time.sleep(delay)
            delay *= 2


@contextlib.contextmanager
def open_revision(cfg: OxenRepoConfig, revision: str, repo_path: Path | None = None):
    """Yield a reader with `.commit_id` and `.read_bytes(path)` for a repo at a revision."""
    if cfg.is_remote:
        reader = RemoteRevision(cfg, revision)
        try:
            yield reader
        finally:
            reader.close()
        return
    assert repo_path is not None, "local repos need their resolved path"
    with repo_lock(repo_path):
        reader = LocalRevision(repo_path, revision)
        try:
            yield reader
        finally:
            reader.close()


def commit_to_branch(repo_path: Path, branch: str, files: dict[str, Path], message: str) -> str:
    """Commit `files` (repo-relative name -> local file) to `branch` of a local repo, in one commit.

    Creates the repo (with an initial commit on main) and the branch as needed. The working tree
    goes back to the branch it was on. If the branch's last commit has the same message, that
    commit is returned and nothing is written: one run, one commit.
    """
    ensure_user()
    with repo_lock(repo_path):
        if not (repo_path / ".oxen").is_dir():
            repo_path.mkdir(parents=True, exist_ok=True)
            repo = oxen.Repo(str(repo_path))
            repo.init()
            (repo_path / "README.md").write_text("# pixart-pipeline results\n\nOne branch per style run.\n")
            repo.add(str(repo_path / "README.md"))
            repo.commit("Initialise results repository")
        repo = oxen.Repo(str(repo_path))
        original = repo.current_branch.name
        if repo.branch_exists(branch):
            repo.checkout(branch)
            last = repo.log()[0]
            if last.message == message:
                repo.checkout(original)
                return last.id
        else:
            repo.checkout(branch, create=True)
        try:
            for name, source in sorted(files.items()):
                target = repo_path / name
                target.parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(source, target)
            for top in sorted({Path(name).parts[0] for name in files}):
                repo.add(str(repo_path / top))
            return repo.commit(message).id
        finally:
            repo.checkout(original)

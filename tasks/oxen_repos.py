"""Oxen repositories: read a dataset at a revision, commit a run's results or a dataset's captions to a branch.

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
import hashlib
import os
import re
import shutil
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
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
            _wait_for_oxen(repo_path, deadline)
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _wait_for_oxen(repo_path: Path, deadline: float) -> None:
    """Wait while a process outside the pipeline (the oxen CLI, a server) holds Oxen's own lock on
    the repo, which makes every call fail with '.oxen/refs/LOCK: Resource temporarily unavailable'."""
    while (repo_path / ".oxen").is_dir():
        try:
            oxen.Repo(str(repo_path)).branches()
            return
        except ValueError as exc:
            if "LOCK" not in str(exc):
                return  # another problem: the operation itself reports it
            if time.monotonic() > deadline:
                raise OxenError(f"{repo_path}: another Oxen process keeps the repo locked ({exc})") from None
            time.sleep(0.2)


def import_folder(folder: Path, repo_path: Path, message: str) -> str:
    """Commit `folder` as the first commit of a new local repo at `repo_path`; returns the commit id.

    Built in a temp folder and renamed into place, so a killed import leaves no half repo.
    """
    if repo_path.exists():
        raise OxenError(f"{repo_path}: already exists; not importing {folder} over it")
    if not folder.is_dir():
        raise OxenError(f"{folder}: dataset folder to import does not exist")
    root = folder.resolve()
    for link in (p for p in folder.rglob("*") if p.is_symlink()):
        if not link.resolve().is_relative_to(root):  # copying would commit the file it points at
            raise OxenError(f"{link}: symlink points outside {folder} (to {link.resolve()}); not importing")
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
        try:
            os.replace(staging, repo_path)
        except OSError:
            if not (repo_path / ".oxen").is_dir():
                raise
            # Two first runs at once: the other one's import won; both read the same folder.
            shutil.rmtree(staging, ignore_errors=True)
            with repo_lock(repo_path):
                return oxen.Repo(str(repo_path)).log()[0].id
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


ASIDE_SUFFIX = ".pixart-aside"


class LocalRevision:
    """Files of a local repo at one commit, read without moving the repo's branch.

    Oxen reads an older file by restoring it into the working tree, so each read sets aside what
    is at that path first (HEAD's file, or an untracked one of the user's), restores, reads, and
    puts it back with a rename: the working tree ends as it was, byte for byte. A kill mid-read
    leaves the set-aside file next to it (`.<name>.pixart-aside`), and the next reader of the repo
    puts it back before anything else."""

    def __init__(self, path: Path, revision: str):
        self.path = path
        self.repo = _open_local(path)
        self.label = str(path)
        for aside in _asides(path):  # a read killed midway: put its file back
            os.replace(aside, aside.with_name(aside.name[1 : -len(ASIDE_SUFFIX)]))
        status = self.repo.status()
        changed = (
            status.added_files() + status.modified_files() + status.removed_files()
            + status.unstaged_modified_files() + status.unstaged_removed_files()
        )  # fmt: skip
        if changed:
            raise OxenError(f"{path}: has uncommitted changes ({changed[:3]}...); commit them before a pull")
        self.commit_id = _local_commit_id(self.repo, revision, self.label)
        self.revision = revision

    def read_bytes(self, rel_path: str) -> bytes:
        target = self.path / rel_path
        if target.is_dir() and not target.is_symlink():
            raise IsADirectoryError(f"{rel_path}: a folder in {self.label}, not a file")
        aside = target.with_name(f".{target.name}{ASIDE_SUFFIX}")
        if os.path.lexists(target):  # a dangling symlink too
            os.replace(target, aside)
        try:
            self.repo.restore(rel_path, source=self.commit_id)
            return target.read_bytes()
        except ValueError as exc:
            if "Commit not found" in str(exc):
                raise OxenError(f"{self.label}: revision {self.revision!r} does not exist") from None
            raise FileNotFoundError(f"{rel_path}: not in {self.label} at {self.revision}") from None
        finally:
            if target.is_dir() and not target.is_symlink():
                shutil.rmtree(target)  # the commit has a folder there
            if os.path.lexists(aside):
                os.replace(aside, target)
            else:
                target.unlink(missing_ok=True)


def _asides(root: Path) -> list[Path]:
    """Files LocalRevision set aside, outside Oxen's own folder (which can hold every version)."""
    found = []
    for folder, dirs, files in os.walk(root):
        dirs[:] = [d for d in dirs if d != ".oxen"]
        found += [Path(folder) / f for f in files if f.startswith(".") and f.endswith(ASIDE_SUFFIX)]
    return found


class RemoteRevision:
    """Files of a repo on an Oxen host at one revision, downloaded on demand."""

    def __init__(self, cfg: OxenRepoConfig, revision: str, token: str | None = None):
        self.label = describe(cfg)
        self.revision = revision
        self.remote = connect(cfg, token)
        self.commit_id = call_remote(lambda: _resolve_commit(self.remote, revision), self.label)
        if self.commit_id is None:
            raise OxenError(f"{self.label}: revision {revision!r} does not exist")
        self._tmp = Path(tempfile.mkdtemp(prefix="oxen-download-"))

    def read_bytes(self, rel_path: str) -> bytes:
        dest = self._tmp / "file"
        try:
            call_remote(lambda: self.remote.download(rel_path, str(dest), self.commit_id), self.label)
        except RemoteNotFound:
            raise FileNotFoundError(f"{rel_path}: not in {self.label} at {self.revision}") from None
        data = dest.read_bytes()
        dest.unlink()
        return data

    def close(self) -> None:
        shutil.rmtree(self._tmp, ignore_errors=True)


def _resolve_commit(remote: oxen.RemoteRepo, revision: str) -> str | None:
    """The commit a branch name or commit id names, or None when the host knows neither."""
    if remote.branch_exists(revision):
        return remote.get_branch(revision).commit_id
    try:
        commits = remote.log(revision=revision, page_size=1).commits
    except Exception as exc:
        if _is_not_found(exc):
            return None
        raise
    return commits[0].id if commits else None


# --- Remote hosts: connection, token, retries -----------------------------------------------------

TOKEN_ENV = "OXEN_API_KEY"
_auth_dir: Path | None = None  # private Oxen config dir holding the tokens we were given
_tokens: dict[str, str] = {}  # host -> token written there
_client_tokens: dict[str, str] | None = None  # what the client saw at its first remote call


class RemoteNotFound(OxenError):
    """The host answered that the repo, revision or file does not exist (not worth retrying)."""


def use_token(host: str, token: str | None) -> None:
    """Have the Oxen client send `token` (else $OXEN_API_KEY) to `host`.

    The token goes into an auth_config.toml in a private temp dir (mode 0700) that OXEN_CONFIG_DIR
    points at; the user's own Oxen config is copied in first, so their user and other hosts' tokens
    stay in effect and their files are never touched. With no token at all, nothing changes.
    The client reads its auth config once per process, at its first remote call, so every host's
    token has to be given before then; a later, different token is refused with a clear error.
    """
    global _auth_dir
    token = token or os.environ.get(TOKEN_ENV) or None
    if token is None or _tokens.get(host) == token:
        return
    if _client_tokens is not None and _client_tokens.get(host) != token:
        raise OxenError(
            f"{host}: its token was given after this process's first Oxen remote call; the client "
            "reads tokens once per process, so configure every host before any remote call"
        )
    if _auth_dir is None:
        _auth_dir = Path(tempfile.mkdtemp(prefix="pixart-oxen-config-"))
        for name in ("user_config.toml", "auth_config.toml"):
            existing = Path(oxen.util.get_oxen_config_dir()) / name
            if existing.is_file():
                shutil.copyfile(existing, _auth_dir / name)
        os.environ["OXEN_CONFIG_DIR"] = str(_auth_dir)
    # The binding itself: oxen.auth.config_auth also calls hub.oxen.ai/api/authorize for that host.
    oxen.oxen_py.auth.config_auth(host, token, str(_auth_dir / "auth_config.toml"))
    os.chmod(_auth_dir / "auth_config.toml", 0o600)
    _tokens[host] = token


def connect(cfg: OxenRepoConfig, token: str | None = None) -> oxen.RemoteRepo:
    """The RemoteRepo of `cfg` with its token in place; fails naming host and repo if it is missing."""
    label = describe(cfg)
    use_token(cfg.host, token)
    ensure_user()  # workspace commits carry the local Oxen user
    remote = call_remote(lambda: oxen.RemoteRepo(cfg.repo, host=cfg.host, scheme=cfg.scheme), label)
    if not call_remote(remote.exists, label):
        raise OxenError(f"{label}: no such repository on {cfg.host}")
    return remote


def _status(exc: Exception) -> int | None:
    """The HTTP status in one of the client's error messages ('status: 500', '[404 Not Found]')."""
    match = re.search(r"(?:status: |\[)([1-5]\d\d)\b", str(exc))
    return int(match[1]) if match else None


def _is_not_found(exc: Exception) -> bool:
    return _status(exc) == 404 or "does not exist" in str(exc)


def call_remote(fn, label: str, attempts: int = 4, first_delay_s: float = 0.5):
    """Call the Oxen client, retrying network faults and server errors with exponential backoff,
    then fail naming the host and repo. 'Not found' and 'not allowed' answers fail at once."""
    global _client_tokens
    if _client_tokens is None:
        _client_tokens = dict(_tokens)
    delay = first_delay_s
    for attempt in range(1, attempts + 1):
        try:
            return fn()
        except Exception as exc:  # noqa: BLE001 - the client raises ValueError or bare Exception for all
            if _is_not_found(exc):
                raise RemoteNotFound(f"{label}: {exc}") from None
            if _status(exc) in (401, 403) or "Authentication failed" in str(exc):
                raise OxenError(f"{label}: the host refused the credentials ({TOKEN_ENV}?): {exc}") from None
            if attempt == attempts:
                raise OxenError(f"{label}: unreachable or failing after {attempts} attempts: {exc}") from None
        time.sleep(delay)
        delay *= 2


@contextlib.contextmanager
def open_revision(
    cfg: OxenRepoConfig, revision: str, repo_path: Path | None = None, token: str | None = None
):
    """Yield a reader with `.commit_id` and `.read_bytes(path)` for a repo at a revision
    (`token` for a remote host; default $OXEN_API_KEY)."""
    if cfg.is_remote:
        reader = RemoteRevision(cfg, revision, token)
        try:
            yield reader
        finally:
            reader.close()
        return
    assert repo_path is not None, "local repos need their resolved path"
    with repo_lock(repo_path):
        yield LocalRevision(repo_path, revision)  # each read puts the working tree back itself


def commit_to_branch(repo_path: Path, branch: str, files: dict[str, Path], message: str) -> str:
    """Commit `files` (repo-relative name -> local file) to `branch` of a local repo, in one commit.

    Creates the repo (with an initial commit on main) and the branch as needed; a new branch starts
    at main. The working tree goes back to main (else to the branch it was on). If the branch's
    last commit has the same message, that commit is returned and nothing is written: one run, one
    commit. Uncommitted files, which only a push killed half-way leaves in a results repo, are
    discarded first, so they never reach another run's commit.
    """
    ensure_user()
    with repo_lock(repo_path):
        if not (repo_path / ".oxen").is_dir():
            _init_with_readme(repo_path, "# pixart-pipeline results\n\nOne branch per style run.\n")
        repo = oxen.Repo(str(repo_path))
        original = "main" if repo.branch_exists("main") else repo.current_branch.name
        if repo.branch_exists(branch):
            _checkout(repo, branch)
            last = repo.log()[0]
            if last.message == message:
                _checkout(repo, original)
                return last.id
        else:
            _checkout(repo, original)  # not from a branch a killed push left checked out
            _checkout(repo, branch, create=True)
        try:
            for name, source in sorted(files.items()):
                target = repo_path / name
                target.parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(source, target)
            for top in sorted({Path(name).parts[0] for name in files}):
                repo.add(str(repo_path / top))
            return repo.commit(message).id
        finally:
            _checkout(repo, original)


def _init_with_readme(repo_path: Path, readme: str) -> None:
    """A new repo whose first commit on main holds README.md, built beside `repo_path` and renamed
    into place: a killed run never leaves a repo without that commit."""
    repo_path.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{repo_path.name}.", dir=repo_path.parent))
    try:
        repo = oxen.Repo(str(staging))
        repo.init()
        (staging / "README.md").write_text(readme)
        repo.add(str(staging / "README.md"))
        repo.commit("Initialise results repository")
        os.replace(staging, repo_path)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _checkout(
    repo: oxen.Repo, revision: str, create: bool = False, keep: frozenset[Path] = frozenset()
) -> None:
    """Check out `revision` with the working tree exactly its commit. oxen 0.65 can leave another
    branch's files in a folder two branches share (or miss this one's), and then refuse the next
    checkout over them as "local changes" (found by tests/test_kills.py). Uncommitted changes are
    discarded, so callers check for them first (update_branch) or own the repo (commit_to_branch).
    Untracked files named in `keep` (repo-relative: a dataset repo's own untracked files) are never
    removed; the rest are the other branch's leftovers."""
    _discard_uncommitted(repo, keep)
    try:
        repo.checkout(revision, create)
    except ValueError as exc:
        if "would be overwritten" not in str(exc):
            raise
        # Status shows the tree clean, so these files are committed content: remove and retry.
        names = re.findall(r"^\s+(\S.*)$", str(exc).partition("continuing:")[2], re.MULTILINE)
        if kept := [name for name in names if Path(name) in keep]:
            raise OxenError(
                f"{repo.path}: checking out {revision} would overwrite untracked files {kept[:3]}; "
                "move them out of the repo first"
            ) from None
        for name in names:
            (Path(repo.path) / name).unlink(missing_ok=True)
        repo.checkout(revision, create)
    _discard_uncommitted(repo, keep)


def _untracked_files(repo: oxen.Repo) -> frozenset[Path]:
    """Repo-relative paths of the untracked files, those in wholly untracked folders included."""
    root = Path(repo.path)
    found = repo.clean()  # without force: only lists (and prints) what it would remove
    files = set(found.files)
    for folder in found.dirs:
        files |= {path.relative_to(root) for path in (root / folder).rglob("*") if not path.is_dir()}
    return frozenset(files)


def _discard_uncommitted(repo: oxen.Repo, keep: frozenset[Path] = frozenset()) -> None:
    """Put the working tree back to its commit: unstage, restore, then remove untracked files
    other than those in `keep` (and the folders that removing them empties)."""
    status = repo.status()
    staged = status.added_files() + status.modified_files() + status.removed_files()
    for path in staged:
        repo.restore(path, staged=True)
    changed = status.modified_files() + status.removed_files()
    for path in changed + status.unstaged_modified_files() + status.unstaged_removed_files():
        repo.restore(path)
    if not keep:
        repo.clean(force=True)
        return
    root = Path(repo.path)
    for name in _untracked_files(repo) - keep:
        (root / name).unlink(missing_ok=True)
        for folder in (root / name).parents:
            if folder == root or any(folder.iterdir()):
                break
            folder.rmdir()


# --- Updating a branch of a dataset repo (the captions branch) -----------------------------------


@dataclass(frozen=True)
class BranchUpdate:
    commit_id: str  # the branch head after the update
    committed: bool  # False when the branch already held these files: nothing was written
    created: bool  # the branch was created by this update


def _uncommitted(repo: oxen.Repo) -> list[str]:
    status = repo.status()
    return (
        status.added_files() + status.modified_files() + status.removed_files()
        + status.unstaged_modified_files() + status.unstaged_removed_files()
    )  # fmt: skip


def _same_bytes(target: Path, source: Path) -> bool:
    if not target.is_file() or target.stat().st_size != source.stat().st_size:
        return False
    return hashlib.sha256(target.read_bytes()).digest() == hashlib.sha256(source.read_bytes()).digest()


def _create_branch_at(
    repo: oxen.Repo, repo_path: Path, branch: str, commit_id: str, keep: frozenset[Path] = frozenset()
) -> None:
    """Create `branch` at `commit_id` and check it out (the working tree repaired as by _checkout).

    oxen 0.65's Python `checkout(<commit id>)` does detach HEAD at the commit, but it also leaves a
    ref named after the commit and then raises "Branch '<id>' not found". We accept exactly that,
    check where HEAD is, branch from there and delete the stray ref.
    """
    try:
        _checkout(repo, commit_id, keep=keep)
    except ValueError as exc:
        if f"Branch '{commit_id}' not found" not in str(exc):
            raise OxenError(f"{repo_path}: cannot check out commit {commit_id}: {exc}") from None
        _discard_uncommitted(repo, keep)  # the error came before _checkout's own repair
    if repo.log()[0].id != commit_id:
        raise OxenError(f"{repo_path}: commit {commit_id} not found")
    repo.checkout(branch, create=True)  # at HEAD: the working tree stays as it is
    if repo.branch_exists(commit_id):
        repo.branch(commit_id, delete=True)


def update_branch(repo_path: Path, branch: str, base_commit: str, files: dict[str, Path], message: str) -> BranchUpdate:
    """Give the paths in `files` (repo-relative name -> local file) those contents on `branch`, in one commit.

    A missing branch is created at `base_commit`. Only files whose bytes differ are copied in; when
    none differ nothing is committed, so the same update twice makes one commit. Paths not named
    stay as they are. The repo must have no uncommitted changes, and its working tree goes back to
    the branch it was on.
    """
    ensure_user()
    with repo_lock(repo_path):
        repo = _open_local(repo_path)
        changed = _uncommitted(repo)
        if changed:
            raise OxenError(f"{repo_path}: has uncommitted changes ({changed[:3]}...); commit them first")
        # Untracked files are the user's: the checkouts below keep them and remove only what a
        # plain oxen checkout would leave behind of the other branch (see _checkout).
        keep = _untracked_files(repo)
        original = repo.current_branch.name
        try:
            created = not repo.branch_exists(branch)
            if created:
                _create_branch_at(repo, repo_path, branch, base_commit, keep)
            else:
                _checkout(repo, branch, keep=keep)
            differing = [name for name, source in sorted(files.items()) if not _same_bytes(repo_path / name, source)]
            if not differing:
                return BranchUpdate(repo.log()[0].id, committed=False, created=created)
            for name in differing:
                target = repo_path / name
                target.parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(files[name], target)
                repo.add(str(target))
            return BranchUpdate(repo.commit(message).id, committed=True, created=created)
        finally:
            _checkout(repo, original, keep=keep)

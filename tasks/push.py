"""Push: commit a run's results to branch `runs/<run id>` of the results repo, in one commit.

What is pushed (paths inside the repo):
    results.jsonl, report.md, metrics.json     from the evaluation
    images/<model>/*.png, grids/*.png          the generated images
    lora/adapter_model.safetensors, lora/adapter_config.json, lora/pytorch_lora_weights.safetensors
    train_log.jsonl, config.yaml, lineage.json

The files are first gathered in `<run dir>/push/` (a complete local copy that survives a failed
push), then committed. Local repos commit in one step; remote hosts get all files staged in one
workspace and one commit, retried with backoff; when the host stays down the run fails naming
host and repo, and the push dir keeps everything. The commit message names the run, so pushing
the same run again finds its commit and writes nothing. A remote host's token comes from the
Prefect Secret block `results.token_secret`, else $OXEN_API_KEY (see oxen_repos.use_token).
"""

from __future__ import annotations

import contextlib
import os
import shutil
from pathlib import Path

import oxen
from prefect import get_run_logger, task

from configs import ResultsConfig, RunConfig
from tasks import oxen_repos
from tasks.workdir import WorkDir

ADAPTER_FILES = ("adapter_model.safetensors", "adapter_config.json", "pytorch_lora_weights.safetensors")


def gather_results(
    eval_dir: Path, adapter_dir: Path, extra_files: dict[str, Path], push_dir: Path
) -> dict[str, Path]:
    """Copy everything the commit will hold into `push_dir`; returns repo path -> local file."""
    files: dict[str, Path] = {}
    for name in ("results.jsonl", "report.md", "metrics.json"):
        files[name] = eval_dir / name
    for folder in ("images", "grids"):
        for path in sorted((eval_dir / folder).rglob("*.png")):
            files[path.relative_to(eval_dir).as_posix()] = path
    for name in ADAPTER_FILES:
        if (adapter_dir / name).exists():
            files[f"lora/{name}"] = adapter_dir / name
    files.update(extra_files)
    missing = [f"{name} ({path})" for name, path in files.items() if not path.is_file()]
    if missing:
        raise FileNotFoundError(f"cannot push, files missing: {missing[:5]}")
    staging = push_dir.with_name(push_dir.name + ".tmp")
    shutil.rmtree(staging, ignore_errors=True)
    for name, source in files.items():
        target = staging / name
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(source, target)
    shutil.rmtree(push_dir, ignore_errors=True)
    os.replace(staging, push_dir)
    return {name: push_dir / name for name in files}


def commit_message(run_id: str) -> str:
    return f"Style run {run_id}"


def push_local(repo_path: Path, branch: str, files: dict[str, Path], run_id: str) -> str:
    return oxen_repos.commit_to_branch(repo_path, branch, files, commit_message(run_id))


def push_remote(
    cfg: ResultsConfig, branch: str, files: dict[str, Path], run_id: str, token: str | None = None
) -> str:
    """Commit `files` to `branch` on the host in one workspace and one commit; returns the commit id.

    Each attempt stages every file in a fresh workspace and commits it; an attempt that fails
    deletes its workspace, so the branch gets the whole run or nothing. A retried attempt first
    looks for its own commit (the answer to a commit can be lost after the host made it).
    """
    label = oxen_repos.describe(cfg)
    message = commit_message(run_id)
    base = _common_root(files)
    remote = oxen_repos.connect(cfg, token)

    def attempt() -> str:
        if remote.branch_exists(branch):
            last = remote.log(revision=branch, page_size=1).commits
            if last and last[0].message == message:
                return last[0].id
        else:
            remote.create_branch(branch)  # from main's head
        workspace = oxen.Workspace(remote, branch)
        try:
            workspace.add_files(str(base), sorted(files))
            return workspace.commit(message).id
        except BaseException:
            with contextlib.suppress(Exception):  # best effort: the host also expires workspaces
                workspace.delete()
            raise

    return oxen_repos.call_remote(attempt, label)


def _common_root(files: dict[str, Path]) -> Path:
    """The folder every file lies in at its repo path (gather_results' push dir)."""
    roots = set()
    for name, path in files.items():
        if not path.as_posix().endswith("/" + name):
            raise ValueError(f"{path}: not at <push dir>/{name}; remote pushes take gather_results' files")
        roots.add(Path(path.as_posix()[: -len(name) - 1]))
    if len(roots) != 1:
        raise ValueError(f"files come from several folders {sorted(roots)}; expected one push dir")
    return roots.pop()


def push_results(
    cfg: ResultsConfig, workdir: WorkDir, run_id: str, files: dict[str, Path], token: str | None = None
) -> dict:
    branch = f"{cfg.branch_prefix}{run_id}"
    if cfg.is_remote:
        commit_id = push_remote(cfg, branch, files, run_id, token)
        repo = oxen_repos.describe(cfg)
    else:
        repo_path = workdir.resolve(cfg.repo)
        commit_id = push_local(repo_path, branch, files, run_id)
        repo = str(repo_path)
    return {"repo": repo, "branch": branch, "commit_id": commit_id, "files": len(files)}


# --- Prefect task ---------------------------------------------------------------------------------


def resolve_token(cfg: ResultsConfig) -> str | None:
    """The results host's token from the Prefect Secret block the config names; None lets
    oxen_repos fall back to $OXEN_API_KEY (or the user's own Oxen config)."""
    if not cfg.is_remote or cfg.token_secret is None:
        return None
    from prefect.blocks.system import Secret

    try:
        return Secret.load(cfg.token_secret).get()
    except ValueError as exc:
        raise ValueError(
            f"results.token_secret: no Prefect Secret block {cfg.token_secret!r} ({exc})"
        ) from None


@task(name="push")
def push_task(
    config: RunConfig, workdir: str, run_id: str, eval_dir: str, adapter_dir: str, extra_files: dict[str, str]
) -> dict:
    logger = get_run_logger()
    work = WorkDir(Path(workdir))
    push_dir = work.run_dir(run_id) / "push"
    files = gather_results(
        Path(eval_dir), Path(adapter_dir), {k: Path(v) for k, v in extra_files.items()}, push_dir
    )
    logger.info(
        "gathered %d files in %s; committing to %s", len(files), push_dir, oxen_repos.describe(config.results)
    )
    try:
        pushed = push_results(config.results, work, run_id, files, resolve_token(config.results))
    except oxen_repos.OxenError as exc:  # the gathered copy is complete: push it again later
        raise oxen_repos.OxenError(f"{exc}; every result is kept in {push_dir}") from None
    logger.info("results commit %s on %s of %s", pushed["commit_id"], pushed["branch"], pushed["repo"])
    return pushed | {"local_copy": str(push_dir)}

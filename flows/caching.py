"""Prefect caching for the style run: each stage's cache key hashes only what its output depends on.

The stage tasks take the whole RunConfig, so Prefect's default policy (hash every input) would
rerun every stage when any setting changes. Here each stage's key is built from its own config
sections, the content of its input files, the work dir and the task's source code:

    pull       dataset settings + the commit the revision points at now
    recaption  manifest content + recaption settings + LLaVA model + device/dtype
    embed      manifest + captions content + embed settings + encoders + evaluation prompts
    train      tasks.train.training_key (train set's cache keys, train settings, base model)
    evaluate   tasks.evaluate.evaluation_key (prompts, adapter bytes, sampling settings) + train set
    push       results settings + run id + the files to push

So a re-run with nothing changed shows every stage as Cached, and changing only `train.*`
reruns train, evaluate and push. Results are persisted as JSON (never pickle) under
`<workdir>/cache/prefect/`, where any later flow run, from the UI or the CLI, finds them; deleting
the work dir deletes outputs and records together.

A cached result names the files of the run that computed it (a run's captions may sit in an
earlier run's folder). `missing_files` lets the flow notice deleted ones and rerun the stage.
"""

from __future__ import annotations

import hashlib
import inspect
from collections.abc import Callable
from pathlib import Path

import oxen
from prefect import Task

from configs import RunConfig
from tasks import oxen_repos
from tasks.cache import content_key, file_sha256
from tasks.embed import resolve_prompts_file
from tasks.evaluate import evaluation_key
from tasks.pull import ensure_dataset_repo, resolve_repo_path
from tasks.train import training_key
from tasks.workdir import WorkDir


def dataset_head(config: RunConfig, workdir: str) -> str:
    """The commit the dataset revision names now: a new commit on the branch is a new pull."""
    cfg = config.dataset
    if cfg.is_remote:
        remote = oxen.RemoteRepo(cfg.repo, host=cfg.host, scheme=cfg.scheme)
        return (
            remote.get_branch(cfg.revision).commit_id if remote.branch_exists(cfg.revision) else cfg.revision
        )
    # The demo's first pull creates the repo from its folder; do it now so the key names that commit.
    ensure_dataset_repo(cfg, WorkDir(Path(workdir)))
    repo_path = resolve_repo_path(cfg, WorkDir(Path(workdir)))
    with oxen_repos.repo_lock(repo_path):
        for branch in oxen.Repo(str(repo_path)).branches():
            if branch.name == cfg.revision:
                return branch.commit_id
    return cfg.revision  # a commit id already


def _pull(p: dict) -> dict:
    return {
        "dataset": p["config"].dataset.model_dump(mode="json"),
        "head": dataset_head(p["config"], p["workdir"]),
    }


def _recaption(p: dict) -> dict:
    config: RunConfig = p["config"]
    return {
        "manifest": file_sha256(p["manifest_path"]),
        "recaption": config.recaption.model_dump(mode="json"),
        "llava": config.models.llava,
        "device": config.device,
        "dtype": config.dtype,
    }


def _embed(p: dict) -> dict:
    config: RunConfig = p["config"]
    return {
        "manifest": file_sha256(p["manifest_path"]),
        "captions": file_sha256(p["captions_path"]),
        "embed": config.embed.model_dump(mode="json"),
        "models": config.models.model_dump(mode="json", exclude={"llava"}),
        "prompts": file_sha256(resolve_prompts_file(config.evaluate.prompts_file)),
        "style_template": config.evaluate.style_template,
        "device": config.device,
        "dtype": config.dtype,
    }


def _train(p: dict) -> dict:
    return {
        "training": training_key(p["train_set_path"], p["config"]),
        "caches": [p["text_cache"], p["latent_cache"]],
    }


def _evaluate(p: dict) -> dict:
    return {
        "evaluation": evaluation_key(p["prompt_set_path"], p["adapter_dir"], p["config"]),
        "train_set": file_sha256(p["train_set_path"]),  # the style metrics compare with these latents
        "caches": [p["text_cache"], p["latent_cache"], p["empty_text_key"]],
    }


def _push(p: dict) -> dict:
    return {
        "results": p["config"].results.model_dump(mode="json"),
        "run_id": p["run_id"],
        "eval_dir": p["eval_dir"],  # named by a hash of the adapter bytes and sampling settings
        "adapter_dir": p["adapter_dir"],
        "extra": {name: file_sha256(path) for name, path in sorted(p["extra_files"].items())},
    }


KEY_PARTS: dict[str, Callable[[dict], dict]] = {
    "pull": _pull, "recaption": _recaption, "embed": _embed,
    "train": _train, "evaluate": _evaluate, "push": _push,
}  # fmt: skip


def stage_key(stage: str, task_fn: Callable, parameters: dict) -> str:
    source = hashlib.sha256(inspect.getsource(task_fn).encode()).hexdigest()
    workdir = str(Path(parameters["workdir"]).resolve())
    return f"{stage}-" + content_key(
        stage=stage, source=source, workdir=workdir, **KEY_PARTS[stage](parameters)
    )


def result_storage(workdir: str) -> Path:
    return Path(workdir) / "cache" / "prefect"


def cached(task: Task, stage: str, workdir: str) -> Task:
    """`task` with its stage's cache key and results persisted under the work dir."""

    def key(context, parameters: dict) -> str:
        return stage_key(stage, task.fn, parameters)

    return task.with_options(
        cache_key_fn=key,
        persist_result=True,
        result_storage=result_storage(workdir),
        result_serializer="json",
    )


def is_cached(task: Task, stage: str, workdir: str, args: tuple) -> bool:
    """Whether calling `task(*args)` will be a cache hit (Prefect stores each record under its key);
    lets a cached GPU stage skip waiting for a GPU slot."""
    try:
        parameters = inspect.signature(task.fn).bind(*args).arguments
        return (result_storage(workdir) / stage_key(stage, task.fn, parameters)).is_file()
    except Exception:  # a key that cannot be computed means no cache hit; the task will say why
        return False


def missing_files(result: dict) -> list[str]:
    """Absolute paths named in a stage's result that no longer exist."""
    values = [v for value in result.values() for v in (value if isinstance(value, list) else [value])]
    return [v for v in values if isinstance(v, str) and v.startswith("/") and not Path(v).exists()]

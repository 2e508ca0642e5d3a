"""Lineage: the run id, the code version and the record that ties a result to its inputs."""

from __future__ import annotations

import hashlib
import json
import subprocess
from datetime import UTC, datetime
from importlib import metadata
from pathlib import Path

import yaml

from configs import RunConfig
from tasks.atomic import write_text
from tasks.cache import content_key
from tasks.oxen_repos import describe

PROJECT_ROOT = Path(__file__).resolve().parent.parent


def make_run_id(config: RunConfig, dataset_commit: str) -> str:
    """Same settings on the same data give the same run id, so a re-run finds its own results."""
    return f"{config.run_name}-{content_key(config=config.fingerprint(), commit=dataset_commit)[:10]}"


def code_version() -> str:
    """The git commit of the checkout (with '+dirty' for local edits), else the package version."""
    try:
        sha = subprocess.run(
            ["git", "-C", str(PROJECT_ROOT), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "-C", str(PROJECT_ROOT), "status", "--porcelain", "--untracked-files=no"],
            capture_output=True, text=True, timeout=5,
        ).stdout.strip()  # fmt: skip
        if sha:
            return sha + ("+dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        pass
    try:
        return "pixart-pipeline==" + metadata.version("pixart-pipeline")
    except metadata.PackageNotFoundError:
        return "unknown"


def prompt_hash(template: str) -> str:
    return hashlib.sha256(template.encode()).hexdigest()[:12]


def build_lineage(config: RunConfig, run_id: str, dataset_commit: str, adapter_dir: str) -> dict:
    return {
        "run_id": run_id,
        "dataset_repo": describe(config.dataset),
        "dataset_commit": dataset_commit,
        "caption_model": config.models.llava if config.recaption.enabled else None,
        "caption_prompt_hash": prompt_hash(config.recaption.prompt_template) if config.recaption.enabled else None,
        "lora_path": adapter_dir,
        "lora_rank": config.train.rank,
        "lora_alpha": config.train.resolved_alpha,
        "config_hash": config.fingerprint(),
        "code_version": code_version(),
    }


def write_json(path: Path, data: dict) -> Path:
    return write_text(path, json.dumps(data, indent=2, sort_keys=True, default=str) + "\n")


def write_run_files(config: RunConfig, run_dir: Path, lineage: dict) -> dict[str, Path]:
    """The resolved config and lineage, as the results commit will hold them."""
    config_path = write_text(run_dir / "config.yaml", yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False))
    return {"config.yaml": config_path, "lineage.json": write_json(run_dir / "lineage.json", lineage)}


def write_run_summary(run_dir: Path, stages: dict, run_id: str) -> Path:
    """run_summary.json: each stage's result and state under `stages`, and, when the stages carry
    the `usage` that flows.style_run.RunBoard measures, one table of them under `usage`:
    {"stages": {stage: {wall_s, peak_gib, peak_reserved_gib, allocated_before_gib,
    allocated_after_gib}}, "wall_s": their sum} (GPU fields null without CUDA)."""
    usage = {name: stage["usage"] for name, stage in stages.items() if "usage" in stage}
    results = {name: {k: v for k, v in stage.items() if k != "usage"} for name, stage in stages.items()}
    summary = {"run_id": run_id, "finished_at": datetime.now(UTC).isoformat(), "stages": results}
    if usage:
        summary["usage"] = {"stages": usage, "wall_s": round(sum(u["wall_s"] for u in usage.values()), 3)}
    return write_json(run_dir / "run_summary.json", summary)

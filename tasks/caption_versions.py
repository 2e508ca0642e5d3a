"""Versioned captions: commit LLaVA's captions back to the dataset's Oxen repo, on their own branch.

The branch (recaption.branch_template, e.g. `captions/llava-1.5-7b-hf`) starts at the dataset
commit that was captioned first. Each update writes the dataset's metadata file in its own
format (.jsonl, .csv or .parquet): every original column of each usable row, plus the caption
column (recaption.caption_column_out, e.g. `llava_caption`) and `<column>_flagged`. Images added
to the dataset since the last update are copied onto the branch in the same commit, so training
selects the captions with nothing but `dataset.revision: <branch>` and
`dataset.caption_column: <column>`.

Rows that pull skipped (undecodable images, empty captions) are left out of the branch's
metadata file; the pull report names them. A flagged row (LLaVA's output was still degenerate
after its retry) carries the original caption, as training would use it, and `true` in
`<column>_flagged`. The same captions of the same images make no new commit.
"""

from __future__ import annotations

import io
import json
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq
from prefect import get_run_logger, task

from configs import DatasetConfig, RunConfig
from tasks import oxen_repos
from tasks.atomic import write_bytes
from tasks.cache import content_key
from tasks.contracts import CAPTIONS, MANIFEST, read_table
from tasks.lineage import prompt_hash
from tasks.pull import read_metadata, safe_relative_path
from tasks.workdir import WorkDir


@dataclass(frozen=True)
class CaptionsCommit:
    repo: str
    branch: str
    commit_id: str  # head of the captions branch after this update
    committed: bool  # False: the branch already held exactly these captions
    rows: int
    flagged: int
    metadata_path: Path  # the local copy of the committed metadata file


def flagged_column(column: str) -> str:
    return f"{column}_flagged"


def recaption_run_id(config: RunConfig, dataset_commit: str) -> str:
    """One folder per dataset commit and caption settings, under the work dir's runs/."""
    settings = {"recaption": config.recaption.model_dump(mode="json"), "llava": config.models.llava,
                "dtype": config.dtype, "dataset": config.dataset.model_dump(mode="json")}  # fmt: skip
    return f"recaption-{content_key(settings=settings, commit=dataset_commit)[:10]}"


def caption_rows(
    metadata_rows: list[dict], manifest: pa.Table, captions: pa.Table, column: str
) -> list[dict]:
    """The original metadata row of every usable image, in file order, with the caption columns added.

    `metadata_rows` come from pull.read_metadata of the captioned commit; `manifest` and
    `captions` are that pull's MANIFEST and the recaption stage's CAPTIONS tables.
    """
    by_image = {row["image_id"]: row for row in captions.to_pylist()}
    usable = {row["file_name"]: by_image[row["image_id"]] for row in manifest.to_pylist()}
    rows, seen = [], set()
    for row in metadata_rows:
        try:
            name = safe_relative_path(row.get("file_name"))
        except ValueError:
            continue
        if name not in usable or name in seen:  # a skipped row, or a later duplicate pull ignored
            continue
        seen.add(name)
        caption = usable[name]
        original = {key: value for key, value in row.items() if key != "_row"}
        rows.append(original | {column: caption["caption"], flagged_column(column): caption["flagged"]})
    if len(seen) != len(usable):
        missing = sorted(set(usable) - seen)
        raise ValueError(f"{len(missing)} manifest image(s) not in the metadata file, e.g. {missing[0]}")
    return rows


def encode_metadata(rows: list[dict], metadata_file: str) -> bytes:
    """`rows` in the format `metadata_file`'s suffix names, as pull.read_metadata reads it back."""
    if metadata_file.endswith(".jsonl"):
        return "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows).encode()
    buffer = io.BytesIO()
    table = pa.Table.from_pylist(rows)
    if metadata_file.endswith(".csv"):
        pacsv.write_csv(table, buffer)
    else:
        pq.write_table(table, buffer)
    return buffer.getvalue()


def commit_message(model_id: str, revision: str | None, prompt_template: str, rows: int, flagged: int,
                   dataset_commit: str) -> str:  # fmt: skip
    model = f"{model_id}@{revision}" if revision else model_id
    return (
        f"Captions by {model}, prompt {prompt_hash(prompt_template)}: {rows} images "
        f"({flagged} flagged) of dataset commit {dataset_commit}"
    )


def commit_captions(
    config: RunConfig,
    workdir: WorkDir,
    manifest: pa.Table,
    captions: pa.Table,
    dataset_commit: str,
    out_dir: Path,
) -> CaptionsCommit:
    """Commit `captions` of the dataset at `dataset_commit` to its captions branch (local repos)."""
    dataset: DatasetConfig = config.dataset
    recaption = config.recaption
    if dataset.is_remote:
        raise oxen_repos.OxenError(
            f"{oxen_repos.describe(dataset)}: committing captions to a remote dataset repo is not supported; "
            "clone it and point dataset.repo at the local copy"
        )
    repo_path = workdir.resolve(dataset.repo)
    with oxen_repos.open_revision(dataset, dataset_commit, repo_path) as revision:
        metadata_rows, _ = read_metadata(revision.read_bytes(dataset.metadata_file), dataset.metadata_file)
    rows = caption_rows(metadata_rows, manifest, captions, recaption.caption_column_out)
    flagged = sum(bool(row[flagged_column(recaption.caption_column_out)]) for row in rows)

    metadata_path = write_bytes(
        out_dir / "captions-branch" / Path(dataset.metadata_file).name,
        encode_metadata(rows, dataset.metadata_file),
    )
    files = {dataset.metadata_file: metadata_path}
    files.update({row["file_name"]: workdir.resolve(row["image_path"]) for row in manifest.to_pylist()})
    branch = recaption.branch(config.models.llava)
    message = commit_message(
        config.models.llava,
        recaption.model_revision,
        recaption.prompt_template,
        len(rows),
        flagged,
        dataset_commit,
    )
    update = oxen_repos.update_branch(repo_path, branch, dataset_commit, files, message)
    return CaptionsCommit(
        str(repo_path), branch, update.commit_id, update.committed, len(rows), flagged, metadata_path
    )


# --- Prefect task ---------------------------------------------------------------------------------


@task(name="commit-captions")
def commit_captions_task(
    config: RunConfig, workdir: str, manifest_path: str, captions_path: str, dataset_commit: str, run_dir: str
) -> dict:
    logger = get_run_logger()
    result = commit_captions(
        config, WorkDir(Path(workdir)), read_table(Path(manifest_path), MANIFEST),
        read_table(Path(captions_path), CAPTIONS), dataset_commit, Path(run_dir),
    )  # fmt: skip
    if result.committed:
        logger.info("committed %d captions (%d flagged) to %s@%s: %s",
                    result.rows, result.flagged, result.repo, result.branch, result.commit_id)  # fmt: skip
    else:
        logger.info("%s@%s already holds these captions (%s); nothing committed",
                    result.repo, result.branch, result.commit_id)  # fmt: skip
    return {
        "repo": result.repo, "branch": result.branch, "commit_id": result.commit_id, "committed": result.committed,
        "rows": result.rows, "flagged": result.flagged, "metadata": str(result.metadata_path),
    }  # fmt: skip

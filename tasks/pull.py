"""Pull: read an imagefolder dataset from an Oxen repo at a revision and write its manifest.

The dataset is a metadata file (`metadata.jsonl`, `.csv` or `.parquet`) with a `file_name`
column and a caption column, next to the images it names. Every row is checked: the path must
stay inside the dataset, the image must decode, the caption must be non-empty text. Bad rows
are named in `pull_report.jsonl` and left out; the run goes on with the rest. Problems that
stop the run (no such revision, no metadata file, no caption column, no usable row) raise.

Output (contracts.MANIFEST): one row per usable image, its bytes copied into the work dir's
content-addressed image store as `<sha256><suffix>`.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq
from prefect import get_run_logger, task

from configs import DatasetConfig, RunConfig
from tasks import oxen_repos
from tasks.atomic import write_text
from tasks.cache import content_key
from tasks.contracts import MANIFEST, write_table
from tasks.images import load_rgb
from tasks.workdir import WorkDir

PROJECT_ROOT = Path(__file__).resolve().parent.parent
# A caption is a sentence or a paragraph; a longer one overflows LLaVA's context in recaption
# (and T5 reads only its first ~500 characters).
MAX_CAPTION_CHARS = 4000


class DatasetError(ValueError):
    """The dataset cannot be used at all; the message names the repo, revision, file or column."""


@dataclass
class PullResult:
    manifest_path: Path
    report_path: Path
    commit_id: str
    rows: int
    skipped: int


def read_metadata(data: bytes, metadata_file: str) -> tuple[list[dict], list[dict]]:
    """Rows of the metadata file, and problems with lines that could not be parsed."""
    if metadata_file.endswith(".jsonl"):
        rows, problems = [], []
        data = data.removeprefix(b"\xef\xbb\xbf")  # the byte-order mark some Windows editors add
        for number, raw in enumerate(data.splitlines(), start=1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as exc:  # not replaced: a caption of U+FFFD would train silently
                problems.append({"row": number, "file_name": None, "problem": f"not valid UTF-8: {exc}"})
                continue
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                problems.append({"row": number, "file_name": None, "problem": f"malformed JSON: {exc.msg}"})
                continue
            if not isinstance(row, dict):
                problems.append({"row": number, "file_name": None, "problem": "line is not a JSON object"})
                continue
            rows.append({"_row": number, **row})
        return rows, problems
    try:
        table = pacsv.read_csv(io.BytesIO(data)) if metadata_file.endswith(".csv") else pq.read_table(io.BytesIO(data))
    except (pa.ArrowInvalid, OSError) as exc:
        raise DatasetError(f"{metadata_file}: cannot be parsed: {exc}") from None
    return [{"_row": i + 1, **row} for i, row in enumerate(table.to_pylist())], []


def safe_relative_path(file_name: object) -> str:
    """The dataset-relative path, or ValueError when it is not a plain path inside the dataset."""
    if not isinstance(file_name, str) or not file_name.strip():
        raise ValueError("file_name is missing or not text")
    path = PurePosixPath(file_name.replace("\\", "/"))
    if path.is_absolute() or ".." in path.parts or file_name.startswith("~"):
        raise ValueError("path escapes the dataset")
    if not path.parts or path.parts[0] == ".oxen" or "\0" in file_name:
        raise ValueError("not a dataset file path (the dataset root, Oxen's own folder, or a NUL character)")
    return str(path)


def _inside(repo_path: Path, rel_path: str) -> bool:
    """Whether the file stays inside the repo once every symlink on its way is followed."""
    return (repo_path / rel_path).resolve().is_relative_to(repo_path.resolve())


def store_image(data: bytes, suffix: str, images_dir: Path, name: str | None = None) -> tuple[str, Path, int, int]:
    """Copy an image into the content-addressed store after checking that it decodes.

    `name` (the image's path in the dataset) is what an error message calls it.
    """
    image_id = hashlib.sha256(data).hexdigest()
    target = images_dir / f"{image_id}{suffix.lower()}"
    if not target.exists():
        images_dir.mkdir(parents=True, exist_ok=True)
        tmp = images_dir / f".{image_id}.{os.getpid()}.tmp{suffix.lower()}"
        tmp.write_bytes(data)
        try:
            width, height = load_rgb(tmp, name=name).size
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        os.replace(tmp, target)
    else:
        width, height = load_rgb(target, name=name).size
    return image_id, target, width, height


def resolve_repo_path(cfg: DatasetConfig, workdir: WorkDir) -> Path | None:
    return None if cfg.is_remote else workdir.resolve(cfg.repo)


def ensure_dataset_repo(cfg: DatasetConfig, workdir: WorkDir) -> None:
    """First use of the demo: commit the bundled folder into a new local repo."""
    repo_path = resolve_repo_path(cfg, workdir)
    if repo_path is None or repo_path.exists() or not cfg.import_from:
        return
    source = Path(cfg.import_from)
    if not source.is_absolute():
        source = source if source.exists() else PROJECT_ROOT / source
    oxen_repos.import_folder(source, repo_path, f"Import dataset from {cfg.import_from}")


def pull_dataset(cfg: DatasetConfig, workdir: WorkDir) -> PullResult:
    ensure_dataset_repo(cfg, workdir)
    repo_path = resolve_repo_path(cfg, workdir)
    if repo_path is not None and not repo_path.exists():
        raise DatasetError(f"{repo_path}: dataset repo does not exist")
    label = oxen_repos.describe(cfg) if cfg.is_remote else str(repo_path)
    rows_out, problems = [], []
    with oxen_repos.open_revision(cfg, cfg.revision, repo_path) as revision:
        try:
            metadata = revision.read_bytes(cfg.metadata_file)
        except FileNotFoundError:
            raise DatasetError(f"{label}@{cfg.revision}: no {cfg.metadata_file}") from None
        rows, problems = read_metadata(metadata, cfg.metadata_file)
        if rows and not any(cfg.caption_column in row for row in rows):
            columns = sorted({k for row in rows for k in row if k != "_row"})
            raise DatasetError(
                f"{label}/{cfg.metadata_file}: caption column {cfg.caption_column!r} not found; columns: {columns}"
            )
        seen_names, seen_ids = set(), set()
        for row in rows:
            number, file_name = row["_row"], row.get("file_name")

            def skip(problem: str) -> None:
                problems.append({"row": number, "file_name": file_name, "problem": problem})  # noqa: B023

            caption = row.get(cfg.caption_column)
            try:
                rel_path = safe_relative_path(file_name)
            except ValueError as exc:
                skip(str(exc))
                continue
            if not isinstance(caption, str) or not caption.strip():
                skip(f"caption column {cfg.caption_column!r} is empty or not text")
                continue
            if len(caption) > MAX_CAPTION_CHARS:
                skip(f"caption is {len(caption)} characters long; the limit is {MAX_CAPTION_CHARS}")
                continue
            if repo_path is not None and not _inside(repo_path, rel_path):
                skip("path escapes the dataset through a symlink")  # reading it would follow the link
                continue
            if rel_path in seen_names:
                skip("duplicate file_name")
                continue
            seen_names.add(rel_path)
            try:
                data = revision.read_bytes(rel_path)
                image_id, stored, width, height = store_image(
                    data, PurePosixPath(rel_path).suffix, workdir.images, name=rel_path
                )
            except FileNotFoundError:
                skip("image file is missing")
                continue
            except (ValueError, OSError) as exc:
                skip(f"image does not decode: {exc}")
                continue
            if image_id in seen_ids:
                skip("same image bytes as an earlier row")
                continue
            seen_ids.add(image_id)
            rows_out.append(
                {
                    "image_id": image_id, "file_name": rel_path, "image_path": str(stored),
                    "width": width, "height": height, "original_caption": caption.strip(),
                    "source_repo": label, "source_commit": revision.commit_id,
                }
            )  # fmt: skip
        commit_id = revision.commit_id
    if not rows_out:
        raise DatasetError(f"{label}@{cfg.revision}: no usable rows ({len(problems)} problems, e.g. {problems[:3]})")
    key = content_key(dataset=cfg.model_dump(mode="json"), commit=commit_id)[:16]
    out_dir = workdir.root / "cache" / "manifests" / key
    manifest_path = write_table(pa.Table.from_pylist(rows_out, schema=MANIFEST), MANIFEST, out_dir / "manifest.parquet")
    report_path = out_dir / "pull_report.jsonl"
    write_text(report_path, "".join(json.dumps(p, default=str) + "\n" for p in problems))
    return PullResult(manifest_path, report_path, commit_id, len(rows_out), len(problems))


# --- Prefect task ---------------------------------------------------------------------------------


@task(name="pull", retries=0)
def pull_task(config: RunConfig, workdir: str) -> dict:
    logger = get_run_logger()
    result = pull_dataset(config.dataset, WorkDir(Path(workdir)))
    logger.info("pulled %d rows at commit %s; %d skipped", result.rows, result.commit_id, result.skipped)
    if result.skipped:
        for line in result.report_path.read_text().splitlines()[:20]:
            logger.warning("skipped: %s", line)
    return {
        "manifest": str(result.manifest_path), "report": str(result.report_path), "commit_id": result.commit_id,
        "rows": result.rows, "skipped": result.skipped,
    }  # fmt: skip

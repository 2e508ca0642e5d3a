"""Artifacts: what a style run shows in the Prefect UI, built from the files its stages wrote.

Pure functions (no Prefect here): they read a stage's outputs and return markdown, table rows
or a PNG; `flows/style_run.py` publishes them with Prefect's `create_*_artifact`. A browser must
be able to load every image, so `image_url` inlines small ones as data URIs and points at
`pixart-pipeline serve`'s image server for larger ones (None when neither works: the caller then
names the file instead of showing it).
"""

from __future__ import annotations

import base64
import json
import re
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from urllib.parse import quote

from PIL import Image, ImageDraw, ImageFont

from tasks.contracts import CAPTIONS, read_table
from tasks.images import PNG_THREADS, save_png

DATA_URI_LIMIT = 256 * 1024  # bytes of PNG; above this an image is only shown when served
STAGES = ("pull", "recaption", "embed", "train", "evaluate", "push")


def artifact_key(*parts: str) -> str:
    """Prefect artifact keys allow lowercase letters, digits and dashes only."""
    key = re.sub(r"[^a-z0-9]+", "-", "-".join(parts).lower()).strip("-")
    return key or "artifact"


# ---- images -------------------------------------------------------------------------------------


def image_url(
    path: str | Path, served_root: str | None, served_url: str | None, limit: int = DATA_URI_LIMIT
) -> str | None:
    """A URL the browser can load for `path`: a data URI when the file is small (it then shows
    for as long as the artifact exists), else the image server's URL when it serves the file's
    folder, else None."""
    path = Path(path).resolve()
    if path.stat().st_size <= limit:
        return "data:image/png;base64," + base64.b64encode(path.read_bytes()).decode("ascii")
    if served_root and served_url and path.is_relative_to(Path(served_root).resolve()):
        relative = path.relative_to(Path(served_root).resolve())
        return f"{served_url.rstrip('/')}/{quote(relative.as_posix())}"
    return None


def _font(size: int) -> ImageFont.ImageFont:
    return ImageFont.load_default(size=size)


def grid_sheet(
    grid_paths: list[str | Path],
    labels: list[str],
    out_path: Path,
    min_width: int = 256,
    rows: tuple[int, int] | None = None,
    max_cell: int = 256,
    columns: int = 2,
) -> Path:
    """All base|LoRA grids of an evaluation in one image: a row per prompt, its label above it.

    Each grid has one row per seed; `rows=(keep, of)` keeps the first `keep` of its `of` rows (a
    preview small enough to inline). The sheet is a preview: a grid of `columns` images (models)
    wider than `max_cell` px per image is shrunk to that (full-size images are in the evaluation's
    grids/). Tiny grids (the demo's images are 64 px) are enlarged by whole pixels so they stay sharp."""
    if not grid_paths:
        raise ValueError("no grids to put on the sheet")
    if len(labels) != len(grid_paths):
        raise ValueError(f"{len(labels)} labels for {len(grid_paths)} grids")

    def load(path: str | Path) -> Image.Image:
        grid = Image.open(path).convert("RGB")
        if rows is not None:
            keep, total = rows
            grid = grid.crop((0, 0, grid.width, grid.height // total * keep))
        return _shrink(grid, max_cell * columns)

    with ThreadPoolExecutor(PNG_THREADS) as pool:
        grids = list(pool.map(load, grid_paths))
    scale = max(1, -(-min_width // max(g.width for g in grids)))
    grids = [g.resize((g.width * scale, g.height * scale), Image.Resampling.NEAREST) for g in grids]
    font, pad, label_h = _font(12), 6, 18
    width = max(g.width for g in grids) + 2 * pad
    header_h = 20
    height = header_h + sum(label_h + g.height + pad for g in grids) + pad
    sheet = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(sheet)
    half = grids[0].width // 2
    draw.text((pad + half // 2, 4), "base", fill="black", font=font, anchor="ma")
    draw.text((pad + half + half // 2, 4), "LoRA", fill="black", font=font, anchor="ma")
    y = header_h
    for grid, label in zip(grids, labels, strict=True):
        draw.text((pad, y + 2), _fit(draw, label, font, width - 2 * pad), fill="#333333", font=font)
        sheet.paste(grid, (pad, y + label_h))
        y += label_h + grid.height + pad
    return save_png(out_path, sheet, compress_level=1)  # a tall preview: fast beats small


def _shrink(grid: Image.Image, width: int) -> Image.Image:
    """`grid` at most `width` px wide, aspect kept. BOX averages each cell's pixels: no aliasing,
    exact for the usual halving of 512 px images, and ~3x faster than LANCZOS on a full sheet."""
    if grid.width <= width:
        return grid
    height = max(1, round(grid.height * width / grid.width))
    return grid.resize((width, height), Image.Resampling.BOX)


def _fit(draw: ImageDraw.ImageDraw, text: str, font: ImageFont.ImageFont, width: int) -> str:
    if draw.textlength(text, font=font) <= width:
        return text
    while text and draw.textlength(text + "...", font=font) > width:
        text = text[:-1]
    return text + "..."


def read_train_log(path: str | Path) -> list[dict]:
    rows = []
    for number, line in enumerate(Path(path).read_text().splitlines(), start=1):
        if not line.strip():
            continue
        row = json.loads(line)
        if "step" not in row or "loss" not in row:
            raise ValueError(f"{path}:{number}: train log row without 'step' and 'loss'")
        rows.append(row)
    return rows


def loss_curve(rows: list[dict], out_path: Path, size: tuple[int, int] = (520, 260)) -> Path:
    """Training loss per step (light) and its moving average (dark), as a small PNG chart."""
    if not rows:
        raise ValueError("no training steps to plot")
    steps = [int(r["step"]) for r in rows]
    losses = [float(r["loss"]) for r in rows]
    window = max(1, len(losses) // 20)
    smooth = [sum(losses[max(0, i - window + 1) : i + 1]) / len(losses[max(0, i - window + 1) : i + 1])
              for i in range(len(losses))]  # fmt: skip
    width, height = size
    left, right, top, bottom = 56, 14, 26, 30
    low, high = min(losses), max(losses)
    high = high if high > low else low + 1e-6
    first, last = steps[0], max(steps[-1], steps[0] + 1)

    def point(step: int, loss: float) -> tuple[float, float]:
        x = left + (step - first) / (last - first) * (width - left - right)
        y = top + (high - loss) / (high - low) * (height - top - bottom)
        return x, y

    image = Image.new("RGB", size, "white")
    draw = ImageDraw.Draw(image)
    font = _font(11)
    draw.text(
        (left, 6), f"training loss ({len(rows)} steps, moving average of {window})", fill="black", font=font
    )
    draw.line([(left, top), (left, height - bottom), (width - right, height - bottom)], fill="#888888")
    for value in (high, (high + low) / 2, low):
        y = point(first, value)[1]
        draw.text((left - 4, y), f"{value:.3g}", fill="#444444", font=font, anchor="rm")
    for step in (first, last):
        x = point(step, low)[0]
        draw.text((x, height - bottom + 4), str(step), fill="#444444", font=font, anchor="ma")
    if len(rows) > 1:
        draw.line([point(s, v) for s, v in zip(steps, losses, strict=True)], fill="#a6c8ff", width=1)
        draw.line([point(s, v) for s, v in zip(steps, smooth, strict=True)], fill="#1f4fbf", width=2)
    else:
        x, y = point(steps[0], losses[0])
        draw.ellipse([x - 3, y - 3, x + 3, y + 3], fill="#1f4fbf")
    return save_png(out_path, image)


# ---- tables and markdown -------------------------------------------------------------------------


def caption_rows(captions_path: str | Path, limit: int = 20) -> list[dict]:
    """The first `limit` captions: original next to LLaVA's, and which one training uses."""
    table = read_table(Path(captions_path), CAPTIONS).slice(0, limit)
    return [
        {
            "image": row["image_id"][:12],
            "original": row["original_caption"],
            "generated": row["generated_caption"] or "",
            "trained on": "original" if row["flagged"] or row["generated_caption"] is None else "generated",
        }
        for row in table.to_pylist()
    ]


def metrics_markdown(m: dict, run_id: str) -> str:
    """The evaluation's style-shift metrics (tasks/style_metrics.py) as a short report."""
    ratio = m["latent_fd_ratio"]
    verdict = (
        "moved samples toward the training style" if ratio > 1 else "did not move samples toward the style"
    )
    return "\n".join([
        f"# Style shift of {run_id}",
        "",
        f"**latent FD ratio (base / LoRA): {ratio:.3f}**: the LoRA {verdict} (above 1 is closer).",
        "",
        "| metric (lower is closer to the training images) | base | LoRA |",
        "| --- | --- | --- |",
        f"| latent Frechet distance (diagonal) | {m['latent_fd_base']:.4g} | {m['latent_fd_lora']:.4g} |",
        f"| colour distance (0-255) | {m['color_distance_base']:.3g} | {m['color_distance_lora']:.3g} |",
        "",
        "How both are measured: `tasks/style_metrics.py`.",
    ])  # fmt: skip


def results_rows(run_id: str, pushed: dict) -> list[dict]:
    """One row naming the results commit; `pixart-pipeline runs` reads it back."""
    return [
        {
            "run_id": run_id,
            "repo": pushed["repo"],
            "branch": pushed["branch"],
            "commit_id": pushed["commit_id"],
        }
    ]


def progress_description(stage_states: dict[str, str], current: str | None = None) -> str:
    """'pull: Cached | recaption: Completed | embed: running | train | ...' for the progress artifact."""
    parts = []
    for stage in STAGES:
        if stage in stage_states:
            parts.append(f"{stage}: {stage_states[stage]}")
        elif stage == current:
            parts.append(f"{stage}: running")
        else:
            parts.append(stage)
    return " | ".join(parts)

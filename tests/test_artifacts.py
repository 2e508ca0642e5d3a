"""What a style run shows in the Prefect UI: the pure builders in tasks/artifacts.py."""

from __future__ import annotations

import base64
import json
from pathlib import Path

import pyarrow as pa
import pytest
from PIL import Image

from tasks import artifacts
from tasks.contracts import CAPTIONS, write_table


def _png(path: Path, size: tuple[int, int], colour: str = "red") -> Path:
    Image.new("RGB", size, colour).save(path)
    return path


def test_artifact_keys_use_only_what_prefect_allows():
    assert artifacts.artifact_key("My_Style.v2", "lora-grid") == "my-style-v2-lora-grid"
    assert artifacts.artifact_key("__") == "artifact"


def test_small_images_are_inlined_and_large_ones_served(tmp_path: Path):
    small = _png(tmp_path / "small.png", (8, 8))
    url = artifacts.image_url(small, None, None)
    assert url.startswith("data:image/png;base64,")
    assert base64.b64decode(url.split(",", 1)[1]) == small.read_bytes()

    (tmp_path / "runs" / "a b").mkdir(parents=True)
    large = _png(tmp_path / "runs" / "a b" / "grid.png", (8, 8))
    served = artifacts.image_url(large, str(tmp_path), "http://127.0.0.1:4280/", limit=10)
    assert served == "http://127.0.0.1:4280/runs/a%20b/grid.png"
    # Neither small enough nor under the served folder: nothing the browser could load.
    assert artifacts.image_url(large, str(tmp_path / "elsewhere"), "http://x", limit=10) is None
    assert artifacts.image_url(large, None, None, limit=10) is None


def test_grid_sheet_stacks_one_labelled_row_per_prompt(tmp_path: Path):
    grids = [
        _png(tmp_path / f"{i}.png", (128, 64), colour) for i, colour in enumerate(["red", "blue", "green"])
    ]
    sheet = artifacts.grid_sheet(
        grids, ["0. a cat", "1. a dog", "2. " + "long " * 40], tmp_path / "out" / "sheet.png"
    )
    image = Image.open(sheet).convert("RGB")
    assert image.width >= 256  # tiny grids are enlarged by whole pixels
    assert image.height > 3 * 128
    # The second row's grid (blue) sits below the first (red), enlarged 2x.
    column = [image.getpixel((10, y)) for y in range(image.height)]
    first_red, first_blue = column.index((255, 0, 0)), column.index((0, 0, 255))
    assert first_blue - first_red >= 128
    # A preview keeps each grid's first seed row: two-seed grids (red over blue) show red only.
    two_seeds = Image.new("RGB", (128, 128), "red")
    two_seeds.paste(Image.new("RGB", (128, 64), "blue"), (0, 64))
    two_seeds.save(tmp_path / "two.png")
    preview = artifacts.grid_sheet([tmp_path / "two.png"], ["0. a cat"], tmp_path / "p.png", rows=(1, 2))
    colours = {colour for _, colour in Image.open(preview).convert("RGB").getcolors(1 << 16)}
    assert (255, 0, 0) in colours and (0, 0, 255) not in colours
    with pytest.raises(ValueError, match="2 labels for 3 grids"):
        artifacts.grid_sheet(grids, ["a", "b"], tmp_path / "bad.png")


def test_grid_sheet_of_full_size_grids_is_a_preview(tmp_path: Path):
    """512 px images (base red | LoRA blue, two seeds) come out at most 256 px a cell."""
    grids = []
    for i in range(3):
        grid = Image.new("RGB", (2 * 512, 2 * 512), "red")
        grid.paste(Image.new("RGB", (512, 2 * 512), "blue"), (512, 0))
        grids.append(grid)
        grid.save(tmp_path / f"{i}.png")
    paths = [tmp_path / f"{i}.png" for i in range(3)]
    sheet = Image.open(artifacts.grid_sheet(paths, ["0. a", "1. b", "2. c"], tmp_path / "sheet.png"))
    sheet = sheet.convert("RGB")
    assert sheet.width <= 2 * 256 + 12  # two cells and the side padding
    row = [sheet.getpixel((x, sheet.height // 2)) for x in range(sheet.width)]
    assert 250 <= row.count((255, 0, 0)) <= 256 and 250 <= row.count((0, 0, 255)) <= 256
    column = [sheet.getpixel((100, y)) for y in range(sheet.height)]
    assert 3 * 500 <= column.count((255, 0, 0)) <= 3 * 512  # each grid 512 px tall: aspect kept
    wider = artifacts.grid_sheet(paths, ["0. a", "1. b", "2. c"], tmp_path / "w.png", max_cell=400)
    assert Image.open(wider).width == 2 * 400 + 12


def test_loss_curve_is_drawn_from_the_train_log(tmp_path: Path):
    log = tmp_path / "train_log.jsonl"
    log.write_text("".join(json.dumps({"step": s, "loss": 2.0 / s, "lr": 1e-3}) + "\n" for s in range(1, 51)))
    curve = artifacts.loss_curve(artifacts.read_train_log(log), tmp_path / "curve.png", size=(300, 150))
    image = Image.open(curve).convert("RGB")
    assert image.size == (300, 150)
    dark_blue = (0x1F, 0x4F, 0xBF)
    pixels = [image.getpixel((x, y)) for x in range(image.width) for y in range(image.height)]
    assert pixels.count(dark_blue) > 50  # the moving average is drawn

    log.write_text('{"step": 1, "loss": 1.0}\n{"epoch": 0}\n')
    with pytest.raises(ValueError, match=r"train_log.jsonl:2"):
        artifacts.read_train_log(log)
    with pytest.raises(ValueError, match="no training steps"):
        artifacts.loss_curve([], tmp_path / "empty.png")


def test_caption_rows_show_original_generated_and_which_one_trains(tmp_path: Path):
    rows = [
        {"image_id": f"{i:064x}", "original_caption": f"orig {i}", "generated_caption": f"gen {i}",
         "caption": f"gen {i}", "model_id": "tiny:llava", "prompt": "p", "flagged": i == 1}
        for i in range(5)
    ]  # fmt: skip
    rows[2]["generated_caption"] = None
    path = write_table(pa.Table.from_pylist(rows, schema=CAPTIONS), CAPTIONS, tmp_path / "captions.parquet")
    shown = artifacts.caption_rows(path, limit=3)
    assert [row["original"] for row in shown] == ["orig 0", "orig 1", "orig 2"]
    assert [row["trained on"] for row in shown] == ["generated", "original", "original"]
    assert shown[2]["generated"] == "" and len(shown[0]["image"]) == 12


def test_metrics_markdown_and_progress_text():
    metrics = {"latent_fd_ratio": 3.5, "latent_fd_base": 90.0, "latent_fd_lora": 25.7,
               "color_distance_base": 0.54, "color_distance_lora": 0.47}  # fmt: skip
    text = artifacts.metrics_markdown(metrics, "demo-123")
    assert "3.500" in text and "moved samples toward" in text and "| 90 | 25.7 |" in text
    assert "did not move" in artifacts.metrics_markdown(metrics | {"latent_fd_ratio": 0.9}, "demo-123")

    progress = artifacts.progress_description({"pull": "Cached", "recaption": "Completed"}, "embed")
    assert progress == "pull: Cached | recaption: Completed | embed: running | train | evaluate | push"
    pushed = {"repo": "/r", "branch": "runs/x", "commit_id": "abc"}
    assert artifacts.results_rows("x", pushed) == [
        {"run_id": "x", "repo": "/r", "branch": "runs/x", "commit_id": "abc"}
    ]

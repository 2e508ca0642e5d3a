"""Aspect-ratio buckets: train on non-square images without cropping them square.

PixArt-alpha was trained on a table of 33 sizes of about 512x512 pixels each, from 1:4 to 4:1
(ASPECT_RATIO_512 below, diffusers' ASPECT_RATIO_512_BIN). With `embed.buckets` on, each image
goes to the bucket whose height/width ratio is nearest its own, is resized to cover the bucket
and centre-cropped; its latents are cached at that size. Training then draws every batch from
one bucket, since the latents of a batch must share a shape.

At other resolutions the table is scaled and rounded to multiples of SIZE_MULTIPLE, so
latents split into whole transformer patches; sizes that coincide after rounding become one
bucket (at 64 px the 33 sizes shrink to a handful).
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence

import numpy as np

# (height, width) in pixels by height/width ratio: PixArt-alpha's ASPECT_RATIO_512_BIN.
ASPECT_RATIO_512: dict[str, tuple[int, int]] = {
    "0.25": (256, 1024), "0.28": (256, 928), "0.32": (288, 896), "0.33": (288, 864), "0.35": (288, 832),
    "0.4": (320, 800), "0.42": (320, 768), "0.48": (352, 736), "0.5": (352, 704), "0.52": (352, 672),
    "0.57": (384, 672), "0.6": (384, 640), "0.68": (416, 608), "0.72": (416, 576), "0.78": (448, 576),
    "0.82": (448, 544), "0.88": (480, 544), "0.94": (480, 512), "1.0": (512, 512), "1.07": (512, 480),
    "1.13": (544, 480), "1.21": (544, 448), "1.29": (576, 448), "1.38": (576, 416), "1.46": (608, 416),
    "1.67": (640, 384), "1.75": (672, 384), "2.0": (704, 352), "2.09": (736, 352), "2.4": (768, 320),
    "2.5": (800, 320), "3.0": (864, 288), "4.0": (1024, 256),
}  # fmt: skip
SIZE_MULTIPLE = 16  # pixels: the VAE's 8x downsampling times PixArt's 2x2 patches

Size = tuple[int, int]  # (height, width) in pixels


def bucket_table(resolution: int, multiple: int = SIZE_MULTIPLE) -> list[Size]:
    """The 512 table scaled to `resolution`, distinct sizes only, ordered by height/width."""

    def scaled(pixels: int) -> int:
        return max(multiple, round(pixels * resolution / 512 / multiple) * multiple)

    sizes = {(scaled(h), scaled(w)) for h, w in ASPECT_RATIO_512.values()}
    return sorted(sizes, key=lambda size: size[0] / size[1])


def nearest_bucket(height: int, width: int, table: Sequence[Size]) -> Size:
    """The size whose ratio is nearest the image's, measured as |log ratio| so that portrait and
    landscape are treated alike (PixArt compares plain h/w differences, coarse for tall images)."""
    if height < 1 or width < 1:
        raise ValueError(f"image size {height}x{width} has no pixels")
    target = math.log(height / width)
    return min(table, key=lambda size: abs(math.log(size[0] / size[1]) - target))


def ratio_tolerance(table: Sequence[Size]) -> float:
    """The largest |log(bucket ratio / image ratio)| for an image whose ratio is within the table's
    range: half the widest gap between neighbouring buckets."""
    logs = sorted(math.log(h / w) for h, w in table)
    return max((b - a for a, b in itertools.pairwise(logs)), default=0.0) / 2


def bucket_name(size: Size) -> str:
    return f"{size[0]}x{size[1]}"


def parse_bucket(name: str) -> Size:
    try:
        height, width = (int(part) for part in name.split("x"))
    except ValueError:
        raise ValueError(f"bucket {name!r} is not 'HEIGHTxWIDTH'") from None
    return height, width


def bucket_batches(
    bucket_of_each_row: Sequence[str | None], batch_size: int, seed: int, epoch: int
) -> list[list[int]]:
    """One epoch's batches of row indices, every batch from a single bucket.

    A pure function of (buckets, batch_size, seed, epoch), so a resumed run sees the same
    batches: rows of each bucket are shuffled and cut into batches (the last one of a bucket may
    be short), then the batches of all buckets are shuffled together. Rows whose bucket is None
    (buckets off) form one bucket.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    rng = np.random.default_rng([seed, epoch])
    rows_of: dict[str, list[int]] = {}
    for row, bucket in enumerate(bucket_of_each_row):
        rows_of.setdefault(bucket or "", []).append(row)
    batches = []
    for bucket in sorted(rows_of):  # a fixed order, so the draws below do not depend on dict order
        rows = np.asarray(rows_of[bucket])[rng.permutation(len(rows_of[bucket]))]
        batches += [rows[i : i + batch_size].tolist() for i in range(0, len(rows), batch_size)]
    return [batches[i] for i in rng.permutation(len(batches))]

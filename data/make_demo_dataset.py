"""Generate the bundled demo style dataset (``data/demo/``).

The style is deliberately easy to verify by machine: every pixel is one of five
flat palette colours, and every shape carries a bold 3 px black outline. A model
that has picked up the style should produce images whose pixels mostly sit close
to ``PALETTE``; ``palette_fraction`` measures exactly that.

Output is an imagefolder-style dataset::

    data/demo/metadata.jsonl        {"file_name": "images/0001_red_circle.png", "text": "..."}
    data/demo/images/*.png          64x64 RGB

Run ``python data/make_demo_dataset.py``; the output is byte-identical across runs.
"""

from __future__ import annotations

import io
import json
import math
import os
import random
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

SIZE = 64
NUM_IMAGES = 32
SEED = 20240601
OUTLINE_PX = 3

CREAM = (245, 236, 212)
BLACK = (0, 0, 0)
RED = (214, 48, 49)
TEAL = (22, 138, 134)
MUSTARD = (228, 174, 36)

# Exactly five colours. They are pairwise far apart (L-inf > 2 * PALETTE_TOLERANCE),
# so a pixel can never be "near" two palette colours at once.
PALETTE: list[tuple[int, int, int]] = [CREAM, BLACK, RED, TEAL, MUSTARD]

# Only the accent colours are used as fills; cream is reserved for the background
# and black for outlines, so the style reads the same in every image.
ACCENTS = {"red": RED, "teal": TEAL, "mustard": MUSTARD}

# Generated samples are never pixel-exact (VAE decoding blurs and shifts colours),
# so the style check allows a small per-channel slack.
PALETTE_TOLERANCE = 24

ROOT = Path(__file__).resolve().parent / "demo"


def palette_fraction(image: Image.Image, tolerance: int = PALETTE_TOLERANCE) -> float:
    """Fraction of pixels within L-inf ``tolerance`` of some ``PALETTE`` colour.

    Demo images score 1.0; uniform random noise scores a few percent.
    """
    pixels = np.asarray(image.convert("RGB"), dtype=np.int16).reshape(-1, 1, 3)
    palette = np.asarray(PALETTE, dtype=np.int16).reshape(1, -1, 3)
    near = (np.abs(pixels - palette).max(axis=2) <= tolerance).any(axis=1)
    return float(near.mean())


# --- shapes -------------------------------------------------------------------
# Each subject is a list of (mask, colour) parts painted back to front. Masks are
# drawn without anti-aliasing, so they contain only 0 and 255 and the final image
# contains only palette colours.


def _mask(draw_fn) -> Image.Image:
    mask = Image.new("L", (SIZE, SIZE), 0)
    draw_fn(ImageDraw.Draw(mask))
    return mask


def _star_points(cx, cy, r, points=5, inner=0.45):
    pts = []
    for k in range(points * 2):
        radius = r if k % 2 == 0 else r * inner
        angle = -math.pi / 2 + k * math.pi / points
        pts.append((cx + radius * math.cos(angle), cy + radius * math.sin(angle)))
    return pts


def circle(cx, cy, r, main, _second):
    return [
        (_mask(lambda d: d.ellipse([cx - r, cy - r, cx + r, cy + r], fill=255)), main)
    ]


def square(cx, cy, r, main, _second):
    s = r * 0.85  # a square of the same "radius" looks much bigger than a circle
    return [
        (_mask(lambda d: d.rectangle([cx - s, cy - s, cx + s, cy + s], fill=255)), main)
    ]


def triangle(cx, cy, r, main, _second):
    pts = [(cx, cy - r), (cx + r, cy + r * 0.8), (cx - r, cy + r * 0.8)]
    return [(_mask(lambda d: d.polygon(pts, fill=255)), main)]


def star(cx, cy, r, main, _second):
    return [(_mask(lambda d: d.polygon(_star_points(cx, cy, r), fill=255)), main)]


def heart(cx, cy, r, main, _second):
    # One mask for the whole heart so the outline follows its silhouette only.
    lobe = r * 0.5

    def draw(d):
        for ox in (-lobe, lobe):
            d.ellipse(
                [
                    cx + ox - lobe,
                    cy - r * 0.6 - lobe * 0.2,
                    cx + ox + lobe,
                    cy - r * 0.6 + 2 * lobe - lobe * 0.2,
                ],
                fill=255,
            )
        d.polygon(
            [(cx - r, cy - r * 0.2), (cx + r, cy - r * 0.2), (cx, cy + r)], fill=255
        )

    return [(_mask(draw), main)]


def moon(cx, cy, r, main, _second):
    disc = _mask(lambda d: d.ellipse([cx - r, cy - r, cx + r, cy + r], fill=255))
    bite = _mask(
        lambda d: d.ellipse(
            [cx - r * 0.3, cy - r * 1.1, cx + r * 1.5, cy + r * 0.7], fill=255
        )
    )
    crescent = np.where(np.asarray(bite) > 0, 0, np.asarray(disc)).astype(np.uint8)
    return [(Image.fromarray(crescent, mode="L"), main)]


def house(cx, cy, r, main, second):
    walls = _mask(
        lambda d: d.rectangle(
            [cx - r * 0.7, cy - r * 0.1, cx + r * 0.7, cy + r], fill=255
        )
    )
    roof = _mask(
        lambda d: d.polygon([(cx - r, cy), (cx + r, cy), (cx, cy - r)], fill=255)
    )
    door = _mask(
        lambda d: d.rectangle(
            [cx - r * 0.15, cy + r * 0.45, cx + r * 0.15, cy + r], fill=255
        )
    )
    return [(walls, main), (roof, second), (door, BLACK)]


def tree(cx, cy, r, main, second):
    trunk = _mask(
        lambda d: d.rectangle(
            [cx - r * 0.18, cy + r * 0.2, cx + r * 0.18, cy + r], fill=255
        )
    )
    crown = _mask(
        lambda d: d.ellipse(
            [cx - r * 0.75, cy - r, cx + r * 0.75, cy + r * 0.4], fill=255
        )
    )
    return [(trunk, second), (crown, main)]


def fish(cx, cy, r, main, second):
    tail = _mask(
        lambda d: d.polygon(
            [(cx + r * 0.4, cy), (cx + r, cy - r * 0.55), (cx + r, cy + r * 0.55)],
            fill=255,
        )
    )
    body = _mask(
        lambda d: d.ellipse(
            [cx - r, cy - r * 0.5, cx + r * 0.55, cy + r * 0.5], fill=255
        )
    )
    eye = _mask(
        lambda d: d.rectangle(
            [cx - r * 0.6, cy - r * 0.2, cx - r * 0.6 + 2, cy - r * 0.2 + 2], fill=255
        )
    )
    return [(tail, second), (body, main), (eye, BLACK)]


# name -> (draw function, uses a second accent colour)
SUBJECTS = {
    "circle": (circle, False),
    "square": (square, False),
    "triangle": (triangle, False),
    "star": (star, False),
    "heart": (heart, False),
    "moon": (moon, False),
    "house": (house, True),
    "tree": (tree, True),
    "fish": (fish, True),
}

# Outline of every part is painted as a dilation of its mask, which keeps the
# stroke exactly OUTLINE_PX wide regardless of shape (ImageDraw's `width` is not
# consistent across primitives).
_DILATE = ImageFilter.MaxFilter(2 * OUTLINE_PX + 1)


def render(parts) -> Image.Image:
    canvas = np.empty((SIZE, SIZE, 3), dtype=np.uint8)
    canvas[:] = CREAM
    for mask, colour in parts:
        inside = np.asarray(mask) > 0
        if colour != BLACK:  # black details (eyes, doors) need no outline of their own
            canvas[np.asarray(mask.filter(_DILATE)) > 0] = BLACK
        canvas[inside] = colour
    return Image.fromarray(canvas, mode="RGB")


def _where(cx, cy) -> str:
    # Centres only range over the middle of the canvas, so "off-centre" is a few px.
    mid, slack = (SIZE - 1) / 2, 5
    row = "upper" if cy < mid - slack else "lower" if cy > mid + slack else ""
    col = "left" if cx < mid - slack else "right" if cx > mid + slack else ""
    if row and col:
        return f"in the {row} {col}"
    if row:
        return "near the top" if row == "upper" else "near the bottom"
    if col:
        return f"on the {col}"
    return "in the centre"


CAPTIONS = [
    "a {size}{colour} {subject}{extra} with a black outline on a cream background",
    "a {size}{colour} {subject}{extra} {where}, bold black outline, cream background",
    "flat {colour} {subject}{extra} outlined in black on a cream background",
    "a simple {size}{colour} {subject}{extra} {where}, thick black outline, plain cream backdrop",
]
EXTRAS = {
    "house": " with a {second} roof",
    "tree": " with a {second} trunk",
    "fish": " with a {second} tail",
}


def make_samples(rng: random.Random):
    """Yield (file stem, image, caption). Every subject gets a fair share of images."""
    # Pair subjects with main colours so each subject is seen in several colours,
    # then shuffle so neighbouring files differ.
    names, colours = list(SUBJECTS), sorted(ACCENTS)
    pairs = [
        (names[i % len(names)], colours[(i + i // len(names)) % len(colours)])
        for i in range(NUM_IMAGES)
    ]
    rng.shuffle(pairs)
    for index, (subject, main_name) in enumerate(pairs, start=1):
        draw_fn, two_colour = SUBJECTS[subject]
        second_name = rng.choice([c for c in colours if c != main_name])
        r = rng.randint(11, 21)
        # Keep shape + outline + 1 px margin inside the canvas.
        lo, hi = r + OUTLINE_PX + 1, SIZE - 1 - r - OUTLINE_PX - 1
        cx, cy = rng.randint(lo, hi), rng.randint(lo, hi)
        image = render(draw_fn(cx, cy, r, ACCENTS[main_name], ACCENTS[second_name]))
        caption = rng.choice(CAPTIONS).format(
            size="small " if r <= 14 else "large " if r >= 19 else "",
            colour=main_name,
            subject=subject,
            extra=EXTRAS.get(subject, "").format(second=second_name)
            if two_colour
            else "",
            where=_where(cx, cy),
        )
        yield f"{index:04d}_{main_name}_{subject}", image, caption


def _atomic_write(path: Path, data: bytes) -> None:
    # A crash mid-write must never leave a truncated PNG that a later training run
    # would silently pick up.
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def _png_bytes(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    # No pnginfo and fixed compression settings -> identical bytes on every run.
    image.save(buf, format="PNG", compress_level=9, optimize=False)
    return buf.getvalue()


def main() -> None:
    images_dir = ROOT / "images"
    images_dir.mkdir(parents=True, exist_ok=True)
    rng = random.Random(SEED)

    rows, written = [], set()
    for stem, image, caption in make_samples(rng):
        assert palette_fraction(image, tolerance=0) == 1.0, stem
        file_name = f"images/{stem}.png"
        _atomic_write(ROOT / file_name, _png_bytes(image))
        written.add(file_name)
        rows.append({"file_name": file_name, "text": caption})

    # Drop images left over from an older version of this script, otherwise the
    # imagefolder loader would still see them.
    for stale in images_dir.glob("*.png"):
        if f"images/{stale.name}" not in written:
            stale.unlink()

    lines = "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows)
    _atomic_write(ROOT / "metadata.jsonl", lines.encode("utf-8"))
    print(f"wrote {len(rows)} images to {images_dir}")


if __name__ == "__main__":
    main()

"""Open any dataset image as a plain 8-bit RGB picture, or fail with a message naming the file.

Datasets hold whatever people upload: PNGs with alpha or palettes, 16-bit scans, CMYK JPEGs,
phone photos that are only upright through their EXIF tag, animated GIFs. Every stage that
looks at pixels (pull to validate, recaption, embed) goes through `load_rgb`, so they all
see the same image.
"""

from __future__ import annotations

import io
import os
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

from tasks.atomic import write_bytes

# Transparent pixels become white: a cut-out on white is what the image looks like in a viewer,
# while Pillow's plain RGB conversion would show whatever colour the hidden pixels happen to hold.
BACKGROUND = (255, 255, 255)
# PIL's PNG encoder and decoder release the GIL, so threads code PNGs in parallel; more than 8
# gains little.
PNG_THREADS = min(8, os.cpu_count() or 1)
_ALPHA_MODES = {"RGBA", "LA", "PA", "RGBa", "La"}
_INT_MODES = {"I", "I;16", "I;16L", "I;16B", "I;16N"}


def save_png(path: str | Path, image: Image.Image, compress_level: int = 6) -> Path:
    """`image` as a PNG at `path`, written atomically. Level 6 is PIL's default; no optimize=True,
    which is slow and saves little."""
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", compress_level=compress_level)
    return write_bytes(path, buffer.getvalue())


def load_rgb(path: str | Path, name: str | None = None) -> Image.Image:
    """The image at `path` as RGB, upright, first frame; ValueError naming the file if unusable.

    `name` is how the message refers to the file (default: its path), e.g. its path in the dataset
    when `path` is a temporary copy.
    """
    path = Path(path)
    label = name or str(path)
    try:
        image = Image.open(path)
    except Image.DecompressionBombError as exc:
        raise _bomb(label, exc) from None
    except (OSError, SyntaxError, ValueError) as exc:
        raise _unreadable(label, exc) from None
    with image:
        _check_size(image, label)
        try:
            image.seek(0)  # animations: the first frame is what thumbnails and viewers show
            rgb = _to_rgb(ImageOps.exif_transpose(image))
            rgb.load()  # decode now, so a truncated file fails here and not in a later stage
        except Image.DecompressionBombError as exc:
            raise _bomb(label, exc) from None
        except (OSError, SyntaxError, ValueError, EOFError) as exc:
            raise _unreadable(label, exc) from None
    return rgb


def _bomb(label: str, reason: object) -> ValueError:
    return ValueError(f"{label}: refusing a possible decompression bomb ({reason})")


def _unreadable(label: str, exc: Exception) -> ValueError:
    return ValueError(f"{label}: not a readable image ({type(exc).__name__}: {exc})")


def _check_size(image: Image.Image, label: str) -> None:
    """Pillow only warns between MAX_IMAGE_PIXELS and twice that; we refuse the whole range."""
    limit = Image.MAX_IMAGE_PIXELS
    width, height = image.size
    if limit is not None and width * height > limit:
        raise _bomb(
            label, f"{width}x{height} = {width * height} pixels > PIL.Image.MAX_IMAGE_PIXELS = {limit}"
        )
    if width < 1 or height < 1:
        raise ValueError(f"{label}: image has no pixels ({width}x{height})")


def _to_rgb(image: Image.Image) -> Image.Image:
    if image.mode in _INT_MODES:
        return _sixteen_bit_to_rgb(image)
    if image.mode in _ALPHA_MODES or "transparency" in image.info:
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, BACKGROUND + (255,))
        return Image.alpha_composite(background, rgba).convert("RGB")
    # CMYK, L, 1, P, YCbCr, ...: Pillow's conversions are exact enough for captions and latents.
    return image.convert("RGB")  # a copy even for RGB, so nothing refers to the closed file


def _sixteen_bit_to_rgb(image: Image.Image) -> Image.Image:
    """Scale 0..65535 down to 0..255; Pillow's own conversion clips, turning most pixels white.

    Mode "I" is read as 16-bit too: that is what 16-bit PNG and TIFF greyscale files open as.
    """
    values = np.asarray(image, dtype=np.float64)
    grey = np.clip(np.rint(values / 257.0), 0, 255).astype(np.uint8)
    return Image.fromarray(grey).convert("RGB")

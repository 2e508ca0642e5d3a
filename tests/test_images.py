"""load_rgb (tasks/images.py): every image mode a dataset may hold comes out as upright 8-bit RGB."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from tasks.images import load_rgb

RED = (255, 0, 0)
WHITE = (255, 255, 255)


def _near(pixel, expected, tolerance=6) -> bool:
    return all(abs(a - b) <= tolerance for a, b in zip(pixel, expected, strict=True))


def test_rgba_transparent_pixels_become_white(tmp_path):
    image = Image.new("RGBA", (3, 1), (0, 0, 0, 0))  # transparent *black*: must not show as black
    image.putpixel((1, 0), RED + (255,))
    image.putpixel((2, 0), (0, 0, 0, 128))
    image.save(tmp_path / "a.png")
    rgb = load_rgb(tmp_path / "a.png")
    assert rgb.mode == "RGB" and rgb.size == (3, 1)
    assert rgb.getpixel((0, 0)) == WHITE
    assert rgb.getpixel((1, 0)) == RED
    assert _near(rgb.getpixel((2, 0)), (127, 127, 127), tolerance=1)  # half black over white


def test_palette_with_transparent_index_becomes_white(tmp_path):
    image = Image.new("P", (2, 1))
    image.putpalette([0, 0, 0, 255, 0, 0] + [0] * 762)  # index 0 black, index 1 red
    image.putpixel((1, 0), 1)
    image.save(tmp_path / "p.png", transparency=0)
    assert Image.open(tmp_path / "p.png").mode == "P"
    rgb = load_rgb(tmp_path / "p.png")
    assert rgb.mode == "RGB"
    assert rgb.getpixel((0, 0)) == WHITE and rgb.getpixel((1, 0)) == RED


def test_grey_with_alpha(tmp_path):
    image = Image.new("LA", (2, 1), (0, 0))
    image.putpixel((1, 0), (40, 255))
    image.save(tmp_path / "la.png")
    rgb = load_rgb(tmp_path / "la.png")
    assert rgb.getpixel((0, 0)) == WHITE and rgb.getpixel((1, 0)) == (40, 40, 40)


def test_sixteen_bit_grey_is_scaled_not_clipped(tmp_path):
    Image.fromarray(np.array([[0, 32896, 65535]], dtype=np.uint16)).save(tmp_path / "g16.png")
    assert Image.open(tmp_path / "g16.png").mode.startswith("I")
    rgb = load_rgb(tmp_path / "g16.png")
    assert [rgb.getpixel((x, 0)) for x in range(3)] == [(0, 0, 0), (128, 128, 128), WHITE]


def test_cmyk_jpeg(tmp_path):
    Image.new("CMYK", (8, 8), (0, 255, 255, 0)).save(tmp_path / "cmyk.jpg", quality=95)
    assert Image.open(tmp_path / "cmyk.jpg").mode == "CMYK"
    rgb = load_rgb(tmp_path / "cmyk.jpg")
    assert rgb.mode == "RGB" and _near(rgb.getpixel((4, 4)), RED, tolerance=12)


def test_exif_orientation_is_applied(tmp_path):
    image = Image.new("RGB", (40, 20), WHITE)
    image.paste(RED, (0, 0, 10, 20))  # red band on the left
    exif = Image.Exif()
    exif[0x0112] = 6  # Orientation: rotate 90 degrees clockwise to display
    image.save(tmp_path / "rot.jpg", exif=exif, quality=95)
    rgb = load_rgb(tmp_path / "rot.jpg")
    assert rgb.size == (20, 40)
    assert _near(rgb.getpixel((10, 2)), RED, tolerance=20)  # the left band is now on top
    assert _near(rgb.getpixel((10, 37)), WHITE, tolerance=20)


def test_one_pixel_image(tmp_path):
    Image.new("L", (1, 1), 200).save(tmp_path / "one.png")
    rgb = load_rgb(tmp_path / "one.png")
    assert rgb.size == (1, 1) and rgb.getpixel((0, 0)) == (200, 200, 200)


def test_animated_gif_gives_first_frame(tmp_path):
    frames = [Image.new("RGB", (4, 4), RED), Image.new("RGB", (4, 4), (0, 0, 255))]
    frames[0].save(tmp_path / "anim.gif", save_all=True, append_images=frames[1:], duration=100, loop=0)
    assert Image.open(tmp_path / "anim.gif").n_frames == 2
    rgb = load_rgb(tmp_path / "anim.gif")
    assert rgb.mode == "RGB" and rgb.getpixel((2, 2)) == RED


def test_truncated_file_names_the_file(tmp_path):
    buffer = io.BytesIO()
    Image.effect_noise((64, 64), 50).convert("RGB").save(buffer, format="PNG")
    path = tmp_path / "cut.png"
    path.write_bytes(buffer.getvalue()[: len(buffer.getvalue()) // 2])
    with pytest.raises(ValueError, match=r"cut\.png: not a readable image"):
        load_rgb(path)


def test_not_an_image_names_the_file(tmp_path):
    (tmp_path / "notes.png").write_text("hello")
    with pytest.raises(ValueError, match=r"notes\.png: not a readable image"):
        load_rgb(tmp_path / "notes.png")


@pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")
@pytest.mark.parametrize("side", [40, 64])  # 1600 px: Pillow only warns; 4096 px: Pillow raises
def test_decompression_bomb_is_refused(tmp_path, monkeypatch, side):
    Image.new("RGB", (side, side)).save(tmp_path / "bomb.png")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)
    with pytest.raises(ValueError, match=r"bomb\.png: refusing a possible decompression bomb"):
        load_rgb(tmp_path / "bomb.png")


def test_image_is_detached_from_its_file(tmp_path):
    Image.new("RGB", (2, 2), RED).save(tmp_path / "x.png")
    rgb = load_rgb(tmp_path / "x.png")
    (tmp_path / "x.png").unlink()
    assert rgb.getpixel((1, 1)) == RED

"""Bad inputs, generated here: every kind goes through the real stage function or config loader.

Each case says what should happen: the row is kept (an odd but valid image or caption), the row
is skipped with a report line naming its row and file, or the run stops with an error naming the
file, column or field. Anything else counts as not handled; an exception nobody meant to raise
(a traceback for the user) counts as crashed. The last test prints
`N kinds tried, N handled, 0 crashed` and fails unless every kind was handled.
"""

from __future__ import annotations

import contextlib
import io
import json
import re
import struct
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from configs import DatasetConfig, ModelsConfig
from flows.cli import main as cli_main
from tasks import model_loading
from tasks.contracts import MANIFEST, read_table
from tasks.embed import read_prompts, resolve_prompts_file
from tasks.images import load_rgb
from tasks.oxen_repos import OxenError, import_folder
from tasks.pull import DatasetError, pull_dataset
from tasks.workdir import WorkDir

DEMO = Path(__file__).resolve().parent.parent / "data" / "demo"
GOOD = {"file_name": "images/good.png", "text": "a good image"}


# --- Generated files ---------------------------------------------------------------------------


def encode(image: Image.Image, fmt: str, **options) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **options)
    return buffer.getvalue()


def gradient(size=(32, 32), mode="RGB") -> Image.Image:
    x = np.linspace(0, 255, size[0] * size[1] * 3).astype(np.uint8).reshape(size[1], size[0], 3)
    return Image.fromarray(x).convert(mode)


def png_chunk(tag: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data) & 0xFFFFFFFF)


def png_of_size(width: int, height: int, real_rows: bool = False) -> bytes:
    """A greyscale PNG claiming width x height; with real_rows its zlib data inflates to them all
    (a true decompression bomb: ~100 KB that inflates to width*height bytes)."""
    raw = zlib.compress(b"\0" * ((width + 1) * height), 6) if real_rows else zlib.compress(b"\0" * 16)
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", ihdr) + png_chunk(b"IDAT", raw) + png_chunk(b"IEND", b"")


def exif_rotated() -> bytes:
    exif = Image.Exif()
    exif[0x0112] = 6  # Orientation: rotate 90 degrees clockwise to view
    return encode(gradient((64, 32)), "JPEG", exif=exif.tobytes())


def palette_with_transparency() -> bytes:
    image = Image.new("P", (16, 16), 0)
    image.putpalette([255, 0, 0, 0, 0, 255] + [0] * 762)
    image.paste(1, (8, 0, 16, 16))
    return encode(image, "PNG", transparency=0)


def sixteen_bit() -> bytes:
    return encode(Image.fromarray(np.full((16, 16), 30000, dtype=np.uint16)), "PNG")


def animated_gif() -> bytes:
    frames = [Image.new("P", (16, 16), i) for i in (1, 2)]
    return encode(frames[0], "GIF", save_all=True, append_images=frames[1:])


def truncated(data: bytes) -> bytes:
    return data[: len(data) // 2]


def corrupt_header(data: bytes) -> bytes:
    return b"\x89PNX" + data[4:]


def bad_idat_crc(data: bytes) -> bytes:
    at = data.index(b"IDAT") + 6
    return data[:at] + bytes([data[at] ^ 0xFF]) + data[at + 1 :]


PNG = encode(gradient(), "PNG")
JPEG = encode(gradient(), "JPEG")


# --- Case table --------------------------------------------------------------------------------


class RawLine(str):
    """A metadata line written as it is (not as JSON)."""


@dataclass
class DatasetCase:
    """A metadata file (rows after the GOOD one, or raw bytes) and files, pulled from one repo."""

    kind: str
    expect: str  # "keep", "skip" or "fatal"
    rows: list = field(default_factory=list)
    files: dict[str, bytes] = field(default_factory=dict)
    raw: bytes | None = None  # the whole metadata file, instead of rows
    pattern: str = ""  # the skip problem or the fatal message must match
    config: dict = field(default_factory=dict)  # extra DatasetConfig settings
    check: Callable[[dict], None] | None = None  # on the kept row (manifest dict)
    suffix: str = ".jsonl"


@dataclass
class CustomCase:
    kind: str
    run: Callable[[Env], None]  # asserts what must happen; AssertionError = not handled


def image_case(kind: str, data: bytes, ext: str, expect: str, pattern: str = "", check=None) -> DatasetCase:
    name = f"images/{kind}.{ext}"
    return DatasetCase(
        kind, expect, [{"file_name": name, "text": kind}], {name: data}, pattern=pattern, check=check
    )


def row_case(kind: str, row, pattern: str, files: dict | None = None) -> DatasetCase:
    return DatasetCase(kind, "skip", [row], files or {}, pattern=pattern)


def _size(width: int, height: int):
    def check(row: dict) -> None:
        assert (row["width"], row["height"]) == (width, height), row

    return check


def _pixels(test: Callable[[np.ndarray], bool]):
    def check(row: dict) -> None:
        pixels = np.asarray(load_rgb(row["image_path"]))
        assert pixels.dtype == np.uint8 and pixels.shape[2] == 3 and test(pixels), pixels.mean()

    return check


NOT_IMAGE = "image does not decode: images/.*not a readable image"
BOMB = "image does not decode: images/.*decompression bomb"

IMAGE_CASES = [
    image_case("cmyk-jpeg", encode(gradient(mode="CMYK"), "JPEG"), "jpg", "keep", check=_size(32, 32)),
    image_case("16-bit-png", sixteen_bit(), "png", "keep", check=_pixels(lambda p: 100 < p.mean() < 140)),
    image_case("palette-transparency", palette_with_transparency(), "png", "keep",
               check=_pixels(lambda p: (p[0, 0] == 255).all() and p[0, 15].tolist() == [0, 0, 255])),
    image_case("exif-rotated", exif_rotated(), "jpg", "keep", check=_size(32, 64)),
    image_case("rgba", encode(gradient(mode="RGBA"), "PNG"), "png", "keep"),
    image_case("greyscale-alpha", encode(gradient(mode="LA"), "PNG"), "png", "keep"),
    image_case("one-bit", encode(gradient(mode="1"), "PNG"), "png", "keep"),
    image_case("greyscale-jpeg", encode(gradient(mode="L"), "JPEG"), "jpg", "keep"),
    image_case("animated-gif", animated_gif(), "gif", "keep"),
    image_case("webp", encode(gradient(), "WEBP"), "webp", "keep"),
    image_case("16-bit-tiff", encode(Image.fromarray(np.full((8, 8), 700, np.uint16)), "TIFF"), "tif", "keep"),
    image_case("one-pixel", encode(Image.new("RGB", (1, 1), (9, 9, 9)), "PNG"), "png", "keep", check=_size(1, 1)),
    image_case("extreme-aspect", encode(gradient((512, 4)), "PNG"), "png", "keep", check=_size(512, 4)),
    image_case("png-named-jpg", encode(gradient((8, 8)), "PNG"), "jpg", "keep"),
    image_case("upper-case-suffix", encode(gradient((9, 9)), "PNG"), "PNG", "keep"),
    image_case("zero-byte", b"", "png", "skip", NOT_IMAGE),
    image_case("truncated-png", truncated(PNG), "png", "skip", NOT_IMAGE),
    image_case("truncated-jpeg", truncated(JPEG), "jpg", "skip", NOT_IMAGE),
    image_case("truncated-gif", truncated(animated_gif()), "gif", "skip", NOT_IMAGE),
    image_case("corrupt-png-signature", corrupt_header(PNG), "png", "skip", NOT_IMAGE),
    image_case("corrupt-png-data", bad_idat_crc(encode(gradient((40, 40)), "PNG")), "png", "skip", NOT_IMAGE),
    image_case("random-bytes", np.random.default_rng(0).bytes(2048), "png", "skip", NOT_IMAGE),
    image_case("text-named-png", b"just some notes\n", "png", "skip", NOT_IMAGE),
    image_case("html-named-jpg", b"<!doctype html><html><body>404</body></html>", "jpg", "skip", NOT_IMAGE),
    image_case("pdf-named-png", b"%PDF-1.4\n1 0 obj<<>>endobj\ntrailer<<>>\n%%EOF\n", "png", "skip", NOT_IMAGE),
    image_case("zip-named-png", b"PK\x03\x04" + b"\0" * 60, "png", "skip", NOT_IMAGE),
    image_case("svg-named-png", b'<svg xmlns="http://www.w3.org/2000/svg" width="9" height="9"/>', "png", "skip",
               NOT_IMAGE),
    image_case("bomb-header-30000x30000", png_of_size(30000, 30000), "png", "skip", BOMB),
    image_case("bomb-inflating-10000x10000", png_of_size(10000, 10000, real_rows=True), "png", "skip", BOMB),
]  # fmt: skip

METADATA_CASES = [
    row_case("malformed-json-line", RawLine('{"file_name": "images/x.png", "text": '), "malformed JSON"),
    row_case("json-array-line", ["images/x.png", "text"], "not a JSON object"),
    row_case("json-number-line", 42, "not a JSON object"),
    row_case("missing-file-name", {"text": "no file"}, "file_name is missing"),
    row_case("file-name-not-text", {"file_name": 17, "text": "number"}, "file_name is missing or not text"),
    row_case("caption-null", {"file_name": "images/c1.png", "text": None}, "caption column 'text' is empty",
             {"images/c1.png": encode(gradient((5, 5)), "PNG")}),
    row_case("caption-number", {"file_name": "images/c2.png", "text": 3.5}, "caption column 'text' is empty or not text",
             {"images/c2.png": encode(gradient((6, 6)), "PNG")}),
    row_case("caption-list", {"file_name": "images/c3.png", "text": ["a"]}, "not text",
             {"images/c3.png": encode(gradient((7, 7)), "PNG")}),
    row_case("caption-empty", {"file_name": "images/c4.png", "text": ""}, "empty",
             {"images/c4.png": encode(gradient((10, 10)), "PNG")}),
    row_case("caption-whitespace", {"file_name": "images/c5.png", "text": " \t\n "}, "empty",
             {"images/c5.png": encode(gradient((11, 11)), "PNG")}),
    row_case("caption-very-long", {"file_name": "images/c6.png", "text": "style " * 50_000},
             "caption is 300000 characters long; the limit is", {"images/c6.png": encode(gradient((12, 12)), "PNG")}),
    row_case("duplicate-file-name", GOOD, "duplicate file_name"),
    row_case("duplicate-image-bytes", {"file_name": "images/copy.png", "text": "copy"},
             "same image bytes as an earlier row", {"images/copy.png": (DEMO / "images/0001_mustard_star.png").read_bytes()}),
    row_case("missing-image-file", {"file_name": "images/not-there.png", "text": "gone"}, "image file is missing"),
    DatasetCase("non-utf8-line", "skip", raw=json.dumps(GOOD).encode() + b'\n{"file_name": "images/x.png", '
                b'"text": "caf\xe9"}\n', pattern="not valid UTF-8"),
    DatasetCase("unicode-caption-kept", "keep", [{"file_name": "images/u.png", "text": "étoile ★ 星\u2028 \U0001f31f"}],
                {"images/u.png": encode(gradient((13, 13)), "PNG")},
                check=lambda row: row["original_caption"] == "étoile ★ 星\u2028 \U0001f31f"),
    DatasetCase("utf8-bom-and-crlf", "keep", raw=b"\xef\xbb\xbf" + json.dumps(GOOD).encode() + b"\r\n\r\n"
                + json.dumps({"file_name": "images/crlf.png", "text": "crlf"}).encode() + b"\r\n",
                files={"images/crlf.png": encode(gradient((14, 14)), "PNG")}),
    DatasetCase("extra-columns-kept", "keep", [{"file_name": "images/e.png", "text": "e", "score": 3, "tags": ["x"]}],
                {"images/e.png": encode(gradient((15, 15)), "PNG")}),
    DatasetCase("missing-caption-column", "fatal", raw=b'{"file_name": "images/good.png", "label": "x"}\n',
                pattern=r"meta/missing-caption-column.jsonl: caption column 'text' not found; columns: \['file_name', "
                "'label'\\]"),
    DatasetCase("renamed-caption-column", "fatal", config={"caption_column": "caption"},
                pattern=r"caption column 'caption' not found; columns: \['file_name', 'text'\]"),
    DatasetCase("empty-dataset", "fatal", raw=b"", pattern=r"@main: no usable rows \(0 problems"),
    DatasetCase("blank-lines-only", "fatal", raw=b"\n\n  \n", pattern="no usable rows"),
    DatasetCase("every-row-bad", "fatal", raw=b'{"file_name": "images/nope.png", "text": "x"}\n',
                pattern="no usable rows .*image file is missing"),
    DatasetCase("csv-unbalanced-quotes", "fatal", raw=b'file_name,text\n"images/good.png,"a\nb,c,d\n', suffix=".csv",
                pattern=r"meta/csv-unbalanced-quotes.csv: cannot be parsed"),
    DatasetCase("parquet-corrupt", "fatal", raw=b"PAR1 this is not parquet PAR1", suffix=".parquet",
                pattern=r"meta/parquet-corrupt.parquet: cannot be parsed"),
    DatasetCase("csv-kept", "keep", raw=b"file_name,text\nimages/good.png,a good image\nimages/csv.png,from csv\n",
                files={"images/csv.png": encode(gradient((17, 17)), "PNG")}, suffix=".csv"),
]  # fmt: skip

ESCAPES = "path escapes the dataset"
PATH_CASES = [
    row_case("dot-dot", {"file_name": "../outside.png", "text": "x"}, ESCAPES),
    row_case("dot-dot-inside", {"file_name": "images/../../outside.png", "text": "x"}, ESCAPES),
    row_case("absolute-path", {"file_name": "/etc/passwd", "text": "x"}, ESCAPES),
    row_case("home-path", {"file_name": "~/.ssh/id_rsa", "text": "x"}, ESCAPES),
    row_case("backslash-dot-dot", {"file_name": "..\\..\\outside.png", "text": "x"}, ESCAPES),
    row_case("oxen-internals", {"file_name": ".oxen/config.toml", "text": "x"}, "Oxen's own folder"),
    row_case("nul-in-name", {"file_name": "images/a\u0000.png", "text": "x"}, "NUL character"),
    row_case("dataset-root", {"file_name": ".", "text": "x"}, "the dataset root"),
    row_case("very-long-name", {"file_name": "images/" + "n" * 5000 + ".png", "text": "x"}, "File name too long"),
    row_case("folder-as-image", {"file_name": "images", "text": "x"}, "image does not decode"),
    row_case("symlinked-file-escapes", {"file_name": "links/escape.png", "text": "x"}, "escapes the dataset through a symlink"),
    row_case("symlinked-folder-escapes", {"file_name": "linked/outside.png", "text": "x"}, "escapes the dataset through a symlink"),
]  # fmt: skip

DATASET_CASES = IMAGE_CASES + METADATA_CASES + PATH_CASES


# --- The dataset repo holding every case -----------------------------------------------------


@dataclass
class Env:
    root: Path  # a tmp folder for cases that need their own files
    repo: Path
    work: WorkDir
    outside: Path  # a folder beside the repo that symlinks point into


def metadata_path(case: DatasetCase) -> str:
    return f"meta/{case.kind}{case.suffix}"


@pytest.fixture(scope="module")
def env(tmp_path_factory) -> Env:
    root = tmp_path_factory.mktemp("bad-inputs")
    source = root / "source"
    (source / "images").mkdir(parents=True)
    (source / "meta").mkdir()
    (source / "images/good.png").write_bytes((DEMO / "images/0001_mustard_star.png").read_bytes())
    for case in DATASET_CASES:
        for name, data in case.files.items():
            (source / name).write_bytes(data)
        if case.raw is not None:
            data = case.raw
        else:
            lines = [row if isinstance(row, RawLine) else json.dumps(row) for row in [GOOD, *case.rows]]
            data = "".join(line + "\n" for line in lines).encode()
        (source / metadata_path(case)).write_bytes(data)
    repo = root / "repo"
    import_folder(source, repo, "every bad input")
    # After the commit, as if someone edited the working tree: links out of the dataset.
    outside = root / "outside"
    outside.mkdir()
    (outside / "outside.png").write_bytes(encode(gradient((20, 20)), "PNG"))
    (repo / "links").mkdir()
    (repo / "links/escape.png").symlink_to(outside / "outside.png")
    (repo / "linked").symlink_to(outside, target_is_directory=True)
    return Env(root, repo, WorkDir(root / "work"), outside)


def run_dataset_case(case: DatasetCase, env: Env) -> None:
    cfg = DatasetConfig(repo=str(env.repo), metadata_file=metadata_path(case), **case.config)
    if case.expect == "fatal":
        with pytest.raises(DatasetError) as raised:
            pull_dataset(cfg, env.work)
        assert re.search(case.pattern, str(raised.value)), str(raised.value)
        return
    result = pull_dataset(cfg, env.work)
    manifest = read_table(result.manifest_path, MANIFEST).to_pylist()
    report = [json.loads(line) for line in result.report_path.read_text().splitlines()]
    names = [row["file_name"] for row in manifest]
    assert names[0] == GOOD["file_name"], names
    if case.expect == "keep":
        assert report == [] and len(manifest) == 2, (report, names)
        if case.check:
            case.check(manifest[1])
        return
    assert len(manifest) == 1, names
    assert len(report) == 1, report
    problem = report[0]
    assert problem["row"] == 2, problem  # the line number in the metadata file
    row = case.rows[0] if case.rows else None
    if isinstance(row, dict) and isinstance(row.get("file_name"), str):
        assert problem["file_name"] == row["file_name"], problem
    assert re.search(case.pattern, problem["problem"]), problem["problem"]


# --- Repos, models, configs and prompt files --------------------------------------------------


def fatal(error: type[BaseException], pattern: str, fn: Callable, *args, **kwargs) -> None:
    with pytest.raises(error) as raised:
        fn(*args, **kwargs)
    assert re.search(pattern, str(raised.value)), str(raised.value)


def repo_missing(env: Env) -> None:
    fatal(DatasetError, r"/nowhere: dataset repo does not exist", pull_dataset,
          DatasetConfig(repo=str(env.root / "nowhere")), env.work)  # fmt: skip


def not_an_oxen_repo(env: Env) -> None:
    (env.root / "plain").mkdir(exist_ok=True)
    fatal(
        OxenError,
        r"/plain: not an Oxen repository",
        pull_dataset,
        DatasetConfig(repo=str(env.root / "plain")),
        env.work,
    )


def unknown_revision(env: Env) -> None:
    fatal(
        OxenError,
        r"revision 'v9' does not exist",
        pull_dataset,
        DatasetConfig(repo=str(env.repo), revision="v9"),
        env.work,
    )


def metadata_file_missing(env: Env) -> None:
    cfg = DatasetConfig(repo=str(env.repo), metadata_file="meta/absent.jsonl")
    fatal(DatasetError, r"@main: no meta/absent.jsonl", pull_dataset, cfg, env.work)


def import_with_escaping_symlink(env: Env) -> None:
    folder = env.root / "to-import"
    (folder / "images").mkdir(parents=True, exist_ok=True)
    (folder / "metadata.jsonl").write_text(json.dumps({"file_name": "images/secret.png", "text": "x"}) + "\n")
    link = folder / "images" / "secret.png"
    if not link.is_symlink():
        link.symlink_to(env.outside / "outside.png")
    cfg = DatasetConfig(repo=str(env.root / "imported"), import_from=str(folder))
    fatal(OxenError, r"images/secret.png: symlink points outside", pull_dataset, cfg, env.work)
    assert not (env.root / "imported").exists()  # nothing of the outside file was committed


def import_folder_missing(env: Env) -> None:
    cfg = DatasetConfig(repo=str(env.root / "imported2"), import_from=str(env.root / "no-folder"))
    fatal(OxenError, r"no-folder: dataset folder to import does not exist", pull_dataset, cfg, env.work)


def unknown_tiny_model(env: Env) -> None:
    fatal(ValueError, r"unknown tiny model 'tiny:nope'", model_loading.resolve_model, "tiny:nope")


def model_folder_without_weights(env: Env) -> None:
    folder = env.root / "empty-model"
    folder.mkdir(exist_ok=True)
    models = ModelsConfig(pixart=str(folder))
    fatal(OSError, r"models.pixart='.*empty-model': cannot load", model_loading.load_transformer, models,
          torch.float32, torch.device("cpu"))  # fmt: skip


def unknown_captioner_id(env: Env) -> None:
    models = ModelsConfig(llava="/no/such/llava")
    fatal(OSError, r"models.llava='/no/such/llava': cannot load", model_loading.load_captioner, models,
          torch.float32, torch.device("cpu"))  # fmt: skip


def unknown_text_encoder_id(env: Env) -> None:
    models = ModelsConfig(text_encoder="/no/such/t5")
    fatal(OSError, r"models.text_encoder='/no/such/t5': cannot load", model_loading.load_text_encoder, models,
          torch.float32, torch.device("cpu"))  # fmt: skip


REPO_CASES = [
    CustomCase("dataset-repo-missing", repo_missing),
    CustomCase("not-an-oxen-repo", not_an_oxen_repo),
    CustomCase("unknown-revision", unknown_revision),
    CustomCase("metadata-file-missing", metadata_file_missing),
    CustomCase("import-symlink-escapes", import_with_escaping_symlink),
    CustomCase("import-folder-missing", import_folder_missing),
    CustomCase("unknown-tiny-model-id", unknown_tiny_model),
    CustomCase("model-folder-without-weights", model_folder_without_weights),
    CustomCase("unknown-captioner-id", unknown_captioner_id),
    CustomCase("unknown-text-encoder-id", unknown_text_encoder_id),
]

DEMO_CONFIG = """
device: cpu
dtype: float32
dataset: {repo: oxen/demo-dataset, import_from: data/demo}
models: {pixart: "tiny:pixart", llava: "tiny:llava"}
"""


def config_case(kind: str, text: str, *named: str, base: bool = True) -> CustomCase:
    """`pixart-pipeline validate` on the config: exit status 2 and every `named` in the message."""

    def run(env: Env) -> None:
        path = env.root / "configs" / f"{kind}.yaml"
        path.parent.mkdir(exist_ok=True)
        path.write_text((DEMO_CONFIG if base else "") + text)
        stdout, stderr = io.StringIO(), io.StringIO()
        with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
            status = cli_main(["validate", str(path)])
        message = stderr.getvalue()
        assert status == 2, (status, message, stdout.getvalue()[:200])
        assert f"{kind}.yaml" in message or kind == "config-file-missing", message
        for name in named:
            assert name in message, (name, message)

    return CustomCase(f"config-{kind}", run)


CONFIG_CASES = [
    config_case("wrong-type", "train: {rank: eight}", "train.rank", "integer"),
    config_case("float-for-int", "train: {rank: 8.5}", "train.rank"),
    config_case("unknown-top-level-key", "trian: {rank: 8}", "trian", "Extra inputs"),
    config_case("unknown-nested-key", "train: {learning_rat: 0.1}", "train.learning_rat"),
    config_case("negative-rank", "train: {rank: -4}", "train.rank", "greater than 0"),
    config_case("zero-batch-size", "train: {batch_size: 0}", "train.batch_size"),
    config_case("zero-max-steps", "train: {max_steps: 0}", "train.max_steps"),
    config_case("dropout-one", "train: {dropout: 1.0}", "train.dropout"),
    config_case("zero-resolution", "embed: {resolution: 0}", "embed.resolution"),
    config_case("negative-resolution", "embed: {resolution: -512}", "embed.resolution"),
    config_case("resolution-not-multiple-of-64", "embed: {resolution: 500}", "embed.resolution", "multiple of 64"),
    config_case("resolution-too-large", "embed: {resolution: 100000}", "embed.resolution"),
    config_case("zero-max-length", "embed: {max_length: 0}", "embed.max_length"),
    config_case("unknown-device", "device: tpu", "device"),
    config_case("unknown-dtype", "dtype: float64", "dtype"),
    config_case("run-name-with-path", "run_name: ../../etc", "run_name"),
    config_case("missing-dataset", "device: cpu\n", "dataset", base=False),
    config_case("not-a-mapping", "- a\n- b\n", "mapping", base=False),
    config_case("invalid-yaml", "train: {rank: [\n", "not valid YAML", base=False),
    config_case("empty-file", "", "mapping", base=False),
    config_case("metadata-format", "device: cpu\ndataset: {repo: x, metadata_file: data.txt}\n",
                "dataset.metadata_file", base=False),
    config_case("prompt-template-without-slot", "recaption: {prompt_template: describe it}", "recaption.prompt_template"),
    config_case("style-template-without-slot", "evaluate: {style_template: plain}", "evaluate.style_template"),
    config_case("no-seeds", "evaluate: {seeds: []}", "evaluate.seeds"),
    config_case("checkpoint-not-saved", "train: {checkpointing_steps: 100}\nevaluate: {checkpoints: [150]}",
                "evaluate.checkpoints [150]"),
    config_case("8bit-adam-on-cpu", "train: {use_8bit_adam: true}", "use_8bit_adam"),
    config_case("quantized-captioner-on-cpu", "recaption: {quantization: 4bit}", "recaption.quantization"),
    config_case("bad-cron", "recaption: {schedule: '@daily'}", "recaption.schedule"),
    config_case("bad-branch-template", "recaption: {branch_template: 'captions/{oops}'}", "recaption.branch_template"),
    config_case("too-many-new-tokens", "recaption: {max_new_tokens: 100000}", "recaption.max_new_tokens"),
]  # fmt: skip


def config_file_missing(env: Env) -> None:
    stderr = io.StringIO()
    with contextlib.redirect_stderr(stderr):
        status = cli_main(["validate", str(env.root / "no-such.yaml")])
    assert status == 2 and "no-such.yaml: config file not found" in stderr.getvalue(), stderr.getvalue()


def prompt_case(kind: str, data: bytes, pattern: str) -> CustomCase:
    def run(env: Env) -> None:
        path = env.root / "prompts" / f"{kind}.jsonl"
        path.parent.mkdir(exist_ok=True)
        path.write_bytes(data)
        fatal(
            ValueError, pattern.replace("PATH", re.escape(str(path))), read_prompts, path, "styled, {prompt}"
        )

    return CustomCase(f"prompts-{kind}", run)


def prompts_file_missing(env: Env) -> None:
    fatal(FileNotFoundError, r"prompts file nowhere/prompts.jsonl not found", resolve_prompts_file,
          "nowhere/prompts.jsonl")  # fmt: skip


OK_PROMPT = b'{"prompt": "a fish"}\n'
PROMPT_CASES = [
    CustomCase("config-file-missing", config_file_missing),
    prompt_case("malformed-json", OK_PROMPT + b'{"prompt": \n', r"PATH:2: not valid JSON"),
    prompt_case("missing-prompt-key", OK_PROMPT + b'{"text": "a fish"}\n', r"PATH:2: expected an object"),
    prompt_case("empty-prompt", OK_PROMPT + b'{"prompt": "  "}\n', r"PATH:2: expected an object"),
    prompt_case("prompt-not-text", b'{"prompt": 5}\n', r"PATH:1: expected an object"),
    prompt_case(
        "category-not-text", b'{"prompt": "a", "category": 3}\n', r"PATH:1: 'category' must be a string"
    ),
    prompt_case("no-prompts", b"\n\n", r"PATH: no prompts"),
    prompt_case("non-utf8", OK_PROMPT + b'{"prompt": "caf\xe9"}\n', r"PATH: not valid UTF-8"),
    CustomCase("prompts-file-missing", prompts_file_missing),
]

ALL_CASES: list[DatasetCase | CustomCase] = DATASET_CASES + REPO_CASES + CONFIG_CASES + PROMPT_CASES
OUTCOMES: dict[str, str] = {}  # kind -> "handled" | "not handled: ..." | "crashed: ..."


def attempt(case: DatasetCase | CustomCase, env: Env) -> str:
    try:
        if isinstance(case, DatasetCase):
            run_dataset_case(case, env)
        else:
            case.run(env)
    except AssertionError as exc:  # the stage answered, but not as it should have
        outcome = f"not handled: {str(exc)[:300]}"
    except pytest.fail.Exception as exc:  # pytest.raises saw no exception at all
        outcome = f"not handled: {exc}"
    except BaseException as exc:
        if isinstance(exc, KeyboardInterrupt):
            raise
        outcome = f"crashed: {type(exc).__name__}: {str(exc)[:300]}"
    else:
        outcome = "handled"
    OUTCOMES[case.kind] = outcome
    return outcome


def test_case_kinds_are_unique_and_enough():
    kinds = [case.kind for case in ALL_CASES]
    assert len(kinds) == len(set(kinds)), sorted(k for k in kinds if kinds.count(k) > 1)
    assert len(kinds) >= 50


@pytest.mark.parametrize("case", ALL_CASES, ids=lambda case: case.kind)
def test_bad_input(case, env, tiny_models):
    outcome = attempt(case, env)
    assert outcome == "handled", f"{case.kind}: {outcome}"


def test_summary(env, tiny_models, capsys):
    """Runs any kinds not run above (e.g. under -k), then prints the figures the README quotes."""
    for case in ALL_CASES:
        if case.kind not in OUTCOMES:
            attempt(case, env)
    tried = len(OUTCOMES)
    handled = sum(outcome == "handled" for outcome in OUTCOMES.values())
    crashed = sum(outcome.startswith("crashed") for outcome in OUTCOMES.values())
    with capsys.disabled():
        print(f"\n{tried} kinds tried, {handled} handled, {crashed} crashed")
    bad = {kind: outcome for kind, outcome in OUTCOMES.items() if outcome != "handled"}
    assert tried >= 50 and handled == tried and crashed == 0, bad

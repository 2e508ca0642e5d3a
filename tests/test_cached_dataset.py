"""Tests for the training view (tasks/cached_dataset.py), the cache it is built from (tasks/cache.py)
and aspect-ratio batching (tasks/buckets.py). Synthetic caches: no models, fast."""

from __future__ import annotations

import json
import mmap
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
import torch

from tasks import contracts
from tasks.buckets import ASPECT_RATIO_512, bucket_batches, bucket_table
from tasks.cache import ShardedCache
from tasks.cached_dataset import (
    INFO_FILE,
    CachedTrainView,
    DeviceTrainView,
    TensorFile,
    TensorFileWriter,
    ViewError,
    build_train_view,
)
from tasks.embed import build_train_set, tensor_bytes

DIM, MAX_LENGTH = 16, 12


def _caches(root: Path, dtype: torch.dtype, flip: bool = True, n: int = 6) -> dict:
    """Text and latent caches for n images, three of them in a 2x4 latent bucket; returns what was written."""
    gen = torch.Generator().manual_seed(0)
    texts, latents, expected = [], [], {"embeds": [], "length": [], "mean": {}, "std": {}}
    rows, latent_keys, buckets = [], [], []
    for i in range(n):
        length = 1 + i * 2
        embedding = torch.randn(length, DIM, generator=gen).to(dtype)
        name = str(dtype).removeprefix("torch.")
        texts.append({"key": f"t{i}", "text": f"caption {i}", "length": length, "dim": DIM,
                      "dtype": name, "embedding": tensor_bytes(embedding)})  # fmt: skip
        expected["embeds"].append(embedding)
        expected["length"].append(length)
        shape = (4, 2, 4) if i % 2 else (4, 3, 3)
        for flipped in (False, True) if flip else (False,):
            key = f"l{i}-{flipped}"
            mean, std = (
                torch.randn(shape, generator=gen).to(dtype),
                torch.rand(shape, generator=gen).to(dtype),
            )
            latents.append({"key": key, "image_id": f"img{i}", "flipped": flipped, "channels": 4,
                            "height": shape[1], "width": shape[2], "dtype": name,
                            "mean": tensor_bytes(mean), "std": tensor_bytes(std)})  # fmt: skip
            expected["mean"][key], expected["std"][key] = mean.float(), std.float()
        rows.append({"image_id": f"img{i}", "caption": f"caption {i}"})
        latent_keys.append((f"l{i}-False", f"l{i}-True" if flip else None))
        buckets.append("16x32" if i % 2 else "24x24")
    # Two shards per cache, rows shuffled across them: the view must find each key wherever it is.
    for folder, schema, table_rows in (
        ("text", contracts.TEXT_EMBEDDINGS, texts),
        ("latents", contracts.LATENTS, latents),
    ):
        cache = ShardedCache(root / folder, schema)
        cache.write(pa.Table.from_pylist(table_rows[::2], schema=schema))
        cache.write(pa.Table.from_pylist(table_rows[1::2], schema=schema))
    train_set = build_train_set(rows, [f"t{i}" for i in range(n)], latent_keys, root, buckets)
    return {"train_set": train_set, "expected": expected, "latent_keys": latent_keys}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_view_batches_equal_cached_values(tmp_path, dtype):
    made = _caches(tmp_path, dtype)
    view_dir = build_train_view(
        made["train_set"], tmp_path / "text", tmp_path / "latents", MAX_LENGTH, tmp_path / "view"
    )
    view = CachedTrainView(view_dir)
    assert len(view) == 6 and view.has_flipped and view.image_ids[3] == "img3"
    assert (view.max_length, view.embed_dim, view.latent_channels) == (MAX_LENGTH, DIM, 4)
    assert view.buckets == ["24x24", "16x32"] * 3

    indices, flip = [5, 1, 3], np.array([False, True, False])  # one latent size: 2x4
    batch = view.batch(indices, flip)
    expected = made["expected"]
    assert batch["embeds"].dtype == dtype and batch["embeds"].shape == (3, MAX_LENGTH, DIM)
    assert batch["mask"].dtype == torch.long and batch["mask"].sum(1).tolist() == [11, 3, 7]
    for slot, i in enumerate(indices):
        length = expected["length"][i]
        assert torch.equal(batch["embeds"][slot, :length], expected["embeds"][i])
        assert not batch["embeds"][slot, length:].float().any()
        key = made["latent_keys"][i][int(flip[slot])]
        assert batch["mean"].dtype == torch.float32
        assert torch.equal(batch["mean"][slot], expected["mean"][key])
        assert torch.equal(batch["std"][slot], expected["std"][key])
    with pytest.raises(ValueError, match="one latent size"):
        view.batch([0, 1])
    assert view.latent_sizes == ["3x3", "2x4"] * 3
    assert view.nbytes == sum(f.stat().st_size for f in view_dir.glob("*.arrow"))

    resident = DeviceTrainView(view, torch.device("cpu"))  # the GPU path's gathers, run on the CPU
    for rows, flags in (([5, 1, 3], flip), ([4, 0], None), ([2], [True])):
        expected, got = view.batch(rows, flags), resident.batch(rows, flags)
        for name in expected:
            assert got[name].dtype == expected[name].dtype and torch.equal(got[name], expected[name])


def test_view_is_reused_rebuilt_on_change_and_truncation_detected(tmp_path):
    made = _caches(tmp_path, torch.float32, flip=False)
    args = (tmp_path / "text", tmp_path / "latents", MAX_LENGTH, tmp_path / "view")
    view_dir = build_train_view(made["train_set"], *args)
    assert not CachedTrainView(view_dir).has_flipped
    info = view_dir / INFO_FILE
    stamp = info.stat().st_mtime_ns
    assert build_train_view(made["train_set"], *args) == view_dir and info.stat().st_mtime_ns == stamp

    build_train_view(
        made["train_set"], tmp_path / "text", tmp_path / "latents", MAX_LENGTH + 4, tmp_path / "view"
    )
    assert json.loads(info.read_text())["max_length"] == MAX_LENGTH + 4
    assert CachedTrainView(view_dir).batch([0]).get("embeds").shape[1] == MAX_LENGTH + 4

    texts = view_dir / "texts.arrow"
    texts.write_bytes(texts.read_bytes()[:-100])
    with pytest.raises(ViewError, match="texts.arrow"):
        CachedTrainView(view_dir)
    build_train_view(made["train_set"], tmp_path / "text", tmp_path / "latents", MAX_LENGTH + 4, view_dir)
    assert len(CachedTrainView(view_dir)) == 6  # the damaged view was rebuilt


# A builder in its own process. Writing the texts takes a second (and is counted in `log`), and
# both builders start together once each has written its `ready` file and the test its `go`
# file, so the second arrives while the first is still building.
BUILDER = """
import os, sys, time
from pathlib import Path
sys.path.insert(0, {root!r})
from tasks import cached_dataset

write_texts = cached_dataset._write_texts

def slow_write_texts(*args, **kwargs):
    with open({log!r}, "a") as handle:
        handle.write(f"{{os.getpid()}}\\n")
    time.sleep(1.0)
    return write_texts(*args, **kwargs)

cached_dataset._write_texts = slow_write_texts
Path({ready!r}).touch()
while not Path({go!r}).exists():
    time.sleep(0.01)
cached_dataset.build_train_view(*[Path(a) for a in {paths!r}], {max_length!r}, Path({view!r}))
"""


def test_two_processes_building_one_view_build_it_once(tmp_path):
    """Without the build lock both would build, and one could delete the view the other just
    renamed into place; with it the second finds the first one's view and takes it."""
    made = _caches(tmp_path, torch.float32)
    view_dir = tmp_path / "view"
    (tmp_path / ".view.tmp-killed").mkdir()  # left by a builder killed earlier
    paths = [str(made["train_set"]), str(tmp_path / "text"), str(tmp_path / "latents")]
    log, go = tmp_path / "builds.log", tmp_path / "go"
    children = []
    for i in range(2):
        script = BUILDER.format(
            root=str(Path(__file__).resolve().parents[1]), log=str(log), ready=str(tmp_path / f"ready{i}"),
            go=str(go), paths=paths, max_length=MAX_LENGTH, view=str(view_dir),
        )  # fmt: skip
        children.append(subprocess.Popen([sys.executable, "-c", script], stderr=subprocess.PIPE, text=True))
    deadline = time.monotonic() + 60
    while not all((tmp_path / f"ready{i}").exists() for i in range(2)) and time.monotonic() < deadline:
        time.sleep(0.05)
    go.touch()
    errors = [child.communicate(timeout=60)[1] for child in children]
    assert [child.returncode for child in children] == [0, 0], errors
    assert len(log.read_text().splitlines()) == 1  # built once: the second waited for the first's view
    assert len(CachedTrainView(view_dir)) == 6
    assert not list(tmp_path.glob(".view.tmp-*"))


def test_corrupt_shard_is_set_aside_when_the_view_reads_it(tmp_path):
    made = _caches(tmp_path, torch.float32, flip=False)
    shard = ShardedCache(tmp_path / "latents", contracts.LATENTS).shards()[0]
    data = bytearray(shard.read_bytes())
    row = contracts.read_table(shard, contracts.LATENTS).column("mean")[0].as_py()
    data[data.index(row) + 5] ^= 0x01  # one bit of one value: the row count and layout stay intact
    shard.write_bytes(bytes(data))
    assert ShardedCache(tmp_path / "latents", contracts.LATENTS).missing(["l0-False"]) == []  # keys intact

    with pytest.raises(KeyError, match="not cached"):
        build_train_view(
            made["train_set"], tmp_path / "text", tmp_path / "latents", MAX_LENGTH, tmp_path / "view"
        )
    assert shard.with_suffix(".corrupt").exists() and not (tmp_path / "view").exists()


def test_shards_stay_within_max_size_and_read_back(tmp_path):
    rows = [{"key": f"k{i:02d}", "text": "x", "length": 1, "dim": 1, "dtype": "uint8",
             "embedding": os.urandom(40_000 + 1000 * i)} for i in range(20)]  # fmt: skip
    limit = 200_000
    cache = ShardedCache(tmp_path, contracts.TEXT_EMBEDDINGS, max_shard_bytes=limit)
    paths = cache.write(pa.Table.from_pylist(rows, schema=contracts.TEXT_EMBEDDINGS))
    assert len(paths) >= 5 and max(p.stat().st_size for p in paths) <= limit
    table = cache.read([r["key"] for r in rows[::-1]])
    assert table.column("embedding").to_pylist() == [r["embedding"] for r in rows[::-1]]


def _rss_bytes() -> int:
    with open("/proc/self/statm") as handle:
        return int(handle.read().split()[1]) * mmap.PAGESIZE


def test_reading_a_batch_maps_only_its_rows(tmp_path):
    """2,000 rows of 1 MiB: opening and reading a batch must not pull the 2 GiB file into memory."""
    rows, shape = 2000, (128, 4096)  # bfloat16: 1 MiB a row
    path = tmp_path / "big.arrow"
    writer = TensorFileWriter(path, "bfloat16")
    block = np.arange(100 * 128 * 4096, dtype=np.uint16).reshape(100, *shape)
    for start in range(0, rows, 100):
        block[:, 0, 0] = np.arange(start, start + 100)  # the row's number, so rows differ between blocks
        writer.append({"embedding": block, "length": np.arange(start, start + 100, dtype=np.int32)})
    assert writer.close()["bytes"] > rows << 20
    del block
    before = _rss_bytes()
    tensors = TensorFile(path)
    picked = np.array([1999, 7, 1000, 123, 1500, 42, 888, 1234])
    batch = tensors.take(picked, ["embedding", "length"])
    grown = _rss_bytes() - before
    try:
        assert tensors.num_rows == rows and batch["embedding"].shape == (8, *shape)
        assert batch["length"].tolist() == batch["embedding"][:, 0, 0].tolist() == picked.tolist()
        expected = (np.arange(128 * 4096) + (picked[:, None] % 100) * 128 * 4096).astype(np.uint16)
        assert np.array_equal(batch["embedding"].reshape(8, -1)[:, 1:], expected[:, 1:])
        assert grown < 64 << 20, f"resident memory grew by {grown >> 20} MiB for an 8 MiB batch"
    finally:
        del tensors
        path.unlink()  # 2 GiB: not for pytest to keep


def _diffusers_table(name: str) -> dict:
    """A table from diffusers' PixArt pipeline source, read without importing it (that takes seconds)."""
    import ast
    import importlib.util

    package = Path(importlib.util.find_spec("diffusers").origin).parent
    source = package / "pipelines" / "pixart_alpha" / "pipeline_pixart_alpha.py"
    for node in ast.parse(source.read_text()).body:
        if isinstance(node, ast.Assign) and getattr(node.targets[0], "id", None) == name:
            return {k: (int(h), int(w)) for k, (h, w) in ast.literal_eval(node.value).items()}
    raise AssertionError(f"{name} not found in {source}")


def test_bucket_table_is_pixarts_scaled():
    assert ASPECT_RATIO_512 == _diffusers_table("ASPECT_RATIO_512_BIN")
    assert sorted(bucket_table(256)) == sorted(set(_diffusers_table("ASPECT_RATIO_256_BIN").values()))
    assert all(h % 16 == 0 and w % 16 == 0 for h, w in bucket_table(64)) and (64, 64) in bucket_table(64)


def test_bucket_batches_are_deterministic_and_single_bucket():
    buckets = ["16x32", "24x24", "16x32", "24x24", "16x32", "32x16", "16x32", "24x24"]
    batches = bucket_batches(buckets, 2, seed=3, epoch=0)
    assert batches == bucket_batches(buckets, 2, seed=3, epoch=0)
    assert batches != bucket_batches(buckets, 2, seed=3, epoch=1)
    assert sorted(i for b in batches for i in b) == list(range(len(buckets)))
    assert all(len({buckets[i] for i in batch}) == 1 and 1 <= len(batch) <= 2 for batch in batches)
    assert [len(b) for b in bucket_batches([None] * 5, 2, 0, 0)] in ([2, 2, 1], [2, 1, 2], [1, 2, 2])

"""The training view: exactly the cached tensors one run trains on, as memory-mapped Arrow files.

    <run_dir>/train_view/
      texts.arrow             one row per distinct caption: `embedding` [max_length, dim], zero past `length`
      latents-<h>x<w>.arrow   one row per distinct latent of that latent size: `mean`, `std` [C, h, w]
      index.parquet           row i of train_set.parquet -> rows of those files (contracts.TRAIN_VIEW_INDEX)
      view.json               written last: format, content key, each file's row count and byte size

Why a view: parquet pages are decoded into process memory, so training straight from the cache
shards would hold every embedding in RAM (100k captions x ~1 MB). The view's Arrow IPC files are
uncompressed fixed-size tensors. Opening one memory-maps it; a batch is one numpy gather per
tensor from the mapped pages into a new array (no Python loop over rows). The pages live in
the OS page cache: shared, evictable, read from disk on first touch. A process's resident
memory grows only by the pages it touched, which the kernel may drop again under pressure, so
a 100k-image view (~100 GB at 512 px in bfloat16) needs disk, not RAM.

Building reads each cache shard that holds a needed key once (ShardedCache.scan), so memory stays
at about one shard; rows are written in the order found and the index says where each went. The
view is built in a temp folder and renamed into place, so it is complete or absent; shards are
checked (checksums) as they are read, so the view holds only verified values. Values keep the
cache's dtype: bfloat16 is stored as its 16-bit patterns (uint16) and viewed as bfloat16 by torch.
Builders of one folder take turns under a file lock (`.<folder>.lock` beside it), so processes
that start at once build it once: the later ones find the first one's view current and reuse it.

On a GPU with room to spare, DeviceTrainView copies the view's tensors onto the device once and
gathers each batch there; otherwise CachedTrainView gathers from the mapped pages and copies the
batch over through pinned memory.
"""

from __future__ import annotations

import fcntl
import itertools
import json
import os
import shutil
import tempfile
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pyarrow as pa
import torch
from pyarrow import ipc
from tqdm.auto import tqdm

from tasks import contracts
from tasks.cache import ShardedCache, content_key

VIEW_FORMAT = 1
TEXTS_FILE, INDEX_FILE, INFO_FILE = "texts.arrow", "index.parquet", "view.json"
STORAGE = {"float32": np.float32, "float16": np.float16, "bfloat16": np.uint16}  # numpy has no bfloat16
TORCH_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
BATCH_BYTES = 64 << 20  # rows per Arrow record batch: about this much, so building stays within memory


class ViewError(ValueError):
    """A training view that is missing, incomplete or not what its view.json says."""


# --- Tensor files ----------------------------------------------------------------------------------


class TensorFileWriter:
    """Appends record batches to an Arrow IPC file. Arrays of more than one dimension become
    fixed-size-list columns whose field metadata records the per-row shape and the dtype."""

    def __init__(self, path: Path, dtype: str):
        self.path, self.dtype, self.rows = Path(path), dtype, 0
        self._sink = self._writer = self._schema = None

    def append(self, arrays: dict[str, np.ndarray]) -> int:
        """Write `arrays` (name -> [n, ...], tensors in STORAGE[dtype]); returns the first row's number."""
        columns, fields = [], []
        for name, array in arrays.items():
            array = np.ascontiguousarray(array)
            if array.ndim == 1:
                columns.append(pa.array(array))
                fields.append(pa.field(name, columns[-1].type, nullable=False))
                continue
            shape = array.shape[1:]
            values = pa.array(array.reshape(-1))  # zero-copy from numpy
            columns.append(pa.FixedSizeListArray.from_arrays(values, int(np.prod(shape))))
            metadata = {"shape": json.dumps(list(shape)), "dtype": self.dtype}
            fields.append(pa.field(name, columns[-1].type, nullable=False, metadata=metadata))
        batch = pa.RecordBatch.from_arrays(columns, schema=pa.schema(fields))
        if self._writer is None:
            self._sink = pa.OSFile(str(self.path), "wb")
            self._writer, self._schema = ipc.new_file(self._sink, batch.schema), batch.schema
        elif not batch.schema.equals(self._schema, check_metadata=True):
            raise ViewError(f"{self.path}: rows of another shape or dtype than the first ({batch.schema})")
        self._writer.write_batch(batch)
        self.rows += batch.num_rows
        return self.rows - batch.num_rows

    def close(self) -> dict:
        """Finish the file; returns {"rows", "bytes"} for view.json."""
        if self._writer is None:
            raise ViewError(f"{self.path}: no rows were written")
        self._writer.close()
        self._sink.close()
        return {"rows": self.rows, "bytes": self.path.stat().st_size}


class TensorFile:
    """A memory-mapped file from TensorFileWriter; take(rows) copies just those rows out."""

    def __init__(self, path: Path):
        self.path = Path(path)
        try:
            table = ipc.open_file(pa.memory_map(str(self.path))).read_all()  # maps; reads no tensor data
        except (OSError, pa.ArrowInvalid) as exc:
            raise ViewError(f"{self.path}: unreadable Arrow file ({exc})") from None
        self.num_rows = table.num_rows
        self.dtypes: dict[str, str] = {}
        self.chunks: dict[str, list[np.ndarray]] = {}  # zero-copy views of the mapped record batches
        for field in table.schema:
            metadata = field.metadata or {}
            shape = tuple(json.loads(metadata.get(b"shape", b"[]")))
            self.dtypes[field.name] = metadata.get(b"dtype", b"").decode()
            column = table.column(field.name)
            values = [c.flatten() if shape else c for c in column.chunks]
            self.chunks[field.name] = [
                v.to_numpy(zero_copy_only=True).reshape(len(c), *shape) for v, c in zip(values, column.chunks)
            ]
        self._starts = np.cumsum([0] + [len(c) for c in table.column(0).chunks])

    def shape(self, name: str) -> tuple[int, ...]:
        return self.chunks[name][0].shape[1:]

    def take(self, rows: np.ndarray, names: Sequence[str]) -> dict[str, np.ndarray]:
        """{name: [len(rows), ...]} gathered from the record batches that hold `rows`."""
        rows = np.asarray(rows, dtype=np.int64)
        if rows.size and (rows.min() < 0 or rows.max() >= self.num_rows):
            raise IndexError(f"{self.path}: rows outside 0..{self.num_rows - 1}")
        chunk_of = np.searchsorted(self._starts, rows, side="right") - 1
        out = {}
        for name in names:
            first = self.chunks[name][0]
            out[name] = np.empty((len(rows), *first.shape[1:]), dtype=first.dtype)
            for chunk in np.unique(chunk_of):  # at most one pass per record batch the rows touch
                picked = chunk_of == chunk
                out[name][picked] = self.chunks[name][chunk][rows[picked] - self._starts[chunk]]
        return out

    def load(self, names: Sequence[str], device: torch.device) -> dict[str, torch.Tensor]:
        """Every row of `names` as tensors on `device`, copied over one record batch at a time
        (so the host holds one batch's copy, not the whole file's)."""
        parts: dict[str, list[torch.Tensor]] = {name: [] for name in names}
        for start, stop in itertools.pairwise(self._starts.tolist()):
            for name, array in self.take(np.arange(start, stop), names).items():
                parts[name].append(_to_torch(array, self.dtypes[name]).to(device))
        return {name: torch.cat(tensors) for name, tensors in parts.items()}


def _to_torch(array: np.ndarray, dtype: str) -> torch.Tensor:
    if dtype == "bfloat16":
        return torch.from_numpy(array.view(np.int16)).view(torch.bfloat16)
    return torch.from_numpy(array)


# --- Building --------------------------------------------------------------------------------------


def view_key(train_set: pa.Table, max_length: int) -> str:
    """What the view's content depends on: the train set's cache keys, in order, and max_length."""
    columns = ["image_id", "text_key", "latent_key", "flipped_latent_key", "bucket"]
    return content_key(format=VIEW_FORMAT, max_length=max_length, rows=train_set.select(columns).to_pylist())


def build_train_view(
    train_set_path: Path, text_cache: Path, latent_cache: Path, max_length: int, view_dir: Path
) -> Path:
    """Write the view of train_set.parquet into `view_dir`, unless an intact one for it is there.

    Raises KeyError when a needed key is not cached, or was in a shard found corrupt on reading
    (the shard is then set aside, so computing the missing keys again repairs the cache).
    """
    train_set = contracts.read_table(Path(train_set_path), contracts.TRAIN_SET)
    if train_set.num_rows == 0:
        raise ViewError(f"{train_set_path}: no training rows")
    key, view_dir = view_key(train_set, max_length), Path(view_dir)
    if is_current(view_dir, key):
        return view_dir
    with _build_lock(view_dir):
        if is_current(view_dir, key):  # another process built it while this one waited
            return view_dir
        _write_view(train_set, Path(text_cache), Path(latent_cache), max_length, key, view_dir)
    return view_dir


def _write_view(
    train_set: pa.Table, text_cache: Path, latent_cache: Path, max_length: int, key: str, view_dir: Path
) -> None:
    rows = train_set.to_pylist()
    with _atomic_dir(view_dir) as tmp:
        files: dict[str, dict] = {}
        text_rows = _write_texts(tmp, text_cache, {r["text_key"] for r in rows}, max_length, files)
        latent_keys = {k for r in rows for k in (r["latent_key"], r["flipped_latent_key"]) if k}
        latent_at = _write_latents(tmp, latent_cache, latent_keys, files)
        index = []
        for number, row in enumerate(rows):
            latent_file, latent_row = latent_at[row["latent_key"]]
            flipped_row = None
            if row["flipped_latent_key"]:
                flipped_file, flipped_row = latent_at[row["flipped_latent_key"]]
                if flipped_file != latent_file:
                    raise ViewError(
                        f"{latent_cache}: image {row['image_id']}: flipped latent has another shape"
                    )
            index.append({
                "image_id": row["image_id"], "bucket": row["bucket"], "text_row": text_rows[row["text_key"]],
                "latent_file": latent_file, "latent_row": latent_row, "flipped_row": flipped_row,
            })  # fmt: skip
        table = pa.Table.from_pylist(index, schema=contracts.TRAIN_VIEW_INDEX)
        contracts.write_table(table, contracts.TRAIN_VIEW_INDEX, tmp / INDEX_FILE)
        info = {
            "format": VIEW_FORMAT,
            "key": key,
            "rows": len(rows),
            "max_length": max_length,
            "files": files,
        }
        (tmp / INFO_FILE).write_text(json.dumps(info, indent=2) + "\n")  # last: marks the view complete


def _write_texts(
    folder: Path, cache_dir: Path, keys: set[str], max_length: int, files: dict
) -> dict[str, int]:
    """texts.arrow from the text cache; returns key -> row."""
    row_of: dict[str, int] = {}
    writer = None
    cache = ShardedCache(cache_dir, contracts.TEXT_EMBEDDINGS)
    for table in tqdm(cache.scan(keys), desc="view: texts", unit="shard"):
        dims, dtypes = set(table.column("dim").to_pylist()), set(table.column("dtype").to_pylist())
        if len(dims) != 1 or len(dtypes) != 1 or (writer and dtypes != {writer.dtype}):
            raise ViewError(f"{cache_dir}: embeddings of several widths {dims} or dtypes {dtypes}")
        dim, dtype = dims.pop(), dtypes.pop()
        writer = writer or TensorFileWriter(folder / TEXTS_FILE, dtype)
        storage = np.dtype(STORAGE[dtype])
        step = max(1, BATCH_BYTES // (max_length * dim * storage.itemsize))  # padded rows per record batch
        for part in (table.slice(s, step) for s in range(0, table.num_rows, step)):
            lengths = np.asarray(part.column("length").to_numpy(), dtype=np.int32)
            if lengths.max() > max_length:
                raise ViewError(f"{cache_dir}: a text has {lengths.max()} tokens > max_length {max_length}")
            padded = np.zeros((part.num_rows, max_length, dim), dtype=storage)
            for i, (data, length) in enumerate(zip(part.column("embedding").to_pylist(), lengths)):
                padded[i, :length] = np.frombuffer(data, dtype=storage).reshape(length, dim)
            first = writer.append({"embedding": padded, "length": lengths})
            row_of.update((k, first + i) for i, k in enumerate(part.column("key").to_pylist()))
    files[TEXTS_FILE] = writer.close()
    return row_of


def _write_latents(folder: Path, cache_dir: Path, keys: set[str], files: dict) -> dict[str, tuple[str, int]]:
    """latents-<h>x<w>.arrow from the latent cache, one file per latent size; returns key -> (file, row)."""
    at: dict[str, tuple[str, int]] = {}
    writers: dict[str, TensorFileWriter] = {}
    cache = ShardedCache(cache_dir, contracts.LATENTS)
    for table in tqdm(cache.scan(keys), desc="view: latents", unit="shard"):
        shapes = table.select(["channels", "height", "width", "dtype"]).to_pylist()
        for (channels, height, width, dtype), rows in _group_rows(shapes).items():
            name = f"latents-{height}x{width}.arrow"
            if name not in writers:
                writers[name] = TensorFileWriter(folder / name, dtype)
            writer = writers[name]
            if writer.dtype != dtype:
                raise ViewError(f"{cache_dir}: latents in dtypes {writer.dtype} and {dtype}")
            part = table.take(pa.array(rows, type=pa.int64()))
            storage, shape = STORAGE[dtype], (part.num_rows, channels, height, width)
            arrays = {
                column: np.frombuffer(b"".join(part.column(column).to_pylist()), dtype=storage).reshape(shape)
                for column in ("mean", "std")
            }
            first = writer.append(arrays)
            at.update((k, (name, first + i)) for i, k in enumerate(part.column("key").to_pylist()))
    files.update((name, writer.close()) for name, writer in writers.items())
    return at


def _group_rows(shapes: list[dict]) -> dict[tuple, list[int]]:
    groups: dict[tuple, list[int]] = {}
    for i, row in enumerate(shapes):
        groups.setdefault((row["channels"], row["height"], row["width"], row["dtype"]), []).append(i)
    return groups


def _read_info(view_dir: Path) -> dict:
    """view.json, after checking every file it lists is there with the size it lists (truncation)."""
    try:
        info = json.loads((view_dir / INFO_FILE).read_text())
    except (OSError, ValueError) as exc:
        raise ViewError(f"{view_dir}: no complete training view ({exc})") from None
    if info.get("format") != VIEW_FORMAT:
        raise ViewError(f"{view_dir}: view format {info.get('format')!r}, want {VIEW_FORMAT}")
    for name, meta in info["files"].items():
        size = (view_dir / name).stat().st_size if (view_dir / name).is_file() else None
        if size != meta["bytes"]:
            raise ViewError(f"{view_dir / name}: {size} bytes, view.json says {meta['bytes']}")
    return info


def is_current(view_dir: Path, key: str) -> bool:
    """Whether `view_dir` holds a complete, untruncated view with content key `key`."""
    try:
        return _read_info(Path(view_dir))["key"] == key
    except ViewError:
        return False


@contextmanager
def _build_lock(dest: Path) -> Iterator[None]:
    """An exclusive lock on building `dest`, held until the block ends. flock is released by
    the kernel when its holder dies, so a killed builder never leaves the folder locked."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    with open(dest.parent / f".{dest.name}.lock", "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


@contextmanager
def _atomic_dir(dest: Path) -> Iterator[Path]:
    """A temp folder that replaces `dest` when the block succeeds; callers hold _build_lock(dest).

    The old `dest` is renamed aside before the new one moves in, never deleted in place, so a
    reader sees a whole view or none; one that mapped the old files keeps them until it closes.
    Temp folders of builders killed earlier are removed first: under the lock nobody uses them.
    """
    for leftover in dest.parent.glob(f".{dest.name}.tmp-*"):
        shutil.rmtree(leftover, ignore_errors=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.tmp-", dir=dest.parent))
    try:
        yield tmp
        if dest.exists():  # stale (another key) or incomplete
            os.replace(dest, tempfile.mkdtemp(prefix=f".{dest.name}.tmp-", dir=dest.parent))
        os.replace(tmp, dest)
    finally:
        for leftover in dest.parent.glob(f".{dest.name}.tmp-*"):
            shutil.rmtree(leftover, ignore_errors=True)


# --- Reading ---------------------------------------------------------------------------------------


class CachedTrainView:
    """Training batches from a view folder, memory-mapped.

    batch(indices, flip, device) -> {"embeds": [B, max_length, dim] in the cached dtype (zero past
    each caption), "mask": [B, max_length] long, "mean", "std": [B, C, h, w] float32, unscaled},
    on `device` when given. Indices are rows of train_set.parquet; one batch must come from one
    latent size (`latent_sizes`; see tasks.buckets.bucket_batches when buckets are on).
    """

    def __init__(self, path: str | Path):
        self.path = Path(path)
        info = _read_info(self.path)
        index = contracts.read_table(self.path / INDEX_FILE, contracts.TRAIN_VIEW_INDEX)
        self.texts = TensorFile(self.path / TEXTS_FILE)
        self.latents = {
            name: TensorFile(self.path / name) for name in info["files"] if name.startswith("latents-")
        }
        for name, tensors in [(TEXTS_FILE, self.texts), *self.latents.items()]:
            if tensors.num_rows != info["files"][name]["rows"]:
                raise ViewError(
                    f"{tensors.path}: {tensors.num_rows} rows, view.json says {info['files'][name]['rows']}"
                )
        if index.num_rows != info["rows"]:
            raise ViewError(f"{self.path / INDEX_FILE}: {index.num_rows} rows, view.json says {info['rows']}")
        self.nbytes: int = sum(meta["bytes"] for meta in info["files"].values())  # the tensor files
        self.image_ids: list[str] = index.column("image_id").to_pylist()
        self.buckets: list[str | None] = index.column("bucket").to_pylist()
        self._file_names = sorted(self.latents)
        number = {name: i for i, name in enumerate(self._file_names)}
        latent_files = index.column("latent_file").to_pylist()
        self._file_of = np.array([number[name] for name in latent_files])
        # "<h>x<w>" of each row's latents: rows of one size can share a batch.
        self.latent_sizes: list[str] = [
            name.removeprefix("latents-").removesuffix(".arrow") for name in latent_files
        ]
        self._text_row = index.column("text_row").to_numpy()
        self._latent_row = index.column("latent_row").to_numpy()
        self._flipped_row = index.column("flipped_row").fill_null(-1).to_numpy()
        self.has_flipped = bool((self._flipped_row >= 0).all())
        if not self.has_flipped and (self._flipped_row >= 0).any():
            raise ViewError(f"{self.path}: flipped latents for some rows but not all")
        self.max_length, self.embed_dim = self.texts.shape("embedding")
        self.latent_channels = next(iter(self.latents.values())).shape("mean")[0]

    def __len__(self) -> int:
        return len(self.image_ids)

    def locate(self, indices, flip=None) -> tuple[np.ndarray, str, np.ndarray]:
        """(rows of texts.arrow, latent file, rows in it) of the train-set rows `indices` (ints);
        where `flip` (bools, one per index) is set, the rows of the mirrored latents."""
        indices = np.asarray(indices, dtype=np.int64)
        files = np.unique(self._file_of[indices])
        if len(files) != 1:
            sizes = [self._file_names[f] for f in files]
            raise ValueError(
                f"{self.path}: a batch must have one latent size, got {sizes} (use bucket_batches)"
            )
        latent_rows = self._latent_row[indices]
        if flip is not None and np.asarray(flip).any():
            if not self.has_flipped:
                raise ValueError(f"{self.path}: flip asked for, but the view has no flipped latents")
            latent_rows = np.where(np.asarray(flip, dtype=bool), self._flipped_row[indices], latent_rows)
        return self._text_row[indices], self._file_names[files[0]], latent_rows

    def batch(self, indices, flip=None, device: torch.device | None = None) -> dict[str, torch.Tensor]:
        """The rows `indices`, gathered from the mapped pages (see the class doc)."""
        text_rows, name, latent_rows = self.locate(indices, flip)
        text = self.texts.take(text_rows, ["embedding", "length"])
        latents = self.latents[name]
        dist = latents.take(latent_rows, ["mean", "std"])
        tensors = (
            _to_torch(text["embedding"], self.texts.dtypes["embedding"]),
            torch.from_numpy(text["length"]),
            _to_torch(dist["mean"], latents.dtypes["mean"]),
            _to_torch(dist["std"], latents.dtypes["std"]),
        )
        return _batch_dict(*(_to_device(t, device) for t in tensors), max_length=self.max_length)


class DeviceTrainView:
    """A view's tensor files copied onto `device` once; batch() (same as CachedTrainView's)
    then gathers on the device, so a step's host work is only finding the rows."""

    def __init__(self, view: CachedTrainView, device: torch.device):
        self.view, self.device, self.has_flipped = view, device, view.has_flipped
        self.texts = view.texts.load(["embedding", "length"], device)
        self.latents = {name: tensors.load(["mean", "std"], device) for name, tensors in view.latents.items()}

    def __len__(self) -> int:
        return len(self.view)

    def batch(self, indices, flip=None, device: torch.device | None = None) -> dict[str, torch.Tensor]:
        text_rows, name, latent_rows = self.view.locate(indices, flip)
        text_rows, latent_rows = (torch.from_numpy(r).to(self.device) for r in (text_rows, latent_rows))
        latents = self.latents[name]
        tensors = (
            self.texts["embedding"][text_rows],
            self.texts["length"][text_rows],
            latents["mean"][latent_rows],
            latents["std"][latent_rows],
        )
        return _batch_dict(*(_to_device(t, device) for t in tensors), max_length=self.view.max_length)


def _to_device(tensor: torch.Tensor, device: torch.device | None) -> torch.Tensor:
    if device is None:
        return tensor
    if tensor.device.type == "cpu" and torch.device(device).type == "cuda":
        # Pinned, so the copy runs asynchronously; the caching host allocator keeps the pinned
        # buffer until the copy is done.
        return tensor.pin_memory().to(device, non_blocking=True)
    return tensor.to(device)


def _batch_dict(embeds, lengths, mean, std, max_length: int) -> dict[str, torch.Tensor]:
    """The batch as CachedTrainView documents it; the mask and float32 casts made where the
    tensors already are (on the GPU, not the host)."""
    positions = torch.arange(max_length, device=lengths.device)
    return {
        "embeds": embeds,
        "mask": (positions[None, :] < lengths.long()[:, None]).long(),
        "mean": mean.float(),
        "std": std.float(),
    }

"""Data contracts: every file one stage writes and another reads, in one place.

Writers call `validate` before writing; readers call `read_table`, which checks the schema and
the schema version recorded in the file's metadata. docs/data-contracts.md describes each file.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

# 2: per-column sha256 checksums in the metadata; arrays may be stored as "bfloat16".
SCHEMA_VERSION = "2"
# A field with this metadata may be left out by writers (and is absent from older files): it reads as null.
OPTIONAL = {"optional": "true"}

# manifest.parquet (pull): one row per valid dataset image.
MANIFEST = pa.schema(
    [
        pa.field("image_id", pa.string(), nullable=False),  # sha256 of the image file's bytes
        pa.field("file_name", pa.string(), nullable=False),  # path inside the dataset repo
        pa.field("image_path", pa.string(), nullable=False),  # content-addressed copy in the work dir
        pa.field("width", pa.int32(), nullable=False),
        pa.field("height", pa.int32(), nullable=False),
        pa.field("original_caption", pa.string(), nullable=False),
        pa.field("source_repo", pa.string(), nullable=False),
        pa.field("source_commit", pa.string(), nullable=False),
    ],
    metadata={"contract": "manifest"},
)

# captions.parquet (recaption): the caption each image is trained with.
CAPTIONS = pa.schema(
    [
        pa.field("image_id", pa.string(), nullable=False),
        pa.field("original_caption", pa.string(), nullable=False),
        pa.field("generated_caption", pa.string(), nullable=True),  # null when re-captioning is off
        pa.field("caption", pa.string(), nullable=False),  # the one training uses
        pa.field("model_id", pa.string(), nullable=True),
        pa.field("prompt", pa.string(), nullable=True),
        pa.field("flagged", pa.bool_(), nullable=False),  # degenerate output kept for review, not training
    ],
    metadata={"contract": "captions"},
)

# Caption cache shards (recaption): one generated caption per image x captioner settings.
CAPTION_CACHE = pa.schema(
    [
        pa.field("key", pa.string(), nullable=False),  # sha256 of image id, model, prompt template, settings
        pa.field("image_id", pa.string(), nullable=False),
        pa.field("model_id", pa.string(), nullable=False),
        pa.field("prompt", pa.string(), nullable=False),  # the filled prompt LLaVA saw
        pa.field("generated_caption", pa.string(), nullable=False),
        pa.field("flagged", pa.bool_(), nullable=False),  # empty or looping even after one retry
    ],
    metadata={"contract": "caption_cache"},
)

# Text-embedding cache shards (embed). Only the valid tokens are stored: `length` rows of
# `dim` values; training pads back to max_length and rebuilds the attention mask from `length`.
TEXT_EMBEDDINGS = pa.schema(
    [
        pa.field("key", pa.string(), nullable=False),  # text_embedding_key(...)
        pa.field("text", pa.string(), nullable=False),
        pa.field("length", pa.int32(), nullable=False),
        pa.field("dim", pa.int32(), nullable=False),
        pa.field("dtype", pa.string(), nullable=False),  # numpy dtype, or "bfloat16": see array_from_bytes
        pa.field("embedding", pa.binary(), nullable=False),  # row-major [length, dim]
    ],
    metadata={"contract": "text_embeddings"},
)

# Latent cache shards (embed): the VAE's latent distribution, so training samples per step.
LATENTS = pa.schema(
    [
        pa.field("key", pa.string(), nullable=False),  # latent_key(...)
        pa.field("image_id", pa.string(), nullable=False),
        pa.field("flipped", pa.bool_(), nullable=False),
        pa.field("channels", pa.int32(), nullable=False),
        pa.field("height", pa.int32(), nullable=False),  # latent rows (pixels / 8)
        pa.field("width", pa.int32(), nullable=False),
        pa.field("dtype", pa.string(), nullable=False),
        pa.field("mean", pa.binary(), nullable=False),  # [channels, height, width], unscaled
        pa.field("std", pa.binary(), nullable=False),
    ],
    metadata={"contract": "latents"},
)

# train_set.parquet (embed): what training reads, one row per training image.
TRAIN_SET = pa.schema(
    [
        pa.field("image_id", pa.string(), nullable=False),
        pa.field("caption", pa.string(), nullable=False),
        pa.field("text_key", pa.string(), nullable=False),  # row in the text-embedding cache
        pa.field("latent_key", pa.string(), nullable=False),  # row in the latent cache
        pa.field("flipped_latent_key", pa.string(), nullable=True),  # set when flip augmentation is on
        # "HxW" pixels of the image's aspect-ratio bucket when embed.buckets is on, else null.
        pa.field("bucket", pa.string(), nullable=True, metadata=OPTIONAL),
    ],
    metadata={"contract": "train_set"},
)

# train_view/index.parquet (embed): row i of train_set.parquet, located in the view's tensor files
# (tasks/cached_dataset.py writes and reads them; docs/data-contracts.md describes them).
TRAIN_VIEW_INDEX = pa.schema(
    [
        pa.field("image_id", pa.string(), nullable=False),
        pa.field("bucket", pa.string(), nullable=True),  # as in TRAIN_SET
        pa.field("text_row", pa.int64(), nullable=False),  # row of texts.arrow
        pa.field("latent_file", pa.string(), nullable=False),  # latents-<h>x<w>.arrow (latent rows x columns)
        pa.field("latent_row", pa.int64(), nullable=False),
        pa.field("flipped_row", pa.int64(), nullable=True),  # null without flip augmentation
    ],
    metadata={"contract": "train_view_index"},
)

# prompt_set.parquet (embed): evaluation prompts with their cached embeddings.
PROMPT_SET = pa.schema(
    [
        pa.field("prompt", pa.string(), nullable=False),
        pa.field("styled_prompt", pa.string(), nullable=False),
        pa.field("category", pa.string(), nullable=True),
        pa.field("text_key", pa.string(), nullable=False),  # embedding of styled_prompt
    ],
    metadata={"contract": "prompt_set"},
)

# results.jsonl (evaluate): one JSON object per prompt x model x seed.
RESULT_FIELDS = (
    "prompt", "styled_prompt", "model", "seed", "steps", "guidance", "sampler", "image_path",
    "width", "height", "run_id", "dataset_repo", "dataset_commit", "caption_model", "caption_prompt_hash",
    "lora_path", "lora_rank", "lora_alpha", "config_hash", "code_version", "created_at",
)  # fmt: skip


class ContractError(ValueError):
    """A file that does not match its documented contract."""


def validate(table: pa.Table, schema: pa.Schema, name: str) -> pa.Table:
    """Cast `table` to `schema` (same column names, compatible types) or say what differs."""
    for field in schema:
        if field.name not in table.column_names and (field.metadata or {}).get(b"optional") == b"true":
            table = table.append_column(field.name, pa.nulls(table.num_rows, field.type))
    missing = [f.name for f in schema if f.name not in table.column_names]
    extra = [c for c in table.column_names if c not in schema.names]
    if missing or extra:
        raise ContractError(f"{name}: missing columns {missing}, unexpected columns {extra}")
    table = table.select(schema.names)
    try:
        table = table.cast(schema)
    except (pa.ArrowInvalid, pa.ArrowTypeError, ValueError) as exc:
        raise ContractError(f"{name}: {exc}") from None
    for field in schema:
        if not field.nullable and table.column(field.name).null_count:
            raise ContractError(f"{name}: column {field.name!r} has nulls")
    return table


def column_checksum(column: pa.ChunkedArray) -> str:
    """sha256 of a column's values and nulls, the same however the column is split into chunks."""
    nulls, lengths, data = hashlib.sha256(), hashlib.sha256(), hashlib.sha256()
    for chunk in column.chunks:
        nulls.update(chunk.is_null().to_numpy(zero_copy_only=False).tobytes())
        chunk = chunk.drop_null()
        if len(chunk) == 0:
            continue
        kind = chunk.type
        if pa.types.is_binary(kind) or pa.types.is_string(kind):
            # The values' bytes straight from the Arrow buffers: no copy of a tensor column.
            start = chunk.offset
            offsets = np.frombuffer(chunk.buffers()[1], np.int32)[start : start + len(chunk) + 1]
            lengths.update(np.diff(offsets).tobytes())
            data.update(chunk.buffers()[2][int(offsets[0]) : int(offsets[-1])])
        elif pa.types.is_primitive(kind):
            data.update(chunk.to_numpy(zero_copy_only=False).tobytes())
        else:
            raise ContractError(f"no checksum for column type {kind}")
    return hashlib.sha256(nulls.digest() + lengths.digest() + data.digest()).hexdigest()


def write_table(table: pa.Table, schema: pa.Schema, path: Path) -> Path:
    """Validate, then write atomically: a reader never sees a half-written file."""
    table = validate(table, schema, str(path))
    checksums = {name: column_checksum(table.column(name)) for name in table.column_names}
    metadata = dict(schema.metadata or {})
    metadata.update({b"schema_version": SCHEMA_VERSION.encode(), b"num_rows": str(table.num_rows).encode(),
                     b"checksums": json.dumps(checksums).encode()})  # fmt: skip
    table = table.replace_schema_metadata(metadata)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    # Binary columns hold raw tensors: dictionary encoding, compression and min/max statistics
    # cost time and space and buy nothing there.
    plain = [f.name for f in schema if not pa.types.is_binary(f.type)]
    try:
        pq.write_table(
            table, tmp, use_dictionary=plain, write_statistics=plain,
            compression={n: "snappy" if n in plain else "none" for n in schema.names},
        )  # fmt: skip
        with open(tmp, "rb+") as handle:
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)  # a disk-full write must not keep the disk full
        raise
    return path


def read_table(path: Path, schema: pa.Schema, columns: list[str] | None = None) -> pa.Table:
    """Read a contract file (or some of its columns), refusing one that is truncated, foreign, of
    another version, or whose values differ from their checksums (a flipped bit)."""
    try:
        table = pq.read_table(path, columns=columns)
    except (OSError, pa.ArrowInvalid) as exc:
        raise ContractError(f"{path}: unreadable parquet ({exc})") from None
    metadata = table.schema.metadata or {}
    if metadata.get(b"schema_version") != SCHEMA_VERSION.encode():
        raise ContractError(f"{path}: schema version {metadata.get(b'schema_version')!r}, want {SCHEMA_VERSION}")
    if metadata.get(b"num_rows") != str(table.num_rows).encode():
        raise ContractError(f"{path}: row count does not match its metadata (truncated or edited)")
    checksums = json.loads(metadata.get(b"checksums", b"{}"))
    for name in table.column_names:
        if checksums.get(name) != column_checksum(table.column(name)):
            raise ContractError(f"{path}: column {name!r} does not match its checksum (corrupted)")
    if columns is not None:
        return validate(table, pa.schema([schema.field(c) for c in columns]), str(path))
    return validate(table, schema, str(path))


def array_to_bytes(array: np.ndarray) -> bytes:
    return np.ascontiguousarray(array).tobytes()


def array_from_bytes(data: bytes, dtype: str, shape: tuple[int, ...]) -> np.ndarray:
    """The array stored by array_to_bytes (or tasks.embed.tensor_bytes). numpy has no bfloat16:
    "bfloat16" data (16-bit patterns) comes back widened to float32, which is exact."""
    if dtype == "bfloat16":
        bits = np.frombuffer(data, dtype=np.uint16).astype(np.uint32) << 16
        return bits.view(np.float32).reshape(shape)
    return np.frombuffer(data, dtype=np.dtype(dtype)).reshape(shape)

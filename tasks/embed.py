"""Embed: precompute what training and evaluation feed the transformer, once per content.

PixArt's frozen parts (the T5 text encoder and the VAE) are far larger than the LoRA being
trained, so their outputs are computed here and cached by content; training then never loads
them. Text: T5 hidden states of each caption/prompt at `max_length` tokens, storing only the
valid tokens (the rest are padding that the attention mask hides). Images: the VAE's latent
*distribution* (mean, std, unscaled), so training draws a fresh sample each step as the
reference script does; with `embed.buckets` each image keeps its aspect ratio (tasks/buckets.py).
The empty string is embedded too: it is the unconditional text for classifier-free guidance.
Values are stored in the dtype they were computed in (bfloat16 on GPU, float32 in the CPU demo).

Outputs: rows in the text/latent caches (contracts.TEXT_EMBEDDINGS, contracts.LATENTS), two
small tables in the run dir that point into them (train_set.parquet, prompt_set.parquet), and
the memory-mapped training view built from them (<run_dir>/train_view, tasks/cached_dataset.py).
The models are dropped before each embed_* function returns, so their memory is free for training.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
from collections.abc import Iterator, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import NamedTuple

import numpy as np
import pyarrow as pa
import torch
from PIL import Image
from prefect import get_run_logger, task
from tqdm.auto import tqdm

from configs import EmbedConfig, ModelsConfig, RunConfig
from tasks import contracts, model_loading
from tasks.buckets import bucket_name, bucket_table, nearest_bucket
from tasks.cache import ShardedCache, content_key
from tasks.cached_dataset import build_train_view
from tasks.images import load_rgb
from tasks.workdir import WorkDir

log = logging.getLogger(__name__)

EMPTY_TEXT = ""  # the unconditional caption for classifier-free guidance
FLUSH_EVERY = 4  # batches per cache shard: a killed run keeps all but the last few batches
WRITES_IN_FLIGHT = 2  # one T5 shard takes about as long to write as to compute (bench/RESULTS.md)
BINARY_CHUNK_BYTES = 2**31 - 1  # the most one arrow binary array addresses (int32 offsets)
LOADER_THREADS = min(8, os.cpu_count() or 1)  # image decoding overlaps the VAE (PIL releases the GIL)
PROJECT_ROOT = Path(__file__).resolve().parent.parent
# Part of every latent key: changing how images are cropped must not reuse old latents.
PREPROCESS = "resize-cover-bilinear/center-crop/[-1,1]"

Size = tuple[int, int]  # (height, width) in pixels


# --- Keys ------------------------------------------------------------------------------------------


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def text_encoder_id(models: ModelsConfig) -> str:
    return models.text_encoder or f"{models.pixart}/text_encoder"


def text_encoder_revision(models: ModelsConfig) -> str | None:
    return models.text_encoder_revision if models.text_encoder else models.pixart_revision


def vae_id(models: ModelsConfig) -> str:
    return f"{models.pixart}/vae"


def text_embedding_key(
    text: str, encoder_id: str, max_length: int, dtype: str, revision: str | None = None
) -> str:
    """An unpinned revision (None: the hub's main branch) cannot tell when upstream weights change;
    pin a commit in models.*_revision for caches that must follow the weights exactly.
    Left out on purpose: embed.batch_size and embed.compile. Both change bf16 values only by
    rounding (other kernels, other padding), as the re-caption key leaves out its static cache;
    keying on them would recompute every embedding for a speed setting."""
    return content_key(
        kind="text", text=text, encoder=encoder_id, revision=revision, max_length=max_length, dtype=dtype
    )  # fmt: skip


def latent_key(
    image_id: str, vae: str, size: Size, flipped: bool, dtype: str, revision: str | None = None
) -> str:
    """`size` is the (height, width) the image is cropped to: the resolution, or its bucket."""
    return content_key(
        kind="latent", image_id=image_id, vae=vae, revision=revision, size=bucket_name(size), flipped=flipped,
        dtype=dtype, preprocess=PREPROCESS,
    )  # fmt: skip


def tensor_bytes(tensor: torch.Tensor) -> bytes:
    """Row-major bytes of a tensor in its own dtype; bfloat16 as its 16-bit patterns (numpy has
    none; contracts.array_from_bytes and the training view read them back)."""
    tensor = tensor.detach().cpu().contiguous()
    if tensor.dtype == torch.bfloat16:
        tensor = tensor.view(torch.int16)
    return tensor.numpy().tobytes()


# --- Cache writes ----------------------------------------------------------------------------------


class _ShardWriter:
    """Writes cache shards on background threads (parquet, checksums and fsync release the GIL),
    at most WRITES_IN_FLIGHT at a time. close() waits for all and re-raises a failed write."""

    def __init__(self, cache: ShardedCache):
        self.cache, self._pool = cache, ThreadPoolExecutor(WRITES_IN_FLIGHT)
        self._pending: list[Future] = []

    def write(self, parts: list) -> None:
        """Hand `parts` (row dicts or tables; the list is emptied) over, to be written as one shard."""
        if parts:
            while len(self._pending) >= WRITES_IN_FLIGHT:
                self._pending.pop(0).result()
            self._pending.append(self._pool.submit(self._write, list(parts)))
            parts.clear()

    def _write(self, parts: list) -> None:
        rows = not isinstance(parts[0], pa.Table)
        table = pa.Table.from_pylist(parts, schema=self.cache.schema) if rows else pa.concat_tables(parts)
        self.cache.write(table)

    def close(self) -> None:
        try:
            while self._pending:
                self._pending.pop(0).result()
        finally:
            self._pool.shutdown()


def _shard_bytes(embed_cfg: EmbedConfig) -> int:
    return embed_cfg.max_shard_mb << 20


# --- Text ------------------------------------------------------------------------------------------


def embed_texts(
    texts: Sequence[str],
    models_cfg: ModelsConfig,
    embed_cfg: EmbedConfig,
    cache_dir: Path,
    device: torch.device,
    dtype: torch.dtype,
) -> list[str]:
    """Cache the T5 embedding of every text; return their keys in the order given."""
    keys = text_cache_keys(texts, models_cfg, embed_cfg, dtype)
    cache = ShardedCache(Path(cache_dir), contracts.TEXT_EMBEDDINGS, _shard_bytes(embed_cfg))
    missing = set(cache.missing(keys))
    todo = list({k: t for k, t in zip(keys, texts, strict=True) if k in missing}.items())
    if not todo:
        return keys

    tokenizer, model = model_loading.load_text_encoder(models_cfg, dtype, device)
    if embed_cfg.compile:
        compile_text_encoder(model)
    writer, tables = _ShardWriter(cache), []
    queued: _QueuedTexts | None = None  # a batch still on the device; its rows are built one batch later
    try:
        # Similar lengths in one batch: padding to the batch's longest text wastes little.
        lengths = tokenizer([t for _, t in todo], truncation=True, max_length=embed_cfg.max_length)
        order = np.argsort([len(ids) for ids in lengths["input_ids"]], kind="stable")
        todo = [todo[i] for i in order]
        starts = range(0, len(todo), embed_cfg.batch_size)
        for n, start in enumerate(tqdm(starts, desc="T5 embeddings", unit="batch")):
            batch = todo[start : start + embed_cfg.batch_size]
            launched = _encode_text_batch(batch, tokenizer, model, embed_cfg.max_length, device)
            if queued is not None:  # the host builds its rows while the device runs `launched`
                tables.append(_text_table(queued))
            queued = launched
            if n % FLUSH_EVERY == 0:  # n batches finished
                writer.write(tables)
        tables.append(_text_table(queued))
        queued = None
    finally:
        if queued is not None:  # computed before a later batch failed: keep it if it can be read
            with contextlib.suppress(Exception):
                tables.append(_text_table(queued))
        writer.write(tables)  # finished batches are valid even when a later one failed
        writer.close()
        del tokenizer, model
        model_loading.release()
    log.info("embedded %d of %d texts (%d cached)", len(todo), len(set(keys)), len(set(keys)) - len(todo))
    return keys


def compile_text_encoder(model: torch.nn.Module, backend: str = "inductor") -> None:
    """torch.compile each T5 block in place (embed.compile). Dynamic shapes, as batches are padded to
    their longest text: two graphs serve every length (block 0 also computes the position bias).
    Static shapes over bucketed lengths were slower; bench/RESULTS.md says when compiling pays off."""
    for block in model.encoder.block:
        block.compile(backend=backend, dynamic=True)


class _QueuedTexts(NamedTuple):
    """A T5 batch whose valid hidden states are on their way to host memory."""

    batch: list[tuple[str, str]]  # (key, text)
    lengths: list[int]  # valid tokens per text
    valid: torch.Tensor  # [sum(lengths), dim] on the host, in batch order
    copied: torch.cuda.Event | None  # the copy is done once this is; None on the CPU


@torch.inference_mode()
def _encode_text_batch(batch, tokenizer, model, max_length: int, device: torch.device) -> _QueuedTexts:
    """Queue T5 on `batch` and the copy of its valid tokens to the host (no waiting on CUDA)."""
    tokens = tokenizer(
        [text for _, text in batch], padding="longest", truncation=True, max_length=max_length,
        return_tensors="pt",
    )  # fmt: skip
    mask = tokens.attention_mask.bool()
    # The valid tokens (either padding side) by indices computed here: the gather needs no sync
    # and one transfer moves them all. non_blocking: nothing here waits for earlier batches.
    index = mask.flatten().nonzero().squeeze(1)
    hidden = model(
        input_ids=tokens.input_ids.to(device, non_blocking=True),
        attention_mask=tokens.attention_mask.to(device, non_blocking=True),
    ).last_hidden_state
    valid = hidden.flatten(0, 1).index_select(0, index.to(device, non_blocking=True))
    lengths = mask.sum(1).tolist()
    if device.type != "cuda":
        return _QueuedTexts(batch, lengths, valid.cpu(), None)
    host = torch.empty(valid.shape, dtype=valid.dtype, pin_memory=True).copy_(valid, non_blocking=True)
    copied = torch.cuda.current_stream().record_event()  # after the copy, asynchronous as pinned
    return _QueuedTexts(batch, lengths, host, copied)


def _text_table(queued: _QueuedTexts) -> pa.Table:
    """The TEXT_EMBEDDINGS rows of a queued batch, once copied. Each embedding is a slice of the
    batch's host buffer: bytes objects (~0.6 MB a caption) cost more host time than T5's launches."""
    if queued.copied is not None:
        queued.copied.synchronize()
    valid, lengths = queued.valid, np.array(queued.lengths, dtype=np.int64)
    # bfloat16 as its 16-bit patterns, as tensor_bytes stores it (numpy has no bfloat16).
    values = valid.view(torch.int16) if valid.dtype == torch.bfloat16 else valid
    data = values.numpy().reshape(-1).view(np.uint8)
    ends = np.cumsum(lengths) * (valid.shape[1] * valid.element_size())
    chunks, first = [], 0
    while first < len(lengths):  # one binary array addresses at most BINARY_CHUNK_BYTES
        base = ends[first - 1] if first else 0
        last = max(first + 1, int(np.searchsorted(ends, base + BINARY_CHUNK_BYTES, side="right")))
        offsets = pa.py_buffer(np.concatenate([[0], ends[first:last] - base]).astype(np.int32))
        buffers = [None, offsets, pa.py_buffer(data[base : ends[last - 1]])]
        chunks.append(pa.Array.from_buffers(pa.binary(), last - first, buffers))
        first = last
    keys, texts = zip(*queued.batch, strict=True)
    columns = {"key": keys, "text": texts, "length": lengths, "dim": [valid.shape[1]] * len(keys),
               "dtype": [dtype_name(valid.dtype)] * len(keys), "embedding": pa.chunked_array(chunks, pa.binary())}  # fmt: skip
    return pa.table(columns, schema=contracts.TEXT_EMBEDDINGS)


def load_text_embeddings(
    cache_dir: Path, keys: Sequence[str], max_length: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """(embeddings [N, max_length, dim] float32, attention mask [N, max_length] long), right-padded.

    Everything in memory: for the evaluation prompts and small sets; training reads the view."""
    table = ShardedCache(Path(cache_dir), contracts.TEXT_EMBEDDINGS).read(keys)
    dims = set(table.column("dim").to_pylist())
    if len(dims) > 1:
        raise ValueError(f"{cache_dir}: embeddings of different widths {sorted(dims)} (mixed text encoders?)")
    dim = dims.pop() if dims else 0
    embeds = np.zeros((len(keys), max_length, dim), dtype=np.float32)
    mask = np.zeros((len(keys), max_length), dtype=np.int64)
    for i, row in enumerate(table.to_pylist()):
        if row["length"] > max_length:
            raise ValueError(
                f"{cache_dir}: key {row['key']} has {row['length']} tokens > max_length {max_length}"
            )
        array = contracts.array_from_bytes(row["embedding"], row["dtype"], (row["length"], row["dim"]))
        embeds[i, : row["length"]] = array
        mask[i, : row["length"]] = 1
    return torch.from_numpy(embeds), torch.from_numpy(mask)


# --- Images ----------------------------------------------------------------------------------------


def preprocess_image(image: Image.Image, size: int | Size) -> torch.Tensor:
    """Resize (bilinear) to cover `size` (height, width; an int means square), centre-crop, [-1, 1].

    For a square size this is PixArt's 512 training transform, with sizes and offsets as in
    torchvision's Resize(int) and CenterCrop, so the latents match the reference script's.
    """
    height, width = (size, size) if isinstance(size, int) else size
    w, h = image.size
    if width * h >= height * w:  # the width is the tighter fit: it sets the scale
        new_size = (width, max(height, int(width * h / w)))
    else:
        new_size = (max(width, int(height * w / h)), height)
    if new_size != image.size:
        image = image.resize(new_size, Image.Resampling.BILINEAR)
    top = round((new_size[1] - height) / 2.0)
    left = round((new_size[0] - width) / 2.0)
    image = image.crop((left, top, left + width, top + height))
    pixels = np.asarray(image, dtype=np.float32) / 127.5 - 1.0
    return torch.from_numpy(pixels).permute(2, 0, 1).contiguous()


def image_size(row: Mapping, embed_cfg: EmbedConfig) -> Size:
    """The (height, width) a manifest row's image is encoded at: square, or its bucket."""
    if not embed_cfg.buckets:
        return embed_cfg.resolution, embed_cfg.resolution
    if "height" not in row or "width" not in row:
        raise ValueError(f"image {row['image_id']}: buckets need the manifest's width and height")
    return nearest_bucket(row["height"], row["width"], bucket_table(embed_cfg.resolution))


def text_cache_keys(
    texts: Sequence[str], models_cfg: ModelsConfig, embed_cfg: EmbedConfig, dtype: torch.dtype
) -> list[str]:
    """The keys embed_texts stores each text's T5 embedding under."""
    encoder, revision = text_encoder_id(models_cfg), text_encoder_revision(models_cfg)
    return [text_embedding_key(t, encoder, embed_cfg.max_length, dtype_name(dtype), revision) for t in texts]


def latent_cache_keys(
    row: Mapping, models_cfg: ModelsConfig, embed_cfg: EmbedConfig, dtype: torch.dtype
) -> tuple[str, str | None]:
    """The keys embed_images stores a manifest row's latents under: (plain, mirrored or None
    without embed.flip)."""
    size, vae_name = image_size(row, embed_cfg), vae_id(models_cfg)
    dt, revision = dtype_name(dtype), models_cfg.pixart_revision
    plain = latent_key(row["image_id"], vae_name, size, False, dt, revision)
    return plain, latent_key(row["image_id"], vae_name, size, True, dt, revision) if embed_cfg.flip else None


def embed_images(
    manifest_rows: Sequence[Mapping],
    models_cfg: ModelsConfig,
    embed_cfg: EmbedConfig,
    cache_dir: Path,
    device: torch.device,
    dtype: torch.dtype,
) -> list[tuple[str, str | None]]:
    """Cache the VAE latent distribution of every manifest row's image (and its mirror image
    when embed_cfg.flip); return (latent key, flipped key or None) per row, in order."""
    # One job per latent to compute: key -> (image id, path, flipped, size). Dict order dedupes.
    jobs: dict[str, tuple[str, str, bool, Size]] = {}
    pairs = []
    for row in manifest_rows:
        size = image_size(row, embed_cfg)
        plain, flipped = latent_cache_keys(row, models_cfg, embed_cfg, dtype)
        pairs.append((plain, flipped))
        jobs[plain] = (row["image_id"], row["image_path"], False, size)
        if flipped:
            jobs[flipped] = (row["image_id"], row["image_path"], True, size)
    cache = ShardedCache(Path(cache_dir), contracts.LATENTS, _shard_bytes(embed_cfg))
    missing = set(cache.missing(jobs))
    by_size: dict[Size, list[tuple]] = {}  # a VAE batch needs one image size
    for key, job in jobs.items():
        if key in missing:
            by_size.setdefault(job[3], []).append((key, *job))
    batches = [
        group[i : i + embed_cfg.batch_size]
        for _, group in sorted(by_size.items())
        for i in range(0, len(group), embed_cfg.batch_size)
    ]
    if not batches:
        return pairs

    vae = model_loading.load_vae(models_cfg, dtype, device)
    writer, rows = _ShardWriter(cache), []
    try:
        with ThreadPoolExecutor(LOADER_THREADS) as pool:
            loaded = _pixel_batches(batches, pool)
            for n, (batch, pixels) in enumerate(
                tqdm(loaded, total=len(batches), desc="VAE latents", unit="batch")
            ):
                rows += _encode_image_batch(batch, pixels, vae, device, dtype)
                if (n + 1) % FLUSH_EVERY == 0:
                    writer.write(rows)
    finally:
        writer.write(rows)  # finished batches are valid even when a later one failed
        writer.close()
        del vae
        model_loading.release()
    computed = sum(len(b) for b in batches)
    log.info("encoded %d of %d latents (%d cached)", computed, len(jobs), len(jobs) - computed)
    return pairs


def _load_pixels(job: tuple) -> torch.Tensor:
    _, image_id, path, flipped, size = job
    try:
        image = load_rgb(Path(path))
    except (OSError, ValueError) as exc:
        raise ValueError(f"image {image_id} ({path}): cannot be read: {exc}") from None
    pixels = preprocess_image(image, size)
    return pixels.flip(-1) if flipped else pixels


def _pixel_batches(
    batches: list[list[tuple]], pool: ThreadPoolExecutor
) -> Iterator[tuple[list, torch.Tensor]]:
    """Each batch with its pixels; the next batch is decoded on `pool` while this one is encoded."""
    upcoming = [pool.submit(_load_pixels, job) for job in batches[0]]
    for n, batch in enumerate(batches):
        current = upcoming
        upcoming = [pool.submit(_load_pixels, job) for job in batches[n + 1]] if n + 1 < len(batches) else []
        yield batch, torch.stack([future.result() for future in current])


@torch.inference_mode()
def _encode_image_batch(
    batch, pixels: torch.Tensor, vae, device: torch.device, dtype: torch.dtype
) -> list[dict]:
    dist = vae.encode(pixels.to(device, dtype)).latent_dist
    means, stds = dist.mean.cpu(), dist.std.cpu()
    rows = []
    for (key, image_id, _, flipped, _), mean, std in zip(batch, means, stds, strict=True):
        channels, height, width = mean.shape
        rows.append(
            {
                "key": key, "image_id": image_id, "flipped": flipped, "channels": channels,
                "height": height, "width": width, "dtype": dtype_name(mean.dtype),
                "mean": tensor_bytes(mean), "std": tensor_bytes(std),
            }
        )  # fmt: skip
    return rows


def load_latent_dist(cache_dir: Path, keys: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean, std), each [N, channels, height, width] float32, unscaled (training applies
    vae.config.scaling_factor after sampling). All rows must have one latent size."""
    table = ShardedCache(Path(cache_dir), contracts.LATENTS).read(keys)
    means, stds = [], []
    for row in table.to_pylist():
        shape = (row["channels"], row["height"], row["width"])
        means.append(contracts.array_from_bytes(row["mean"], row["dtype"], shape).astype(np.float32))
        stds.append(contracts.array_from_bytes(row["std"], row["dtype"], shape).astype(np.float32))
    shapes = {m.shape for m in means}
    if len(shapes) > 1:
        raise ValueError(f"{cache_dir}: latents of different shapes {sorted(shapes)} (mixed resolutions?)")
    return torch.from_numpy(np.stack(means)), torch.from_numpy(np.stack(stds))


# --- Train and prompt sets -------------------------------------------------------------------------


def training_rows(captions: pa.Table, manifest: pa.Table, source: str = "captions") -> list[dict]:
    """Manifest rows (dicts) with their training `caption`, in manifest order. Flagged captions
    (degenerate LLaVA output kept for review) are left out; any image-id mismatch is an error."""
    by_id = {row["image_id"]: row for row in manifest.to_pylist()}
    caption_of: dict[str, str] = {}
    flagged: set[str] = set()
    for number, row in enumerate(captions.to_pylist()):
        image_id = row["image_id"]
        if image_id not in by_id:
            raise ValueError(f"{source}: row {number} image_id {image_id} is not in the manifest")
        if image_id in caption_of:
            raise ValueError(f"{source}: row {number} repeats image_id {image_id}")
        caption_of[image_id] = row["caption"]
        if row["flagged"]:
            flagged.add(image_id)
    uncaptioned = [i for i in by_id if i not in caption_of]
    if uncaptioned:
        raise ValueError(
            f"{source}: {len(uncaptioned)} manifest image(s) have no caption, e.g. {uncaptioned[0]}"
        )
    rows = [{**row, "caption": caption_of[i]} for i, row in by_id.items() if i not in flagged]
    if not rows:
        raise ValueError(f"{source}: every caption is flagged; nothing to train on")
    if flagged:
        log.warning("%s: %d flagged caption(s) left out of the train set", source, len(flagged))
    return rows


def build_train_set(
    rows: Sequence[Mapping],
    text_keys: Sequence[str],
    latent_keys: Sequence[tuple[str, str | None]],
    run_dir: Path,
    buckets: Sequence[str | None] | None = None,
) -> Path:
    """Write <run_dir>/train_set.parquet: one row per training image, pointing into the caches;
    `buckets` ("HxW" per row) when aspect-ratio buckets are on."""
    buckets = buckets if buckets is not None else [None] * len(rows)
    table = pa.Table.from_pylist(
        [
            {"image_id": row["image_id"], "caption": row["caption"], "text_key": text_key,
             "latent_key": plain, "flipped_latent_key": flipped, "bucket": bucket}
            for row, text_key, (plain, flipped), bucket in zip(
                rows, text_keys, latent_keys, buckets, strict=True
            )
        ],
        schema=contracts.TRAIN_SET,
    )  # fmt: skip
    return contracts.write_table(table, contracts.TRAIN_SET, Path(run_dir) / "train_set.parquet")


def resolve_prompts_file(path: str | Path) -> Path:
    """As given when absolute or found from the CWD, else relative to the project root."""
    path = Path(path).expanduser()
    if path.is_absolute() or path.is_file():
        return path
    if (PROJECT_ROOT / path).is_file():
        return PROJECT_ROOT / path
    raise FileNotFoundError(f"prompts file {path} not found in {Path.cwd()} or {PROJECT_ROOT}")


def read_prompts(prompts_file: Path, style_template: str) -> list[dict]:
    """JSONL rows {"prompt": str, "category": str (optional)} -> rows with `styled_prompt` added."""
    prompts = []
    try:
        text = Path(prompts_file).read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise ValueError(f"{prompts_file}: not valid UTF-8 ({exc})") from None
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        where = f"{prompts_file}:{number}"
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise ValueError(f"{where}: not valid JSON ({exc.msg})") from None
        if not isinstance(row, dict) or not isinstance(row.get("prompt"), str) or not row["prompt"].strip():
            raise ValueError(f"{where}: expected an object with a non-empty string 'prompt'")
        category = row.get("category")
        if category is not None and not isinstance(category, str):
            raise ValueError(f"{where}: 'category' must be a string")
        prompt = row["prompt"].strip()
        # replace(), not format(): other braces in the template are plain text.
        prompts.append({"prompt": prompt, "styled_prompt": style_template.replace("{prompt}", prompt),
                        "category": category})  # fmt: skip
    if not prompts:
        raise ValueError(f"{prompts_file}: no prompts")
    return prompts


def build_prompt_set(prompts: Sequence[Mapping], text_keys: Sequence[str], run_dir: Path) -> Path:
    """Write <run_dir>/prompt_set.parquet: read_prompts' rows plus the key of each styled prompt."""
    rows = [{**prompt, "text_key": key} for prompt, key in zip(prompts, text_keys, strict=True)]
    table = pa.Table.from_pylist(rows, schema=contracts.PROMPT_SET)
    return contracts.write_table(table, contracts.PROMPT_SET, Path(run_dir) / "prompt_set.parquet")


# --- The whole stage ------------------------------------------------------------------------------


def embed_run(
    rows: Sequence[Mapping], prompts: Sequence[Mapping], config: RunConfig, wd: WorkDir, run_dir: Path
) -> dict:
    """Cache every embedding and latent the run needs, then write the train set, the prompt set
    and the training view. Building the view (and loading the prompts' embeddings) reads every
    value training and evaluation will use and checks it against its shard's checksums; a shard
    that fails is set aside, and its rows are computed again once."""
    device, dtype = model_loading.pick_device(config.device), model_loading.DTYPES[config.dtype]
    text_cache = ShardedCache(wd.text_cache, contracts.TEXT_EMBEDDINGS)
    latent_cache = ShardedCache(wd.latent_cache, contracts.LATENTS)
    # One encoder load for all texts: the unconditional one, captions and styled prompts.
    texts = [EMPTY_TEXT, *(row["caption"] for row in rows), *(p["styled_prompt"] for p in prompts)]
    buckets = [bucket_name(image_size(row, config.embed)) if config.embed.buckets else None for row in rows]
    computed_texts, computed_latents = set(), set()
    for attempt in (1, 2):
        texts_before, latents_before = text_cache.keys(), latent_cache.keys()
        text_keys = embed_texts(texts, config.models, config.embed, wd.text_cache, device, dtype)
        latent_keys = embed_images(rows, config.models, config.embed, wd.latent_cache, device, dtype)
        computed_texts |= set(text_keys) - texts_before
        computed_latents |= {k for pair in latent_keys for k in pair if k} - latents_before
        key_of = dict(zip(texts, text_keys, strict=True))
        train_set = build_train_set(rows, [key_of[r["caption"]] for r in rows], latent_keys, run_dir, buckets)
        prompt_keys = [key_of[p["styled_prompt"]] for p in prompts]
        prompt_set = build_prompt_set(prompts, prompt_keys, run_dir)
        try:
            max_length = config.embed.max_length
            view = build_train_view(
                train_set, wd.text_cache, wd.latent_cache, max_length, run_dir / "train_view"
            )
            load_text_embeddings(wd.text_cache, [key_of[EMPTY_TEXT], *prompt_keys], max_length)
            break
        except KeyError as exc:
            if attempt == 2:
                raise
            log.warning("embed: %s (a shard failed its checks); computing the missing rows again", exc)
    return {
        "train_set": str(train_set),
        "prompt_set": str(prompt_set),
        "train_view": str(view),
        "empty_text_key": key_of[EMPTY_TEXT],
        "text_cache": str(wd.text_cache),
        "latent_cache": str(wd.latent_cache),
        "texts_computed": len(computed_texts),
        "latents_computed": len(computed_latents),
    }


# --- Prefect task ----------------------------------------------------------------------------------


@task(name="embed", retries=0)
def embed_task(manifest_path: str, captions_path: str, config: RunConfig, workdir: str, run_dir: str) -> dict:
    logger = get_run_logger()
    wd = WorkDir(Path(workdir))
    manifest = contracts.read_table(Path(manifest_path), contracts.MANIFEST)
    captions = contracts.read_table(Path(captions_path), contracts.CAPTIONS)
    rows = [
        {**row, "image_path": str(wd.resolve(row["image_path"]))}
        for row in training_rows(captions, manifest, source=captions_path)
    ]
    prompts = read_prompts(resolve_prompts_file(config.evaluate.prompts_file), config.evaluate.style_template)
    result = embed_run(rows, prompts, config, wd, Path(run_dir))
    logger.info(
        "embed: %d train images (%d flagged captions left out), %d prompts; computed %d texts, %d latents; "
        "training view %s",
        len(rows), captions.num_rows - len(rows), len(prompts), result["texts_computed"],
        result["latents_computed"], result["train_view"],
    )  # fmt: skip
    return result

"""Embed: precompute what training and evaluation feed the transformer, once per content.

PixArt's frozen parts (the T5 text encoder and the VAE) are far larger than the LoRA being
trained, so their outputs are computed here and cached by content; training then never loads
them. Text: T5 hidden states of each caption/prompt at `max_length` tokens, storing only the
valid tokens (the rest are padding that the attention mask hides). Images: the VAE's latent
*distribution* (mean, std, unscaled), so training draws a fresh sample each step as the
reference script does. The empty string is embedded too: it is the unconditional text for
classifier-free guidance.

Outputs: rows in the text/latent caches (contracts.TEXT_EMBEDDINGS, contracts.LATENTS) and
two small tables in the run dir that point into them: train_set.parquet, prompt_set.parquet.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import pyarrow as pa
import torch
from PIL import Image
from prefect import get_run_logger, task
from tqdm.auto import tqdm

from configs import EmbedConfig, ModelsConfig, RunConfig
from tasks import contracts, model_loading
from tasks.cache import ShardedCache, content_key
from tasks.images import load_rgb
from tasks.workdir import WorkDir

log = logging.getLogger(__name__)

EMPTY_TEXT = ""  # the unconditional caption for classifier-free guidance
STORED_DTYPE = "float32"  # dtype of cached arrays (smaller dtypes later)
FLUSH_EVERY = 4  # batches per cache shard: a killed run keeps all but the last few batches
PROJECT_ROOT = Path(__file__).resolve().parent.parent
# Part of every latent key: changing how images are cropped must not reuse old latents.
PREPROCESS = "resize-shorter-bilinear/center-crop/[-1,1]"


# --- Keys ------------------------------------------------------------------------------------------


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def text_encoder_id(models: ModelsConfig) -> str:
    return models.text_encoder or f"{models.pixart}/text_encoder"


def vae_id(models: ModelsConfig) -> str:
    return f"{models.pixart}/vae"


def text_embedding_key(text: str, encoder_id: str, max_length: int, dtype: str) -> str:
    return content_key(kind="text", text=text, encoder=encoder_id, max_length=max_length, dtype=dtype)


def latent_key(image_id: str, vae: str, resolution: int, flipped: bool, dtype: str) -> str:
    return content_key(
        kind="latent", image_id=image_id, vae=vae, resolution=resolution, flipped=flipped,
        dtype=dtype, preprocess=PREPROCESS,
    )  # fmt: skip


# --- Text ------------------------------------------------------------------------------------------


def _flush(cache: ShardedCache, rows: list[dict]) -> None:
    if rows:
        cache.write(pa.Table.from_pylist(rows, schema=cache.schema))
        rows.clear()


def embed_texts(
    texts: Sequence[str],
    models_cfg: ModelsConfig,
    embed_cfg: EmbedConfig,
    cache_dir: Path,
    device: torch.device,
    dtype: torch.dtype,
) -> list[str]:
    """Cache the T5 embedding of every text; return their keys in the order given."""
    encoder = text_encoder_id(models_cfg)
    keys = [text_embedding_key(t, encoder, embed_cfg.max_length, dtype_name(dtype)) for t in texts]
    cache = ShardedCache(Path(cache_dir), contracts.TEXT_EMBEDDINGS)
    missing = set(cache.missing(keys))
    todo = list({k: t for k, t in zip(keys, texts, strict=True) if k in missing}.items())
    if not todo:
        return keys

    tokenizer, model = model_loading.load_text_encoder(models_cfg, dtype, device)
    rows: list[dict] = []
    try:
        # Similar lengths in one batch: padding to the batch's longest text wastes little.
        lengths = tokenizer([t for _, t in todo], truncation=True, max_length=embed_cfg.max_length)
        order = np.argsort([len(ids) for ids in lengths["input_ids"]], kind="stable")
        todo = [todo[i] for i in order]
        starts = range(0, len(todo), embed_cfg.batch_size)
        for n, start in enumerate(tqdm(starts, desc="T5 embeddings", unit="batch")):
            batch = todo[start : start + embed_cfg.batch_size]
            rows += _encode_text_batch(batch, tokenizer, model, embed_cfg.max_length, device)
            if (n + 1) % FLUSH_EVERY == 0:
                _flush(cache, rows)
    finally:
        _flush(cache, rows)  # finished batches are valid even when a later one failed
        del tokenizer, model
        model_loading.release()
    log.info("embedded %d of %d texts (%d cached)", len(todo), len(set(keys)), len(set(keys)) - len(todo))
    return keys


@torch.inference_mode()
def _encode_text_batch(batch, tokenizer, model, max_length: int, device: torch.device) -> list[dict]:
    tokens = tokenizer(
        [text for _, text in batch], padding="longest", truncation=True, max_length=max_length,
        return_tensors="pt",
    )  # fmt: skip
    mask = tokens.attention_mask.to(device)
    hidden = model(input_ids=tokens.input_ids.to(device), attention_mask=mask).last_hidden_state
    rows = []
    for (key, text), states, valid in zip(batch, hidden, mask.bool(), strict=True):
        # Boolean indexing keeps only the tokens the mask marks valid, whichever side was padded.
        array = states[valid].float().cpu().numpy()
        rows.append(
            {
                "key": key, "text": text, "length": array.shape[0], "dim": array.shape[1],
                "dtype": STORED_DTYPE, "embedding": contracts.array_to_bytes(array.astype(STORED_DTYPE)),
            }
        )  # fmt: skip
    return rows


def load_text_embeddings(
    cache_dir: Path, keys: Sequence[str], max_length: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """(embeddings [N, max_length, dim] float32, attention mask [N, max_length] long), right-padded."""
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


def preprocess_image(image: Image.Image, resolution: int) -> torch.Tensor:
    """PixArt's 512 training transform: shorter side -> resolution (bilinear), centre crop, [-1, 1].

    Sizes and offsets follow torchvision's Resize(int) and CenterCrop, so the latents match
    the reference script's.
    """
    width, height = image.size
    short, long = min(width, height), max(width, height)
    new_long = int(resolution * long / short)
    size = (resolution, new_long) if width <= height else (new_long, resolution)
    if size != image.size:
        image = image.resize(size, Image.Resampling.BILINEAR)
    top = round((size[1] - resolution) / 2.0)
    left = round((size[0] - resolution) / 2.0)
    image = image.crop((left, top, left + resolution, top + resolution))
    pixels = np.asarray(image, dtype=np.float32) / 127.5 - 1.0
    return torch.from_numpy(pixels).permute(2, 0, 1).contiguous()


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
    vae_name, res, dt = vae_id(models_cfg), embed_cfg.resolution, dtype_name(dtype)
    pairs = [
        (
            latent_key(row["image_id"], vae_name, res, False, dt),
            latent_key(row["image_id"], vae_name, res, True, dt) if embed_cfg.flip else None,
        )
        for row in manifest_rows
    ]
    # One job per latent to compute: (key, image id, path, flipped). Dict order dedupes.
    jobs: dict[str, tuple[str, str, bool]] = {}
    for row, (plain, flipped) in zip(manifest_rows, pairs, strict=True):
        jobs[plain] = (row["image_id"], row["image_path"], False)
        if flipped:
            jobs[flipped] = (row["image_id"], row["image_path"], True)
    cache = ShardedCache(Path(cache_dir), contracts.LATENTS)
    missing = set(cache.missing(jobs))
    todo = [(key, *job) for key, job in jobs.items() if key in missing]
    if not todo:
        return pairs

    vae = model_loading.load_vae(models_cfg, dtype, device)
    rows: list[dict] = []
    try:
        starts = range(0, len(todo), embed_cfg.batch_size)
        for n, start in enumerate(tqdm(starts, desc="VAE latents", unit="batch")):
            rows += _encode_image_batch(todo[start : start + embed_cfg.batch_size], vae, res, device, dtype)
            if (n + 1) % FLUSH_EVERY == 0:
                _flush(cache, rows)
    finally:
        _flush(cache, rows)  # finished batches are valid even when a later one failed
        del vae
        model_loading.release()
    log.info("encoded %d of %d latents (%d cached)", len(todo), len(jobs), len(jobs) - len(todo))
    return pairs


def _load_pixels(image_id: str, path: str, resolution: int, flipped: bool) -> torch.Tensor:
    try:
        image = load_rgb(Path(path))
    except (OSError, ValueError) as exc:
        raise ValueError(f"image {image_id} ({path}): cannot be read: {exc}") from None
    pixels = preprocess_image(image, resolution)
    return pixels.flip(-1) if flipped else pixels


@torch.inference_mode()
def _encode_image_batch(batch, vae, resolution: int, device: torch.device, dtype: torch.dtype) -> list[dict]:
    pixels = torch.stack(
        [_load_pixels(image_id, path, resolution, flip) for _, image_id, path, flip in batch]
    )
    dist = vae.encode(pixels.to(device, dtype)).latent_dist
    means, stds = dist.mean.float().cpu().numpy(), dist.std.float().cpu().numpy()
    rows = []
    for (key, image_id, _, flipped), mean, std in zip(batch, means, stds, strict=True):
        channels, height, width = mean.shape
        rows.append(
            {
                "key": key, "image_id": image_id, "flipped": flipped, "channels": channels,
                "height": height, "width": width, "dtype": STORED_DTYPE,
                "mean": contracts.array_to_bytes(mean.astype(STORED_DTYPE)),
                "std": contracts.array_to_bytes(std.astype(STORED_DTYPE)),
            }
        )  # fmt: skip
    return rows


def load_latent_dist(cache_dir: Path, keys: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean, std), each [N, channels, height, width] float32, unscaled (training applies
    vae.config.scaling_factor after sampling)."""
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
) -> Path:
    """Write <run_dir>/train_set.parquet: one row per training image, pointing into the caches."""
    table = pa.Table.from_pylist(
        [
            {"image_id": row["image_id"], "caption": row["caption"], "text_key": text_key,
             "latent_key": plain, "flipped_latent_key": flipped}
            for row, text_key, (plain, flipped) in zip(rows, text_keys, latent_keys, strict=True)
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
    for number, line in enumerate(Path(prompts_file).read_text().splitlines(), start=1):
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


# --- Prefect task ----------------------------------------------------------------------------------


@task(name="embed", retries=0)
def embed_task(manifest_path: str, captions_path: str, config: RunConfig, workdir: str, run_dir: str) -> dict:
    logger = get_run_logger()
    wd = WorkDir(Path(workdir))
    device, dtype = model_loading.pick_device(config.device), model_loading.DTYPES[config.dtype]
    manifest = contracts.read_table(Path(manifest_path), contracts.MANIFEST)
    captions = contracts.read_table(Path(captions_path), contracts.CAPTIONS)
    rows = [
        {**row, "image_path": str(wd.resolve(row["image_path"]))}
        for row in training_rows(captions, manifest, source=captions_path)
    ]
    prompts = read_prompts(resolve_prompts_file(config.evaluate.prompts_file), config.evaluate.style_template)

    # One encoder load for all texts: the unconditional one, captions and styled prompts.
    texts = [EMPTY_TEXT, *(row["caption"] for row in rows), *(p["styled_prompt"] for p in prompts)]
    # What the caches held before, so the summary can say how much this run computed.
    texts_before = ShardedCache(wd.text_cache, contracts.TEXT_EMBEDDINGS).keys()
    latents_before = ShardedCache(wd.latent_cache, contracts.LATENTS).keys()
    text_keys = embed_texts(texts, config.models, config.embed, wd.text_cache, device, dtype)
    latent_keys = embed_images(rows, config.models, config.embed, wd.latent_cache, device, dtype)

    key_of = dict(zip(texts, text_keys, strict=True))
    train_set = build_train_set(rows, [key_of[row["caption"]] for row in rows], latent_keys, Path(run_dir))
    prompt_set = build_prompt_set(prompts, [key_of[p["styled_prompt"]] for p in prompts], Path(run_dir))
    texts_computed = len(set(text_keys) - texts_before)
    latents_computed = len({k for pair in latent_keys for k in pair if k} - latents_before)
    logger.info(
        "embed: %d train images (%d flagged captions left out), %d prompts; computed %d texts, %d latents",
        len(rows), captions.num_rows - len(rows), len(prompts), texts_computed, latents_computed,
    )  # fmt: skip
    return {
        "train_set": str(train_set),
        "prompt_set": str(prompt_set),
        "empty_text_key": key_of[EMPTY_TEXT],
        "text_cache": str(wd.text_cache),
        "latent_cache": str(wd.latent_cache),
        "texts_computed": texts_computed,
        "latents_computed": latents_computed,
    }

"""Shards of a dataset for distributed re-captioning and embedding (flows/fanout.py runs them on Dask).

A shard is a list of manifest rows that still have a value to compute: a caption, or (for the
style run) a caption's T5 embedding or an image's VAE latents. Running a shard calls the stages'
own functions on just those rows (recaption.caption_images, embed.embed_texts, embed.embed_images),
on the worker's GPU, and writes into the work dir's shared content-addressed caches, which take
concurrent writers. The stages that run afterwards find every value cached and compute nothing,
so their outputs are those of a single-process run.

Only rows with work are sharded: a re-run with nothing new starts no cluster at all, and the few
images a scheduled recaption adds are spread over the workers instead of landing in one shard.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Mapping, Sequence
from pathlib import Path

import pyarrow as pa
import torch
from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE

from configs import RunConfig
from tasks import model_loading
from tasks.cache import ShardedCache
from tasks.contracts import CAPTION_CACHE, LATENTS, MANIFEST, TEXT_EMBEDDINGS, read_table
from tasks.embed import (
    EMPTY_TEXT,
    embed_images,
    embed_texts,
    latent_cache_keys,
    read_prompts,
    resolve_prompts_file,
    text_cache_keys,
)
from tasks.recaption import caption_images, caption_keys
from tasks.workdir import WorkDir

STAGES = ("recaption", "embed")


# --- Keys the stages will ask for ------------------------------------------------------------------


def text_key(text: str, config: RunConfig) -> str:
    return text_cache_keys([text], config.models, config.embed, model_loading.DTYPES[config.dtype])[0]


def latent_keys(row: Mapping, config: RunConfig) -> list[str]:
    keys = latent_cache_keys(row, config.models, config.embed, model_loading.DTYPES[config.dtype])
    return [key for key in keys if key]


def prompt_texts(config: RunConfig) -> list[str]:
    """The texts embed embeds besides the captions: the unconditional one and the styled prompts."""
    prompts = read_prompts(resolve_prompts_file(config.evaluate.prompts_file), config.evaluate.style_template)
    return [EMPTY_TEXT, *(prompt["styled_prompt"] for prompt in prompts)]


def captioned_rows(
    manifest: pa.Table, config: RunConfig, wd: WorkDir, device: torch.device
) -> tuple[list[dict], int]:
    """(manifest rows with their training caption as embed_task builds them, flagged ones left out;
    captions generated). Captions missing from the cache are generated on `device`."""
    dtype = model_loading.DTYPES[config.dtype]
    captioned = caption_images(
        manifest, config.recaption, config.models, device, dtype, wd.captions_cache, image_root=wd.root
    )
    rows = [
        {**row, "caption": caption["caption"], "image_path": str(wd.resolve(row["image_path"]))}
        for row, caption in zip(manifest.to_pylist(), captioned.table.to_pylist(), strict=True)
        if not caption["flagged"]
    ]
    return rows, captioned.generated


def _take(table: pa.Table, indices: Sequence[int]) -> pa.Table:
    return table.take(pa.array(indices, type=pa.int64()))


# --- Planning --------------------------------------------------------------------------------------


def pending_rows(
    manifest: pa.Table, config: RunConfig, wd: WorkDir, stages: Sequence[str]
) -> tuple[list[int], bool]:
    """(indices of manifest rows with a value still to compute, whether any prompt text is missing).
    Reads only the caches: no model is loaded."""
    unknown = set(stages) - set(STAGES)
    if unknown:
        raise ValueError(f"unknown stages {sorted(unknown)}; expected some of {STAGES}")
    pending: set[int] = set()
    if config.recaption.enabled:
        _, keys = caption_keys(manifest, config.recaption, config.models, model_loading.DTYPES[config.dtype])
        missing = set(ShardedCache(wd.captions_cache, CAPTION_CACHE).missing(keys))
        pending = {i for i, key in enumerate(keys) if key in missing}
    if "embed" not in stages:
        return sorted(pending), False

    captioned = [i for i in range(manifest.num_rows) if i not in pending]
    rows, _ = captioned_rows(_take(manifest, captioned), config, wd, torch.device("cpu"))  # all cached
    by_id = {row["image_id"]: row for row in rows}
    texts = ShardedCache(wd.text_cache, TEXT_EMBEDDINGS).keys()
    latents = ShardedCache(wd.latent_cache, LATENTS).keys()
    image_ids = manifest.column("image_id").to_pylist()
    for index in captioned:
        row = by_id.get(image_ids[index])  # None: a flagged caption, which embed leaves out
        if row and (text_key(row["caption"], config) not in texts or set(latent_keys(row, config)) - latents):
            pending.add(index)
    prompts_missing = any(text_key(text, config) not in texts for text in prompt_texts(config))
    return sorted(pending), prompts_missing


def split_rows(indices: Sequence[int], count: int) -> list[list[int]]:
    """`indices` in at most `count` consecutive, non-empty parts whose sizes differ by at most one."""
    count = max(1, min(count, len(indices)))
    size, extra = divmod(len(indices), count)
    parts, start = [], 0
    for part in range(count):
        stop = start + size + (part < extra)
        parts.append(list(indices[start:stop]))
        start = stop
    return [part for part in parts if part]


def plan_shards(manifest: pa.Table, config: RunConfig, wd: WorkDir, stages: Sequence[str]) -> list[dict]:
    """One shard per worker ({"index", "rows", "prompts"}) over the rows with work; none when every
    value is cached. Missing prompt texts ride with the first shard; alone they make no shard, as
    the embed stage computes them in one short T5 pass anyway."""
    rows, prompts_missing = pending_rows(manifest, config, wd, stages)
    parts = split_rows(rows, config.distributed.workers)
    return [{"index": i, "rows": part, "prompts": prompts_missing and i == 0} for i, part in enumerate(parts)]


# --- Running one shard -----------------------------------------------------------------------------


def shard_device(setting: str, card: int) -> torch.device:
    """The device of a worker: CUDA card `card % cards` when the run uses CUDA (else the CPU)."""
    device = model_loading.pick_device(setting)
    if device.type != "cuda":
        return device
    return torch.device("cuda", card % torch.cuda.device_count())


def run_shard(
    manifest: pa.Table, shard: Mapping, config: RunConfig, wd: WorkDir, device: torch.device,
    stages: Sequence[str],
) -> dict:  # fmt: skip
    """Compute every missing value of the shard's rows into the caches; returns what it computed."""
    rows = _take(manifest, shard["rows"])
    dtype = model_loading.DTYPES[config.dtype]
    # The current CUDA device must be the shard's: embed queues its copies on the current stream.
    with torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext():
        captioned, generated = captioned_rows(rows, config, wd, device)
        done = {"rows": rows.num_rows, "captions": generated, "texts": 0, "latents": 0}
        if "embed" not in stages:
            return done
        texts = [row["caption"] for row in captioned] + (prompt_texts(config) if shard["prompts"] else [])
        latents = [key for row in captioned for key in latent_keys(row, config)]
        done["texts"] = len(
            ShardedCache(wd.text_cache, TEXT_EMBEDDINGS).missing(text_key(t, config) for t in texts)
        )
        done["latents"] = len(ShardedCache(wd.latent_cache, LATENTS).missing(latents))
        embed_texts(texts, config.models, config.embed, wd.text_cache, device, dtype)
        embed_images(captioned, config.models, config.embed, wd.latent_cache, device, dtype)
    return done


def _dask_worker() -> tuple[str, int | None]:
    """(name, index) of the Dask worker running this code; the index is None where the name is no
    number (a local cluster numbers its workers 0..n-1)."""
    try:
        from distributed import get_worker

        name = get_worker().name
    except (ImportError, ValueError):  # not on a Dask worker
        return f"pid {os.getpid()}", None
    return str(name), int(name) if str(name).isdigit() else None


# --- Prefect tasks ---------------------------------------------------------------------------------


@task(name="fanout-plan", cache_policy=NO_CACHE)
def plan_shards_task(manifest_path: str, config: RunConfig, workdir: str, stages: list[str]) -> list[dict]:
    shards = plan_shards(read_table(Path(manifest_path), MANIFEST), config, WorkDir(Path(workdir)), stages)
    get_run_logger().info(
        "%s: %d rows with values to compute, in %d shard(s)",
        "+".join(stages), sum(len(s["rows"]) for s in shards), len(shards),
    )  # fmt: skip
    return shards


@task(name="fanout-shard", cache_policy=NO_CACHE)  # the caches are content-addressed already
def shard_task(manifest_path: str, shard: dict, config: RunConfig, workdir: str, stages: list[str]) -> dict:
    logger = get_run_logger()
    worker, index = _dask_worker()
    # A local cluster's workers see every card and take one each by index. A running cluster's
    # workers see their own card first: dask-cuda rotates CUDA_VISIBLE_DEVICES per worker.
    card = 0 if config.distributed.address else shard["index"] if index is None else index
    device = shard_device(config.device, card)
    logger.info("shard %d: %d rows on worker %s (pid %d), %s", shard["index"], len(shard["rows"]), worker,
                os.getpid(), device)  # fmt: skip
    manifest = read_table(Path(manifest_path), MANIFEST)
    done = run_shard(manifest, shard, config, WorkDir(Path(workdir)), device, stages)
    logger.info("shard %d: generated %d captions, embedded %d texts and %d latents",
                shard["index"], done["captions"], done["texts"], done["latents"])  # fmt: skip
    return {**done, "shard": shard["index"], "worker": worker, "pid": os.getpid(), "device": str(device)}

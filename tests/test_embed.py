"""Tests for the embed stage (tasks/embed.py): tiny models on CPU."""

from __future__ import annotations

import hashlib
import json
import math
import multiprocessing
import weakref
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
import torch
from PIL import Image
from prefect.logging import disable_run_logger

from configs import CONFIG_DIR, EmbedConfig, ModelsConfig, load_config
from tasks import contracts, embed, model_loading
from tasks.buckets import bucket_table, ratio_tolerance
from tasks.cache import ShardedCache
from tasks.cached_dataset import CachedTrainView
from tasks.embed import (
    build_prompt_set,
    build_train_set,
    embed_images,
    embed_task,
    embed_texts,
    load_latent_dist,
    load_text_embeddings,
    preprocess_image,
    read_prompts,
    training_rows,
)

DEMO = Path(__file__).resolve().parent.parent / "data" / "demo"
CPU, F32, BF16 = torch.device("cpu"), torch.float32, torch.bfloat16
MODELS = ModelsConfig(pixart="tiny:pixart")
LONG = " ".join(["a red circle with a thick black outline on a cream background"] * 20)  # > 120 tokens
TEXTS = ["", "a teal star", "flat mustard heart outlined in black", LONG, "a teal star"]


@pytest.fixture(scope="module", autouse=True)
def _embed_models(tiny_models):
    """Tiny models built once per session (conftest), before any test or worker process needs them."""
    return tiny_models


def _demo_rows(n: int) -> list[dict]:
    images = sorted((DEMO / "images").glob("*.png"))[:n]
    return [{"image_id": hashlib.sha256(p.read_bytes()).hexdigest(), "image_path": str(p)} for p in images]


def _forbid_model_loading(monkeypatch) -> None:
    def refuse(*args, **kwargs):
        raise AssertionError("a model was loaded although everything was cached")

    monkeypatch.setattr(model_loading, "load_text_encoder", refuse)
    monkeypatch.setattr(model_loading, "load_vae", refuse)


# --- Text ------------------------------------------------------------------------------------------


def test_cached_text_embeddings_equal_fresh_computation(tmp_path):
    cfg = EmbedConfig(batch_size=2)
    keys = embed_texts(TEXTS, MODELS, cfg, tmp_path, CPU, F32)
    assert len(keys) == len(TEXTS) and keys[1] == keys[4] and len(set(keys)) == 4
    embeds, mask = load_text_embeddings(tmp_path, keys, cfg.max_length)

    tokenizer, encoder = model_loading.load_text_encoder(MODELS, F32, CPU)
    tokens = tokenizer(TEXTS, padding="max_length", truncation=True, max_length=120, return_tensors="pt")
    with torch.no_grad():
        fresh = encoder(input_ids=tokens.input_ids, attention_mask=tokens.attention_mask).last_hidden_state
    assert embeds.shape == (5, 120, encoder.config.d_model) and embeds.dtype == torch.float32
    assert mask.dtype == torch.long
    assert torch.equal(mask, tokens.attention_mask)
    assert mask[0].sum() == 1 and mask[3].sum() == 120  # "" is just </s>; the long text is truncated
    valid = mask.bool()
    torch.testing.assert_close(embeds[valid], fresh[valid])
    assert not embeds[~valid].any()  # padding is zeros


def test_compiled_text_encoder_gives_the_same_embeddings(tmp_path, monkeypatch):
    compiled, original = [], embed.compile_text_encoder

    def eager_backend(model):  # dynamo's capture without inductor's C++/Triton toolchain
        original(model, backend="eager")
        compiled.extend(block._compiled_call_impl is not None for block in model.encoder.block)

    monkeypatch.setattr(embed, "compile_text_encoder", eager_backend)
    plain_keys = embed_texts(TEXTS, MODELS, EmbedConfig(batch_size=2), tmp_path / "plain", CPU, F32)
    cfg = EmbedConfig(batch_size=2, compile=True)
    keys = embed_texts(TEXTS, MODELS, cfg, tmp_path / "compiled", CPU, F32)
    assert compiled and all(compiled)
    assert keys == plain_keys  # compiling changes speed, not the cache key
    plain, plain_mask = load_text_embeddings(tmp_path / "plain", keys, 120)
    fast, mask = load_text_embeddings(tmp_path / "compiled", keys, 120)
    assert torch.equal(mask, plain_mask)  # only the valid tokens are stored, padded or not
    torch.testing.assert_close(fast, plain)


def test_batches_split_into_binary_chunks_store_the_same_values(tmp_path, monkeypatch):
    cfg = EmbedConfig(batch_size=4)
    keys = embed_texts(TEXTS, MODELS, cfg, tmp_path / "whole", CPU, F32)
    monkeypatch.setattr(embed, "BINARY_CHUNK_BYTES", 600)  # ~5 tokens of the tiny T5: rows mostly alone
    assert embed_texts(TEXTS, MODELS, cfg, tmp_path / "chunked", CPU, F32) == keys
    whole = ShardedCache(tmp_path / "whole", contracts.TEXT_EMBEDDINGS).read(keys)
    chunked = ShardedCache(tmp_path / "chunked", contracts.TEXT_EMBEDDINGS).read(keys)
    assert chunked.equals(whole)


def test_load_text_embeddings_pads_back_to_max_length(tmp_path):
    keys = embed_texts(["a teal star", ""], MODELS, EmbedConfig(), tmp_path, CPU, F32)
    table = contracts.read_table(next(tmp_path.glob("shard-*.parquet")), contracts.TEXT_EMBEDDINGS)
    stored = dict(zip(table.column("key").to_pylist(), table.column("length").to_pylist(), strict=True))
    embeds, mask = load_text_embeddings(tmp_path, keys, 150)
    assert embeds.shape[:2] == (2, 150) and mask.shape == (2, 150)
    assert mask.sum(1).tolist() == [stored[k] for k in keys]
    assert not embeds[0, stored[keys[0]] :].any()
    with pytest.raises(ValueError, match="max_length 2"):
        load_text_embeddings(tmp_path, keys, 2)


def test_second_run_computes_nothing_and_loads_no_model(tmp_path, monkeypatch):
    rows = _demo_rows(3)
    cfg = EmbedConfig(resolution=64, flip=True)
    text_keys = embed_texts(TEXTS, MODELS, cfg, tmp_path / "text", CPU, F32)
    latent_keys = embed_images(rows, MODELS, cfg, tmp_path / "latents", CPU, F32)
    shards = sorted(tmp_path.rglob("*.parquet"))

    _forbid_model_loading(monkeypatch)
    assert embed_texts(TEXTS, MODELS, cfg, tmp_path / "text", CPU, F32) == text_keys
    assert embed_images(rows, MODELS, cfg, tmp_path / "latents", CPU, F32) == latent_keys
    assert sorted(tmp_path.rglob("*.parquet")) == shards


@pytest.mark.parametrize("damage", ["truncated", "bit flip"])
def test_corrupted_shard_is_detected_and_recomputed(tmp_path, damage):
    keys = embed_texts(TEXTS[:3], MODELS, EmbedConfig(), tmp_path, CPU, F32)
    before, _ = load_text_embeddings(tmp_path, keys, 120)
    (shard,) = tmp_path.glob("shard-*.parquet")
    data = shard.read_bytes()
    if damage == "truncated":
        data = data[: len(data) // 2]
    else:  # one bit inside a stored embedding: the file still parses, with the same row count
        value = contracts.read_table(shard, contracts.TEXT_EMBEDDINGS).column("embedding")[0].as_py()
        at = data.index(value) + len(value) // 2
        data = data[:at] + bytes([data[at] ^ 0x10]) + data[at + 1 :]
    shard.write_bytes(data)
    with pytest.raises(contracts.ContractError, match="checksum" if damage == "bit flip" else "unreadable"):
        contracts.read_table(shard, contracts.TEXT_EMBEDDINGS)

    with pytest.raises(KeyError, match="not cached"):
        load_text_embeddings(tmp_path, keys, 120)  # reading sets the shard aside...
    assert shard.with_suffix(".corrupt").exists() and not shard.exists()
    assert (
        embed_texts(TEXTS[:3], MODELS, EmbedConfig(), tmp_path, CPU, F32) == keys
    )  # ...and it is recomputed
    after, _ = load_text_embeddings(tmp_path, keys, 120)
    torch.testing.assert_close(after, before)


def test_bfloat16_values_are_stored_as_computed(tmp_path):
    cfg = EmbedConfig(resolution=64, max_shard_mb=1)
    keys = embed_texts(TEXTS[:3], MODELS, cfg, tmp_path / "text", CPU, BF16)
    table = ShardedCache(tmp_path / "text", contracts.TEXT_EMBEDDINGS).read(keys)
    assert set(table.column("dtype").to_pylist()) == {"bfloat16"}
    lengths, dims = table.column("length").to_pylist(), table.column("dim").to_pylist()
    assert [len(b) for b in table.column("embedding").to_pylist()] == [
        2 * n * d for n, d in zip(lengths, dims)
    ]
    embeds, mask = load_text_embeddings(tmp_path / "text", keys, 120)
    assert torch.equal(embeds, embeds.bfloat16().float())  # widened from bfloat16, exactly
    tokenizer, encoder = model_loading.load_text_encoder(MODELS, BF16, CPU)
    for i, text in enumerate(TEXTS[:3]):
        tokens = tokenizer(text, truncation=True, max_length=120, return_tensors="pt")
        with torch.no_grad():
            fresh = encoder(**tokens).last_hidden_state[0].float()
        torch.testing.assert_close(embeds[i, : mask[i].sum()], fresh, atol=0.02, rtol=0.02)

    rows = _demo_rows(2)
    pairs = embed_images(rows, MODELS, cfg, tmp_path / "latents", CPU, BF16)
    table = ShardedCache(tmp_path / "latents", contracts.LATENTS).read([p for p, _ in pairs])
    assert set(table.column("dtype").to_pylist()) == {"bfloat16"}
    mean, std = load_latent_dist(tmp_path / "latents", [p for p, _ in pairs])
    vae = model_loading.load_vae(MODELS, BF16, CPU)
    pixels = torch.stack([preprocess_image(embed.load_rgb(r["image_path"]), 64) for r in rows])
    with torch.no_grad():
        dist = vae.encode(pixels.to(BF16)).latent_dist
    assert torch.equal(mean, dist.mean.float()) and torch.equal(
        std, dist.std.float()
    )  # same batch, same bits


def test_models_are_released_when_embedding_returns(tmp_path, monkeypatch):
    """The GPU twin of this check (allocated memory back to baseline) runs in the GPU benchmark."""
    refs = []
    real_text_encoder, real_vae = model_loading.load_text_encoder, model_loading.load_vae

    def text_encoder(*args, **kwargs):
        tokenizer, model = real_text_encoder(*args, **kwargs)
        refs.append(weakref.ref(model))
        return tokenizer, model

    def vae(*args, **kwargs):
        model = real_vae(*args, **kwargs)
        refs.append(weakref.ref(model))
        return model

    monkeypatch.setattr(model_loading, "load_text_encoder", text_encoder)
    monkeypatch.setattr(model_loading, "load_vae", vae)
    embed_texts(["a teal star"], MODELS, EmbedConfig(), tmp_path / "text", CPU, F32)
    embed_images(_demo_rows(1), MODELS, EmbedConfig(resolution=64), tmp_path / "latents", CPU, F32)
    assert len(refs) == 2 and [ref() for ref in refs] == [None, None]


def test_failed_run_keeps_finished_batches(tmp_path, monkeypatch):
    texts = [f"a teal star number {i}" for i in range(7)]
    cfg = EmbedConfig(batch_size=1)
    real, calls = embed._encode_text_batch, []

    def dies_on_sixth_batch(*args, **kwargs):
        calls.append(1)
        if len(calls) == 6:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(embed, "_encode_text_batch", dies_on_sixth_batch)
    with pytest.raises(KeyboardInterrupt):
        embed_texts(texts, MODELS, cfg, tmp_path, CPU, F32)
    cache = embed.ShardedCache(tmp_path, contracts.TEXT_EMBEDDINGS)
    # One shard written along the way (what a SIGKILL would leave), one for the rest on the way out.
    shard_sizes = sorted(contracts.read_table(s, cache.schema).num_rows for s in cache.shards())
    assert shard_sizes == [1, embed.FLUSH_EVERY]

    calls.clear()
    keys = embed_texts(texts, MODELS, cfg, tmp_path, CPU, F32)
    assert len(calls) == 2  # only the two unfinished texts were computed
    assert load_text_embeddings(tmp_path, keys, 120)[1].sum(1).min() > 0


# --- Images ----------------------------------------------------------------------------------------


def test_preprocess_resizes_shorter_side_and_centre_crops():
    # 256x128: shorter side -> 64 gives 128x64, with the white band at columns 28..99 of
    # which the centre crop keeps 32..95: all white. Any other crop would show black.
    pixels = np.zeros((128, 256, 3), dtype=np.uint8)
    pixels[:, 56:200] = 255
    out = preprocess_image(Image.fromarray(pixels), 64)
    assert out.shape == (3, 64, 64) and out.dtype == torch.float32
    assert torch.allclose(out, torch.ones_like(out))
    dark = preprocess_image(Image.new("RGB", (40, 90)), 64)  # upscaled, portrait
    assert dark.shape == (3, 64, 64) and torch.all(dark == -1.0)


def test_latents_match_vae_and_flip_gives_different_latents(tmp_path):
    rows = _demo_rows(2)
    pairs = embed_images(rows, MODELS, EmbedConfig(resolution=64, flip=True), tmp_path, CPU, F32)
    plain, flipped = [p for p, _ in pairs], [f for _, f in pairs]
    assert all(f is not None and f != p for p, f in pairs)
    mean, std = load_latent_dist(tmp_path, plain)
    flip_mean, _ = load_latent_dist(tmp_path, flipped)
    assert mean.shape == std.shape == (2, 4, 8, 8) and bool((std > 0).all())
    assert not torch.allclose(mean, flip_mean)

    vae = model_loading.load_vae(MODELS, F32, CPU)
    image = embed.load_rgb(rows[0]["image_path"])
    x = preprocess_image(image, 64)[None]
    with torch.no_grad():
        torch.testing.assert_close(mean[:1], vae.encode(x).latent_dist.mean)
        torch.testing.assert_close(flip_mean[:1], vae.encode(x.flip(-1)).latent_dist.mean)

    unflipped = embed_images(rows, MODELS, EmbedConfig(resolution=64), tmp_path, CPU, F32)
    assert unflipped == [(p, None) for p in plain]  # same plain keys: no flip means a subset


def _odd_sized_images(folder: Path) -> list[dict]:
    """Noise images from 1:4 to 4:1 (width x height below), as manifest rows."""
    rng = np.random.default_rng(0)
    rows = []
    for width, height in [(160, 40), (100, 70), (64, 64), (60, 90), (36, 128), (50, 120)]:
        path = folder / f"{width}x{height}.png"
        Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8)).save(path)
        image_id = hashlib.sha256(path.read_bytes()).hexdigest()
        rows.append({"image_id": image_id, "image_path": str(path), "width": width, "height": height})
    return rows


def test_bucketed_latents_keep_each_images_aspect_ratio(tmp_path):
    rows = _odd_sized_images(tmp_path)
    cfg = EmbedConfig(resolution=64, buckets=True, flip=True, batch_size=2)
    pairs = embed_images(rows, MODELS, cfg, tmp_path / "latents", CPU, F32)
    table, tolerance = bucket_table(64), ratio_tolerance(bucket_table(64))
    vae = model_loading.load_vae(MODELS, F32, CPU)
    for row, (plain, flipped) in zip(rows, pairs, strict=True):
        mean, _ = load_latent_dist(tmp_path / "latents", [plain])
        height, width = mean.shape[2] * 8, mean.shape[3] * 8
        assert (height, width) in table and (height, width) == embed.image_size(row, cfg)
        error = abs(math.log(height / width) - math.log(row["height"] / row["width"]))
        assert error <= tolerance + 1e-9, f"{row['width']}x{row['height']} -> bucket {height}x{width}"
        assert error == min(abs(math.log(h / w) - math.log(row["height"] / row["width"])) for h, w in table)
        flip_mean, _ = load_latent_dist(tmp_path / "latents", [flipped])
        assert flip_mean.shape == mean.shape
        pixels = preprocess_image(embed.load_rgb(row["image_path"]), (height, width))[None]
        with torch.no_grad():
            torch.testing.assert_close(mean, vae.encode(pixels).latent_dist.mean)
    square = EmbedConfig(resolution=64)  # a square image's bucket is the plain square crop: same latents
    assert embed_images(rows[2:3], MODELS, square, tmp_path / "latents", CPU, F32)[0][0] == pairs[2][0]


def _embed_in_another_process(
    start, text_dir: str, latent_dir: str, texts: list[str], rows: list[dict]
) -> None:
    torch.set_num_threads(1)
    start.wait()  # both look for missing keys at once, so both compute and write every shard
    cfg = EmbedConfig(resolution=64, batch_size=1, flip=True)  # many small shards: many chances to collide
    embed_texts(texts, MODELS, cfg, Path(text_dir), CPU, F32)
    embed_images(rows, MODELS, cfg, Path(latent_dir), CPU, F32)


def test_two_processes_embedding_into_one_cache(tmp_path, monkeypatch):
    texts, rows = [f"a teal star number {i}" for i in range(10)], _demo_rows(3)
    # fork: the workers start at once (spawn re-imports torch, transformers and prefect: ~20 s each
    # on 2 cores). They run torch on one thread, as DataLoader workers do, which makes fork safe.
    fork = multiprocessing.get_context("fork")
    args = (fork.Barrier(2), str(tmp_path / "text"), str(tmp_path / "latents"), texts, rows)
    workers = [fork.Process(target=_embed_in_another_process, args=args) for _ in range(2)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(timeout=240)
    assert [w.exitcode for w in workers] == [0, 0]
    assert not list(tmp_path.rglob("*.corrupt")) and not list(tmp_path.rglob("*.tmp"))

    _forbid_model_loading(monkeypatch)  # every key is there and readable
    cfg = EmbedConfig(resolution=64, flip=True)
    keys = embed_texts(texts, MODELS, cfg, tmp_path / "text", CPU, F32)
    pairs = embed_images(rows, MODELS, cfg, tmp_path / "latents", CPU, F32)
    embeds, _ = load_text_embeddings(tmp_path / "text", keys, 120)
    mean, _ = load_latent_dist(tmp_path / "latents", [p for p, _ in pairs])
    monkeypatch.undo()  # values equal those of a run on its own
    alone = embed_texts(texts, MODELS, cfg, tmp_path / "alone", CPU, F32)
    torch.testing.assert_close(embeds, load_text_embeddings(tmp_path / "alone", alone, 120)[0])
    alone = embed_images(rows, MODELS, cfg, tmp_path / "alone-latents", CPU, F32)
    torch.testing.assert_close(mean, load_latent_dist(tmp_path / "alone-latents", [p for p, _ in alone])[0])


# --- Train and prompt sets -------------------------------------------------------------------------


def _tables(rows: list[dict], flagged: set[int] = frozenset()) -> tuple[pa.Table, pa.Table]:
    manifest = pa.Table.from_pylist(
        [
            {**row, "file_name": Path(row["image_path"]).name, "width": 64, "height": 64,
             "original_caption": f"caption {i}", "source_repo": "demo", "source_commit": "abc"}
            for i, row in enumerate(rows)
        ],
        schema=contracts.MANIFEST,
    )  # fmt: skip
    captions = pa.Table.from_pylist(
        [
            {"image_id": row["image_id"], "original_caption": f"caption {i}", "generated_caption": None,
             "caption": f"a teal star {i}", "model_id": None, "prompt": None, "flagged": i in flagged}
            for i, row in enumerate(rows)
        ],
        schema=contracts.CAPTIONS,
    )  # fmt: skip
    return manifest, captions


def test_training_rows_leave_out_flagged_and_refuse_mismatches():
    rows = _demo_rows(3)
    manifest, captions = _tables(rows, flagged={1})
    picked = training_rows(captions, manifest)
    assert [r["image_id"] for r in picked] == [rows[0]["image_id"], rows[2]["image_id"]]
    assert picked[1]["caption"] == "a teal star 2"
    with pytest.raises(ValueError, match="no caption"):
        training_rows(captions.slice(0, 2), manifest)
    with pytest.raises(ValueError, match="not in the manifest"):
        training_rows(captions, manifest.slice(0, 2))


def test_train_and_prompt_sets_validate_against_contracts(tmp_path):
    rows = [{**r, "caption": f"caption {i}"} for i, r in enumerate(_demo_rows(2))]
    path = build_train_set(rows, ["t0", "t1"], [("l0", "f0"), ("l1", None)], tmp_path)
    table = contracts.read_table(path, contracts.TRAIN_SET)
    assert table.column("flipped_latent_key").to_pylist() == ["f0", None]
    assert path == tmp_path / "train_set.parquet"

    prompts = read_prompts(
        embed.resolve_prompts_file("data/demo_eval_prompts.jsonl"), "In style, {prompt} {x}"
    )
    assert prompts[0]["styled_prompt"] == "In style, a woman reading a book on a park bench {x}"
    path = build_prompt_set(prompts, [f"k{i}" for i in range(len(prompts))], tmp_path)
    table = contracts.read_table(path, contracts.PROMPT_SET)
    assert table.num_rows == len(prompts) and table.column("category").to_pylist()[0] == "people"


@pytest.mark.parametrize(
    "bad_line, message",
    [
        ("{not json", "not valid JSON"),
        ('{"category": "x"}', "'prompt'"),
        ('{"prompt": "a", "category": 3}', "'category'"),
    ],
)
def test_bad_prompt_row_names_file_and_line(tmp_path, bad_line, message):
    prompts_file = tmp_path / "prompts.jsonl"
    prompts_file.write_text('{"prompt": "a cat"}\n\n' + bad_line + "\n")
    with pytest.raises(ValueError, match=f"prompts.jsonl:3: .*{message}"):
        read_prompts(prompts_file, "{prompt}")


# --- Prefect task ----------------------------------------------------------------------------------


def test_embed_task_end_to_end_then_fully_cached(tmp_path, monkeypatch):
    config = load_config(CONFIG_DIR / "demo.yaml")
    config.embed.flip = True
    manifest, captions = _tables(_demo_rows(4), flagged={3})
    contracts.write_table(manifest, contracts.MANIFEST, tmp_path / "manifest.parquet")
    contracts.write_table(captions, contracts.CAPTIONS, tmp_path / "captions.parquet")
    monkeypatch.chdir(tmp_path)  # the prompts file must be found relative to the project root
    args = (
        str(tmp_path / "manifest.parquet"),
        str(tmp_path / "captions.parquet"),
        config,
        str(tmp_path / "work"),
    )

    with disable_run_logger():
        first = embed_task.fn(*args, str(tmp_path / "run1"))
    n_prompts = len(read_prompts(embed.resolve_prompts_file(config.evaluate.prompts_file), "{prompt}"))
    assert first["texts_computed"] == 1 + 3 + n_prompts  # "", three unflagged captions, prompts
    assert first["latents_computed"] == 2 * 3
    train_set = contracts.read_table(Path(first["train_set"]), contracts.TRAIN_SET)
    prompt_set = contracts.read_table(Path(first["prompt_set"]), contracts.PROMPT_SET)
    assert train_set.num_rows == 3 and prompt_set.num_rows == n_prompts
    embeds, mask = load_text_embeddings(first["text_cache"], [first["empty_text_key"]], 120)
    assert mask.sum() == 1 and embeds[0, 0].any() and not embeds[0, 1:].any()
    mean, std = load_latent_dist(first["latent_cache"], train_set.column("flipped_latent_key").to_pylist())
    assert mean.shape == std.shape == (3, 4, 8, 8)
    view = CachedTrainView(first["train_view"])  # the training view holds the same values
    batch = view.batch([0, 1, 2], flip=[True, True, True])
    assert torch.equal(batch["mean"], mean) and torch.equal(batch["std"], std)
    captions, _ = load_text_embeddings(first["text_cache"], train_set.column("text_key").to_pylist(), 120)
    assert (
        torch.equal(batch["embeds"], captions) and view.image_ids == train_set.column("image_id").to_pylist()
    )

    _forbid_model_loading(monkeypatch)
    with disable_run_logger():
        second = embed_task.fn(*args, str(tmp_path / "run2"))
    assert second["texts_computed"] == second["latents_computed"] == 0
    assert contracts.read_table(Path(second["train_set"]), contracts.TRAIN_SET).equals(train_set)
    assert json.dumps(second)  # small, serialisable record
    monkeypatch.undo()

    # A bit flipped in a latent shard: the view build notices, sets the shard aside, recomputes its rows.
    shard = ShardedCache(first["latent_cache"], contracts.LATENTS).shards()[0]
    value = contracts.read_table(shard, contracts.LATENTS).column("mean")[0].as_py()
    data = bytearray(shard.read_bytes())
    data[data.index(value) + 7] ^= 0x04
    shard.write_bytes(bytes(data))
    with disable_run_logger():
        third = embed_task.fn(*args, str(tmp_path / "run3"))
    assert third["latents_computed"] > 0 and shard.with_suffix(".corrupt").exists()
    assert torch.equal(CachedTrainView(third["train_view"]).batch([0, 1, 2], [True] * 3)["mean"], mean)

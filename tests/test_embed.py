"""Tests for the embed stage (tasks/embed.py): tiny models on CPU."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
import torch
from PIL import Image
from prefect.logging import disable_run_logger

from configs import CONFIG_DIR, EmbedConfig, ModelsConfig, load_config
from tasks import contracts, embed, model_loading
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
CPU, F32 = torch.device("cpu"), torch.float32
MODELS = ModelsConfig(pixart="tiny:pixart")
LONG = " ".join(["a red circle with a thick black outline on a cream background"] * 20)  # > 120 tokens
TEXTS = ["", "a teal star", "flat mustard heart outlined in black", LONG, "a teal star"]


@pytest.fixture(scope="module", autouse=True)
def _embed_home(tmp_path_factory):
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("PIXART_PIPELINE_HOME", str(tmp_path_factory.mktemp("home")))
        yield


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


def test_corrupted_shard_is_detected_and_recomputed(tmp_path):
    keys = embed_texts(TEXTS[:3], MODELS, EmbedConfig(), tmp_path, CPU, F32)
    before, _ = load_text_embeddings(tmp_path, keys, 120)
    (shard,) = tmp_path.glob("shard-*.parquet")
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])

    assert embed_texts(TEXTS[:3], MODELS, EmbedConfig(), tmp_path, CPU, F32) == keys
    assert shard.with_suffix(".corrupt").exists()
    after, _ = load_text_embeddings(tmp_path, keys, 120)
    torch.testing.assert_close(after, before)


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

    _forbid_model_loading(monkeypatch)
    with disable_run_logger():
        second = embed_task.fn(*args, str(tmp_path / "run2"))
    assert second["texts_computed"] == second["latents_computed"] == 0
    assert contracts.read_table(Path(second["train_set"]), contracts.TRAIN_SET).equals(train_set)
    assert json.dumps(second)  # small, serialisable record

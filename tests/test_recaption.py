"""Re-caption stage (tasks/recaption.py): tiny random LLaVA on CPU, cache behaviour, degenerate outputs."""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path

import pyarrow as pa
import pytest
import torch
from PIL import Image
from prefect.logging import disable_run_logger

from configs import MISSION_PROMPT, DatasetConfig, ModelsConfig, RecaptionConfig, RunConfig
from tasks import model_loading, recaption
from tasks.cache import ShardedCache
from tasks.contracts import CAPTION_CACHE, CAPTIONS, MANIFEST, read_table, write_table
from tasks.recaption import (
    FALLBACK_FORMAT,
    GREEDY,
    RETRY,
    build_prompt,
    caption_batch,
    caption_images,
    chat_prompt,
    clean_caption,
    generate_captions,
    is_degenerate,
)

DEMO = Path(__file__).resolve().parent.parent / "data" / "demo"
MODELS = ModelsConfig(llava="tiny:llava")
CPU, F32 = torch.device("cpu"), torch.float32


def _manifest(start: int, stop: int) -> pa.Table:
    rows = []
    for line in (DEMO / "metadata.jsonl").read_text().splitlines()[start:stop]:
        record = json.loads(line)
        path = DEMO / record["file_name"]
        with Image.open(path) as image:
            width, height = image.size
        rows.append({
            "image_id": hashlib.sha256(path.read_bytes()).hexdigest(), "file_name": record["file_name"],
            "image_path": str(path), "width": width, "height": height, "original_caption": record["text"],
            "source_repo": "demo", "source_commit": "0" * 40,
        })  # fmt: skip
    return pa.Table.from_pylist(rows, schema=MANIFEST)


def _forbid_model_loading(monkeypatch) -> None:
    def refuse(*args, **kwargs):
        raise AssertionError("the captioner must not be loaded")

    monkeypatch.setattr(model_loading, "load_captioner", refuse)


def _count_model_loads(monkeypatch) -> list[int]:
    loads = []
    real = model_loading.load_captioner

    def counting(*args, **kwargs):
        loads.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(model_loading, "load_captioner", counting)
    return loads


# ----------------------------------------------------------------------------- text helpers


def test_build_prompt_fills_only_the_template():
    prompt = build_prompt(MISSION_PROMPT, "a {weird} caption {0} }{")
    assert prompt == (
        "Give the caption of this image 'a {weird} caption {0} }{', "
        "describe this image and its style in a very detailed manner"
    )
    assert build_prompt("{{literal}} {caption}", "x") == "{literal} x"
    with pytest.raises(ValueError, match="prompt_template"):
        build_prompt("{caption} in {style}", "x")


def test_chat_prompt_uses_the_processor_template_or_llava_format(tiny_models):
    from transformers import AutoProcessor

    class NoTemplate:
        chat_template = None

    assert chat_prompt(NoTemplate(), "describe it") == "USER: <image>\ndescribe it ASSISTANT:"
    processor = AutoProcessor.from_pretrained(tiny_models["llava"])
    assert chat_prompt(processor, "describe it") == FALLBACK_FORMAT.format(prompt="describe it")
    processor.tokenizer.padding_side = "right"  # a processor not loaded through load_captioner
    with pytest.raises(ValueError, match="pad on the left"):
        generate_captions(None, processor, [], [], max_new_tokens=4, decoding=GREEDY)


def test_clean_caption():
    assert clean_caption("  A red\tstar\n\non  cream. ") == "A red star on cream."
    assert clean_caption("star\ufffd\x00 shape\u200b") == "star shape"
    assert clean_caption("\ufffd \x07 ") == ""


@pytest.mark.parametrize(
    ("text", "degenerate"),
    [
        ("", True),
        ("... !!", True),  # no words at all
        ("a red star on a cream background", False),
        ("a red star, a blue heart, a green circle and a yellow square on a cream background", False),
        ("the red star the red star the red star on cream", False),  # three times is still prose
        ("the red star the red star the red star the red star", True),
        ("A red star. A Red Star, a red star! a red star and more", True),  # case and punctuation
        ("red red red blue red red red red blue red red red", True),  # 2 unique of 12 words
        ("red blue green red blue green red blue green", False),  # 9 words: too short to judge
        ("a star hahahahahahahahahahaha", True),
    ],
)
def test_is_degenerate(text, degenerate):
    assert is_degenerate(text) is degenerate


# ----------------------------------------------------------------------------- retry and flags


def test_degenerate_caption_is_retried_once_with_retry_settings(monkeypatch):
    calls = []

    def fake_generate(model, processor, images, prompts, max_new_tokens, decoding):
        calls.append((len(images), decoding))
        if decoding == RETRY:
            return ["a teal star outlined in black"] * len(images)
        return ["a fine caption of a star", ""]  # the second image comes out empty

    monkeypatch.setattr(recaption, "generate_captions", fake_generate)
    results = caption_batch(None, None, ["img1", "img2"], ["p1", "p2"], max_new_tokens=8)
    assert results == [("a fine caption of a star", False), ("a teal star outlined in black", False)]
    assert calls == [(2, GREEDY), (1, RETRY)]  # only the bad one is retried, once
    stats = {"greedy_calls": 1}  # added to, as over a stage's batches
    assert caption_batch(None, None, ["img1", "img2"], ["p1", "p2"], max_new_tokens=8, stats=stats) == results
    counts = {k: stats[k] for k in ("greedy_calls", "retry_calls", "retried")}
    assert counts == {"greedy_calls": 2, "retry_calls": 1, "retried": 1}
    assert stats["greedy_s"] >= 0 and stats["retry_s"] >= 0


def test_still_degenerate_is_flagged_and_original_caption_used(monkeypatch, tmp_path):
    calls = []

    def looping(model, processor, images, prompts, max_new_tokens, decoding):
        calls.append(decoding)
        return ["star star star " * 5] * len(images)

    monkeypatch.setattr(model_loading, "load_captioner", lambda *a, **k: (object(), object()))
    monkeypatch.setattr(recaption, "generate_captions", looping)
    manifest = _manifest(0, 3)
    result = caption_images(manifest, RecaptionConfig(batch_size=2), MODELS, CPU, F32, tmp_path / "c")
    table = result.table.to_pylist()
    assert calls == [GREEDY, RETRY] * 2  # two batches, one retry each
    assert all(row["flagged"] for row in table)
    assert [row["caption"] for row in table] == manifest.column("original_caption").to_pylist()
    assert all(row["generated_caption"].startswith("star star") for row in table)  # kept for review


def test_task_logs_where_the_time_went(monkeypatch, tmp_path, caplog):
    """Stage timings and retry counts summed over the batches, in the task's last log line."""

    def every_second_empty(model, processor, images, prompts, max_new_tokens, decoding):
        if decoding == RETRY:
            return ["a teal star outlined in black"] * len(images)
        return ["a fine caption of a star" if i % 2 == 0 else "" for i in range(len(images))]

    monkeypatch.setattr(model_loading, "load_captioner", lambda *a, **k: (object(), object()))
    monkeypatch.setattr(recaption, "generate_captions", every_second_empty)
    monkeypatch.setattr(recaption, "get_run_logger", lambda: logging.getLogger("recaption-test"))
    manifest_path = write_table(_manifest(0, 5), MANIFEST, tmp_path / "run" / "manifest.parquet")
    config = RunConfig(
        device="cpu", dtype="float32", dataset=DatasetConfig(repo="oxen/ds"), models=MODELS,
        recaption=RecaptionConfig(batch_size=2, max_new_tokens=4),
    )  # fmt: skip
    with caplog.at_level(logging.INFO, logger="recaption-test"):
        out = recaption.recaption_task.fn(
            str(manifest_path), config, str(tmp_path / "work"), str(tmp_path / "run")
        )
    messages = [r.getMessage() for r in caplog.records if r.name == "recaption-test"]
    assert out["generated"] == 5 and out["flagged"] == 0
    # Batches of 2, 2, 1: the second image of each full batch needs a retry; the two wait for
    # each other and are retried in one call (a batch of 2).
    last = messages[-1]
    assert last.startswith("recaption timings: load model ") and ", load images " in last
    assert " s (3 calls), retry " in last and " s for 2 captions (1 calls), cache writes " in last

    stats: dict = {}  # the counts themselves, and nothing when everything is cached
    cfg, cache_dir = config.recaption, tmp_path / "c"
    caption_images(_manifest(0, 5), cfg, MODELS, CPU, F32, cache_dir, stats=stats)
    assert (stats["greedy_calls"], stats["retry_calls"], stats["retried"]) == (3, 1, 2)
    seconds = ("load_model_s", "load_images_s", "greedy_s", "retry_s", "cache_write_s")
    assert all(stats[k] >= 0 for k in seconds)
    again: dict = {}
    assert caption_images(_manifest(0, 5), cfg, MODELS, CPU, F32, cache_dir, stats=again).generated == 0
    assert again == {}


# ----------------------------------------------------------------------------- tiny LLaVA


def test_batched_captions_equal_one_at_a_time(tiny_models, tmp_path):
    manifest = _manifest(0, 5)
    batched = caption_images(
        manifest, RecaptionConfig(batch_size=5, max_new_tokens=8), MODELS, CPU, F32, tmp_path / "a"
    )
    single = caption_images(
        manifest, RecaptionConfig(batch_size=1, max_new_tokens=8), MODELS, CPU, F32, tmp_path / "b"
    )
    assert batched.generated == single.generated == 5
    assert batched.table.equals(single.table)
    rows = batched.table.to_pylist()
    assert any(row["generated_caption"] for row in rows)
    assert all(row["caption"] == (row["original_caption"] if row["flagged"] else row["generated_caption"])
               for row in rows)  # fmt: skip
    assert rows[0]["prompt"] == build_prompt(MISSION_PROMPT, rows[0]["original_caption"])
    assert {row["model_id"] for row in rows} == {"tiny:llava"}
    assert [row["image_id"] for row in rows] == manifest.column("image_id").to_pylist()


def test_static_cache_gives_the_same_captions_and_cache_keys(tiny_models, tmp_path, monkeypatch):
    manifest, cfg = _manifest(0, 5), RecaptionConfig(batch_size=4, max_new_tokens=8)
    plain = caption_images(manifest, cfg, MODELS, CPU, F32, tmp_path / "plain")
    calls, real = [], recaption.generate_captions

    def spy(model, processor, images, prompts, max_new_tokens, decoding):
        calls.append((len(images), decoding))
        return real(model, processor, images, prompts, max_new_tokens, decoding)

    monkeypatch.setattr(recaption, "generate_captions", spy)
    static_cfg = cfg.model_copy(update={"static_cache": True})
    static = caption_images(manifest, static_cfg, MODELS, CPU, F32, tmp_path / "static")
    assert static.generated == 5 and static.table.equals(plain.table)
    # Every call fills the whole batch (the last batch has one image, the retries fewer).
    assert len(calls) >= 2 and {n for n, _ in calls} == {4}
    assert calls[0][1] == {**GREEDY, "cache_implementation": "static"}
    assert all(decoding["cache_implementation"] == "static" for _, decoding in calls)
    # Same cache keys: the static run finds everything the plain run cached.
    with monkeypatch.context() as patch:
        _forbid_model_loading(patch)
        assert caption_images(manifest, static_cfg, MODELS, CPU, F32, tmp_path / "plain").generated == 0


def test_cache_generates_only_what_is_missing(tiny_models, tmp_path, monkeypatch):
    cache_dir = tmp_path / "captions"
    cfg = RecaptionConfig(batch_size=4, max_new_tokens=6)
    loads = _count_model_loads(monkeypatch)
    first = caption_images(_manifest(0, 5), cfg, MODELS, CPU, F32, cache_dir)
    assert first.generated == 5 and len(loads) == 1

    with monkeypatch.context() as patch:
        _forbid_model_loading(patch)
        again = caption_images(_manifest(0, 5), cfg, MODELS, CPU, F32, cache_dir)
    assert again.generated == 0 and again.table.equals(first.table)

    grown = caption_images(_manifest(0, 8), cfg, MODELS, CPU, F32, cache_dir)
    assert grown.generated == 3 and len(loads) == 2
    assert grown.table.slice(0, 5).equals(first.table)  # manifest order, old rows unchanged

    reworded = cfg.model_copy(update={"prompt_template": "Describe '{caption}' in detail"})
    changed = caption_images(_manifest(0, 8), reworded, MODELS, CPU, F32, cache_dir)
    assert changed.generated == 8
    assert (
        changed.table.column("prompt")[0].as_py()
        == f"Describe '{changed.table['original_caption'][0]}' in detail"
    )


def test_killed_run_keeps_finished_batches(tiny_models, tmp_path, monkeypatch):
    cache_dir = tmp_path / "captions"
    cfg = RecaptionConfig(batch_size=2, max_new_tokens=4)
    manifest = _manifest(0, 5)
    broken = manifest.set_column(
        2, "image_path", pa.array([*manifest["image_path"].to_pylist()[:4], __file__])
    )
    monkeypatch.setattr(recaption, "SHARD_EVERY", 1)
    with pytest.raises(ValueError, match="test_recaption.py: not a readable image"):
        caption_images(broken, cfg, MODELS, CPU, F32, cache_dir)
    assert len(ShardedCache(cache_dir, CAPTION_CACHE).keys()) == 4  # two batches written before the failure
    assert caption_images(manifest, cfg, MODELS, CPU, F32, cache_dir).generated == 1


def test_disabled_keeps_original_captions_without_a_model(tmp_path, monkeypatch):
    _forbid_model_loading(monkeypatch)
    manifest = _manifest(0, 4)
    result = caption_images(manifest, RecaptionConfig(enabled=False), MODELS, CPU, F32, tmp_path / "c")
    assert result.generated == 0
    assert result.table.column("generated_caption").null_count == 4
    assert result.table.column("caption").to_pylist() == manifest.column("original_caption").to_pylist()
    assert not any(result.table.column("flagged").to_pylist())
    assert not (tmp_path / "c").exists()


def test_task_writes_captions_and_reports_counts(tiny_models, tmp_path):
    manifest_path = write_table(_manifest(0, 3), MANIFEST, tmp_path / "run" / "manifest.parquet")
    config = RunConfig(
        device="cpu", dtype="float32", dataset=DatasetConfig(repo="oxen/ds"), models=MODELS,
        recaption=RecaptionConfig(batch_size=2, max_new_tokens=4),
    )  # fmt: skip
    with disable_run_logger():
        out = recaption.recaption_task.fn(
            str(manifest_path), config, str(tmp_path / "work"), str(tmp_path / "run")
        )
        again = recaption.recaption_task.fn(
            str(manifest_path), config, str(tmp_path / "work"), str(tmp_path / "run")
        )
    table = read_table(Path(out["captions"]), CAPTIONS)
    assert out["captions"] == str(tmp_path / "run" / "captions.parquet")
    assert (out["rows"], out["generated"], out["model_id"]) == (3, 3, "tiny:llava")
    assert out["flagged"] == sum(table.column("flagged").to_pylist())
    assert (again["generated"], again["rows"]) == (0, 3)
    assert any((tmp_path / "work" / "cache" / "captions").glob("shard-*.parquet"))


# ----------------------------------------------------------------------------- revision and quantization


def test_revision_and_quantization_reach_the_loader_and_the_cache_key(monkeypatch, tmp_path):
    loaded = []
    monkeypatch.setattr(model_loading, "load_captioner", lambda *a, **k: loaded.append(k) or (object(), object()))
    monkeypatch.setattr(recaption, "generate_captions", lambda m, p, images, *a: ["a flat teal star"] * len(images))
    manifest, cache_dir = _manifest(0, 2), tmp_path / "captions"
    cfg = RecaptionConfig(max_new_tokens=4)
    assert caption_images(manifest, cfg, MODELS, CPU, F32, cache_dir).generated == 2
    assert loaded == [{"quantization": "none", "revision": None}]
    pinned = cfg.model_copy(update={"model_revision": "a1b2c3"})
    assert caption_images(manifest, pinned, MODELS, CPU, F32, cache_dir).generated == 2  # new key: regenerated
    assert caption_images(manifest, pinned, MODELS, CPU, F32, cache_dir).generated == 0
    assert loaded[1] == {"quantization": "none", "revision": "a1b2c3"} and len(loaded) == 2
    keys = {recaption.caption_key("i", "p", "m", 8, F32, revision, quant)
            for revision in (None, "a1b2c3") for quant in ("none", "8bit", "4bit")}  # fmt: skip
    assert len(keys) == 6


def test_quantized_loading_needs_cuda_and_quantizes_only_the_language_model(tiny_models):
    from transformers import LlavaForConditionalGeneration
    from transformers.quantizers.quantizers_utils import should_convert_module

    four = model_loading.captioner_quantization("4bit", torch.bfloat16)
    assert four.load_in_4bit and four.bnb_4bit_quant_type == "nf4" and four.bnb_4bit_compute_dtype == torch.bfloat16
    assert model_loading.captioner_quantization("8bit", torch.bfloat16).load_in_8bit
    assert model_loading.captioner_quantization("none", torch.bfloat16) is None
    with pytest.raises(ValueError, match="needs a CUDA device"):
        model_loading.load_captioner(MODELS, F32, CPU, quantization="4bit")
    # The skip list must name real modules: only the language model's linears get quantized.
    model = LlavaForConditionalGeneration.from_pretrained(tiny_models["llava"])
    linears = [name for name, module in model.named_modules() if isinstance(module, torch.nn.Linear)]
    quantized = {name.split(".layers.")[0] for name in linears if should_convert_module(name, four.llm_int8_skip_modules)}
    assert quantized == {"model.language_model"}
    assert any(name.startswith("model.vision_tower") for name in linears)

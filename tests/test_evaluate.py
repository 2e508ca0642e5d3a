"""Evaluate stage on the tiny PixArt (CPU, 64 px, 3 steps) with hand-built caches and adapter."""

from __future__ import annotations

import io
import json
import logging
import math
import shutil
from pathlib import Path

import numpy as np
import prefect.logging
import pyarrow as pa
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from configs import CONFIG_DIR, load_config
from tasks import evaluate as evaluate_module
from tasks import model_loading
from tasks.cache import ShardedCache, content_key
from tasks.contracts import LATENTS, PROMPT_SET, RESULT_FIELDS, TEXT_EMBEDDINGS, TRAIN_SET, write_table
from tasks.evaluate import LINEAGE_FIELDS, evaluate, evaluate_task, evaluation_key, stamp_lineage
from tasks.lora import ADAPTER_NAME, save_adapter
from tasks.style_metrics import (
    frechet_distance_diagonal,
    frechet_to_reference,
    posterior_mixture,
    style_shift,
)

PROMPTS = [("a red circle", "shapes"), ("a teal fish | outlined", None)]
PHASES = ["load", "sample base", "sample lora", "decode", "metrics", "write"]  # without checkpoints, CLIP
SEEDS = [0, 1]
LINEAGE = {name: f"test-{name}" for name in LINEAGE_FIELDS} | {"lora_rank": 4, "lora_alpha": 4.0}


@pytest.fixture(scope="module")
def inputs(tiny_models, tmp_path_factory) -> dict:
    """Prompt set, text and latent caches, train set and a LoRA adapter with non-zero B matrices."""
    from peft import LoraConfig, inject_adapter_in_model

    root = tmp_path_factory.mktemp("eval_inputs")
    config = load_config(CONFIG_DIR / "demo.yaml")
    config.evaluate.seeds = SEEDS
    config.evaluate.num_inference_steps = 3
    config.evaluate.batch_size = 3  # 4 samples per model -> batches of 3 and 1
    transformer = model_loading.load_transformer(config.models, torch.float32, torch.device("cpu"))
    dim, size = transformer.config.caption_channels, transformer.config.sample_size
    channels = transformer.config.in_channels
    rng = np.random.default_rng(0)

    texts = [f"Image in the demo style, {p}" for p, _ in PROMPTS] + [""]
    lengths = [7, 11, 1]
    text_rows = [
        {"key": content_key(text=t), "text": t, "length": n, "dim": dim, "dtype": "float32",
         "embedding": rng.standard_normal((n, dim), dtype=np.float32).tobytes()}
        for t, n in zip(texts, lengths)
    ]  # fmt: skip
    ShardedCache(root / "text", TEXT_EMBEDDINGS).write(pa.Table.from_pylist(text_rows))
    prompt_rows = [
        {"prompt": p, "styled_prompt": t, "category": c, "text_key": row["key"]}
        for (p, c), t, row in zip(PROMPTS, texts, text_rows)
    ]
    write_table(pa.Table.from_pylist(prompt_rows), PROMPT_SET, root / "prompt_set.parquet")

    latent_rows, train_rows = [], []
    for i in range(6):
        mean = (0.5 + 0.3 * rng.standard_normal((channels, size, size))).astype(np.float32)
        key = content_key(latent=i)
        latent_rows.append({
            "key": key, "image_id": f"img{i}", "flipped": False, "channels": channels, "height": size,
            "width": size, "dtype": "float32", "mean": mean.tobytes(), "std": np.ones_like(mean).tobytes(),
        })  # fmt: skip
        train_rows.append({"image_id": f"img{i}", "caption": "c", "text_key": text_rows[0]["key"],
                           "latent_key": key, "flipped_latent_key": None})  # fmt: skip
    ShardedCache(root / "latents", LATENTS).write(pa.Table.from_pylist(latent_rows))
    write_table(pa.Table.from_pylist(train_rows), TRAIN_SET, root / "train_set.parquet")

    lora_config = LoraConfig(r=4, lora_alpha=4, target_modules=config.train.resolved_targets)
    inject_adapter_in_model(lora_config, transformer, adapter_name=ADAPTER_NAME)
    with torch.no_grad(), torch.random.fork_rng():
        torch.manual_seed(1)
        for name, param in transformer.named_parameters():
            if "lora_B" in name:  # zero at init: the adapter would change nothing
                param.normal_(0.0, 0.3)
    save_adapter(transformer, root / "adapter", base_model=config.models.pixart)
    # Training checkpoints as train.py writes them (trainable parameters by name): step 100 with the
    # LoRA's B still zero (the base model's outputs), step 200 with the final weights.
    lora = {n: p.detach().clone() for n, p in transformer.named_parameters() if "lora_" in n}
    for step, weights in ((100, {n: 0 * v if "lora_B" in n else v for n, v in lora.items()}), (200, lora)):
        (root / "checkpoints" / f"checkpoint-{step}").mkdir(parents=True)
        save_file(weights, root / "checkpoints" / f"checkpoint-{step}" / "lora.safetensors")
    return {
        "prompt_set_path": root / "prompt_set.parquet", "train_set_path": root / "train_set.parquet",
        "text_cache": root / "text", "latent_cache": root / "latents",
        "empty_text_key": text_rows[-1]["key"], "adapter_dir": root / "adapter", "config": config,
    }  # fmt: skip


@pytest.fixture(scope="module")
def first_run(inputs, tmp_path_factory):
    output_dir = tmp_path_factory.mktemp("eval_out")
    return evaluate(**inputs, output_dir=output_dir, lineage=LINEAGE), output_dir


def _pixels(path: Path) -> np.ndarray:
    return np.asarray(Image.open(path).convert("RGB"))


def test_results_have_every_field_for_base_and_lora(first_run):
    result, output_dir = first_run
    rows = [json.loads(line) for line in result.results_path.read_text().splitlines()]
    assert len(rows) == result.image_count == len(PROMPTS) * 2 * len(SEEDS)
    assert all(tuple(row) == RESULT_FIELDS for row in rows)
    assert {(r["model"], r["seed"]) for r in rows} == {(m, s) for m in ("base", "lora") for s in SEEDS}
    assert {r["run_id"] for r in rows} == {"test-run_id"} and rows[0]["lora_rank"] == 4
    assert rows[0]["steps"] == 3 and rows[0]["sampler"] == "ddim" and rows[0]["width"] == 64
    assert rows[0]["created_at"].endswith("+00:00")
    for row in rows:
        assert _pixels(output_dir / row["image_path"]).shape == (64, 64, 3)


def test_lora_changes_the_images_and_seeds_change_the_noise(first_run):
    _, output_dir = first_run
    base = _pixels(output_dir / "images/base/000-seed0.png")
    assert not np.array_equal(base, _pixels(output_dir / "images/lora/000-seed0.png"))
    assert not np.array_equal(base, _pixels(output_dir / "images/base/000-seed1.png"))


def test_grid_puts_base_left_and_lora_right(first_run):
    result, output_dir = first_run
    assert [p.name for p in result.grid_paths] == ["000.png", "001.png"]
    grid = _pixels(result.grid_paths[1])
    assert grid.shape == (64 * len(SEEDS), 2 * 64, 3)
    assert np.array_equal(grid[64:, :64], _pixels(output_dir / "images/base/001-seed1.png"))
    assert np.array_equal(grid[64:, 64:], _pixels(output_dir / "images/lora/001-seed1.png"))


def test_metrics_and_report_are_written(first_run):
    result, output_dir = first_run
    metrics = json.loads((output_dir / "metrics.json").read_text())
    assert metrics == result.metrics
    for name in ("latent_fd_base", "latent_fd_lora", "latent_fd_ratio", "color_distance_base",
                 "color_distance_lora"):  # fmt: skip
        assert math.isfinite(metrics[name]) and metrics[name] >= 0, name
    report = result.report_path.read_text()
    assert "[grid](grids/001.png)" in report and "fish \\| outlined" in report
    assert f"{metrics['latent_fd_ratio']:.3f}" in report


def test_task_reruns_identically_then_hits_its_cache(inputs, first_run, tmp_path, monkeypatch, caplog):
    result, output_dir = first_run
    monkeypatch.setattr(evaluate_module, "get_run_logger", lambda: logging.getLogger("evaluate-test"))
    with caplog.at_level(logging.INFO, logger="evaluate-test"):
        record = evaluate_task.fn(**{k: str(v) if isinstance(v, Path) else v for k, v in inputs.items()},
                                  workdir=str(tmp_path), lineage=LINEAGE)  # fmt: skip
    assert list(record["timings"]) == PHASES
    sampling = record["timings"]["sample base"] + record["timings"]["sample lora"]
    rate = pytest.approx(record["image_count"] / sampling, rel=0.01) if sampling else None  # None: < 5 ms
    assert record["images_per_s"] == rate
    timings_line = [r.getMessage() for r in caplog.records if r.name == "evaluate-test"][-1]
    assert timings_line.startswith("evaluate timings: load ") and "sample lora " in timings_line
    assert "; sampling " in timings_line and timings_line.endswith(" images/s")
    key = evaluation_key(inputs["prompt_set_path"], inputs["adapter_dir"], inputs["config"])
    assert record["eval_dir"] == str(tmp_path / "cache" / "eval" / key[:16]) and not record["cached"]
    again = Path(record["eval_dir"])
    for path in sorted((output_dir / "images").rglob("*.png")):  # same seeds -> same pixels
        assert np.array_equal(_pixels(path), _pixels(again / path.relative_to(output_dir))), path
    assert record["metrics"] == result.metrics

    def no_models(*args, **kwargs):
        raise AssertionError("a cache hit must not load models")

    monkeypatch.setattr(model_loading, "load_transformer", no_models)
    with prefect.logging.disable_run_logger():
        hit = evaluate_task.fn(**inputs, workdir=str(tmp_path), lineage=LINEAGE)
    assert hit["cached"] and hit["metrics"] == result.metrics and hit["image_count"] == result.image_count
    assert hit["timings"] == record["timings"] and hit["images_per_s"] == record["images_per_s"]
    json.dumps(hit)  # flows/caching.py persists task results as JSON


def test_timings_cover_every_phase_and_are_kept_in_done_json(first_run):
    result, output_dir = first_run
    assert list(result.timings) == PHASES
    assert all(seconds >= 0 and seconds == round(seconds, 2) for seconds in result.timings.values())
    assert json.loads((output_dir / "done.json").read_text())["timings"] == result.timings
    again = evaluate_module._read_done(output_dir)
    assert again.cached and again.timings == result.timings and again == result


def test_a_done_json_from_before_timings_is_still_a_cache_hit(inputs, first_run, tmp_path, monkeypatch):
    _, output_dir = first_run
    old = shutil.copytree(output_dir, tmp_path / "old")
    record = json.loads((old / "done.json").read_text())
    del record["timings"]
    (old / "done.json").write_text(json.dumps(record))
    monkeypatch.setattr(model_loading, "load_transformer", lambda *a: pytest.fail("sampled anyway"))
    result = evaluate(**inputs, output_dir=old, lineage=LINEAGE)
    assert result.cached and result.timings == {} and result.image_count == record["image_count"]
    assert evaluate_module.images_per_second(result.timings, result.image_count) is None
    assert evaluate_module.format_timings(result.timings) == "none recorded"


def _png_bytes(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def test_threaded_writes_equal_the_serial_encoding(tmp_path, monkeypatch):
    """The PNGs written by the thread pool are byte for byte the plain one-at-a-time encoding of the
    same pixels, and the grids come back in prompt order."""
    config = load_config(CONFIG_DIR / "demo.yaml")
    config.evaluate.seeds = SEEDS
    monkeypatch.setattr(evaluate_module, "PNG_THREADS", 4)
    rng = np.random.default_rng(3)
    prompts = [{"prompt": f"p{i}", "styled_prompt": f"styled p{i}", "category": None} for i in range(5)]
    n = len(prompts) * len(SEEDS)
    images = {m: rng.integers(0, 256, (n, 32, 32, 3), dtype=np.uint8) for m in ("base", "lora")}
    latents = {m: rng.standard_normal((n, 4, 4, 4)) for m in images}
    metrics = style_shift(latents, images, latents["base"], 0 * latents["base"], images["base"])
    result = evaluate_module._write_outputs(tmp_path, prompts, images, metrics, config, LINEAGE)
    assert result.grid_paths == [tmp_path / "grids" / f"{i:03d}.png" for i in range(len(prompts))]
    for index in range(len(prompts)):
        rows = range(index * len(SEEDS), (index + 1) * len(SEEDS))
        for model in images:
            for row, seed in zip(rows, SEEDS):
                written = (tmp_path / evaluate_module.image_relpath(model, index, seed)).read_bytes()
                assert written == _png_bytes(Image.fromarray(images[model][row])), (model, index, seed)
        grid = evaluate_module.grid_image([[images[m][r] for r in rows] for m in images])
        assert result.grid_paths[index].read_bytes() == _png_bytes(grid)

    real = evaluate_module.save_png

    def failing(path, image):
        if path.name == "002.png":
            raise OSError("disk full")
        return real(path, image)

    monkeypatch.setattr(evaluate_module, "save_png", failing)
    with pytest.raises(OSError, match="disk full"):  # a worker's error reaches the caller
        evaluate_module._write_outputs(tmp_path / "failed", prompts, images, metrics, config, LINEAGE)


def test_stamping_puts_another_runs_lineage_on_a_shared_evaluation(inputs, first_run, tmp_path):
    result, output_dir = first_run
    prompt_set, config = inputs["prompt_set_path"], inputs["config"]
    same = stamp_lineage(output_dir, prompt_set, config, LINEAGE, result.metrics, tmp_path / "same")
    for name, path in same.items():  # the lineage it was written with: the same bytes
        assert path.read_bytes() == (output_dir / name).read_bytes(), name

    other = LINEAGE | {"run_id": "demo-renamed", "code_version": "abc123"}
    stamped = stamp_lineage(output_dir, prompt_set, config, other, result.metrics, tmp_path / "other")
    before = [json.loads(line) for line in (output_dir / "results.jsonl").read_text().splitlines()]
    after = [json.loads(line) for line in stamped["results.jsonl"].read_text().splitlines()]
    assert len(after) == len(before) and all(tuple(row) == RESULT_FIELDS for row in after)
    for old, new in zip(before, after, strict=True):
        assert new == old | {"run_id": "demo-renamed", "code_version": "abc123"}
    assert "| run | demo-renamed |" in stamped["report.md"].read_text()
    with pytest.raises(ValueError, match="lineage: missing fields"):
        stamp_lineage(output_dir, prompt_set, config, {"run_id": "x"}, result.metrics, tmp_path / "bad")


def test_dpm_sampler(inputs, first_run, tmp_path):
    config = inputs["config"].model_copy(deep=True)
    config.evaluate.sampler, config.evaluate.seeds = "dpm", [0]
    result = evaluate(**(inputs | {"config": config}), output_dir=tmp_path, lineage=LINEAGE)
    rows = [json.loads(line) for line in result.results_path.read_text().splitlines()]
    assert len(rows) == 4 and {r["sampler"] for r in rows} == {"dpm"}
    ddim = _pixels(first_run[1] / "images/lora/000-seed0.png")
    assert not np.array_equal(_pixels(tmp_path / "images/lora/000-seed0.png"), ddim)


def test_key_follows_the_settings(inputs):
    config = inputs["config"]
    key = evaluation_key(inputs["prompt_set_path"], inputs["adapter_dir"], config)
    other = config.model_copy(deep=True)
    other.evaluate.guidance_scale = 2.0
    assert evaluation_key(inputs["prompt_set_path"], inputs["adapter_dir"], other) != key
    moved = config.model_copy(deep=True)
    moved.evaluate.prompts_file = "elsewhere/prompts.jsonl"  # same rows in the prompt set
    assert evaluation_key(inputs["prompt_set_path"], inputs["adapter_dir"], moved) == key


def _tiny_clip(folder: Path) -> Path:
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel

    layers = {"hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2}
    text = layers | {"vocab_size": 99, "max_position_embeddings": 16, "bos_token_id": 1, "eos_token_id": 2,
                     "pad_token_id": 0}  # fmt: skip
    vision = layers | {"image_size": 32, "patch_size": 8}
    with torch.random.fork_rng():
        torch.manual_seed(0)
        CLIPModel(CLIPConfig(text_config=text, vision_config=vision, projection_dim=8)).save_pretrained(
            folder
        )
    CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(
        folder
    )
    return folder


def test_checkpoints_and_clip_similarity(inputs, first_run, tmp_path):
    config = inputs["config"].model_copy(deep=True)
    config.evaluate.checkpoints = [200, 100]
    config.evaluate.clip_model = str(_tiny_clip(tmp_path / "clip"))
    result = evaluate(**(inputs | {"config": config}), output_dir=tmp_path / "out", lineage=LINEAGE)
    rows = [json.loads(line) for line in result.results_path.read_text().splitlines()]
    models = ["base", "checkpoint-100", "checkpoint-200", "lora"]
    assert [r["model"] for r in rows[: 4 * len(SEEDS)]] == [m for m in models for _ in SEEDS]
    out = tmp_path / "out"
    for seed in SEEDS:  # zero-B step 100 is the base model; step 200 holds the final weights
        base, lora = (_pixels(first_run[1] / f"images/{m}/001-seed{seed}.png") for m in ("base", "lora"))
        assert np.array_equal(_pixels(out / f"images/checkpoint-100/001-seed{seed}.png"), base)
        assert np.array_equal(_pixels(out / f"images/checkpoint-200/001-seed{seed}.png"), lora)
    assert _pixels(result.grid_paths[0]).shape == (64 * len(SEEDS), 4 * 64, 3)
    metrics = result.metrics
    assert list(metrics["models"]) == ["base", "lora", "checkpoint-100", "checkpoint-200"]
    assert metrics["models"]["checkpoint-100"]["latent_fd"] == pytest.approx(metrics["latent_fd_base"])
    assert metrics["models"]["checkpoint-200"]["latent_fd"] == pytest.approx(metrics["latent_fd_lora"])
    for name in models:
        assert -1 <= metrics["models"][name]["clip_similarity"] <= 1
    assert metrics["clip_similarity_lora"] == metrics["models"]["lora"]["clip_similarity"]
    report = result.report_path.read_text()
    assert "| checkpoint-100 |" in report and "CLIP similarity" in report
    assert list(result.timings) == [
        "load", "sample base", "sample lora", "sample checkpoint-100", "sample checkpoint-200", "decode",
        "clip", "metrics", "write",
    ]  # fmt: skip


def test_a_missing_checkpoint_fails_before_sampling(inputs, tmp_path, monkeypatch):
    config = inputs["config"].model_copy(deep=True)
    config.evaluate.checkpoints = [300]
    config.train.max_steps = 300
    monkeypatch.setattr(model_loading, "load_transformer", lambda *a: pytest.fail("sampled anyway"))
    with pytest.raises(FileNotFoundError, match="checkpoint-300: no training checkpoint"):
        evaluate(**(inputs | {"config": config}), output_dir=tmp_path, lineage=LINEAGE)


def test_bad_lineage_is_refused_before_any_work(inputs, tmp_path):
    with pytest.raises(ValueError, match=r"missing fields \['run_id'\]"):
        evaluate(**inputs, output_dir=tmp_path, lineage={k: v for k, v in LINEAGE.items() if k != "run_id"})
    assert not any(tmp_path.iterdir())


def test_frechet_distance_prefers_the_training_distribution():
    rng = np.random.default_rng(0)
    mean, scale = rng.standard_normal((4, 8, 8)), 0.2
    train = mean + scale * rng.standard_normal((64, 4, 8, 8))
    same = mean + scale * rng.standard_normal((8, 4, 8, 8))
    noise = rng.standard_normal((8, 4, 8, 8))
    assert frechet_distance_diagonal(same, train) < frechet_distance_diagonal(noise, train)
    assert frechet_distance_diagonal(train, train) == pytest.approx(0.0, abs=1e-9)
    assert math.isfinite(frechet_distance_diagonal(same[:1], train))  # one sample is enough


def test_style_shift_colour_distance():
    rng = np.random.default_rng(1)
    latents = rng.standard_normal((3, 4, 8, 8))
    train_images = np.full((2, 8, 8, 3), (200, 100, 50), dtype=np.uint8)
    near = np.full((1, 8, 8, 3), (190, 100, 50), dtype=np.uint8)  # 10 off in one channel
    far = np.full((1, 8, 8, 3), (0, 0, 0), dtype=np.uint8)
    metrics = style_shift(
        {"base": latents[:1] + 3, "lora": latents[:1]}, {"base": far, "lora": near}, latents, 0 * latents,
        train_images,
    )  # fmt: skip
    assert metrics["color_distance_lora"] == pytest.approx(10 / 3)
    assert metrics["color_distance_base"] == pytest.approx(350 / 3)
    assert metrics["latent_fd_ratio"] > 1 and metrics["mean_rgb_train"] == [200.0, 100.0, 50.0]
    assert metrics["models"]["lora"]["color_distance"] == metrics["color_distance_lora"]


def test_reference_is_the_posterior_mixture_training_samples_from():
    """Samples drawn like training draws them (mean + std * noise) are at distance ~0; the bare
    means, which lack the posterior spread, are not."""
    rng = np.random.default_rng(2)
    means = rng.standard_normal((32, 4, 8, 8)) * 0.2
    stds = np.full_like(means, 1.0)
    mu, sd = posterior_mixture(means, stds)
    assert sd.mean() == pytest.approx(np.sqrt(1.0 + 0.04), rel=0.05)
    drawn = means[rng.integers(0, 32, 4000)] + stds[:1] * rng.standard_normal((4000, 4, 8, 8))
    assert frechet_to_reference(drawn, mu, sd) < 0.1 * frechet_to_reference(means, mu, sd)
    # With zero std the mixture is the set of means: the plain two-set distance.
    assert frechet_to_reference(means[:8], *posterior_mixture(means, 0 * stds)) == pytest.approx(
        frechet_distance_diagonal(means[:8], means)
    )


def test_train_latents_are_the_square_ones_when_buckets_are_on(tmp_path):
    """Bucketed non-square latents have other shapes than the samples: the metrics leave them out."""
    from tasks.evaluate import load_train_latents

    sizes = {"a": (8, 8, "64x64"), "b": (4, 8, "32x64"), "c": (8, 8, "64x64"), "d": (8, 4, "64x32")}
    latents, rows = [], []
    for name, (height, width, bucket) in sizes.items():
        mean = np.full((4, height, width), ord(name), np.float32)
        latents.append({"key": name, "image_id": name, "flipped": False, "channels": 4, "height": height,
                        "width": width, "dtype": "float32", "mean": mean.tobytes(),
                        "std": np.ones_like(mean).tobytes()})  # fmt: skip
        rows.append({"image_id": name, "caption": "c", "text_key": "t", "latent_key": name,
                     "flipped_latent_key": None, "bucket": bucket})  # fmt: skip
    ShardedCache(tmp_path / "latents", LATENTS).write(pa.Table.from_pylist(latents))
    train_set = write_table(pa.Table.from_pylist(rows), TRAIN_SET, tmp_path / "train_set.parquet")
    means, stds = load_train_latents(train_set, tmp_path / "latents", resolution=64)
    assert means.shape == stds.shape == (2, 4, 8, 8) and sorted(means[:, 0, 0, 0]) == [ord("a"), ord("c")]
    with pytest.raises(ValueError, match="no training image in the 32x32 bucket"):
        load_train_latents(train_set, tmp_path / "latents", resolution=32)

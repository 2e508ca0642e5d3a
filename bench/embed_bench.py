"""Issue 4: T5-v1.1-XXL captions/s and VAE 512 px images/s through tasks/embed.py, one card.

    python bench/embed_bench.py

Baseline in the same run: T5 at batch 1 padded to 120 tokens (what a naive per-caption loop and
the reference training script do). Project: embed_texts / embed_images end to end (cache writes
included) with model_loading's loaders replaced by random full-size builders; captions have
55..95 tokens (60-word captions give ~73 with T5's tokenizer), fed as token ids through a stand-in
tokenizer (only the counts matter for speed). Also checks that GPU memory returns to its level
before each stage call (model_loading.release()).
"""

from __future__ import annotations

import os
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from common import (
    DEVICE,
    RESOLUTION,
    TINY,
    Report,
    allocated_gib,
    build_t5,
    build_vae,
    install_stubs,
    peak_gib,
    reset_peak,
    sync,
    timed,
)  # fmt: skip
from transformers import BatchEncoding

STUBBED = install_stubs()
N_CAPTIONS = 64 if TINY else 2048
N_IMAGES = 8 if TINY else 256
T0 = time.time()
T5_COMPILE_BEFORE_S = 150  # skip the remaining compiled variants when the run is already this late


def older_embed_versions() -> dict:
    """Modules for BENCH_T5_VERSIONS="before=path.py,mid=path.py": copies of tasks/embed.py made
    with `git show 7731adc:tasks/embed.py > .carry/embed_before.py`, so a change is timed against
    the code it replaced on the same card."""
    import importlib.util

    versions = {}
    for item in filter(None, os.environ.get("BENCH_T5_VERSIONS", "").split(",")):
        name, path = item.split("=", 1)
        spec = importlib.util.spec_from_file_location(f"embed_{name}", path)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        versions[name] = module
    return versions


class TokenCountTokenizer:
    """Stands in for T5's tokenizer: text 'cap<i>' has a fixed random length in 55..95 tokens
    (eos included), ids drawn from the real vocabulary range, pad id 0 on the right."""

    def __init__(self, n: int, seed: int = 0):
        rng = np.random.default_rng(seed)
        self.ids = {f"cap{i}": rng.integers(3, 32000 if not TINY else 100, rng.integers(55, 96)).tolist() + [1]
                    for i in range(n)}  # fmt: skip

    pad_multiple = 1  # > 1: pad each batch up to a multiple of this (the bucketed variant)

    def __call__(self, texts, padding=False, truncation=True, max_length=120, return_tensors=None, **_):
        ids = [self.ids[t][:max_length] for t in texts]
        if padding in ("longest", True, "max_length"):
            width = max_length if padding == "max_length" else max(len(x) for x in ids)
            width = -(-width // self.pad_multiple) * self.pad_multiple
            mask = [[1] * len(x) + [0] * (width - len(x)) for x in ids]
            ids = [x + [0] * (width - len(x)) for x in ids]
            return BatchEncoding({"input_ids": ids, "attention_mask": mask}, tensor_type=return_tensors)
        return BatchEncoding({"input_ids": ids, "attention_mask": [[1] * len(x) for x in ids]})


class Timers:
    """Wall time spent inside wrapped functions (per thread it runs on)."""

    def __init__(self):
        self.total: dict[str, float] = {}

    def wrap(self, owner, name: str, label: str):
        original = getattr(owner, name, None)
        if original is None:  # not in this version of the module
            return None

        def timed_call(*args, **kwargs):
            start = time.perf_counter()
            try:
                return original(*args, **kwargs)
            finally:
                self.total[label] = self.total.get(label, 0.0) + time.perf_counter() - start

        setattr(owner, name, timed_call)
        return original


def model_only(model, tokenizer, texts, batch_size: int) -> float:
    """Seconds for the T5 forwards alone over the stage's sorted, padded-to-longest batches."""
    order = np.argsort([len(tokenizer.ids[t]) for t in texts], kind="stable")
    batches = [tokenizer([texts[i] for i in order[s : s + batch_size]], padding="longest", return_tensors="pt").to(DEVICE)
               for s in range(0, len(texts), batch_size)]  # fmt: skip
    with torch.inference_mode():
        for b in batches[:2]:
            model(**b)
        sync()
        start = time.perf_counter()
        for b in batches:
            model(**b).last_hidden_state
        sync()
    return time.perf_counter() - start


def check_cached(cache: Path, keys: list[str], texts: list[str], tokenizer) -> dict:
    """Cached embeddings vs a direct forward of the same texts (same seeded weights, other
    batch composition, so bf16 rounding differs): relative error of the valid tokens."""
    from tasks import embed

    stored, mask = embed.load_text_embeddings(cache, keys, 120)
    model = build_t5()
    tokens = tokenizer(texts, padding="max_length", max_length=120, return_tensors="pt").to(DEVICE)
    with torch.inference_mode():
        fresh = model(**tokens).last_hidden_state.float().cpu()
    del model
    valid = mask.bool()
    same_mask = torch.equal(mask, tokens.attention_mask.cpu().long())
    error = ((stored[valid] - fresh[valid]).norm() / fresh[valid].norm()).item()
    return {"same_mask": same_mask, "relative_error": round(error, 5), "padding_zero": not stored[~valid].any().item()}


def t5_flop_floor(tokens_per_caption: float) -> float:
    """Captions/s at 790 TFLOP/s: 2 FLOP per weight per token (embedding excluded) + attention."""
    import common

    d, ff, layers = common.T5["d_model"], common.T5["d_ff"], common.T5["num_layers"]
    weights = layers * (4 * d * d + 3 * d * ff)
    flop = tokens_per_caption * (2 * weights + layers * 4 * tokens_per_caption * d)
    return 790e12 / flop


def bench_t5(report: Report) -> None:
    """Baseline (batch 1, pad 120) vs embed.embed_texts at batch 64: eager, embed.compile (the
    project's dynamic-shape blocks), and static-shape blocks over lengths bucketed to multiples of
    16; each compiled variant cold (first call in a fresh dynamo state: includes compiling) then
    warm (a second call, new model, new cache dir)."""
    import torch._dynamo
    from torch._dynamo.utils import counters

    from configs import EmbedConfig, ModelsConfig
    from tasks import embed, model_loading

    project_embed = embed
    tokenizer = TokenCountTokenizer(N_CAPTIONS)
    texts = [f"cap{i}" for i in range(N_CAPTIONS)]
    mean_tokens = float(np.mean([len(v) for v in tokenizer.ids.values()]))

    # Baseline: batch 1 at 120 padded tokens, the model called directly; and the model alone.
    model = build_t5()
    one = tokenizer(texts[:1], padding="max_length", max_length=120, return_tensors="pt").to(DEVICE)
    with torch.inference_mode():
        b1, _ = timed(lambda: model(**one).last_hidden_state.cpu(), 3, 20)
    eager_model_s = model_only(model, tokenizer, texts, 64)
    report.add("t5_baseline", {
        "batch1_pad120_captions_per_s": round(1 / b1, 1), "model_only_sorted_b64_captions_per_s":
        round(N_CAPTIONS / eager_model_s, 1), "mean_tokens": round(mean_tokens, 1),
        "floor_120_tokens": round(t5_flop_floor(120), 1), "floor_mean_tokens": round(t5_flop_floor(mean_tokens), 1),
    })  # fmt: skip
    del model, one
    model_loading.release()

    build_times = []

    def load_text_encoder(models, dtype, device):
        start = time.perf_counter()
        model = build_t5(dtype, device)
        sync()
        build_times.append(time.perf_counter() - start)
        return tokenizer, model

    model_loading.load_text_encoder = load_text_encoder
    models = ModelsConfig(pixart="random-init")
    from tasks import cache as cache_module

    project_compile = embed.compile_text_encoder

    def static_bucketed(model, backend="inductor"):  # the alternative the brief asked to compare
        torch._dynamo.config.recompile_limit = 64
        for block in model.encoder.block:
            block.compile(backend=backend, dynamic=False)

    variants = [("eager", False, None, 1), ("compiled_dynamic_cold", True, project_compile, 1),
                ("compiled_dynamic_warm", True, project_compile, 1),
                ("compiled_static16_cold", True, static_bucketed, 16),
                ("compiled_static16_warm", True, static_bucketed, 16)]  # fmt: skip
    if os.environ.get("BENCH_T5_STATIC") == "0":  # measured once (call 5); not needed again
        variants = variants[:3]
    versions = older_embed_versions()
    if versions:  # earlier versions of embed.py, eager, in the same call
        variants = [*((f"{name}_eager", False, None, 1) for name in versions), *variants,
                    *((f"{name}_eager_again", False, None, 1) for name in versions),
                    ("eager_again", False, None, 1)]  # fmt: skip
    for name, compile_on, compile_fn, pad_multiple in variants:
        embed = versions.get(name.split("_")[0], project_embed)
        if name.endswith("_cold"):
            torch._dynamo.reset()
        if compile_fn is not None:
            embed.compile_text_encoder = compile_fn
        tokenizer.pad_multiple = pad_multiple
        timers = Timers()
        originals = [(embed, "_encode_text_batch", timers.wrap(embed, "_encode_text_batch", "launch_s")),
                     (embed, "_text_table", timers.wrap(embed, "_text_table", "rows_s")),
                     (embed, "_text_rows", timers.wrap(embed, "_text_rows", "rows_s")),
                     (embed._ShardWriter, "write", timers.wrap(embed._ShardWriter, "write", "writer_main_thread_s")),
                     (embed._ShardWriter, "close", timers.wrap(embed._ShardWriter, "close", "writer_close_s")),
                     (model_loading, "release", timers.wrap(model_loading, "release", "release_s")),
                     (cache_module.ShardedCache, "write", timers.wrap(cache_module.ShardedCache, "write", "shard_write_bg_s"))]  # fmt: skip
        before = allocated_gib()
        graphs_before = counters["stats"]["unique_graphs"]
        reset_peak()
        cache = Path(tempfile.mkdtemp(prefix="t5cache-"))
        cfg = EmbedConfig(batch_size=64, max_length=120, compile=compile_on)
        result = {"batch": 64, "captions": N_CAPTIONS, "compile": compile_on, "pad_multiple": pad_multiple,
                  "alloc_before_GiB": before}  # fmt: skip
        try:
            sync()
            start = time.perf_counter()
            keys = embed.embed_texts(texts, models, cfg, cache, DEVICE, torch.bfloat16)
            sync()
            wall = time.perf_counter() - start - build_times[-1]
            result.update(captions_per_s=round(N_CAPTIONS / wall, 1), seconds=round(wall, 2),
                          model_build_s=round(build_times[-1], 1), peak_GiB=peak_gib(),
                          alloc_after_GiB=allocated_gib(), new_graphs=counters["stats"]["unique_graphs"] - graphs_before,
                          **{k: round(v, 2) for k, v in timers.total.items()})  # fmt: skip
        except Exception as exc:
            result["error"] = f"{type(exc).__name__}: {str(exc)[-1500:]}"
        for owner, attr, original in originals:
            if original is not None:
                setattr(owner, attr, original)
        embed.compile_text_encoder = project_compile
        tokenizer.pad_multiple = 1
        report.add(f"t5_project_b64_{name}", result)
        if name in ("eager", "compiled_dynamic_warm") and "error" not in result:
            report.add(f"t5_check_{name}", check_cached(cache, keys[:16], texts[:16], tokenizer))
        if time.time() - T0 > T5_COMPILE_BEFORE_S and name.endswith("_warm"):
            break
    model_loading.release()


def write_pngs(folder: Path, n: int) -> list[Path]:
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(1)
    paths = []
    for i in range(n):
        coarse = rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)
        image = Image.fromarray(coarse).resize((RESOLUTION, RESOLUTION), Image.Resampling.BICUBIC)
        pixels = np.asarray(image).astype(np.int16) + rng.integers(-6, 7, (RESOLUTION, RESOLUTION, 3))
        paths.append(folder / f"{i}.png")
        Image.fromarray(pixels.clip(0, 255).astype(np.uint8)).save(paths[-1])
    return paths


def bench_vae(report: Report) -> None:
    from configs import EmbedConfig, ModelsConfig
    from tasks import embed, model_loading

    vae = build_vae()
    with torch.inference_mode():
        for batch in (1, 32):
            x = torch.randn(batch, 3, RESOLUTION, RESOLUTION, device=DEVICE, dtype=torch.bfloat16)
            t, _ = timed(lambda: vae.encode(x).latent_dist.mean.cpu(), 2, 5)
            report.add(
                f"vae_encode_b{batch}", {"images_per_s": round(batch / t, 1), "what": "vae.encode only"}
            )
    del vae, x
    model_loading.release()

    paths = write_pngs(Path(tempfile.mkdtemp(prefix="vaepng-")), N_IMAGES)
    rows = [{"image_id": f"img{i}", "image_path": str(p), "width": RESOLUTION, "height": RESOLUTION}
            for i, p in enumerate(paths)]  # fmt: skip
    model_loading.load_vae = lambda models, dtype, device: build_vae(dtype, device)
    for batch_size in (32,):
        before = allocated_gib()
        result = {"batch": batch_size, "images": N_IMAGES, "alloc_before_GiB": before}
        try:
            cfg = EmbedConfig(batch_size=batch_size, resolution=RESOLUTION, max_length=120)
            sync()
            start = time.perf_counter()
            embed.embed_images(
                rows,
                ModelsConfig(pixart="random-init"),
                cfg,
                Path(tempfile.mkdtemp()),
                DEVICE,
                torch.bfloat16,
            )
            sync()
            wall = time.perf_counter() - start
            result.update(images_per_s=round(N_IMAGES / wall, 1), seconds=round(wall, 2),
                          alloc_after_GiB=allocated_gib(),
                          what="embed.embed_images end to end: PNG decode + preprocess + encode + cache")  # fmt: skip
        except Exception as exc:
            result["error"] = f"{type(exc).__name__}: {str(exc)[-1500:]}"
        report.add(f"vae_project_b{batch_size}", result)


if __name__ == "__main__":
    t0 = time.time()
    report = Report("embed")
    report.add("stubbed_modules", STUBBED)
    bench_t5(report)
    if os.environ.get("BENCH_SKIP_VAE") != "1":
        bench_vae(report)
    print(f"done in {time.time() - t0:.0f}s", flush=True)

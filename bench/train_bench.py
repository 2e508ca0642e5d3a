"""Issue 5: training throughput, reference-equivalent step vs the project's trainer, one card.

    python bench/train_bench.py ref       # PixArt-alpha's train_pixart_lora_hf.py step, rebuilt
    python bench/train_bench.py project   # tasks/train.py (lora_transformer, build_optimizer,
                                          # diffusion_loss, _update) at several settings

`ref` does per step what the reference script does with --mixed_precision bf16,
--gradient_checkpointing, rank 16, its target modules, batch 2: decode two PNGs and apply its
torchvision transform, T5-XXL forward at 120 padded tokens, VAE encode + posterior sample, then
the LoRA step through accelerate (gather + .item() of the loss, clip, AdamW). Token ids are fed
directly (the tokenizer call is <1 ms and needs the real spiece model).

`project` builds the same random PixArt-XL-2 transformer on the GPU (tasks.train.load_transformer
is replaced by the builder; everything after it is the project's code) and feeds it from a
synthetic training view (tasks/cached_dataset.py) written through the caches as the embed stage
writes it: bfloat16 120x4096 embeddings (40..120 valid tokens), 4x64x64 latent mean/std, flipped
variants. tasks.train.serve_view puts it on the GPU, as training does.
"""

from __future__ import annotations

import gc
import os
import sys
import time
from contextlib import nullcontext

import numpy as np
import torch
from common import (
    CAPTION_DIM,
    DEVICE,
    LATENT,
    RESOLUTION,
    TINY,
    Report,
    allocated_gib,
    build_pixart,
    build_t5,
    build_vae,
    ddpm_scheduler,
    install_stubs,
    peak_gib,
    reset_peak,
    sync,
    timed,
)  # fmt: skip

install_stubs()
WARMUP, ITERS = (1, 2) if TINY else (3, 10)
BUDGET_S = float(os.environ.get("BENCH_BUDGET_S", 420))  # project variants stop starting after this
T0 = time.time()


# ---------------------------------------------------------------------------------------------
# Reference-equivalent step.


def write_pngs(folder, n: int) -> list:
    """Photo-like PNGs (smooth colour fields + grain) at the training resolution."""
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    paths = []
    for i in range(n):
        coarse = rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)
        image = Image.fromarray(coarse).resize((RESOLUTION, RESOLUTION), Image.Resampling.BICUBIC)
        pixels = np.asarray(image).astype(np.int16) + rng.integers(-6, 7, (RESOLUTION, RESOLUTION, 3))
        path = folder / f"{i}.png"
        Image.fromarray(pixels.clip(0, 255).astype(np.uint8)).save(path)
        paths.append(path)
    return paths


def bench_reference(report: Report, batch_size: int = 2) -> None:
    from accelerate import Accelerator
    from peft import LoraConfig, get_peft_model
    from PIL import Image

    try:
        from torchvision import transforms
    except ImportError:
        transforms = None

    from configs import REFERENCE_TARGETS

    accelerator = Accelerator(mixed_precision="bf16")
    dtype = torch.bfloat16
    start = time.time()
    text_encoder, vae = build_t5(dtype), build_vae(dtype)
    transformer = build_pixart(dtype).requires_grad_(False)
    transformer = get_peft_model(
        transformer, LoraConfig(r=16, init_lora_weights="gaussian", target_modules=REFERENCE_TARGETS)
    )  # bf16 run: the reference upcasts LoRA params only for fp16 (PEFT autocasts adapters to fp32)
    transformer.enable_gradient_checkpointing()
    lora_layers = [p for p in transformer.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(lora_layers, lr=3e-4, weight_decay=0.03, eps=1e-10)
    transformer, optimizer = accelerator.prepare(transformer, optimizer)
    transformer.train()
    scheduler = ddpm_scheduler()
    build_s = time.time() - start

    paths = write_pngs(OUT_TMP / "png", 16)
    if transforms is not None:
        train_transforms = transforms.Compose([
            transforms.Resize(RESOLUTION, interpolation=transforms.InterpolationMode.BILINEAR),
            transforms.CenterCrop(RESOLUTION), transforms.RandomHorizontalFlip(),
            transforms.ToTensor(), transforms.Normalize([0.5], [0.5]),
        ])  # fmt: skip
    else:  # CPU dry run without torchvision: the project's equivalent transform
        from tasks.embed import preprocess_image

        def train_transforms(image):
            pixels = preprocess_image(image, RESOLUTION)
            return pixels.flip(-1) if torch.rand(()) < 0.5 else pixels

    rng = np.random.default_rng(0)
    max_length = 120
    counter = iter(range(10**9))

    def step():
        i = next(counter)
        images = [
            Image.open(paths[(i * batch_size + k) % len(paths)]).convert("RGB") for k in range(batch_size)
        ]
        pixel_values = torch.stack([train_transforms(im) for im in images]).float()
        lengths = rng.integers(55, 96, batch_size)  # ~73 T5 tokens for a 60-word caption
        input_ids = torch.zeros(batch_size, max_length, dtype=torch.long)
        mask = torch.zeros(batch_size, max_length, dtype=torch.long)
        for k, n in enumerate(lengths):
            input_ids[k, :n] = torch.from_numpy(rng.integers(3, 32000 if not TINY else 100, n))
            mask[k, :n] = 1
        pixel_values, input_ids, mask = (t.to(DEVICE) for t in (pixel_values, input_ids, mask))
        with accelerator.accumulate(transformer):
            latents = (
                vae.encode(pixel_values.to(dtype=dtype)).latent_dist.sample() * vae.config.scaling_factor
            )
            noise = torch.randn_like(latents)
            timesteps = torch.randint(0, 1000, (latents.shape[0],), device=DEVICE).long()
            noisy = scheduler.add_noise(latents, noise, timesteps)
            prompt_embeds = text_encoder(input_ids, attention_mask=mask)[0]
            pred = transformer(
                noisy, encoder_hidden_states=prompt_embeds, encoder_attention_mask=mask,
                timestep=timesteps, added_cond_kwargs={"resolution": None, "aspect_ratio": None},
            ).sample.chunk(2, 1)[0]  # fmt: skip
            loss = torch.nn.functional.mse_loss(pred.float(), noise.float(), reduction="mean")
            accelerator.gather(loss.repeat(batch_size)).mean().item()
            accelerator.backward(loss)
            if accelerator.sync_gradients:
                accelerator.clip_grad_norm_(lora_layers, 1.0)
            optimizer.step()
            optimizer.zero_grad()

    reset_peak()
    median, times = timed(step, WARMUP, ITERS)
    report.add(f"ref_b{batch_size}_ckpt", {
        "what": "reference-equivalent step: PNG decode + T5-XXL + VAE encode + LoRA step (grad ckpt)",
        "batch": batch_size, "transform": "torchvision" if transforms is not None else "tasks.embed.preprocess_image",
        "step_s": round(median, 4), "samples_per_s": round(batch_size / median, 2),
        "peak_GiB": peak_gib(), "build_s": round(build_s, 1), "step_times": [round(t, 4) for t in times],
    })  # fmt: skip


# ---------------------------------------------------------------------------------------------
# The project's trainer.


def synthetic_view(folder, n: int):
    """A training view of n random samples in the cached shapes and dtypes (bfloat16)."""
    import pyarrow as pa

    from tasks import contracts
    from tasks.cache import ShardedCache
    from tasks.cached_dataset import CachedTrainView, build_train_view
    from tasks.embed import build_train_set, tensor_bytes

    rng = torch.Generator().manual_seed(0)
    texts, latents, latent_keys = [], [], []
    for i, length in enumerate(torch.randint(40, 121, (n,), generator=rng).tolist()):
        embedding = (torch.randn(length, CAPTION_DIM, generator=rng) * 0.1).bfloat16()
        texts.append({"key": f"t{i}", "text": f"caption {i}", "length": length, "dim": CAPTION_DIM,
                      "dtype": "bfloat16", "embedding": tensor_bytes(embedding)})  # fmt: skip
        mean = torch.randn(4, LATENT, LATENT, generator=rng) * 4
        for flipped in (False, True):
            latents.append({"key": f"l{i}-{flipped}", "image_id": f"i{i}", "flipped": flipped, "channels": 4,
                            "height": LATENT, "width": LATENT, "dtype": "bfloat16",
                            "mean": tensor_bytes((mean.flip(-1) if flipped else mean).bfloat16()),
                            "std": tensor_bytes(torch.full_like(mean, 0.1).bfloat16())})  # fmt: skip
        latent_keys.append((f"l{i}-False", f"l{i}-True"))
    ShardedCache(folder / "text", contracts.TEXT_EMBEDDINGS).write(
        pa.Table.from_pylist(texts, schema=contracts.TEXT_EMBEDDINGS)
    )
    ShardedCache(folder / "latents", contracts.LATENTS).write(
        pa.Table.from_pylist(latents, schema=contracts.LATENTS)
    )
    rows = [{"image_id": f"i{i}", "caption": f"caption {i}"} for i in range(n)]
    train_set = build_train_set(rows, [f"t{i}" for i in range(n)], latent_keys, folder)
    view = build_train_view(train_set, folder / "text", folder / "latents", 120, folder / "train_view")
    return CachedTrainView(view)


def run_config(**train):
    from configs import RunConfig

    settings = {"rank": 16, "target_modules": "reference", "dropout": 0.0, "lr_scheduler": "constant",
                "mixed_precision": "bf16", "max_steps": 1000, "checkpointing_steps": 1000, **train}  # fmt: skip
    return RunConfig.model_validate({
        "run_name": "bench", "device": "cuda" if DEVICE.type == "cuda" else "cpu", "dtype": "bfloat16",
        "dataset": {"repo": "x"}, "models": {"pixart": "random-init"},
        "embed": {"resolution": RESOLUTION, "max_length": 120}, "train": settings,
    })  # fmt: skip


def bench_variant(
    report,
    accelerator,
    view,
    name,
    *,
    fused=True,
    gpu_data=True,
    profile=False,
    attn=None,
    no_input_cast=False,
    compile_mode=None,
    no_lora=False,
    inductor=None,
    fp8=False,
    **train,
):
    from diffusers.optimization import get_scheduler

    import tasks.train as tt

    config = run_config(**train)
    cfg = config.train
    free()
    baseline = allocated_gib()
    reset_peak()
    if inductor or compile_mode:  # read when the first step compiles: start from a fresh compile
        torch._dynamo.reset()
    inductor_patch = torch._inductor.config.patch(inductor) if inductor else nullcontext()
    plain_compile, swapped = tt.compile_blocks, None

    def compile_variant(transformer, **kwargs):
        nonlocal swapped
        if fp8:  # the blocks' frozen linears become fp8 ones before they are compiled
            swapped = fp8_base_linears(transformer.transformer_blocks)
        if compile_mode:  # e.g. max-autotune-no-cudagraphs: Triton GEMM templates with fused epilogues
            for block in transformer.transformer_blocks:
                block.compile(mode=compile_mode, dynamic=False)
        else:
            plain_compile(transformer, **kwargs)

    tt.compile_blocks = compile_variant
    try:
        if no_lora:
            transformer = InputGradProbe(tt.load_transformer(None, torch.bfloat16, DEVICE).requires_grad_(False))
            if cfg.compile:
                compile_variant(transformer.transformer)
        else:
            transformer = tt.lora_transformer(config, DEVICE)
    finally:
        tt.compile_blocks = plain_compile
    if no_input_cast:  # PEFT casts each LoRA input to the fp32 adapter dtype; autocast recasts it to bf16
        from peft.tuners.lora import LoraLayer

        for module in transformer.modules():
            if isinstance(module, LoraLayer):
                module.cast_input_dtype_enabled = False
    params = [p for p in transformer.parameters() if p.requires_grad]
    if fused:
        optimizer = tt.build_optimizer(params, cfg)
    else:  # the project before this change: foreach AdamW
        optimizer = torch.optim.AdamW(
            params, lr=cfg.learning_rate, weight_decay=cfg.weight_decay, eps=cfg.adam_epsilon
        )
    lr_scheduler = get_scheduler("constant", optimizer)
    model, optimizer = accelerator.prepare(transformer, optimizer)
    data = tt.serve_view(view, DEVICE) if gpu_data else view  # else: gathered from the mapped pages
    plan = tt.StepPlan(len(data), cfg.batch_size, 1, cfg.seed)
    noise_scheduler = ddpm_scheduler()

    def loss_of(batch):
        return tt.diffusion_loss(model, batch, noise_scheduler, 0.18215, torch.bfloat16)

    counter = iter(range(10**9))
    losses = []

    def step():
        s = next(counter)
        torch.manual_seed(tt._step_seed(cfg.seed, s, 0))
        loss, _, _ = tt._update(accelerator, model, loss_of, data, plan.batches(s), optimizer, params, cfg)
        lr_scheduler.step()
        losses.append(loss)

    result = {"batch": cfg.batch_size, "grad_ckpt": cfg.gradient_checkpointing, "compile": compile_mode or cfg.compile,
              "fused_adamw": fused, "data": type(data).__name__, "baseline_alloc_GiB": baseline,
              "lora_targets": "none" if no_lora else cfg.target_modules, "inductor": inductor,
              "fp8_linears": swapped, "fp8_bias_in_gemm": FP8_BIAS_IN_GEMM if fp8 else None}  # fmt: skip
    context = nullcontext()
    if attn is not None:  # pin SDPA's backends; a fresh compile so the graph picks them up
        from torch.nn.attention import SDPBackend, sdpa_kernel

        torch._dynamo.reset()
        context = sdpa_kernel([getattr(SDPBackend, b) for b in attn])
        result["sdpa_backends"] = attn
    try:
        inductor_patch.__enter__()
        context.__enter__()
        sync()
        first = time.perf_counter()
        step()
        sync()
        result["first_step_s"] = round(time.perf_counter() - first, 1)  # includes compilation
        median, times = timed(step, WARMUP - 1, ITERS)
        result.update(step_s=round(median, 4), samples_per_s=round(cfg.batch_size / median, 2),
                      peak_GiB=peak_gib(), step_times=[round(t, 4) for t in times],
                      loss_first_last=[round(losses[0], 4), round(losses[-1], 4)])  # fmt: skip
        if profile:
            result["profile"] = profile_steps(step, 2)
    except torch.OutOfMemoryError as exc:
        result["error"] = f"OOM: {str(exc)[:200]}"
    except Exception as exc:  # one failed variant must not lose the others
        result["error"] = f"{type(exc).__name__}: {str(exc)[-1500:]}"
    finally:
        context.__exit__(None, None, None)
        inductor_patch.__exit__(None, None, None)
    report.add(name, result)
    accelerator.free_memory()
    del model, transformer, optimizer, params, data, lr_scheduler
    free()


class InputGradProbe(torch.nn.Module):
    """The frozen transformer without LoRA. A trainable zero offset on its input makes backward
    run through every block computing input gradients only: the work any LoRA adds to, so its
    rate bounds every LoRA implementation that keeps these base kernels."""

    def __init__(self, transformer: torch.nn.Module):
        super().__init__()
        self.transformer = transformer
        self.offset = torch.nn.Parameter(torch.zeros(1, transformer.config.in_channels, 1, 1, device=DEVICE))

    def forward(self, hidden_states, **kwargs):
        return self.transformer(hidden_states + self.offset.to(hidden_states.dtype), **kwargs)


E4M3_MAX = 448.0
FP8_BIAS_IN_GEMM = True  # cleared by fp8_base_linears where _scaled_mm takes no bias with row scales


def to_fp8_rows(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Row-wise e4m3 quantization: (values, float32 dequantization scale per row)."""
    scale = x.abs().amax(dim=-1, keepdim=True).float().clamp(min=1e-12) / E4M3_MAX
    return (x.float() / scale).to(torch.float8_e4m3fn), scale


class _Fp8Matmul(torch.autograd.Function):
    """y = x @ W.T + b for a frozen W kept in fp8 twice (rows scaled for the forward, columns for
    the input gradient); x and the output gradient are quantized row-wise on the fly."""

    @staticmethod
    def forward(ctx, x, weight, weight_scale, weight_t, weight_t_scale, bias):
        ctx.save_for_backward(weight_t, weight_t_scale)
        rows, scale = to_fp8_rows(x)
        fused_bias = bias if FP8_BIAS_IN_GEMM else None
        y = torch._scaled_mm(rows, weight.t(), scale_a=scale, scale_b=weight_scale, bias=fused_bias,
                             out_dtype=torch.bfloat16)  # fmt: skip
        return y if fused_bias is not None or bias is None else y + bias

    @staticmethod
    def backward(ctx, grad):
        weight_t, weight_t_scale = ctx.saved_tensors
        rows, scale = to_fp8_rows(grad)
        grad_x = torch._scaled_mm(rows, weight_t.t(), scale_a=scale, scale_b=weight_t_scale,
                                  out_dtype=torch.bfloat16)  # fmt: skip
        return grad_x, None, None, None, None, None


class Fp8FrozenLinear(torch.nn.Module):
    """A frozen nn.Linear whose GEMMs (forward and input gradient) run in fp8 on Hopper. A bench
    experiment for issue 5 (how much fp8 base GEMMs would buy), not a project setting: it changes
    the frozen model's numerics."""

    def __init__(self, linear: torch.nn.Linear):
        super().__init__()
        weight = linear.weight.detach()
        w, w_scale = to_fp8_rows(weight)  # per output channel
        wt, wt_scale = to_fp8_rows(weight.t().contiguous())  # per input channel
        self.register_buffer("weight", w)
        self.register_buffer("weight_scale", w_scale.view(1, -1))
        self.register_buffer("weight_t", wt)
        self.register_buffer("weight_t_scale", wt_scale.view(1, -1))
        bias = None if linear.bias is None else linear.bias.detach().to(torch.bfloat16)
        self.register_buffer("bias", bias)
        self.in_features, self.out_features = linear.in_features, linear.out_features

    def forward(self, x):
        flat = x.reshape(-1, x.shape[-1]).to(torch.bfloat16)
        y = _Fp8Matmul.apply(flat, self.weight, self.weight_scale, self.weight_t, self.weight_t_scale, self.bias)
        return y.view(*x.shape[:-1], self.out_features)


def fp8_base_linears(blocks: torch.nn.Module) -> int:
    """Swap every frozen nn.Linear inside the blocks (a LoRA layer's base_layer included) for
    Fp8FrozenLinear; returns how many."""
    probe = torch.ones(16, 16, device=DEVICE, dtype=torch.float8_e4m3fn)
    try:
        torch._scaled_mm(probe, probe.t(), scale_a=torch.ones(16, 1, device=DEVICE),
                         scale_b=torch.ones(1, 16, device=DEVICE),
                         bias=torch.zeros(16, device=DEVICE, dtype=torch.bfloat16), out_dtype=torch.bfloat16)  # fmt: skip
    except RuntimeError:
        global FP8_BIAS_IN_GEMM
        FP8_BIAS_IN_GEMM = False
    swapped = 0
    for module in list(blocks.modules()):
        for name, child in list(module.named_children()):
            if type(child) is torch.nn.Linear and not child.weight.requires_grad:
                setattr(module, name, Fp8FrozenLinear(child))
                swapped += 1
    return swapped


KERNEL_KINDS = (  # first match wins; names as the profiler reports them on an H100
    ("attention", ("sdpa", "flash", "fmha", "dot_do_o", "attention")),
    ("gemm", ("nvjet", "gemm", "cutlass", "xmma", "splitk")),
    ("copy", ("memcpy", "memset")),
    ("triton", ("triton_",)),
)


def kernel_kind(name: str) -> str:
    lowered = name.lower()
    return next((kind for kind, keys in KERNEL_KINDS if any(k in lowered for k in keys)), "other")


def profile_steps(step, n: int) -> dict:
    """Kernel count, summed kernel time and the top kernels over `n` steps."""
    from torch.profiler import ProfilerActivity, profile

    sync()
    start = time.perf_counter()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(n):
            step()
        sync()
    wall = time.perf_counter() - start
    kernels = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    busy = sum(e.device_time for e in kernels) / 1e6  # us -> s (overlap ignored: one stream)
    by_name: dict[str, list[float]] = {}
    for e in kernels:
        by_name.setdefault(e.name[:90], []).append(e.device_time)
    top = sorted(by_name.items(), key=lambda kv: -sum(kv[1]))[:15]
    by_kind: dict[str, float] = {}
    for e in kernels:
        by_kind[kernel_kind(e.name)] = by_kind.get(kernel_kind(e.name), 0.0) + e.device_time
    return {
        "steps": n, "wall_s_per_step": round(wall / n, 4), "kernels_per_step": len(kernels) // n,
        "gpu_busy_s_per_step": round(busy / n, 4),
        "ms_per_step_by_kind": {kind: round(t / n / 1e3, 2) for kind, t in sorted(by_kind.items())},
        "top": [[name, len(v) // n, round(sum(v) / n / 1e3, 2)] for name, v in top],  # name, count, ms/step
    }  # fmt: skip


def free() -> None:
    gc.collect()
    if DEVICE.type == "cuda":
        torch.cuda.empty_cache()


def bench_data_path(report, view, batch_size: int) -> None:
    """Cost of one batch: gathered from the mapped view (pages already cached) and copied over
    pinned, vs gathered from the view's copy on the device."""
    from tasks.cached_dataset import DeviceTrainView

    idx, flip = torch.randperm(len(view))[:batch_size], torch.rand(batch_size) < 0.5
    resident = DeviceTrainView(view, DEVICE)
    mapped_s, _ = timed(lambda: view.batch(idx, flip, DEVICE), 2, 10)
    dev_s, _ = timed(lambda: resident.batch(idx, flip, DEVICE), 2, 10)
    report.add(f"data_batch_b{batch_size}", {"mapped_pinned_ms": round(mapped_s * 1e3, 2),
                                             "device_resident_ms": round(dev_s * 1e3, 2)})  # fmt: skip
    del resident
    free()


def bench_attention(report: Report, batch: int = 32) -> None:
    """PixArt's two attentions at batch 32 (fwd + bwd) under each SDPA backend."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    heads, dim = 16, 72
    q = torch.randn(batch, heads, 1024, dim, device=DEVICE, dtype=torch.bfloat16, requires_grad=True)
    kv = torch.randn(batch, heads, 120, dim, device=DEVICE, dtype=torch.bfloat16, requires_grad=True)
    bias = torch.zeros(batch, 1, 1, 120, device=DEVICE, dtype=torch.bfloat16)
    bias[:, :, :, 80:] = -10000.0
    bias = bias.expand(batch, heads, 1, 120)
    out = {}
    for backend in ("CUDNN_ATTENTION", "FLASH_ATTENTION", "EFFICIENT_ATTENTION"):
        for kind, args in (("self", (q, q, q, None)), ("cross_masked", (q, kv, kv, bias))):

            def run():
                o = torch.nn.functional.scaled_dot_product_attention(*args[:3], attn_mask=args[3])
                o.sum().backward()

            try:
                with sdpa_kernel([getattr(SDPBackend, backend)]):
                    t, _ = timed(run, 2, 10)
                out[f"{backend}_{kind}_ms"] = round(t * 1e3, 3)
            except Exception as exc:
                out[f"{backend}_{kind}_ms"] = f"{type(exc).__name__}"
    flop = 4 * batch * heads * 1024 * 1024 * dim * 3.5  # fwd + bwd (2.5x)
    out["self_tflops_at_best"] = round(
        flop / min(v for k, v in out.items() if "self" in k and isinstance(v, float)) / 1e12 * 1e3, 1
    )
    report.add("attention_b32_fwd_bwd", out)


def bench_project(report: Report) -> None:
    from accelerate import Accelerator

    import tasks.train as tt

    def random_transformer(models, dtype, device):
        return build_pixart(dtype, device)

    tt.load_transformer = random_transformer  # everything after the weights is the project's code
    if TINY:  # no C++ toolchain needed for a CPU dry run
        original = tt.compile_blocks
        tt.compile_blocks = lambda transformer: original(transformer, backend="eager")
    limit = "recompile_limit" if hasattr(torch._dynamo.config, "recompile_limit") else "cache_size_limit"
    setattr(torch._dynamo.config, limit, 64)  # graphs accumulate over the variants: past 16 later ones ran eager
    accelerator = Accelerator(mixed_precision="bf16", cpu=DEVICE.type == "cpu")
    view = synthetic_view(OUT_TMP / "train_data", 64 if TINY else 256)
    if DEVICE.type == "cuda":
        try:
            bench_attention(report)
        except Exception as exc:
            report.add("attention_b32_fwd_bwd", {"error": f"{type(exc).__name__}: {exc}"[:500]})
        free()
    bench_data_path(report, view, 32)

    attention = dict(batch_size=32, gradient_checkpointing=False, compile=True, target_modules="attention")
    variants = [
        ("proj_b32_compiled_attention_targets_profiled", dict(attention, profile=True)),
        ("dit_no_lora_b32_compiled", dict(batch_size=32, gradient_checkpointing=False, compile=True,
                                          no_lora=True, profile=True)),  # fmt: skip
        ("dit_no_lora_b32_compiled_fp8", dict(batch_size=32, gradient_checkpointing=False, compile=True,
                                              no_lora=True, fp8=True, profile=True)),  # fmt: skip
        ("proj_b32_compiled_attention_targets_fp8", dict(attention, fp8=True, profile=True)),
        ("dit_no_lora_b64_compiled", dict(batch_size=64, gradient_checkpointing=False, compile=True, no_lora=True)),
        ("proj_b48_compiled_attention_targets", dict(attention, batch_size=48)),
        ("proj_b64_compiled_attention_targets", dict(attention, batch_size=64)),
        ("proj_b32_compiled_attention_targets_coordinate_descent",
         dict(attention, inductor={"coordinate_descent_tuning": True})),  # fmt: skip
        ("proj_b32_compiled_max_autotune", dict(batch_size=32, gradient_checkpointing=False, compile=True,
                                                compile_mode="max-autotune-no-cudagraphs")),  # fmt: skip
        ("proj_b32_compiled_attention_targets_max_autotune", dict(
            batch_size=32, gradient_checkpointing=False, compile=True, target_modules="attention",
            compile_mode="max-autotune-no-cudagraphs")),  # fmt: skip
        (
            "proj_b2_ckpt_eager_before",
            dict(batch_size=2, gradient_checkpointing=True, fused=False, gpu_data=False),
        ),
        ("proj_b2_ckpt_eager", dict(batch_size=2, gradient_checkpointing=True)),
        ("proj_b16_eager", dict(batch_size=16, gradient_checkpointing=False)),
        ("proj_b2_ckpt_compiled", dict(batch_size=2, gradient_checkpointing=True, compile=True)),
        ("proj_b2_compiled", dict(batch_size=2, gradient_checkpointing=False, compile=True)),
        ("proj_b32_compiled", dict(batch_size=32, gradient_checkpointing=False, compile=True, profile=True)),
        ("proj_b32_ckpt_compiled", dict(batch_size=32, gradient_checkpointing=True, compile=True)),
        ("proj_b8_ckpt_compiled", dict(batch_size=8, gradient_checkpointing=True, compile=True)),
        ("proj_b48_compiled", dict(batch_size=48, gradient_checkpointing=False, compile=True)),
        (
            "proj_b32_compiled_attention_targets",
            dict(batch_size=32, gradient_checkpointing=False, compile=True, target_modules="attention"),
        ),
        (
            "proj_b32_compiled_no_input_cast",
            dict(batch_size=32, gradient_checkpointing=False, compile=True, no_input_cast=True),
        ),
        ("proj_b16_ckpt_compiled", dict(batch_size=16, gradient_checkpointing=True, compile=True)),
        (
            "proj_b32_compiled_flash",
            dict(
                batch_size=32,
                gradient_checkpointing=False,
                compile=True,
                attn=["FLASH_ATTENTION", "EFFICIENT_ATTENTION"],
            ),
        ),
    ]
    only = os.environ.get("BENCH_VARIANTS")
    for name, kwargs in variants:
        if only and name not in only.split(","):
            continue
        if time.time() - T0 > BUDGET_S:
            report.add(name, {"skipped": f"time budget {BUDGET_S:.0f}s reached"})
            continue
        bench_variant(report, accelerator, view, name, **kwargs)


if __name__ == "__main__":
    from pathlib import Path

    OUT_TMP = Path(os.environ.get("BENCH_TMP", "/tmp/bench"))
    mode = sys.argv[1]
    report = Report(f"train_{mode}")
    if mode == "ref":
        bench_reference(report)
    else:
        bench_project(report)
    print(f"done in {time.time() - T0:.0f}s", flush=True)

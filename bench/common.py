"""Shared pieces of the GPU benchmarks: stand-ins for packages the GPU box lacks, the full-size
architectures (random weights, built directly on the GPU), and timing helpers.

Run from the repository root: `python bench/<name>.py`. BENCH_TINY=1 shrinks every model so a
script can be checked on a CPU in seconds (its numbers then mean nothing).
"""

from __future__ import annotations

import json
import logging
import os
import statistics
import sys
import time
import types
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
TINY = os.environ.get("BENCH_TINY") == "1"
OUT = Path(os.environ.get("OUT", ROOT / "bench" / "out"))
OUT.mkdir(parents=True, exist_ok=True)
DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")


def install_stubs() -> list[str]:
    """prefect (and pyarrow, when missing) as inert modules, for the benchmark process only.

    The stage modules import prefect for their @task wrapper and pyarrow for their schemas;
    the benchmarks call the pure functions, which need neither.
    """
    stubbed = []
    try:
        import prefect
    except ImportError:
        prefect = types.ModuleType("prefect")
        prefect.task = lambda *a, **k: a[0] if a and callable(a[0]) else (lambda fn: fn)
        prefect.get_run_logger = lambda: logging.getLogger("prefect-stub")
        sys.modules["prefect"] = prefect
        stubbed.append("prefect")
    try:
        import pyarrow  # noqa: F401
    except ImportError:

        class Anything:
            def __getattr__(self, name):
                return self

            def __call__(self, *args, **kwargs):
                return self

        for name in ("pyarrow", "pyarrow.parquet"):
            module = types.ModuleType(name)
            module.__getattr__ = lambda attr: Anything()
            sys.modules[name] = module
        stubbed.append("pyarrow")
    return stubbed


# ---------------------------------------------------------------------------------------------
# Full-size configs (shared/FULL_SIZE_MODELS.md); BENCH_TINY shrinks them.

PIXART = dict(
    sample_size=64, num_layers=28, num_attention_heads=16, attention_head_dim=72, in_channels=4,
    out_channels=8, patch_size=2, cross_attention_dim=1152, caption_channels=4096,
    norm_type="ada_norm_single", use_additional_conditions=False, activation_fn="gelu-approximate",
    num_embeds_ada_norm=1000, norm_elementwise_affine=False, norm_eps=1e-6, attention_bias=True,
)  # fmt: skip
T5 = dict(
    d_model=4096, d_ff=10240, d_kv=64, num_heads=64, num_layers=24, vocab_size=32128,
    feed_forward_proj="gated-gelu", relative_attention_num_buckets=32,
    relative_attention_max_distance=128, layer_norm_epsilon=1e-6, dropout_rate=0.0,
    pad_token_id=0, eos_token_id=1, decoder_start_token_id=0,
)  # fmt: skip
VAE = dict(
    in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 4,
    up_block_types=("UpDecoderBlock2D",) * 4, block_out_channels=(128, 256, 512, 512),
    layers_per_block=2, latent_channels=4, norm_num_groups=32, sample_size=512, scaling_factor=0.18215,
)  # fmt: skip
if TINY:
    PIXART.update(num_layers=2, num_attention_heads=2, attention_head_dim=16, cross_attention_dim=32,
                  caption_channels=64, sample_size=8)  # fmt: skip
    T5.update(d_model=64, d_ff=128, d_kv=16, num_heads=4, num_layers=2)
    VAE.update(block_out_channels=(8, 8, 16, 16), layers_per_block=1, norm_num_groups=8)
CAPTION_DIM = T5["d_model"]
LATENT = PIXART["sample_size"]
RESOLUTION = LATENT * 8


def build_pixart(dtype=torch.bfloat16, device=DEVICE):
    from diffusers import PixArtTransformer2DModel

    torch.manual_seed(0)
    with torch.device(device):
        model = PixArtTransformer2DModel(**PIXART)
    return model.to(dtype)


def build_t5(dtype=torch.bfloat16, device=DEVICE):
    from transformers import T5Config, T5EncoderModel

    torch.manual_seed(0)
    with torch.device(device):
        model = T5EncoderModel._from_config(T5Config(**T5), dtype=dtype)
    return model.eval().requires_grad_(False)


def build_vae(dtype=torch.bfloat16, device=DEVICE):
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    with torch.device(device):
        model = AutoencoderKL(**VAE)
    return model.to(dtype).eval().requires_grad_(False)


def pixart_scheduler():
    """PixArt-XL-2-512x512's inference scheduler, as its scheduler_config.json sets it up."""
    from diffusers import DPMSolverMultistepScheduler

    return DPMSolverMultistepScheduler(
        num_train_timesteps=1000, beta_start=0.0001, beta_end=0.02, beta_schedule="linear",
        prediction_type="epsilon", algorithm_type="dpmsolver++", solver_order=2, solver_type="midpoint",
        lower_order_final=True,
    )  # fmt: skip


def ddpm_scheduler():
    from diffusers import DDPMScheduler

    return DDPMScheduler(
        num_train_timesteps=1000, beta_start=0.0001, beta_end=0.02, beta_schedule="linear",
        prediction_type="epsilon",
    )  # fmt: skip


# ---------------------------------------------------------------------------------------------
# Timing and reporting.


def sync() -> None:
    if DEVICE.type == "cuda":
        torch.cuda.synchronize()


def reset_peak() -> None:
    if DEVICE.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()


def peak_gib() -> float:
    return round(torch.cuda.max_memory_allocated() / 2**30, 2) if DEVICE.type == "cuda" else 0.0


def allocated_gib() -> float:
    return round(torch.cuda.memory_allocated() / 2**30, 3) if DEVICE.type == "cuda" else 0.0


def timed(fn, warmup: int, iters: int) -> tuple[float, list[float]]:
    """(median seconds per call, all timings); each call is synchronised before the clock reads."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(iters):
        sync()
        start = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - start)
    return statistics.median(times), times


def device_info() -> dict:
    import transformers

    info = {"torch": torch.__version__, "transformers": transformers.__version__, "tiny": TINY}
    try:
        import diffusers
        import peft

        info.update(diffusers=diffusers.__version__, peft=peft.__version__)
    except ImportError:
        pass
    if DEVICE.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(0)
        info["gpu_mem_GiB"] = round(torch.cuda.get_device_properties(0).total_memory / 2**30, 1)
    return info


class Report:
    """Collects results; every add() rewrites $OUT/<name>.json so a killed run keeps what it had."""

    def __init__(self, name: str):
        self.path = OUT / f"{name}.json"
        self.data = {"date": time.strftime("%Y-%m-%d %H:%M:%S"), "device": device_info(), "results": {}}
        self.write()

    def add(self, key: str, value) -> None:
        self.data["results"][key] = value
        print(f"RESULT {key} {json.dumps(value)}", flush=True)
        self.write()

    def write(self) -> None:
        self.path.write_text(json.dumps(self.data, indent=1, default=str) + "\n")

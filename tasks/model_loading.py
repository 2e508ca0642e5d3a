"""The one place models are loaded, for every stage.

Each loader takes a hub id or a local folder and calls `from_pretrained`: the tiny models the
demo and tests use go through exactly the path the real checkpoints take. A name `tiny:pixart`
or `tiny:llava` is first built (seeded, once) into the models home, then loaded from there.
Weights load from safetensors only and no repository code is ever trusted.
"""

from __future__ import annotations

import gc
import os
from pathlib import Path

import torch

from configs import ModelsConfig

TINY_PREFIX = "tiny:"
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def models_home() -> Path:
    """Where tiny models (and nothing else) are built: $PIXART_PIPELINE_HOME or ~/.cache/pixart-pipeline."""
    return Path(os.environ.get("PIXART_PIPELINE_HOME", Path.home() / ".cache" / "pixart-pipeline"))


def resolve_model(name: str) -> str:
    if not name.startswith(TINY_PREFIX):
        return name
    from tasks.tiny_models import ensure_tiny_models

    kind = name[len(TINY_PREFIX) :]
    built = ensure_tiny_models(models_home() / "tiny-models")
    if kind not in built:
        raise ValueError(f"unknown tiny model {name!r}; known: {sorted(TINY_PREFIX + k for k in built)}")
    return str(built[kind])


def pick_device(setting: str) -> torch.device:
    if setting == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("device 'cuda' was asked for, but torch sees no CUDA device")
    if setting == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(setting)


def _text_encoder_source(models: ModelsConfig) -> tuple[str, dict, dict]:
    """(path, encoder kwargs, tokenizer kwargs): the PixArt repo's subfolders unless overridden."""
    if models.text_encoder:
        return resolve_model(models.text_encoder), {}, {}
    return resolve_model(models.pixart), {"subfolder": "text_encoder"}, {"subfolder": "tokenizer"}


def load_transformer(models: ModelsConfig, dtype: torch.dtype, device: torch.device):
    from diffusers import PixArtTransformer2DModel

    model = PixArtTransformer2DModel.from_pretrained(
        resolve_model(models.pixart), subfolder="transformer", torch_dtype=dtype, use_safetensors=True
    )
    return model.to(device)


def load_vae(models: ModelsConfig, dtype: torch.dtype, device: torch.device):
    from diffusers import AutoencoderKL

    vae = AutoencoderKL.from_pretrained(
        resolve_model(models.pixart), subfolder="vae", torch_dtype=dtype, use_safetensors=True
    )
    return vae.to(device).eval().requires_grad_(False)


def load_text_encoder(models: ModelsConfig, dtype: torch.dtype, device: torch.device):
    """(tokenizer, T5EncoderModel) in eval mode with gradients off."""
    from transformers import AutoTokenizer, T5EncoderModel

    path, encoder_kwargs, tokenizer_kwargs = _text_encoder_source(models)
    tokenizer = AutoTokenizer.from_pretrained(path, **tokenizer_kwargs)
    encoder = T5EncoderModel.from_pretrained(path, dtype=dtype, use_safetensors=True, **encoder_kwargs)
    return tokenizer, encoder.to(device).eval().requires_grad_(False)


def load_tokenizer(models: ModelsConfig):
    from transformers import AutoTokenizer

    path, _, tokenizer_kwargs = _text_encoder_source(models)
    return AutoTokenizer.from_pretrained(path, **tokenizer_kwargs)


def load_noise_scheduler(models: ModelsConfig, kind: str):
    """'ddpm' for training, 'dpm' (the repo's DPM-Solver) or 'ddim' for sampling, from the repo's config."""
    from diffusers import DDIMScheduler, DDPMScheduler, DPMSolverMultistepScheduler

    classes = {"ddpm": DDPMScheduler, "dpm": DPMSolverMultistepScheduler, "ddim": DDIMScheduler}
    scheduler_class = classes[kind]
    config = scheduler_class.load_config(resolve_model(models.pixart), subfolder="scheduler")
    if kind == "ddim":
        # Clipping keeps a weak (tiny, random) model's last steps from blowing up the sample.
        return scheduler_class.from_config(config, clip_sample=True, set_alpha_to_one=True)
    return scheduler_class.from_config(config)


def load_captioner(models: ModelsConfig, dtype: torch.dtype, device: torch.device):
    """(LlavaForConditionalGeneration, processor) ready for batched, left-padded generation."""
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    path = resolve_model(models.llava)
    processor = AutoProcessor.from_pretrained(path)
    processor.tokenizer.padding_side = "left"  # generation continues from the right edge
    attention = "sdpa" if device.type == "cuda" else None
    model = LlavaForConditionalGeneration.from_pretrained(
        path, dtype=dtype, use_safetensors=True, attn_implementation=attention
    )
    return model.to(device).eval().requires_grad_(False), processor


def release() -> None:
    """Give freed GPU memory back; call after dropping the last reference to a stage's models."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()

"""The one place models are loaded, for every stage.

Each loader takes a hub id or a local folder and calls `from_pretrained`: the tiny models the
demo and tests use go through exactly the path the real checkpoints take. A name `tiny:pixart`
or `tiny:llava` is first built (seeded, once) into the models home, then loaded from there.
Weights load from safetensors only and no repository code is ever trusted.
"""

from __future__ import annotations

import functools
import gc
import os
from collections.abc import Callable
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


def _pixart_pinned(models: ModelsConfig) -> dict:
    """from_pretrained's `revision` argument when models.pixart_revision pins one."""
    return {"revision": models.pixart_revision} if models.pixart_revision else {}


def _text_encoder_source(models: ModelsConfig) -> tuple[str, dict, dict]:
    """(path, encoder kwargs, tokenizer kwargs): the PixArt repo's subfolders unless overridden."""
    if models.text_encoder:
        pinned = {"revision": models.text_encoder_revision} if models.text_encoder_revision else {}
        return resolve_model(models.text_encoder), pinned, dict(pinned)
    pinned = _pixart_pinned(models)
    path = resolve_model(models.pixart)
    return path, {"subfolder": "text_encoder", **pinned}, {"subfolder": "tokenizer", **pinned}


def _names_model(describe: Callable[[object], str]):
    """Hub and file errors often leave out which model failed to load (transformers says only
    "We couldn't connect to 'https://huggingface.co'"): re-raise them naming the setting."""

    def wrap(load):
        @functools.wraps(load)
        def loader(source, *args, **kwargs):
            try:
                return load(source, *args, **kwargs)
            except OSError as exc:
                raise OSError(f"{describe(source)}: cannot load this model: {exc}") from None

        return loader

    return wrap


_PIXART = _names_model(lambda m: f"models.pixart={m.pixart!r}")
_TEXT_ENCODER = _names_model(
    lambda m: f"models.text_encoder={m.text_encoder!r}" if m.text_encoder else f"models.pixart={m.pixart!r}"
)


@_PIXART
def load_transformer(models: ModelsConfig, dtype: torch.dtype, device: torch.device):
    from diffusers import PixArtTransformer2DModel

    model = PixArtTransformer2DModel.from_pretrained(
        resolve_model(models.pixart), subfolder="transformer", torch_dtype=dtype, use_safetensors=True,
        **_pixart_pinned(models),
    )  # fmt: skip
    return model.to(device)


@_PIXART
def load_vae(models: ModelsConfig, dtype: torch.dtype, device: torch.device):
    from diffusers import AutoencoderKL

    vae = AutoencoderKL.from_pretrained(
        resolve_model(models.pixart), subfolder="vae", torch_dtype=dtype, use_safetensors=True,
        **_pixart_pinned(models),
    )  # fmt: skip
    return vae.to(device).eval().requires_grad_(False)


@_TEXT_ENCODER
def load_text_encoder(models: ModelsConfig, dtype: torch.dtype, device: torch.device):
    """(tokenizer, T5EncoderModel) in eval mode with gradients off."""
    from transformers import AutoTokenizer, T5EncoderModel

    path, encoder_kwargs, tokenizer_kwargs = _text_encoder_source(models)
    tokenizer = AutoTokenizer.from_pretrained(path, **tokenizer_kwargs)
    encoder = T5EncoderModel.from_pretrained(path, dtype=dtype, use_safetensors=True, **encoder_kwargs)
    return tokenizer, encoder.to(device).eval().requires_grad_(False)


@_TEXT_ENCODER
def load_tokenizer(models: ModelsConfig):
    from transformers import AutoTokenizer

    path, _, tokenizer_kwargs = _text_encoder_source(models)
    return AutoTokenizer.from_pretrained(path, **tokenizer_kwargs)


def load_noise_scheduler(models: ModelsConfig, kind: str):
    """'ddpm' for training, 'dpm' (the repo's DPM-Solver) or 'ddim' for sampling, from the repo's config."""
    from diffusers import DDIMScheduler, DDPMScheduler, DPMSolverMultistepScheduler

    classes = {"ddpm": DDPMScheduler, "dpm": DPMSolverMultistepScheduler, "ddim": DDIMScheduler}
    scheduler_class = classes[kind]
    path = resolve_model(models.pixart)
    config = scheduler_class.load_config(path, subfolder="scheduler", **_pixart_pinned(models))
    if kind == "ddim":
        # Clipping keeps a weak (tiny, random) model's last steps from blowing up the sample.
        return scheduler_class.from_config(config, clip_sample=True, set_alpha_to_one=True)
    return scheduler_class.from_config(config)


# Quantizing only the language model: it is ~95% of LLaVA's weights, while the CLIP tower and
# projector are small and lose most from 4-bit. lm_head stays unquantized, as transformers does by default.
CAPTIONER_UNQUANTIZED = ["model.vision_tower", "model.multi_modal_projector", "lm_head"]


def captioner_quantization(quantization: str, dtype: torch.dtype):
    """The BitsAndBytesConfig for recaption.quantization ('8bit' or '4bit'), or None for 'none'."""
    if quantization == "none":
        return None
    from transformers import BitsAndBytesConfig

    if quantization == "8bit":
        return BitsAndBytesConfig(load_in_8bit=True, llm_int8_skip_modules=CAPTIONER_UNQUANTIZED)
    if quantization == "4bit":
        return BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=dtype,
            llm_int8_skip_modules=CAPTIONER_UNQUANTIZED,
        )  # fmt: skip
    raise ValueError(f"unknown quantization {quantization!r}; use 'none', '8bit' or '4bit'")


@_names_model(lambda m: f"models.llava={m.llava!r}")
def load_captioner(
    models: ModelsConfig,
    dtype: torch.dtype,
    device: torch.device,
    quantization: str = "none",
    revision: str | None = None,
):
    """(LlavaForConditionalGeneration, processor) ready for batched, left-padded generation.

    `revision` pins a hub branch, tag or commit; `quantization` '8bit'/'4bit' needs CUDA.
    """
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    path = resolve_model(models.llava)
    pinned = {"revision": revision} if revision else {}
    quantization_config = captioner_quantization(quantization, dtype)
    if quantization_config is not None and device.type != "cuda":
        raise ValueError(f"recaption.quantization={quantization!r} needs a CUDA device (bitsandbytes), not {device}")
    processor = AutoProcessor.from_pretrained(path, **pinned)
    processor.tokenizer.padding_side = "left"  # generation continues from the right edge
    attention = "sdpa" if device.type == "cuda" else None
    if quantization_config is None:
        model = LlavaForConditionalGeneration.from_pretrained(
            path, dtype=dtype, use_safetensors=True, attn_implementation=attention, **pinned
        )
        return model.to(device).eval().requires_grad_(False), processor
    # bitsandbytes places the weights while loading; a quantized model cannot be moved after.
    model = LlavaForConditionalGeneration.from_pretrained(
        path, dtype=dtype, use_safetensors=True, attn_implementation=attention, **pinned,
        quantization_config=quantization_config, device_map={"": device.index or 0},
    )  # fmt: skip
    return model.eval().requires_grad_(False), processor


@_names_model(lambda name: f"evaluate.clip_model={name!r}")
def load_clip(name: str, dtype: torch.dtype, device: torch.device):
    """(CLIPModel, image processor) for the style metric's image embeddings (evaluate.clip_model)."""
    from transformers import AutoImageProcessor, CLIPModel

    path = resolve_model(name)
    processor = AutoImageProcessor.from_pretrained(path)
    model = CLIPModel.from_pretrained(path, dtype=dtype, use_safetensors=True)
    return model.to(device).eval().requires_grad_(False), processor


def release() -> None:
    """Give freed GPU memory back; call after dropping the last reference to a stage's models."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()

"""Our LoRA adapter on disk, and the one call that puts it on a PixArt model.

diffusers has no `load_lora_weights` for PixArt-alpha, so this module owns the adapter format:

    adapter/
      adapter_model.safetensors        PEFT layout (keys `base_model.model.<module>.lora_A.weight`)
      adapter_config.json              the peft.LoraConfig (rank, alpha, targets)
      pytorch_lora_weights.safetensors diffusers layout (keys `transformer.<module>.lora_A.weight`)

The two weight files hold the same tensors. The PEFT pair loads with plain
`PeftModel.from_pretrained(transformer, adapter_dir)`. The diffusers file carries alpha the way
diffusers' own `save_lora_weights` does: in the safetensors metadata entry `lora_adapter_metadata`,
a JSON of the LoraConfig with every key prefixed `transformer.` (so `transformer.lora_alpha`,
`transformer.r`); there are no `.alpha` tensors.

Usage:
    pipe = PixArtAlphaPipeline.from_pretrained(...)
    apply_lora(pipe, "runs/.../adapter", scale=1.0)   # LoRA on
    set_lora_scale(pipe, 0.0)                         # exactly the base model again
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import torch
from peft import (
    LoraConfig,
    PeftModel,
    get_peft_model_state_dict,
    inject_adapter_in_model,
    set_peft_model_state_dict,
)
from peft.tuners.lora import LoraLayer
from safetensors.torch import load_file, save, save_file

from configs import ModelsConfig
from tasks.atomic import atomic_dir
from tasks.model_loading import load_transformer

ADAPTER_NAME = "style"
PEFT_WEIGHTS = "adapter_model.safetensors"
PEFT_CONFIG = "adapter_config.json"
DIFFUSERS_WEIGHTS = "pytorch_lora_weights.safetensors"
DIFFUSERS_METADATA_KEY = "lora_adapter_metadata"  # diffusers.loaders.lora_base.LORA_ADAPTER_METADATA_KEY
_PEFT_PREFIX = "base_model.model."


def _transformer_of(pipeline_or_transformer: torch.nn.Module) -> torch.nn.Module:
    return getattr(pipeline_or_transformer, "transformer", pipeline_or_transformer)


def save_adapter(transformer: torch.nn.Module, out_dir: Path, base_model: str | None = None) -> Path:
    """Write the adapter named ADAPTER_NAME of `transformer` as the folder described above (atomically)."""
    config: LoraConfig = transformer.peft_config[ADAPTER_NAME]
    state = {
        k: v.detach().to("cpu", torch.float32).contiguous()
        for k, v in get_peft_model_state_dict(transformer, adapter_name=ADAPTER_NAME).items()
    }
    config = copy.copy(config)
    config.base_model_name_or_path = base_model
    if isinstance(config.target_modules, set):  # a set's order changes with PYTHONHASHSEED:
        config.target_modules = sorted(config.target_modules)  # same adapter, same bytes
    with atomic_dir(out_dir) as tmp:
        save_file(
            {_PEFT_PREFIX + k: v for k, v in state.items()}, tmp / PEFT_WEIGHTS, metadata={"format": "pt"}
        )
        config.save_pretrained(str(tmp))  # writes adapter_config.json
        packed = {f"transformer.{k}": v for k, v in json.loads((tmp / PEFT_CONFIG).read_text()).items()}
        _save_sorted_metadata(
            {f"transformer.{k}": v for k, v in state.items()},
            tmp / DIFFUSERS_WEIGHTS,
            metadata={"format": "pt", DIFFUSERS_METADATA_KEY: json.dumps(packed, indent=2, sort_keys=True)},
        )
    return Path(out_dir)


def _save_sorted_metadata(tensors: dict[str, torch.Tensor], path: Path, metadata: dict[str, str]) -> None:
    """save_file, with the metadata keys in sorted order: safetensors writes them in the order of a
    Rust HashMap, which changes from process to process, so the same adapter got other bytes."""
    data = save(tensors, metadata=metadata)
    size = int.from_bytes(data[:8], "little")
    header = json.loads(data[8 : 8 + size])
    header["__metadata__"] = dict(sorted(header["__metadata__"].items()))
    text = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode()
    if len(text) <= size:  # the same JSON, reordered: never longer; padded with spaces as before
        data = data[:8] + text.ljust(size) + data[8 + size :]
    path.write_bytes(data)


def set_lora_scale(pipeline_or_transformer: torch.nn.Module, scale: float) -> int:
    """Scale our adapter's contribution (1.0 = as trained, 0.0 = base model). Returns the layer count."""
    layers = [
        m
        for m in _transformer_of(pipeline_or_transformer).modules()
        if isinstance(m, LoraLayer) and ADAPTER_NAME in m.scaling
    ]
    if not layers:
        raise ValueError(f"no LoRA adapter {ADAPTER_NAME!r} on this model; call apply_lora first")
    for layer in layers:
        layer.set_scale(ADAPTER_NAME, scale)  # scaling = scale * alpha / r
    return len(layers)


def apply_lora(pipeline_or_transformer: torch.nn.Module, adapter_dir: str | Path, scale: float = 1.0):
    """Inject the adapter in `adapter_dir` into a PixArtAlphaPipeline's transformer (or a bare
    PixArtTransformer2DModel), in place, at `scale`; returns the same pipeline/transformer.

    peft adds `scale * alpha / r * B(A(x))` to each target layer's output, so scale 0.0 adds an
    exact zero: outputs are bit-identical to the base model's. The LoRA weights take the model's
    dtype. Apply once per model; load a fresh one to change adapters.
    """
    adapter_dir = Path(adapter_dir)
    for name in (PEFT_WEIGHTS, PEFT_CONFIG):
        if not (adapter_dir / name).is_file():
            raise FileNotFoundError(
                f"{adapter_dir}: no {name}; not a LoRA adapter folder written by training"
            )
    transformer = _transformer_of(pipeline_or_transformer)
    if ADAPTER_NAME in getattr(transformer, "peft_config", {}):
        raise ValueError(f"adapter {ADAPTER_NAME!r} is already applied; load a fresh model to apply another")
    config = LoraConfig.from_pretrained(str(adapter_dir))
    inject_adapter_in_model(config, transformer, adapter_name=ADAPTER_NAME)
    device = next(transformer.parameters()).device
    result = set_peft_model_state_dict(
        transformer, load_file(adapter_dir / PEFT_WEIGHTS, device=str(device)), adapter_name=ADAPTER_NAME
    )
    missing = [k for k in result.missing_keys if f".{ADAPTER_NAME}." in k and "lora_" in k]
    if result.unexpected_keys or missing:
        raise ValueError(
            f"{adapter_dir / PEFT_WEIGHTS}: does not fit this transformer "
            f"(unexpected {result.unexpected_keys[:3]}, missing {missing[:3]})"
        )
    transformer.requires_grad_(False)  # inference only; training builds its own LoRA
    set_lora_scale(transformer, scale)
    return pipeline_or_transformer


def merge_and_save(adapter_dir: str | Path, models: ModelsConfig, out_dir: str | Path) -> Path:
    """Fuse the adapter into a float32 copy of the base transformer and save it with
    `save_pretrained` (safetensors): loadable as `PixArtTransformer2DModel.from_pretrained(out_dir)`."""
    if not (Path(adapter_dir) / PEFT_WEIGHTS).is_file():  # else peft would fall back to a pickled .bin
        raise FileNotFoundError(f"{adapter_dir}: no {PEFT_WEIGHTS}; adapters load from safetensors only")
    base = load_transformer(models, torch.float32, torch.device("cpu"))
    merged = PeftModel.from_pretrained(base, str(adapter_dir)).merge_and_unload()
    with atomic_dir(Path(out_dir)) as tmp:
        merged.save_pretrained(tmp, safe_serialization=True)
    return Path(out_dir)

"""Tests for the adapter format and apply_lora (tasks/lora.py) on the tiny PixArt, CPU."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from diffusers import PixArtAlphaPipeline, PixArtTransformer2DModel
from peft import PeftModel
from peft.tuners.lora import LoraLayer
from safetensors import safe_open
from safetensors.torch import load_file

from configs import RunConfig
from tasks.lora import (
    ADAPTER_NAME,
    DIFFUSERS_METADATA_KEY,
    apply_lora,
    merge_and_save,
    save_adapter,
    set_lora_scale,
)
from tasks.model_loading import load_transformer, resolve_model
from tasks.train import lora_transformer

RANK, ALPHA = 4, 16.0  # scale alpha / r = 4: a wrong alpha shows in the outputs


@pytest.fixture(scope="module")
def _lora_home(tiny_models):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny matmuls only lose from intra-op parallelism
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def config(_lora_home) -> RunConfig:
    return RunConfig.model_validate(
        {
            "device": "cpu",
            "dtype": "float32",
            "dataset": {"repo": "unused"},
            "models": {"pixart": "tiny:pixart"},
            "train": {"rank": RANK, "alpha": ALPHA, "target_modules": "reference"},
        }
    )


@pytest.fixture(scope="module")
def adapter_dir(config, tmp_path_factory):
    """An adapter as training writes it, with random (seeded) non-zero B so it changes outputs."""
    torch.manual_seed(0)
    transformer = lora_transformer(config, torch.device("cpu"))
    with torch.no_grad():
        for name, param in transformer.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.05)
    return save_adapter(transformer, tmp_path_factory.mktemp("lora") / "adapter", base_model="tiny:pixart")


def fresh_transformer(config):
    return load_transformer(config.models, torch.float32, torch.device("cpu")).eval()


def transformer_out(transformer) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    x, text = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 12, 32, generator=g)
    with torch.no_grad():
        return transformer(
            x,
            encoder_hidden_states=text,
            timestep=torch.tensor([10, 700]),
            added_cond_kwargs={"resolution": None, "aspect_ratio": None},
            return_dict=False,
        )[0]


def images(pipe) -> np.ndarray:
    return pipe(
        "a red circle outline",
        num_inference_steps=2,
        height=64,
        width=64,
        output_type="np",
        generator=torch.Generator().manual_seed(0),
        use_resolution_binning=False,
        clean_caption=False,
    ).images


def test_apply_lora_changes_pipeline_and_scale_zero_restores_base(adapter_dir):
    pipe = PixArtAlphaPipeline.from_pretrained(resolve_model("tiny:pixart"))
    base = images(pipe)
    assert apply_lora(pipe, adapter_dir, scale=1.0) is pipe
    styled = images(pipe)
    assert np.abs(styled - base).max() > 1e-3
    set_lora_scale(pipe, 0.0)
    assert np.array_equal(images(pipe), base)  # bit-identical, not just close
    set_lora_scale(pipe, 1.0)
    assert np.array_equal(images(pipe), styled)


def test_scale_multiplies_alpha_over_rank(config, adapter_dir):
    transformer = apply_lora(fresh_transformer(config), adapter_dir, scale=0.5)
    layers = [m for m in transformer.modules() if isinstance(m, LoraLayer)]
    assert layers and all(m.scaling[ADAPTER_NAME] == pytest.approx(0.5 * ALPHA / RANK) for m in layers)
    assert not any(p.requires_grad for p in transformer.parameters())
    half, base = transformer_out(transformer), transformer_out(fresh_transformer(config))
    assert set_lora_scale(transformer, 1.0) == len(layers)
    full = transformer_out(transformer)
    assert (half - base).abs().max() > 0 and (full - half).abs().max() > 0


def test_plain_peft_loads_the_same_adapter(config, adapter_dir):
    ours = transformer_out(apply_lora(fresh_transformer(config), adapter_dir))
    peft_model = PeftModel.from_pretrained(fresh_transformer(config), str(adapter_dir))
    torch.testing.assert_close(transformer_out(peft_model), ours, rtol=0, atol=0)


def test_diffusers_file_matches_and_carries_alpha(adapter_dir):
    peft_weights = load_file(adapter_dir / "adapter_model.safetensors")
    diffusers_weights = load_file(adapter_dir / "pytorch_lora_weights.safetensors")
    assert len(diffusers_weights) == len(peft_weights) > 0
    for key, value in peft_weights.items():
        assert key.startswith("base_model.model.")
        assert torch.equal(diffusers_weights["transformer." + key.removeprefix("base_model.model.")], value)
    with safe_open(adapter_dir / "pytorch_lora_weights.safetensors", "pt") as f:
        metadata = json.loads(f.metadata()[DIFFUSERS_METADATA_KEY])
    assert metadata["transformer.lora_alpha"] == ALPHA and metadata["transformer.r"] == RANK
    config = json.loads((adapter_dir / "adapter_config.json").read_text())
    assert config["lora_alpha"] == ALPHA and "ff.net.2" in config["target_modules"]
    assert any(k.endswith("pos_embed.proj.lora_A.weight") for k in peft_weights)  # conv layers too


def test_merge_and_save_matches_applied_adapter(config, adapter_dir, tmp_path):
    merged_dir = merge_and_save(adapter_dir, config.models, tmp_path / "merged")
    assert (merged_dir / "diffusion_pytorch_model.safetensors").is_file()
    merged = PixArtTransformer2DModel.from_pretrained(merged_dir).eval()
    assert not any("lora" in name for name, _ in merged.named_parameters())
    expected = transformer_out(apply_lora(fresh_transformer(config), adapter_dir))
    torch.testing.assert_close(transformer_out(merged), expected, rtol=1e-4, atol=1e-5)


def test_errors_are_short_and_named(config, adapter_dir, tmp_path):
    with pytest.raises(FileNotFoundError, match="adapter_config.json|adapter_model.safetensors"):
        apply_lora(fresh_transformer(config), tmp_path)
    transformer = apply_lora(fresh_transformer(config), adapter_dir)
    with pytest.raises(ValueError, match="already applied"):
        apply_lora(transformer, adapter_dir)
    with pytest.raises(ValueError, match="apply_lora first"):
        set_lora_scale(fresh_transformer(config), 0.5)

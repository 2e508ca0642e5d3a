"""Tests for the tiny offline stand-in models (tasks/tiny_models.py). CPU only, fast."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import AutoencoderKL, PixArtAlphaPipeline, PixArtTransformer2DModel
from PIL import Image
from transformers import AutoProcessor, AutoTokenizer, LlavaForConditionalGeneration, T5Tokenizer

from tasks.tiny_models import (
    TINY_RESOLUTION,
    build_tiny_llava,
    build_tiny_pixart,
    ensure_tiny_models,
)

PROMPTS = ["Describe this image in one short sentence.", "What style is this drawing?"]


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, Path]:
    return ensure_tiny_models(tmp_path_factory.mktemp("tiny"))


def _artifacts(folder: Path) -> dict[str, bytes]:
    """Weights and tokenizers: the files that must be reproducible bit for bit."""
    files = [*folder.rglob("*.safetensors"), *folder.rglob("tokenizer.json")]
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(files)}


def test_pixart_pipeline_generates_image(models):
    pipe = PixArtAlphaPipeline.from_pretrained(models["pixart"])
    out = pipe(
        "a red circle outline on a white background",
        num_inference_steps=2, height=TINY_RESOLUTION, width=TINY_RESOLUTION,
        generator=torch.Generator().manual_seed(0),
        use_resolution_binning=False, clean_caption=False, output_type="np",
    )
    image = out.images
    assert image.shape == (1, TINY_RESOLUTION, TINY_RESOLUTION, 3)
    assert np.isfinite(image).all()


def test_pixart_components_load_by_subfolder(models):
    transformer = PixArtTransformer2DModel.from_pretrained(models["pixart"], subfolder="transformer")
    vae = AutoencoderKL.from_pretrained(models["pixart"], subfolder="vae")
    assert transformer.config.sample_size * 8 == TINY_RESOLUTION
    assert transformer.config.out_channels == 2 * transformer.config.in_channels  # learned sigma
    inner = transformer.config.num_attention_heads * transformer.config.attention_head_dim
    assert transformer.config.cross_attention_dim == inner
    assert 2 ** (len(vae.config.block_out_channels) - 1) == 8
    assert vae.config.scaling_factor == pytest.approx(0.18215)


def test_t5_tokenizer_round_trip_and_padding(models):
    tok = T5Tokenizer.from_pretrained(models["pixart"], subfolder="tokenizer")
    assert tok.model_max_length == 120
    text = "a blue cat outline, simple flat style"
    enc = tok(text, padding="max_length", max_length=120, truncation=True,
              add_special_tokens=True, return_tensors="pt")
    assert enc.input_ids.shape == (1, 120) and enc.attention_mask.shape == (1, 120)
    n = int(enc.attention_mask.sum())
    assert 0 < n < 120 and enc.attention_mask[0, :n].all()  # right-padded
    assert (enc.input_ids[0, n:] == tok.pad_token_id).all()
    assert tok.decode(enc.input_ids[0], skip_special_tokens=True) == text
    assert tok.unk_token_id not in enc.input_ids[0].tolist()


def test_llava_generates_for_batch_with_left_padding(models):
    processor = AutoProcessor.from_pretrained(models["llava"])
    model = LlavaForConditionalGeneration.from_pretrained(models["llava"])
    assert processor.tokenizer.padding_side == "left"
    assert AutoTokenizer.from_pretrained(models["llava"]).padding_side == "left"

    conversations = [
        [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": p}]}] for p in PROMPTS
    ]
    texts = [processor.apply_chat_template(c, add_generation_prompt=True) for c in conversations]
    assert texts[0] == f"USER: <image>\n{PROMPTS[0]} ASSISTANT:"

    rng = np.random.default_rng(0)
    images = [Image.fromarray(rng.integers(0, 255, (48, 40, 3), dtype=np.uint8)) for _ in PROMPTS]
    inputs = processor(images=images, text=texts, padding=True, return_tensors="pt")
    mask, ids = inputs["attention_mask"], inputs["input_ids"]
    assert (mask[:, -1] == 1).all() and (mask[:, 0] == 0).any()  # left padding happened
    first_real = mask.float().argmax(dim=1)
    assert (ids[torch.arange(2), first_real] == processor.tokenizer.bos_token_id).all()
    # <image> expanded to one token per vision feature (16 patches; CLS dropped).
    assert ((ids == model.config.image_token_index).sum(dim=1) == model.config.image_seq_length).all()
    assert inputs["pixel_values"].shape == (2, 3, 32, 32)

    out = model.generate(**inputs, max_new_tokens=4, do_sample=False)
    assert out.shape[0] == 2 and out.shape[1] == inputs["input_ids"].shape[1] + 4
    assert all(isinstance(s, str) for s in processor.batch_decode(out, skip_special_tokens=True))


@pytest.mark.parametrize("build", [build_tiny_pixart, build_tiny_llava])
def test_rebuild_is_byte_identical(build, tmp_path):
    a, b = build(tmp_path / "a", seed=3), build(tmp_path / "b", seed=3)
    files_a = _artifacts(a)
    assert any(name.endswith(".safetensors") for name in files_a)
    assert files_a == _artifacts(b)
    assert files_a != _artifacts(build(tmp_path / "c", seed=4))


def test_build_is_atomic_and_overwrites(tmp_path, monkeypatch):
    dest = build_tiny_llava(tmp_path / "llava-tiny")
    build_tiny_llava(dest)  # rebuilding over an existing folder replaces it
    assert [p.name for p in tmp_path.iterdir()] == ["llava-tiny"]  # no temp leftovers

    def crash(self, save_directory, **kwargs):
        (Path(save_directory) / "model_index.json").write_text("{}")  # half-written
        raise KeyboardInterrupt

    monkeypatch.setattr(PixArtAlphaPipeline, "save_pretrained", crash)
    with pytest.raises(KeyboardInterrupt):
        build_tiny_pixart(tmp_path / "pixart-tiny")
    assert [p.name for p in tmp_path.iterdir()] == ["llava-tiny"]


def test_ensure_does_not_rebuild(tmp_path):
    paths = ensure_tiny_models(tmp_path)
    assert paths == {"pixart": tmp_path / "pixart-tiny", "llava": tmp_path / "llava-tiny"}
    stamps = {k: (p.stat().st_mtime_ns, p.stat().st_ino) for k, p in paths.items()}
    assert ensure_tiny_models(tmp_path) == paths
    assert {k: (p.stat().st_mtime_ns, p.stat().st_ino) for k, p in paths.items()} == stamps

"""Tiny, random-init stand-ins for PixArt-alpha and LLaVA-1.5.

The pipeline runs where no model weights can be downloaded (CI, sandboxes), yet every
stage should exercise the exact loading code used with the real checkpoints. So we
build *real* diffusers/transformers classes with toy sizes and random weights, save
them in the same folder layout as the hub repos, and load them back with the same
``from_pretrained`` calls. Outputs are noise, but shapes, configs, tokenizers,
processors and (de)serialisation are the genuine article.

Everything is seeded: building twice with the same seed gives byte-identical
safetensors, so cached models are reproducible across machines.
"""

from __future__ import annotations

import io
import random
import string
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import sentencepiece as spm
import torch
from diffusers import (
    AutoencoderKL,
    DPMSolverMultistepScheduler,
    PixArtAlphaPipeline,
    PixArtTransformer2DModel,
)
from transformers import (
    CLIPImageProcessorPil,
    CLIPVisionConfig,
    LlamaConfig,
    LlamaTokenizer,
    LlavaConfig,
    LlavaForConditionalGeneration,
    LlavaProcessor,
    T5Config,
    T5EncoderModel,
    T5Tokenizer,
)

from tasks.atomic import atomic_dir

TINY_RESOLUTION = 64  # pixels; the VAE downsamples by 8 -> 8x8 latents
_LATENT_SIZE = TINY_RESOLUTION // 8
_T5_MAX_LENGTH = 120  # PixArt-alpha's max_sequence_length
_LLAVA_IMAGE_SIZE, _LLAVA_PATCH = 32, 8  # -> 16 patch tokens (+1 CLS, dropped by "default")

# llava-hf/llava-1.5-7b-hf's template: renders "USER: <image>\n{prompt} ASSISTANT:".
LLAVA_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] != 'system' %}{{ message['role'].upper() + ': ' }}{% endif %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'image') %}"
    "{{ '<image>\n' }}{% endfor %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}"
    "{{ content['text'] + ' ' }}{% endfor %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}"
)

# Words a caption/prompt about simple drawings uses, so the tokenizers split them into
# sensible pieces instead of characters (keeps token counts realistic in tests).
_WORD_TEXT = """a an the and with on in of at by for to from is are this that it its there here
red orange yellow green blue purple pink brown black white grey gray gold silver
circle square triangle rectangle star heart oval diamond line lines dot dots stripe stripes shape shapes
cat dog bird fish horse cow sheep pig rabbit mouse lion tiger bear fox owl duck frog snake turtle
tree flower leaf grass sun moon cloud sky sea river mountain house car boat train ball cup hat
outline outlined background foreground style image picture drawing sketch painting illustration doodle icon
describe description caption simple minimal flat bold thin thick small large big tiny round bright dark
left right top bottom center middle corner edge two three four many one single colorful plain
sitting standing running flying swimming smiling holding drawn filled empty solid
user assistant please short sentence write what you see"""
_WORDS = _WORD_TEXT.split()
_SYLLABLES = [c + v for c in "bcdfghjklmnprstvwz" for v in "aeiou"]


def _corpus(seed: int, n: int = 4000, word_rate: float = 0.85, max_syllables: int = 3) -> list[str]:
    """English-ish training text: mostly caption words (`word_rate`), some pseudo-words so
    the tokenizer also learns generic sub-word pieces, plus every printable ASCII char
    so no character of a prompt maps to <unk>."""
    rng = random.Random(seed)

    def word() -> str:
        if rng.random() < word_rate:
            return rng.choice(_WORDS)
        return "".join(rng.choice(_SYLLABLES) for _ in range(rng.randint(1, max_syllables)))

    sentences = []
    for _ in range(n):
        s = " ".join(word() for _ in range(rng.randint(4, 14)))
        if rng.random() < 0.5:
            s = s.capitalize() + rng.choice(".?!,:")
        if rng.random() < 0.25:  # LLaVA prompts are wrapped in "USER: ... ASSISTANT:"
            s = f"USER: {s} ASSISTANT:"
        sentences.append(s)
    return sentences + [string.printable.strip()]


def train_sentencepiece(
    seed: int,
    vocab_size: int = 1000,
    sentences: int = 4000,
    word_rate: float = 0.85,
    max_syllables: int = 3,
    **options,
) -> bytes:
    """Train a sentencepiece model in memory on `sentences` lines of generated text.

    num_threads=1 keeps it deterministic; hard_vocab_limit=False lets a small corpus stop
    short of vocab_size, not fail. A full-size vocabulary needs more varied text: 32000
    pieces (unigram or BPE) take about 40000 sentences with word_rate=0.6, max_syllables=6."""
    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(_corpus(seed, sentences, word_rate, max_syllables)), model_writer=buf,
        vocab_size=vocab_size, hard_vocab_limit=False, num_threads=1, character_coverage=1.0,
        minloglevel=2, **options,
    )  # fmt: skip
    return buf.getvalue()


def _spm_tokenizer(cls, model_bytes: bytes, filename: str, **kwargs):
    """Load a raw sentencepiece model through the transformers converter, the same
    path the hub's ``spiece.model``/``tokenizer.model`` files take. (The converter
    parses the model with protobuf; without it transformers silently falls back to a
    tiktoken reader and fails with a misleading error, so fail clearly here instead.)"""
    import google.protobuf  # noqa: F401

    with tempfile.TemporaryDirectory() as tmp:
        Path(tmp, filename).write_bytes(model_bytes)
        return cls.from_pretrained(tmp, **kwargs)


def t5_tokenizer(seed: int, vocab_size: int = 1000, **corpus) -> T5Tokenizer:
    """PixArt's spiece.model layout: unigram, <pad>=0, </s>=1, <unk>=2, no BOS, then T5's
    100 extra ids. `corpus`: train_sentencepiece's text settings."""
    spiece = train_sentencepiece(
        seed, vocab_size, model_type="unigram", pad_id=0, eos_id=1, unk_id=2, bos_id=-1, **corpus
    )
    return _spm_tokenizer(T5Tokenizer, spiece, "spiece.model", model_max_length=_T5_MAX_LENGTH)


def llava_tokenizer(seed: int, vocab_size: int = 1000, pad_to_size: bool = False, **corpus) -> LlamaTokenizer:
    """llava-hf's layout: a Llama byte-fallback BPE (<unk>=0, <s>=1, </s>=2, no pad) of
    `vocab_size` pieces, then <image> and <pad> appended in that order; left padding.
    `pad_to_size`: fill with unused tokens up to `vocab_size` where sentencepiece stops short, so
    <image> and <pad> get the ids vocab_size and vocab_size + 1 as in the real tokenizer."""
    tokenizer = _spm_tokenizer(
        LlamaTokenizer,
        train_sentencepiece(seed, vocab_size, model_type="bpe", unk_id=0, bos_id=1, eos_id=2,
                            pad_id=-1, byte_fallback=True, **corpus),
        "tokenizer.model",
        padding_side="left",  # decoder-only generation needs left padding
        add_bos_token=True,  # Llama prepends <s>; the converter leaves it off by default
    )  # fmt: skip
    if pad_to_size and len(tokenizer) < vocab_size:
        tokenizer.add_tokens([f"<unused{i}>" for i in range(len(tokenizer), vocab_size)])
    tokenizer.add_tokens(["<image>"], special_tokens=True)
    tokenizer.add_special_tokens({"pad_token": "<pad>"})
    # Must be stored in tokenizer_config.json: AutoTokenizer deliberately loads llava
    # tokenizers as a generic TokenizersBackend, whose default is right padding.
    tokenizer.padding_side = "left"
    return tokenizer


def llava_processor(tokenizer, image_size: int, patch_size: int) -> LlavaProcessor:
    """llava-1.5's processor: CLIP image preprocessing at `image_size`, the chat template.

    The processor expands each <image> into one token per image feature; these values must
    reproduce the vision tower's count: (image_size / patch_size)^2 patches + 1 CLS, and the
    "default" strategy drops the CLS again, matching the config's image_seq_length."""
    return LlavaProcessor(
        image_processor=CLIPImageProcessorPil(
            size={"shortest_edge": image_size}, crop_size={"height": image_size, "width": image_size}
        ),
        tokenizer=tokenizer, patch_size=patch_size, vision_feature_select_strategy="default",
        num_additional_image_tokens=1, chat_template=LLAVA_CHAT_TEMPLATE,
    )  # fmt: skip


@contextmanager
def _seeded(seed: int) -> Iterator[None]:
    """Seed torch for model init without disturbing the caller's global RNG."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


def build_tiny_pixart(dest: Path, seed: int = 0) -> Path:
    """Write a PixArt-alpha pipeline folder (model_index.json + component subfolders)
    loadable by ``PixArtAlphaPipeline.from_pretrained(dest)`` or per component."""
    dest = Path(dest)
    tokenizer = t5_tokenizer(seed)
    caption_channels = 32  # T5 d_model; PixArt projects captions from this to its inner dim
    with _seeded(seed):
        text_encoder = T5EncoderModel(T5Config(
            vocab_size=len(tokenizer), d_model=caption_channels, d_kv=8, num_heads=4, d_ff=64,
            num_layers=2, relative_attention_num_buckets=8, dropout_rate=0.0,
            feed_forward_proj="gated-gelu",  # t5-v1_1 (the PixArt encoder) uses gated GELU
            pad_token_id=0, eos_token_id=1, decoder_start_token_id=0,
        )).eval()
    with _seeded(seed + 1):
        # inner dim = 2 heads x 16 = 32 >= patch values 2*2*4 = 16. out_channels 8 =
        # noise + learned variance, like the real model (the pipeline splits it off).
        transformer = PixArtTransformer2DModel(
            num_attention_heads=2, attention_head_dim=16, cross_attention_dim=32,
            in_channels=4, out_channels=8, num_layers=2, sample_size=_LATENT_SIZE, patch_size=2,
            norm_type="ada_norm_single", use_additional_conditions=False,
            caption_channels=caption_channels,
        ).eval()
    with _seeded(seed + 2):
        # Four blocks -> three 2x downsamples -> factor 8, as the SD VAE PixArt uses.
        vae = AutoencoderKL(
            down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
            block_out_channels=(8, 8, 16, 16), layers_per_block=1, norm_num_groups=8,
            latent_channels=4, sample_size=TINY_RESOLUTION, scaling_factor=0.18215,
        ).eval()
    # Settings of PixArt-alpha/PixArt-XL-2-1024-MS scheduler/scheduler_config.json.
    scheduler = DPMSolverMultistepScheduler(
        num_train_timesteps=1000, beta_start=0.0001, beta_end=0.02, beta_schedule="linear",
        prediction_type="epsilon", algorithm_type="dpmsolver++", solver_order=2,
        solver_type="midpoint", lower_order_final=True, timestep_spacing="linspace",
    )
    pipe = PixArtAlphaPipeline(tokenizer=tokenizer, text_encoder=text_encoder, vae=vae,
                               transformer=transformer, scheduler=scheduler)
    with atomic_dir(dest) as tmp:
        pipe.save_pretrained(tmp, safe_serialization=True)
    return dest


def build_tiny_llava(dest: Path, seed: int = 0) -> Path:
    """Write a llava-1.5-style folder loadable by ``LlavaForConditionalGeneration`` and
    ``AutoProcessor``/``LlavaProcessor`` ``.from_pretrained(dest)``."""
    dest = Path(dest)
    tokenizer = llava_tokenizer(seed + 10)
    image_token_id = tokenizer.convert_tokens_to_ids("<image>")

    vision_config = CLIPVisionConfig(
        image_size=_LLAVA_IMAGE_SIZE, patch_size=_LLAVA_PATCH, hidden_size=32, intermediate_size=64,
        num_hidden_layers=2, num_attention_heads=4, projection_dim=32,
    )
    text_config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    num_patches = (_LLAVA_IMAGE_SIZE // _LLAVA_PATCH) ** 2
    config = LlavaConfig(
        vision_config=vision_config, text_config=text_config, image_token_index=image_token_id,
        image_seq_length=num_patches, vision_feature_select_strategy="default",
        vision_feature_layer=-2,
    )
    with _seeded(seed):
        model = LlavaForConditionalGeneration(config).eval()
    model.generation_config.pad_token_id = tokenizer.pad_token_id

    processor = llava_processor(tokenizer, _LLAVA_IMAGE_SIZE, _LLAVA_PATCH)  # 16 image tokens
    with atomic_dir(dest) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        processor.save_pretrained(tmp)
    return dest


def ensure_tiny_models(cache_dir: Path) -> dict[str, Path]:
    """Return ``{"pixart": ..., "llava": ...}`` under ``cache_dir``, building only the
    missing ones. Existence implies completeness because builds are atomic."""
    cache_dir = Path(cache_dir)
    paths = {}
    for name, build in (("pixart", build_tiny_pixart), ("llava", build_tiny_llava)):
        path = paths[name] = cache_dir / f"{name}-tiny"
        if not path.exists():
            build(path)
    return paths

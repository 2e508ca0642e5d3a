"""Issue 3: LLaVA-1.5-7B captioning images/s, exactly 128 new tokens, 336 px, one card.

    python bench/recaption_bench.py make-processor DIR   # here, once: a 336 px llava processor
    python bench/recaption_bench.py DIR                  # on the GPU box

The model is llava-hf/llava-1.5-7b-hf's architecture with random weights, built on the GPU in
bf16 with sdpa attention. The processor is tiny_models' sentencepiece tokenizer (no real Llama
tokenizer can be downloaded) with llava-1.5's image settings (336 px, patch 14, 576 image
tokens); prompt token counts are close to the real tokenizer's. min_new_tokens = max_new_tokens
= 128 makes every caption exactly 128 tokens whatever the random weights predict.

Baseline in the same run: plain `model.generate` at batch 1. Project:
tasks.recaption.generate_captions at large batches, dynamic cache, then a static cache.
"""

from __future__ import annotations

import os
import sys
import time

import numpy as np
import torch
from common import DEVICE, TINY, Report, allocated_gib, install_stubs, peak_gib, reset_peak, sync

install_stubs()
NEW_TOKENS = 8 if TINY else 128
IMAGE, PATCH = (32, 8) if TINY else (336, 14)


def make_processor(dest: str) -> None:
    from transformers import AutoProcessor, CLIPImageProcessorPil, LlavaProcessor

    from tasks.model_loading import resolve_model
    from tasks.tiny_models import LLAVA_CHAT_TEMPLATE

    tiny = AutoProcessor.from_pretrained(resolve_model("tiny:llava"))
    processor = LlavaProcessor(
        image_processor=CLIPImageProcessorPil(
            size={"shortest_edge": IMAGE}, crop_size={"height": IMAGE, "width": IMAGE}
        ),
        tokenizer=tiny.tokenizer, patch_size=PATCH, vision_feature_select_strategy="default",
        num_additional_image_tokens=1, chat_template=LLAVA_CHAT_TEMPLATE,
    )  # fmt: skip
    processor.save_pretrained(dest)


def build_llava(processor):
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

    tok = processor.tokenizer
    vision = CLIPVisionConfig(
        hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
        patch_size=PATCH, image_size=IMAGE, hidden_act="quick_gelu", projection_dim=768,
    )  # fmt: skip
    text = LlamaConfig(
        hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
        num_key_value_heads=32, vocab_size=32064, rms_norm_eps=1e-5, max_position_embeddings=4096,
        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
    )  # fmt: skip
    if TINY:
        vision.update(dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4))
        text.update(dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=4))  # fmt: skip
    config = LlavaConfig(
        vision_config=vision, text_config=text, image_token_index=tok.convert_tokens_to_ids("<image>"),
        image_seq_length=(IMAGE // PATCH) ** 2, vision_feature_select_strategy="default",
        vision_feature_layer=-2, projector_hidden_act="gelu",
    )  # fmt: skip
    torch.manual_seed(0)
    with torch.device(DEVICE):
        model = LlavaForConditionalGeneration._from_config(
            config, dtype=torch.bfloat16, attn_implementation="sdpa" if DEVICE.type == "cuda" else None
        )
    model.generation_config.pad_token_id = tok.pad_token_id
    return model.eval().requires_grad_(False)


def images_and_prompts(n: int):
    from PIL import Image

    from configs import MISSION_PROMPT
    from tasks.recaption import build_prompt

    rng = np.random.default_rng(0)
    images = [Image.fromarray(rng.integers(0, 256, (512, 512, 3), dtype=np.uint8)) for _ in range(n)]
    prompts = [
        build_prompt(MISSION_PROMPT, f"a lego city scene number {i} with a police car") for i in range(n)
    ]
    return images, prompts


def floor_images_per_s(batch: int, prompt_tokens: int, params: float, bandwidth=3.0e12, flops=790e12) -> dict:
    """Decode: every step reads the LM weights once plus each sequence's KV cache; prefill is
    compute bound. Returns the floor in images/s and its parts."""
    kv_per_token = 32 * 2 * 4096 * 2  # layers x (K, V) x hidden x bf16 bytes
    lm_bytes = 6.74e9 * 2
    avg_len = prompt_tokens + NEW_TOKENS / 2
    decode_s = NEW_TOKENS * (lm_bytes + batch * avg_len * kv_per_token) / bandwidth
    prefill_s = batch * prompt_tokens * 2 * 6.74e9 / flops
    return {"floor_images_per_s": round(batch / (decode_s + prefill_s), 1), "decode_s": round(decode_s, 2),
            "prefill_s": round(prefill_s, 2), "bytes_per_step_GB": round((lm_bytes + batch * avg_len * kv_per_token) / 1e9, 1)}  # fmt: skip


def run(dest: str) -> None:
    """Baseline plain generate at batch 1, then the project path: recaption.caption_batch with
    RecaptionConfig.static_cache's static_batch=64 (cold: compiles; warm: new images; a partial
    batch of 40 padded to 64; longer prompts, which grow the cache), and the dynamic cache on the
    first batch to compare the greedy tokens. Random weights give degenerate text, so the retry
    is switched off here, and GREEDY gains min_new_tokens (every caption is exactly 128 tokens)."""
    from transformers import AutoProcessor

    from tasks import recaption

    report = Report("recaption")
    processor = AutoProcessor.from_pretrained(dest)
    processor.tokenizer.padding_side = "left"  # what model_loading.load_captioner does
    start = time.time()
    model = build_llava(processor)
    params = sum(p.numel() for p in model.parameters())
    report.add("build", {"params_B": round(params / 1e9, 3), "build_s": round(time.time() - start, 1)})
    exact = {"max_new_tokens": NEW_TOKENS, "min_new_tokens": NEW_TOKENS}
    images, prompts = images_and_prompts(128)
    inputs = processor(images=images[:1], text=[processor.apply_chat_template(
        [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": prompts[0]}]}],
        add_generation_prompt=True)], return_tensors="pt").to(DEVICE, dtype=torch.bfloat16)  # fmt: skip
    prompt_tokens = inputs["input_ids"].shape[1]

    # Baseline: plain generate, batch 1.
    with torch.inference_mode():
        model.generate(**inputs, max_new_tokens=4, do_sample=False)  # warm-up
        sync()
        t = time.perf_counter()
        out = model.generate(**inputs, **exact, do_sample=False)
        sync()
        per_image = time.perf_counter() - t
    report.add("hf_generate_b1", {"images_per_s": round(1 / per_image, 3), "new_tokens": out.shape[1] - prompt_tokens,
                                  "prompt_tokens": prompt_tokens, **floor_images_per_s(1, prompt_tokens, params)})  # fmt: skip

    recaption.GREEDY = {**recaption.GREEDY, "min_new_tokens": NEW_TOKENS}
    recaption.is_degenerate = lambda text: False
    batch = 8 if TINY else 64
    longer = [p.replace("police car", "police car, a fire truck and two yellow taxis on a bridge") for p in prompts]
    runs = [("cold", images[:batch], prompts[:batch]), ("warm", images[batch : 2 * batch], prompts[batch : 2 * batch]),
            (f"partial{batch * 5 // 8}", images[: batch * 5 // 8], prompts[: batch * 5 // 8]), ("longer_prompts", images[:batch], longer[:batch]),
            ("longer_prompts_again", images[batch : 2 * batch], longer[batch : 2 * batch])]  # fmt: skip
    static_captions = {}
    for name, run_images, run_prompts in runs:
        result = {"static_batch": batch, "images": len(run_images), **floor_images_per_s(batch, prompt_tokens, params)}
        reset_peak()
        try:
            sync()
            t = time.perf_counter()
            captions = recaption.caption_batch(model, processor, run_images, run_prompts, NEW_TOKENS, static_batch=batch)
            sync()
            seconds = time.perf_counter() - t
            static_captions[name] = [c for c, _ in captions]
            result.update(images_per_s=round(len(run_images) / seconds, 2), seconds=round(seconds, 2),
                          peak_GiB=peak_gib(), cache_len=getattr(model, "_previous_max_cache_length", None))  # fmt: skip
        except Exception as exc:
            result["error"] = f"{type(exc).__name__}: {str(exc)[-1500:]}"
        report.add(f"project_static_b{batch}_{name}", result)

    # Same images through the dynamic cache: are the greedy captions the same?
    result = {"batch": batch}
    try:
        sync()
        t = time.perf_counter()
        captions = [c for c, _ in recaption.caption_batch(model, processor, images[:batch], prompts[:batch], NEW_TOKENS)]
        sync()
        seconds = time.perf_counter() - t
        same = [a == b for a, b in zip(captions, static_captions.get("cold", []))]
        result.update(images_per_s=round(batch / seconds, 2), seconds=round(seconds, 2),
                      captions_equal_to_static=f"{sum(same)}/{len(same)}",
                      first_difference=next(([a[:160], b[:160]] for a, b in zip(captions, static_captions.get("cold", []))
                                             if a != b), None))  # fmt: skip
    except Exception as exc:
        result["error"] = f"{type(exc).__name__}: {str(exc)[-1500:]}"
    report.add(f"project_dynamic_b{batch}", result)
    report.add("alloc_end_GiB", allocated_gib())


if __name__ == "__main__":
    if sys.argv[1] == "make-processor":
        make_processor(sys.argv[2])
    else:
        run(sys.argv[1])

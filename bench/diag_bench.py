"""Diagnostics for the T5 and LLaVA numbers of bench/RESULTS.md's 2026-11-26 14:04 call (one card).

    python bench/diag_bench.py .carry/llava336

T5: is the eager batch-64 forward GPU-bound or host-bound on this card (profiler: GPU kernel time
vs wall), which host syncs it makes (torch.cuda sync debug mode), and the compiled blocks'
model-only rate. LLaVA: how often greedy captions agree between two dynamic-cache batch sizes
(batch 64 vs its first 32), the reference for the static-vs-dynamic agreement measured before.
"""

from __future__ import annotations

import sys
import time
import warnings

import numpy as np
import torch
from common import DEVICE, Report, build_t5, install_stubs, sync
from embed_bench import N_CAPTIONS, TokenCountTokenizer, model_only

install_stubs()


def gpu_busy(fn) -> dict:
    """Wall time of fn() and the summed duration of the CUDA kernels it ran."""
    from torch.profiler import ProfilerActivity, profile

    sync()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        start = time.perf_counter()
        fn()
        sync()
        wall = time.perf_counter() - start
    kernels = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    busy = sum(e.device_time for e in kernels) / 1e6
    return {"wall_s": round(wall, 3), "gpu_kernel_s": round(busy, 3), "kernels": len(kernels)}


def t5(report: Report) -> None:
    tokenizer = TokenCountTokenizer(N_CAPTIONS)
    texts = [f"cap{i}" for i in range(N_CAPTIONS)]
    order = np.argsort([len(tokenizer.ids[t]) for t in texts], kind="stable")
    batches = [tokenizer([texts[i] for i in order[s : s + 64]], padding="longest", return_tensors="pt").to(DEVICE)
               for s in range(0, len(texts), 64)]  # fmt: skip
    model = build_t5()
    with torch.inference_mode():
        for b in batches[:2]:
            model(**b)
        torch.cuda.set_sync_debug_mode("warn")
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            model(**batches[10])
            sync()
        torch.cuda.set_sync_debug_mode(0)
        syncs = sorted({str(w.message)[:200] for w in caught})
        report.add("t5_syncs_per_forward", {"count": len(caught), "kinds": syncs[:5]})
        report.add("t5_eager_4_batches", gpu_busy(lambda: [model(**b).last_hidden_state for b in batches[8:12]]))
        report.add("t5_model_only_eager", {"captions_per_s": round(N_CAPTIONS / model_only(model, tokenizer, texts, 64), 1)})
        for block in model.encoder.block:
            block.compile(dynamic=True)
        start = time.perf_counter()
        for b in batches[:3]:
            model(**b)
        sync()
        compile_s = time.perf_counter() - start
        report.add("t5_compiled_4_batches", gpu_busy(lambda: [model(**b).last_hidden_state for b in batches[8:12]]))
        report.add("t5_model_only_compiled", {"captions_per_s": round(N_CAPTIONS / model_only(model, tokenizer, texts, 64), 1),
                                              "first_batches_s": round(compile_s, 1)})  # fmt: skip
    del model
    torch.cuda.empty_cache()


def llava(report: Report, dest: str) -> None:
    from recaption_bench import NEW_TOKENS, build_llava, images_and_prompts
    from transformers import AutoProcessor

    from tasks import recaption

    processor = AutoProcessor.from_pretrained(dest)
    processor.tokenizer.padding_side = "left"
    model = build_llava(processor)
    images, prompts = images_and_prompts(64)
    decoding = {**recaption.GREEDY, "min_new_tokens": NEW_TOKENS}
    out = {}
    for batch in (64, 32):
        sync()
        t = time.perf_counter()
        out[batch] = recaption.generate_captions(model, processor, images[:batch], prompts[:batch], NEW_TOKENS, decoding)
        sync()
        report.add(f"llava_dynamic_b{batch}", {"images_per_s": round(batch / (time.perf_counter() - t), 2)})
    same = [a == b for a, b in zip(out[64][:32], out[32])]
    # Where do they first part? The common prefix length in characters, per caption.
    prefix = [next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b))) for a, b in zip(out[64], out[32])]
    report.add("llava_dynamic_b64_vs_b32", {"captions_equal": f"{sum(same)}/32", "common_prefix_chars": prefix,
                                            "example": [out[64][0][:120], out[32][0][:120]]})  # fmt: skip


if __name__ == "__main__":
    report = Report("diag")
    t5(report)
    llava(report, sys.argv[1])

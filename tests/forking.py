"""Child processes for kill and concurrency tests.

Children fork from a fresh forkserver that has imported the heavy libraries but not Oxen: a
plain fork of pytest would copy the threads of Oxen's Rust runtime half-alive and hang there.
"""

from __future__ import annotations

import multiprocessing

PRELOAD = ["torch", "diffusers", "transformers", "peft", "accelerate", "pyarrow.parquet", "PIL.Image", "prefect"]


def fork_context():
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload(PRELOAD)
    return context

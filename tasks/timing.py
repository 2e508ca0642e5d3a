"""Wall-clock phase timings that stages log and return (`evaluate timings: ...`)."""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager


@contextmanager
def timed(timings: dict, name: str) -> Iterator[None]:
    """Add the block's wall seconds to timings[name]; a phase may run in several blocks. On CUDA
    no synchronize is needed where a phase ends by copying its results to the CPU."""
    start = time.perf_counter()
    yield
    timings[name] = timings.get(name, 0.0) + time.perf_counter() - start

"""Atomic writes: a file or folder is either absent, the old version, or complete.

Standard library only, so light processes (benchmarks, tiny-model builds) can use it without
importing torch or peft. Temp names start with a dot and carry the process id, so concurrent
writers of one path never share a temp file; the last rename wins.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


def write_bytes(path: str | Path, data: bytes) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)
    return path


def write_text(path: str | Path, text: str) -> Path:
    return write_bytes(path, text.encode())


@contextmanager
def atomic_dir(dest: str | Path) -> Iterator[Path]:
    """Yield a temp folder beside `dest`; it becomes `dest` only if the block succeeds, so a
    folder that exists is complete. An existing `dest` is moved aside first (os.replace cannot
    overwrite a non-empty folder) and removed after the swap."""
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.tmp-", dir=dest.parent))
    try:
        yield tmp
        if dest.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{dest.name}.old-", dir=dest.parent))
            os.replace(dest, old / dest.name)
            os.replace(tmp, dest)
            shutil.rmtree(old)
        else:
            os.replace(tmp, dest)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)

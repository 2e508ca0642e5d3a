"""Content-addressed, append-only caches of parquet shards.

Each cache is a folder of shards; every row carries a `key` that hashes everything its value
depends on. A stage asks which keys are missing, computes only those, and writes them as one
new shard (atomically, named by the hash of its keys; split so none exceeds `max_shard_bytes`).
Shards are never edited, so two runs sharing a cache cannot corrupt each other, and a killed run
leaves at most a temp file behind. A shard that fails its checks (truncated, wrong version, a
column that does not match its checksum) is moved aside and its rows count as missing, so the
stage that owns the cache recomputes them.

Asking which keys exist reads only the `key` columns; values are read (and checked) only from
the shards that hold the keys asked for, one shard at a time when scanning.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Iterable, Iterator
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from tasks.contracts import ContractError, read_table, write_table

log = logging.getLogger(__name__)

SHARD_OVERHEAD_BYTES = 64 * 1024  # parquet page headers, footer and metadata, with room to spare


def file_sha256(path: str | Path) -> str:
    """sha256 of a file's bytes, read in 1 MiB blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def content_key(**parts: object) -> str:
    """sha256 over a canonical JSON of the named parts: the cache key of one value."""
    canonical = json.dumps(parts, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(canonical.encode()).hexdigest()


class ShardedCache:
    def __init__(self, folder: Path, schema: pa.Schema, max_shard_bytes: int | None = None):
        self.folder = Path(folder)
        self.schema = schema
        self.max_shard_bytes = max_shard_bytes

    def shards(self) -> list[Path]:
        return sorted(self.folder.glob("shard-*.parquet"))

    def _read_shard(self, shard: Path, columns: list[str] | None = None) -> pa.Table | None:
        """The shard's table, or None when it is invalid (then moved aside) or gone."""
        try:
            return read_table(shard, self.schema, columns)
        except ContractError as exc:
            if not shard.exists():
                return None  # another run quarantined it first, or it was never there
            # Keep the bad file for inspection; its keys count as missing and get recomputed.
            quarantined = shard.with_suffix(".corrupt")
            try:
                shard.replace(quarantined)
            except FileNotFoundError:
                return None
            log.warning("cache shard %s is invalid (%s); moved to %s", shard, exc, quarantined.name)
            return None

    def index(self) -> dict[str, Path]:
        """key -> the (first) valid shard holding it; reads only the key columns."""
        found: dict[str, Path] = {}
        for shard in self.shards():
            table = self._read_shard(shard, ["key"])
            for key in [] if table is None else table.column("key").to_pylist():
                found.setdefault(key, shard)
        return found

    def keys(self) -> set[str]:
        return set(self.index())

    def missing(self, keys: Iterable[str]) -> list[str]:
        present = self.keys()
        return sorted({k for k in keys if k not in present})

    def write(self, table: pa.Table) -> list[Path]:
        """Write `table` as one shard, or several when it is larger than max_shard_bytes."""
        paths = []
        for start, stop in _split_by_size(table, self.max_shard_bytes):
            part = table.slice(start, stop - start)
            keys = sorted(part.column("key").to_pylist())
            name = hashlib.sha256("\n".join(keys).encode()).hexdigest()[:24]
            paths.append(write_table(part, self.schema, self.folder / f"shard-{name}.parquet"))
        return paths

    def scan(self, keys: Iterable[str]) -> Iterator[pa.Table]:
        """The rows of `keys` (each once, in no particular order), one table per shard that holds
        some; raises KeyError if any key is absent or was in a shard found invalid on reading."""
        wanted = set(keys)
        index = self.index()
        _raise_if_absent(self.folder, [k for k in wanted if k not in index])
        by_shard = {index[key] for key in wanted}
        for shard in sorted(by_shard):
            table = self._read_shard(shard)
            if table is None:
                continue  # invalid: its keys stay in `wanted` and are reported below
            column = table.column("key").to_pylist()
            first = {}
            for i, key in enumerate(column):
                if key in wanted and key not in first:
                    first[key] = i
            wanted -= first.keys()
            yield table.take(pa.array(sorted(first.values()), type=pa.int64()))
        _raise_if_absent(self.folder, sorted(wanted))

    def read(self, keys: Iterable[str]) -> pa.Table:
        """Rows for `keys`, one per key, in the order given; raises KeyError if any key is absent."""
        wanted = list(keys)
        tables = list(self.scan(wanted))
        table = pa.concat_tables(tables) if tables else self.schema.empty_table()
        index = {key: i for i, key in enumerate(table.column("key").to_pylist())}
        return table.take(pa.array([index[k] for k in wanted], type=pa.int64()))


def _raise_if_absent(folder: Path, absent: list[str]) -> None:
    if absent:
        raise KeyError(f"{folder}: {len(absent)} key(s) not cached, e.g. {absent[0]}")


def _split_by_size(table: pa.Table, max_bytes: int | None) -> list[tuple[int, int]]:
    """[start, stop) row ranges whose payload stays within max_bytes (a larger row goes alone).

    Payload = value bytes plus fixed-width columns; a parquet shard of raw tensors (written
    without compression, see contracts.write_table) is that plus a few KiB of headers, which
    the budget leaves room for.
    """
    if table.num_rows == 0:
        return []
    if max_bytes is None:
        return [(0, table.num_rows)]
    sizes = np.zeros(table.num_rows, dtype=np.int64)
    for column in table.columns:
        if pa.types.is_binary(column.type) or pa.types.is_string(column.type):
            sizes += pc.fill_null(pc.binary_length(column), 0).to_numpy()
        else:
            sizes += max(1, column.type.bit_width // 8)
    budget = max(1, max_bytes - SHARD_OVERHEAD_BYTES)
    ranges, start, total = [], 0, 0
    for row, size in enumerate(sizes.tolist()):
        if row > start and total + size > budget:
            ranges.append((start, row))
            start, total = row, 0
        total += size
    ranges.append((start, table.num_rows))
    return ranges

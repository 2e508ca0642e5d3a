"""Content-addressed, append-only caches of parquet shards.

Each cache is a folder of shards; every row carries a `key` that hashes everything its value
depends on. A stage asks which keys are missing, computes only those, and writes them as one
new shard (atomically, named by the hash of its keys). Shards are never edited, so two runs
sharing a cache cannot corrupt each other, and a killed run leaves at most a temp file behind.
A shard that fails its checks (truncated, wrong version) is moved aside and its rows recomputed.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Iterable
from pathlib import Path

import pyarrow as pa

from tasks.contracts import ContractError, read_table, write_table

log = logging.getLogger(__name__)


def content_key(**parts: object) -> str:
    """sha256 over a canonical JSON of the named parts: the cache key of one value."""
    canonical = json.dumps(parts, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(canonical.encode()).hexdigest()


class ShardedCache:
    def __init__(self, folder: Path, schema: pa.Schema):
        self.folder = Path(folder)
        self.schema = schema

    def shards(self) -> list[Path]:
        return sorted(self.folder.glob("shard-*.parquet"))

    def _read_valid_shards(self, columns: list[str] | None = None) -> list[pa.Table]:
        tables = []
        for shard in self.shards():
            try:
                tables.append(read_table(shard, self.schema, columns))
            except ContractError as exc:
                # Keep the bad file for inspection; its keys count as missing and get recomputed.
                quarantined = shard.with_suffix(".corrupt")
                shard.replace(quarantined)
                log.warning("cache shard %s is invalid (%s); moved to %s", shard, exc, quarantined.name)
        return tables

    def keys(self) -> set[str]:
        return {key for table in self._read_valid_shards(["key"]) for key in table.column("key").to_pylist()}

    def missing(self, keys: Iterable[str]) -> list[str]:
        present = self.keys()
        return sorted({k for k in keys if k not in present})

    def write(self, table: pa.Table) -> Path | None:
        if table.num_rows == 0:
            return None
        keys = sorted(table.column("key").to_pylist())
        name = hashlib.sha256("\n".join(keys).encode()).hexdigest()[:24]
        return write_table(table, self.schema, self.folder / f"shard-{name}.parquet")

    def read(self, keys: Iterable[str]) -> pa.Table:
        """Rows for `keys`, one per key, in the order given; raises if any key is absent."""
        wanted = list(keys)
        tables = self._read_valid_shards()
        if not tables:
            table = self.schema.empty_table()
        else:
            table = pa.concat_tables(tables)
        index: dict[str, int] = {}
        for i, key in enumerate(table.column("key").to_pylist()):
            index.setdefault(key, i)
        absent = [k for k in wanted if k not in index]
        if absent:
            raise KeyError(f"{self.folder}: {len(absent)} key(s) not cached, e.g. {absent[0]}")
        return table.take(pa.array([index[k] for k in wanted], type=pa.int64()))

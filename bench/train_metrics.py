"""Measures of training launches, for the GPU benchmarks: when train_log.jsonl records appear,
peak GPU memory per card, samples/s from the log, and whether two loss curves agree within noise."""

from __future__ import annotations

import json
import math
import os
import subprocess
import threading
import time
from pathlib import Path
from typing import Self

import numpy as np

GAP_LIMIT = 2.0  # moving-average gap at most this many times what noise alone gives (~0.8)
OFFSET_Z_LIMIT = 3.0  # mean loss difference at most this many standard errors


# ---------------------------------------------------------------------------------------------
# Watching a run: its log lines and GPU memory.


class Poller:
    """Calls `poll` every `every` seconds on a thread while the `with` block runs, and once at its end."""

    def __init__(self, poll, every: float):
        self._poll, self._every, self._stop = poll, every, threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def _loop(self) -> None:
        while not self._stop.wait(self._every):
            self._poll()

    def __enter__(self) -> Self:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self._poll()


class LogArrivals:
    """When each train_log.jsonl record appeared: the clock for records that carry no `elapsed`."""

    def __init__(self, path: Path):
        self.path, self.seen, self._offset, self._partial = path, {}, 0, ""

    def poll(self) -> None:
        try:
            with open(self.path) as log:
                if log.seek(0, os.SEEK_END) < self._offset:  # rewritten by tasks.train's resume logic
                    self._offset, self._partial = 0, ""
                log.seek(self._offset)
                chunk, self._offset = log.read(), log.tell()
        except FileNotFoundError:
            return
        now = time.perf_counter()
        *lines, self._partial = (self._partial + chunk).split("\n")
        for line in filter(str.strip, lines):
            self.seen.setdefault(json.loads(line)["step"], now)


def gpu_memory_used() -> dict[int, float]:
    """nvidia-smi's memory.used per GPU index in GiB; {} without nvidia-smi."""
    query = ["nvidia-smi", "--query-gpu=index,memory.used", "--format=csv,noheader,nounits"]
    try:
        out = subprocess.run(query, capture_output=True, text=True, timeout=10, check=True).stdout
    except (OSError, subprocess.SubprocessError):
        return {}
    rows = [line.split(",") for line in out.splitlines() if line.strip()]
    return {int(index): float(mib) / 1024 for index, mib in rows}


class PeakMemory:
    """Highest memory.used per GPU while a run lasts: what its process reserved (CUDA context and
    the caching allocator's pool), i.e. what a card must have free, more than tensor bytes."""

    def __init__(self, gpus: list[int]):
        self.gpus, self.before = gpus, gpu_memory_used()
        self.peak = {i: self.before.get(i, 0.0) for i in gpus}

    def poll(self) -> None:
        for i, used in gpu_memory_used().items():
            if i in self.peak:
                self.peak[i] = max(self.peak[i], used)

    def report(self) -> dict:
        if not self.before:
            return {"gpu_memory": "nvidia-smi unavailable"}
        return {f"gpu{i}_peak_GiB": round(self.peak[i], 2) for i in self.gpus} | {
            f"gpu{i}_before_GiB": round(self.before[i], 2) for i in self.gpus
        }


# ---------------------------------------------------------------------------------------------
# Numbers from the log.


def throughput(records: list[dict], arrivals: dict[int, float], global_batch: int, warmup: int) -> dict:
    """Samples/s over the updates after `warmup`: from the end of update `warmup` to the last's."""
    if len(records) < warmup + 2:
        raise ValueError(
            f"{len(records)} logged updates leave too few to time after {warmup} warm-up updates"
        )
    if all("elapsed" in r for r in records):
        times, source = [float(r["elapsed"]) for r in records], "train_log elapsed"
    else:
        times, source = [arrivals[r["step"]] for r in records], "log line arrival (records lack `elapsed`)"
    steps, span = np.diff(times[warmup - 1 :]), times[-1] - times[warmup - 1]
    return {
        "timing": source, "warmup_updates": warmup, "timed_updates": len(steps), "timed_s": round(span, 3),
        "samples_per_s": round(len(steps) * global_batch / span, 2),
        "median_update_s": round(float(np.median(steps)), 4),
        "median_samples_per_s": round(global_batch / float(np.median(steps)), 2),
        "warmup_s": round(times[warmup - 1] - (0 if "elapsed" in records[0] else times[0]), 2),
    }  # fmt: skip


def moving_average(values: np.ndarray, window: int) -> np.ndarray:
    """Trailing mean over `window` updates; entry i covers updates i .. i + window - 1."""
    return np.convolve(values, np.ones(window) / window, mode="valid")


def compare_losses(curves: dict[str, list[float]], window: int) -> dict:
    """Are two loss curves (name -> loss per update) the same within noise? One update's loss
    scatters (random timesteps and noise), so the moving averages are compared with what that
    scatter alone would make of them:

    sigma         one update's scatter, from consecutive differences (a slow trend cancels):
                  rms(diff(loss)) / sqrt(2), pooled over both curves
    ma_gap_ratio  mean |MA_1 - MA_2| / (sigma * sqrt(2 / window)): ~0.8 for curves that differ only
                  by noise (E|N(0, s)| = 0.8 s), well above 1 for curves that differ
    offset_z      (mean loss 1 - mean loss 2) / (sigma * sqrt(2 / updates)): a systematic offset
                  over the whole run, in standard errors
    """
    (name_1, first), (name_2, second) = ((name, np.asarray(c, dtype=float)) for name, c in curves.items())
    if len(first) != len(second):
        raise ValueError(f"loss curves of {len(first)} and {len(second)} updates cannot be compared")
    sigma = float(np.sqrt(np.mean(np.concatenate([np.diff(first), np.diff(second)]) ** 2) / 2))
    ma_1, ma_2 = moving_average(first, window), moving_average(second, window)
    gap = np.abs(ma_1 - ma_2)
    ratio = float(gap.mean() / (sigma * math.sqrt(2 / window))) if sigma > 0 else math.inf
    offset = first.mean() - second.mean()
    offset_z = float(offset / (sigma * math.sqrt(2 / len(first)))) if sigma > 0 else math.inf

    def rounded(values: np.ndarray) -> list[float]:
        return [round(x, 5) for x in values.tolist()]

    return {
        "updates": len(first), "window": window, "sigma_single_update": round(sigma, 5),
        "mean_abs_ma_gap": round(float(gap.mean()), 5), "max_abs_ma_gap": round(float(gap.max()), 5),
        "ma_gap_ratio": round(ratio, 3), "offset_z": round(offset_z, 3),
        "same_within_noise": bool(ratio <= GAP_LIMIT and abs(offset_z) <= OFFSET_Z_LIMIT),
        "ma_first_last": {name_1: rounded(ma_1[[0, -1]]), name_2: rounded(ma_2[[0, -1]])},
        "losses": {name_1: rounded(first), name_2: rounded(second)},
        "moving_average": {name_1: rounded(ma_1), name_2: rounded(ma_2)},
    }  # fmt: skip

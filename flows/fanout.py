"""Distributed re-captioning and embedding: shards of the dataset fanned out over Dask workers.

With `distributed.engine: dask`, the style run (and the recaption job) calls `fan_out` just
before its recaption stage. It plans shards of the rows that still have a value to compute
(tasks/shards.py), then runs one `fanout-shard` task per shard in a `fanout` subflow whose task
runner is prefect-dask's DaskTaskRunner: a local cluster of `distributed.workers` single-threaded
worker processes (one GPU each), or the running cluster at `distributed.address`. Each shard
writes into the work dir's shared caches; the stages then run as usual, find every value cached,
and produce what a single-process run would: the caches are the merge. Wiring only.
"""

from __future__ import annotations

import contextlib

from prefect import flow, get_run_logger

from configs import DistributedConfig, RunConfig
from flows.gpu import gpu_slot
from tasks.shards import plan_shards_task, shard_task


def dask_runner(cfg: DistributedConfig):
    """prefect-dask's task runner for the run's cluster (an optional dependency: imported here)."""
    try:
        from prefect_dask import DaskTaskRunner
    except ImportError:
        raise RuntimeError(
            "distributed.engine: dask needs prefect-dask: pip install 'pixart-pipeline[distributed]'"
        ) from None
    if cfg.address:
        return DaskTaskRunner(address=cfg.address)
    cluster = {
        "n_workers": cfg.workers,
        "threads_per_worker": 1,  # one shard at a time: its models own the worker's card
        "processes": True,
        "host": "127.0.0.1",
        "dashboard_address": None,
        "memory_limit": 0,  # models, not Dask data, fill a worker: no spilling, pausing or restarts
    }
    return DaskTaskRunner(cluster_kwargs=cluster)


@flow(name="fanout")
def fanout_flow(manifest_path: str, shards: list[dict], config: RunConfig, workdir: str,
                stages: list[str]) -> list[dict]:  # fmt: skip
    """Run every shard on the Dask workers; returns each shard's counts, worker and device."""
    futures = [shard_task.submit(manifest_path, shard, config, workdir, stages) for shard in shards]
    return [future.result() for future in futures]


def fan_out(manifest_path: str, config: RunConfig, workdir: str, stages: list[str]) -> list[dict]:
    """Fill the caches of `stages` for the manifest on Dask workers (nothing with engine 'none', or
    when every value is cached already); call it from a flow, before those stages."""
    if config.distributed.engine == "none":
        return []
    logger = get_run_logger()
    shards = plan_shards_task(manifest_path, config, workdir, stages)
    if not shards:
        logger.info("fan-out: no image has a %s value to compute; no cluster started", "+".join(stages))
        return []
    runner = dask_runner(config.distributed)
    # A local cluster works on this machine's cards: it waits for a slot like any GPU stage.
    with gpu_slot("fanout") if not config.distributed.address else contextlib.nullcontext():
        done = fanout_flow.with_options(task_runner=runner)(manifest_path, shards, config, workdir, stages)
    logger.info(
        "fan-out: %d shards on %d workers generated %d captions, %d texts, %d latents",
        len(done), len({d["worker"] for d in done}), sum(d["captions"] for d in done),
        sum(d["texts"] for d in done), sum(d["latents"] for d in done),
    )  # fmt: skip
    return done

"""Issue 9 item 3: `accelerate launch -m tasks.train` on 1 and 2 GPUs, full-size PixArt-XL-2, 512 px.

    python bench/multi_gpu_train.py --out $OUT/multi_gpu_train.json  # a machine with >= 2 GPUs
    python bench/multi_gpu_train.py --tiny --out /tmp/tiny.json      # CPU, tiny PixArt, 2 gloo processes

Three runs of the project's own training CLI, each `accelerate launch ... -m tasks.train --config C
--train-set S --workdir W --output-dir O` in a subprocess, on one synthetic train set:

    a  1 process,   per-process batch B      the one-GPU baseline
    b  2 processes, per-process batch B      throughput; the target is >= 1.8x a's samples/s
    c  2 processes, per-process batch B/2    a's global batch: StepPlan deals each update's samples
                                             round-robin to the processes, so c trains on a's samples
                                             step for step, and its loss curve should match a's
                                             within noise

The model is a random-weight PixArt-XL-2-512x512 pipeline folder (shared/FULL_SIZE_MODELS.md),
built once on the GPU in bf16: the transformer, the scheduler and a random SD VAE, whose config
training reads for the latent scaling factor. No T5: training never loads it. The train set goes
through the embed stage's own writers (its cache keys, ShardedCache shards of the TEXT_EMBEDDINGS
and LATENTS contracts in bf16, build_train_set, build_train_view), so tasks.train reads it exactly
as in a style run. `--tiny` makes the same three launches on the CPU with `tiny:pixart`.

Samples/s come from train_log.jsonl's `elapsed` (seconds since the process's training loop
started) over the updates after --warmup (the first ones compile the blocks and let DDP build its
buckets); records without `elapsed` fall back to the times their log lines appeared. Peak GPU
memory is nvidia-smi's memory.used per card, polled twice a second during each run.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass
from importlib import metadata
from pathlib import Path

import torch
import yaml
from common import OUT, ROOT, build_pixart, build_vae, install_stubs, pixart_scheduler
from train_metrics import LogArrivals, PeakMemory, Poller, compare_losses, throughput

STUBBED = install_stubs()  # before the stage modules: prefect is missing on the GPU box
if "pyarrow" in STUBBED:
    sys.exit("bench/multi_gpu_train.py writes real parquet caches: it needs pyarrow installed")

import pyarrow as pa

from configs import RunConfig, parse_config
from tasks import contracts
from tasks.atomic import atomic_dir, write_text
from tasks.cache import ShardedCache
from tasks.cached_dataset import build_train_view
from tasks.embed import (
    build_train_set,
    dtype_name,
    latent_key,
    tensor_bytes,
    text_embedding_key,
    text_encoder_id,
    text_encoder_revision,
    vae_id,
)
from tasks.model_loading import resolve_model
from tasks.workdir import WorkDir

CACHE_DTYPE = torch.bfloat16  # what the embed stage stores when it runs on a GPU
ROWS_PER_WRITE = 64  # cache rows per ShardedCache.write: ~60 MB of full-size embeddings
SPEEDUP_TARGET = 1.8
DEFAULTS = {  # full size: the best one-GPU settings of bench/RESULTS.md; tiny: seconds on a CPU
    "full": {"batch": 32, "max_steps": 60, "warmup": 10, "rows": 512, "window": 10, "compile": True},
    "tiny": {"batch": 4, "max_steps": 6, "warmup": 1, "rows": 16, "window": 2, "compile": False},
}


@dataclass(frozen=True)
class Settings:
    tiny: bool
    workdir: Path
    out: Path
    batch: int  # per process, runs a and b
    max_steps: int
    warmup: int  # updates left out of samples/s
    rows: int
    window: int  # moving-average window of the loss comparison
    compile: bool
    accumulation: int = 1
    processes: int = 2  # of runs b and c
    runs: tuple[str, ...] = ("a", "b", "c")
    run_timeout: float = 300
    seed: int = 42

    def __post_init__(self) -> None:
        problems = []
        if self.batch % self.processes:
            problems.append(f"--batch {self.batch} must split evenly over {self.processes} processes (run c)")
        if self.rows % (self.batch * self.processes * self.accumulation):
            # A short last micro-batch would recompile the blocks mid-measurement, and a padded
            # epoch end would give a and c different samples there.
            problems.append(f"--rows {self.rows} must be a multiple of batch x processes x accumulation")
        if not 1 <= self.warmup <= self.max_steps - 2:
            problems.append(f"--warmup {self.warmup} must be in [1, max_steps - 2] to leave updates to time")
        if not 2 <= self.window <= self.max_steps // 2:
            problems.append(f"--window {self.window} must be in [2, max_steps / 2]")
        if unknown := set(self.runs) - {"a", "b", "c"}:
            problems.append(f"--runs: unknown runs {sorted(unknown)}; choose from a, b, c")
        if problems:
            raise ValueError("; ".join(problems))


@dataclass(frozen=True)
class RunSpec:
    name: str
    processes: int
    batch: int  # per process


def run_specs(settings: Settings) -> dict[str, RunSpec]:
    n, b = settings.processes, settings.batch
    every = {"a": RunSpec("a", 1, b), "b": RunSpec("b", n, b), "c": RunSpec("c", n, b // n)}
    return {name: every[name] for name in settings.runs}


# ---------------------------------------------------------------------------------------------
# The model folder and the train set.


def build_random_pipeline(dest: Path, device: str = "cuda") -> Path:
    """The full-size PixArt-XL-2-512x512 folder that training loads, random weights in bf16, built
    on the GPU (a CPU init of 611 M parameters is slow), atomically; kept when present."""
    if (dest / "model_index.json").is_file():
        return dest
    with atomic_dir(dest) as tmp:
        for name, build in (("transformer", build_pixart), ("vae", build_vae)):
            model = build(torch.bfloat16, torch.device(device))
            model.save_pretrained(tmp / name, safe_serialization=True)
            del model
        # The repo's scheduler; training reads its betas through DDPMScheduler.from_config.
        pixart_scheduler().save_pretrained(tmp / "scheduler")
        classes = {"transformer": "PixArtTransformer2DModel", "vae": "AutoencoderKL",
                   "scheduler": "DPMSolverMultistepScheduler",
                   "text_encoder": None, "tokenizer": None}  # fmt: skip
        index = {"_class_name": "PixArtAlphaPipeline"}  # no T5: library None marks a component left out
        index |= {name: ["diffusers" if cls else None, cls] for name, cls in classes.items()}
        (tmp / "model_index.json").write_text(json.dumps(index, indent=2) + "\n")
    torch.cuda.empty_cache()
    return dest


def transformer_shape(pixart: str) -> dict:
    """caption_channels, in_channels and sample_size (latent side) of the pipeline's transformer."""
    path = Path(resolve_model(pixart)) / "transformer" / "config.json"
    config = json.loads(path.read_text())
    return {k: config[k] for k in ("caption_channels", "in_channels", "sample_size")}


def write_synthetic_train_set(
    config: RunConfig, workdir: WorkDir, run_dir: Path, rows: int, seed: int
) -> Path:
    """<run_dir>/train_set.parquet and its training view over `rows` random samples; kept when present."""
    train_set = run_dir / "train_set.parquet"
    if not train_set.is_file():
        write_synthetic_caches(config, workdir, run_dir, rows, seed)
    # As the embed stage does: the memory-mapped view beside the train set (a no-op when current).
    max_length = config.embed.max_length
    build_train_view(train_set, workdir.text_cache, workdir.latent_cache, max_length, run_dir / "train_view")
    return train_set


def write_synthetic_caches(config: RunConfig, workdir: WorkDir, run_dir: Path, rows: int, seed: int) -> Path:
    """`rows` random samples in the work dir's text and latent caches under the embed stage's keys,
    then <run_dir>/train_set.parquet pointing at them (written last, atomically)."""
    shape, resolution = transformer_shape(config.models.pixart), config.embed.resolution
    if shape["sample_size"] * 8 != resolution:
        raise ValueError(f"{config.models.pixart}: transformer sample_size is not embed.resolution / 8")
    shard_bytes = config.embed.max_shard_mb << 20
    text_cache = ShardedCache(workdir.text_cache, contracts.TEXT_EMBEDDINGS, shard_bytes)
    latent_cache = ShardedCache(workdir.latent_cache, contracts.LATENTS, shard_bytes)
    generator = torch.Generator().manual_seed(seed)
    samples, texts, latents = [], [], []
    for i in range(rows):
        sample, text, latent = synthetic_sample(i, config, shape, generator)
        samples.append(sample)
        texts.append(text)
        latents.append(latent)
        if len(texts) == ROWS_PER_WRITE or i == rows - 1:
            text_cache.write(pa.Table.from_pylist(texts, schema=contracts.TEXT_EMBEDDINGS))
            latent_cache.write(pa.Table.from_pylist(latents, schema=contracts.LATENTS))
            texts, latents = [], []
    text_keys = [s["text_key"] for s in samples]
    return build_train_set(samples, text_keys, [(s["latent_key"], None) for s in samples], run_dir)


def synthetic_sample(i: int, config: RunConfig, shape: dict, generator: torch.Generator) -> tuple[dict, ...]:
    """(train-set row, TEXT_EMBEDDINGS row, LATENTS row) of sample `i`, keyed as the embed stage keys them.

    The caption is a random T5-shaped embedding of 58-100 % of max_length valid tokens (a 60-word
    caption is ~73 of 120 T5 tokens); the latent a random posterior mean at the SD VAE's scale
    with small stds; both stored in bf16."""
    models, max_length, resolution = config.models, config.embed.max_length, config.embed.resolution
    channels, side, dtype = shape["in_channels"], shape["sample_size"], dtype_name(CACHE_DTYPE)
    caption = f"synthetic caption {i:05d}"
    image_id = hashlib.sha256(f"synthetic image {i}".encode()).hexdigest()
    length = int(torch.randint(round(0.58 * max_length), max_length + 1, (), generator=generator))
    embedding = torch.randn(length, shape["caption_channels"], generator=generator) * 0.15
    mean = torch.randn(channels, side, side, generator=generator) * 5.0
    std = torch.exp(torch.randn(channels, side, side, generator=generator) * 0.5 - 3.0)
    encoder, encoder_revision = text_encoder_id(models), text_encoder_revision(models)
    text_key = text_embedding_key(caption, encoder, max_length, dtype, encoder_revision)
    size = (resolution, resolution)
    plain_key = latent_key(image_id, vae_id(models), size, False, dtype, models.pixart_revision)
    text = {"key": text_key, "text": caption, "length": length, "dim": embedding.shape[1], "dtype": dtype,
            "embedding": tensor_bytes(embedding.to(CACHE_DTYPE))}  # fmt: skip
    latent = {"key": plain_key, "image_id": image_id, "flipped": False, "channels": channels, "height": side,
              "width": side, "dtype": dtype, "mean": tensor_bytes(mean.to(CACHE_DTYPE)),
              "std": tensor_bytes(std.to(CACHE_DTYPE))}  # fmt: skip
    sample = {"image_id": image_id, "caption": caption, "text_key": text_key, "latent_key": plain_key}
    return sample, text, latent


# ---------------------------------------------------------------------------------------------
# Configs and launches.


def run_config(settings: Settings, pixart: str, resolution: int, max_length: int, batch: int) -> RunConfig:
    """The best one-GPU settings of bench/RESULTS.md (rank 16, the reference's targets, compiled
    blocks, no checkpointing); a constant learning rate, so late updates still move the loss."""
    gpu = not settings.tiny
    return parse_config({
        "run_name": "multi-gpu-bench", "device": "cuda" if gpu else "cpu",
        "dtype": "bfloat16" if gpu else "float32",
        "dataset": {"repo": "unused"},  # training reads only the caches
        "models": {"pixart": pixart}, "embed": {"resolution": resolution, "max_length": max_length},
        "train": {"rank": 16, "target_modules": "reference", "learning_rate": 3e-4,
                  "lr_scheduler": "constant", "batch_size": batch,
                  "gradient_accumulation_steps": settings.accumulation, "max_steps": settings.max_steps,
                  "gradient_checkpointing": False, "compile": settings.compile,
                  "mixed_precision": "bf16" if gpu else "no", "use_8bit_adam": False, "seed": settings.seed,
                  "checkpointing_steps": settings.max_steps + 1},  # no checkpoint inside the timed updates
    }, source="bench/multi_gpu_train.py")  # fmt: skip


def write_yaml(config: RunConfig, path: Path) -> Path:
    return write_text(path, yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False))


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def launch_command(spec: RunSpec, mixed_precision: str, paths: dict[str, Path], gpu: bool) -> list[str]:
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", str(spec.processes),
           "--num_machines", "1", "--mixed_precision", mixed_precision, "--dynamo_backend", "no"]  # fmt: skip
    if spec.processes > 1:
        # The torchrun launcher, one process per rank: NCCL on GPUs, gloo on a CPU-only host. With
        # --cpu, accelerate picks its simple launcher, which starts one process whatever the count.
        cmd += ["--multi_gpu", "--main_process_port", str(free_port())]
    elif not gpu:
        cmd += ["--cpu"]
    if gpu:
        cmd += ["--gpu_ids", ",".join(str(i) for i in range(spec.processes))]
    cmd += ["-m", "tasks.train", "--config", paths["config"], "--train-set", paths["train_set"],
            "--workdir", paths["workdir"], "--output-dir", paths["output"]]  # fmt: skip
    return [str(part) for part in cmd]


def subprocess_env(workdir: Path, tiny: bool) -> dict[str, str]:
    """This process's environment (NCCL settings included), with the repo importable, and a
    stand-in for prefect where it is missing (tasks.train uses only its `task` and `get_run_logger`)."""
    paths = [str(ROOT)]
    if "prefect" in STUBBED:
        stub = workdir / "stubs" / "prefect" / "__init__.py"
        stub.parent.mkdir(parents=True, exist_ok=True)
        stub.write_text(
            "import logging\n\n\ndef task(*args, **kwargs):\n"
            "    return args[0] if args and callable(args[0]) else (lambda fn: fn)\n\n\n"
            "def get_run_logger():\n    return logging.getLogger('prefect-stub')\n"
        )
        paths.insert(0, str(stub.parent.parent))
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    env["PYTHONPATH"] = os.pathsep.join(paths + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
    if tiny:
        env["OMP_NUM_THREADS"] = "1"  # tiny matmuls on shared cores only lose from intra-op threads
    return env


def run_training(
    cmd: list[str], env: dict, output_dir: Path, log_path: Path, gpus: list[int], timeout: float
):
    """(train_log records, arrival time per step, wall seconds, memory report) of one launch."""
    shutil.rmtree(output_dir, ignore_errors=True)  # a finished folder would make the run a no-op (done.json)
    output_dir.mkdir(parents=True)
    arrivals, memory = LogArrivals(output_dir / "train_log.jsonl"), PeakMemory(gpus) if gpus else None
    start = time.perf_counter()
    with (
        open(log_path, "w") as log,
        Poller(arrivals.poll, 0.02),
        Poller(memory.poll, 0.5) if memory else nullcontext(),
    ):
        log.write(" ".join(cmd) + "\n\n")
        log.flush()
        # Its own process group, so a timeout stops the launcher and every rank it started.
        proc = subprocess.Popen(
            cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )
        try:
            status = proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            status = f"killed after {timeout:.0f} s"
    wall = time.perf_counter() - start
    if status != 0:
        tail = "".join(log_path.read_text().splitlines(keepends=True)[-30:])
        raise RuntimeError(f"{log_path.name}: exit status {status}; last lines:\n{tail}")
    records = [json.loads(line) for line in (output_dir / "train_log.jsonl").read_text().splitlines() if line]
    return records, arrivals.seen, wall, memory.report() if memory else {}


def same_samples(
    rows: int, first: RunSpec, second: RunSpec, accumulation: int, seed: int, steps: int
) -> bool:
    """Whether each update of `first` trains on the samples (and flips) of `second`'s, all processes
    together, as dealt by the StepPlan that tasks.train builds for each launch."""
    from tasks.train import StepPlan

    def seen(spec: RunSpec, step: int) -> list[tuple[int, bool]]:
        plan, pairs = StepPlan(rows, spec.batch, accumulation, seed, spec.processes), []
        for rank in range(spec.processes):
            for index, flip in plan.batches(step, rank):
                pairs += zip(index.tolist(), flip.tolist(), strict=True)
        return sorted(pairs)

    return all(seen(first, step) == seen(second, step) for step in range(steps))


# ---------------------------------------------------------------------------------------------
# The benchmark.


def _version(package: str) -> str | None:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return None


class Report:
    """The result JSON, rewritten after every entry (a killed bench keeps what it had)."""

    def __init__(self, settings: Settings):
        self.path = settings.out
        versions = {name: _version(name) for name in ("torch", "accelerate", "diffusers", "peft")}
        gpus = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
        self.data = {"date": time.strftime("%Y-%m-%d %H:%M:%S"), "versions": versions, "gpus": gpus,
                     "settings": asdict(settings), "results": {}}  # fmt: skip

    def add(self, key: str, value: dict) -> None:
        self.data["results"][key] = value
        shown = {k: v for k, v in value.items() if k not in ("losses", "moving_average")}
        print("RESULT " + json.dumps({"result": key, **shown}, default=str), flush=True)
        write_text(self.path, json.dumps(self.data, indent=1, default=str) + "\n")


def measure(spec: RunSpec, settings: Settings, config: RunConfig, train_set: Path, env: dict):
    """(report entry, train_log records) of one launch; the entry holds `error` if it failed."""
    workdir, log_path = settings.workdir, settings.out.with_name(f"{settings.out.stem}_{spec.name}.log")
    paths = {"config": write_yaml(config, workdir / "configs" / f"{spec.name}.yaml"), "train_set": train_set,
             "workdir": workdir, "output": workdir / "train" / spec.name}  # fmt: skip
    global_batch = spec.batch * spec.processes * settings.accumulation
    entry = {"processes": spec.processes, "batch_per_process": spec.batch, "global_batch": global_batch,
             "log": str(log_path)}  # fmt: skip
    gpus = [] if settings.tiny else list(range(spec.processes))
    cmd = launch_command(spec, config.train.mixed_precision, paths, gpu=not settings.tiny)
    try:
        records, arrivals, wall, memory = run_training(cmd, env, paths["output"], log_path, gpus,
                                                       settings.run_timeout)  # fmt: skip
        entry |= throughput(records, arrivals, global_batch, settings.warmup)
    except (RuntimeError, ValueError, OSError, KeyError) as exc:
        return entry | {"error": str(exc)}, []
    epochs = [r["epoch"] for r in records]
    return entry | {"wall_s": round(wall, 1), "updates": len(records), "epochs": epochs,
                    "final_loss": records[-1]["loss"], **memory}, records  # fmt: skip


def prepare(settings: Settings, report: Report) -> tuple[str, int, int, Path]:
    """(models.pixart, resolution, max_length, train_set.parquet) shared by the runs."""
    start = time.perf_counter()
    if settings.tiny:
        pixart, max_length = "tiny:pixart", 16
    else:
        folder = build_random_pipeline(settings.workdir / "models" / "pixart-xl-2-512-random")
        pixart, max_length = str(folder), 120
    resolution = transformer_shape(pixart)["sample_size"] * 8
    run_dir = settings.workdir / "runs" / f"synthetic-{settings.rows}-seed{settings.seed}"
    config = run_config(settings, pixart, resolution, max_length, settings.batch)
    train_set = write_synthetic_train_set(
        config, WorkDir(settings.workdir), run_dir, settings.rows, settings.seed
    )
    seconds = round(time.perf_counter() - start, 1)
    report.add("setup", {"pixart": pixart, "train_set": str(train_set), "rows": settings.rows,
                         "resolution": resolution, "seconds": seconds})  # fmt: skip
    return pixart, resolution, max_length, train_set


def run_bench(settings: Settings) -> dict:
    if not settings.tiny and torch.cuda.device_count() < settings.processes:
        sys.exit(
            f"needs {settings.processes} GPUs, torch sees {torch.cuda.device_count()}; --tiny runs on a CPU"
        )
    report, start = Report(settings), time.perf_counter()
    pixart, resolution, max_length, train_set = prepare(settings, report)
    env, specs, entries, logs = subprocess_env(settings.workdir, settings.tiny), run_specs(settings), {}, {}
    for name, spec in specs.items():
        config = run_config(settings, pixart, resolution, max_length, spec.batch)
        entries[name], logs[name] = measure(spec, settings, config, train_set, env)
        report.add(f"run_{name}", entries[name])
    done = {name for name, records in logs.items() if records}
    if {"a", "b"} <= done:
        speedup = entries["b"]["samples_per_s"] / entries["a"]["samples_per_s"]
        report.add("speedup", {"b_over_a": round(speedup, 3), "target": SPEEDUP_TARGET,
                               "met": speedup >= SPEEDUP_TARGET,
                               "scaling_efficiency": round(speedup / settings.processes, 3)})  # fmt: skip
    if {"a", "c"} <= done:
        comparison = compare_losses({name: [r["loss"] for r in logs[name]] for name in "ac"}, settings.window)
        comparison["same_samples"] = same_samples(
            settings.rows, specs["a"], specs["c"], settings.accumulation, settings.seed, settings.max_steps
        )
        comparison["same_epochs"] = entries["a"]["epochs"] == entries["c"]["epochs"]
        report.add("loss_a_vs_c", comparison)
    print(f"done in {time.perf_counter() - start:.0f} s: {settings.out}", flush=True)
    if failed := sorted(set(specs) - done):
        sys.exit(f"runs {failed} failed; their logs: {[entries[name]['log'] for name in failed]}")
    return report.data


def parse_settings(argv: list[str] | None = None) -> Settings:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add = parser.add_argument
    add("--tiny", action="store_true", help="CPU, tiny:pixart, a few updates: proves the script.")
    add("--out", type=Path, default=OUT / "multi_gpu_train.json", help="Result JSON; run logs go beside it.")
    add("--workdir", type=Path, help="Models, caches, runs (default $BENCH_TMP/multi_gpu_train[_tiny]).")
    add("--batch", type=int, help="Per-process batch of runs a and b (32; tiny 4).")
    add("--max-steps", type=int, help="Optimizer updates per run (60; tiny 6).")
    add("--warmup", type=int, help="Updates left out of samples/s (10; tiny 1).")
    add("--rows", type=int, help="Synthetic training samples (512; tiny 16).")
    add("--window", type=int, help="Moving-average window of the loss comparison (10; tiny 2).")
    add("--compile", action=argparse.BooleanOptionalAction, help="train.compile (default on; tiny off).")
    add("--accumulation", type=int, default=1, help="Gradient accumulation steps.")
    add("--processes", type=int, default=2, help="Processes (GPUs) of runs b and c.")
    add("--runs", default="a,b,c", help="Which runs, comma-separated.")
    add("--run-timeout", type=float, default=300, help="Seconds one launch may take.")
    args = parser.parse_args(argv)
    chosen = {k: v for k, v in vars(args).items() if k in DEFAULTS["full"] and v is not None}
    default_dir = Path(os.environ.get("BENCH_TMP", "/tmp/bench")) / f"multi_gpu_train{'_tiny' * args.tiny}"
    try:
        return Settings(
            tiny=args.tiny, workdir=(args.workdir or default_dir).resolve(), out=args.out.resolve(),
            **(DEFAULTS["tiny" if args.tiny else "full"] | chosen), accumulation=args.accumulation,
            processes=args.processes, runs=tuple(r.strip() for r in args.runs.split(",") if r.strip()),
            run_timeout=args.run_timeout,
        )  # fmt: skip
    except ValueError as exc:
        parser.error(str(exc))


if __name__ == "__main__":
    run_bench(parse_settings())

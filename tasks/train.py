"""Train stage: a PEFT LoRA on PixArt-alpha's transformer, from the embed stage's caches.

Reads train_set.parquet (contracts.TRAIN_SET) through its memory-mapped training view
(tasks/cached_dataset.py): the embed stage's <run>/train_view when current, else one built from the
text-embedding and latent caches into <output_dir>/../train_view/<key> and shared by every run on
the same train set. T5 and the VAE are never loaded here. Each optimizer update:

  latents = (mean + std * randn) * vae.scaling_factor     a fresh sample of the cached posterior
  noisy   = DDPM.add_noise(latents, noise, t)              t uniform in [0, num_train_timesteps)
  loss    = MSE(transformer(noisy, t, caption)[:, :C], noise)   epsilon prediction

Learned sigma: PixArt's transformer outputs 2*C channels, the noise (epsilon) and a learned
variance. Like PixArt's own LoRA script we train on the epsilon half only and ignore the variance
channels (no variational-bound term): the LoRA leaves the base model's variance head as it was, and
the samplers we use (DPM-Solver, DDIM) discard those channels anyway.

Determinism and resume: the samples of update `s` are a pure function of (seed, epoch), and every
random draw in it (posterior sample, noise, timesteps, LoRA dropout) comes from torch.manual_seed of
(seed, s, process). A checkpoint therefore needs only the LoRA weights, the optimizer and
lr-scheduler state and `s`: a resumed run continues at the exact batch and reproduces the same
adapter. Gradient accumulation is done here (not by Accelerator.accumulate) so an update never
straddles an epoch boundary and the accumulated gradient is the mean over the update's samples.

    <output_dir>/checkpoints/checkpoint-<step>/   lora.safetensors + state.pt (atomic, pruned)
    <output_dir>/adapter/                         the adapter, see tasks/lora.py for its format
    <output_dir>/train_log.jsonl                  one {step, epoch, loss, lr, grad_norm, elapsed} per update
    <output_dir>/done.json                        written last; its presence makes a re-run a no-op

Multi-GPU: `accelerate launch -m tasks.train --config X --train-set ... --output-dir ...`.
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import time
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field
from functools import cached_property
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from accelerate import Accelerator, PartialState
from accelerate.utils import set_seed
from diffusers import AutoencoderKL
from diffusers.optimization import get_scheduler
from peft import LoraConfig, inject_adapter_in_model
from prefect import get_run_logger, task
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from configs import RunConfig, TrainConfig, load_config
from tasks.atomic import atomic_dir, write_text
from tasks.buckets import bucket_batches
from tasks.cache import content_key
from tasks.cached_dataset import CachedTrainView, DeviceTrainView, build_train_view, is_current, view_key
from tasks.contracts import TRAIN_SET, read_table
from tasks.lora import ADAPTER_NAME, save_adapter
from tasks.model_loading import (
    DTYPES,
    load_noise_scheduler,
    load_transformer,
    pick_device,
    release,
    resolve_model,
)  # fmt: skip
from tasks.workdir import WorkDir

Progress = Callable[[dict, int], None]  # (log record, total steps), called after every update


@dataclass
class TrainResult:
    adapter_dir: Path
    steps: int
    first_loss: float  # mean loss of the first k updates, k = clamp(steps // 5, 1, 10): one update's
    final_loss: float  # loss mostly reflects its random timesteps, so single values are noisy
    resumed_from: int | None  # checkpoint step this run continued from, if any


# ---------------------------------------------------------------------------------------------
# Data: the training view, and which samples each update sees.

TrainData = CachedTrainView | DeviceTrainView
RESIDENT_FRACTION = 0.25  # a view up to this share of the GPU's free memory is copied onto it


def open_train_view(
    train_set_path: Path, text_cache: Path, latent_cache: Path, max_length: int, output_dir: Path, accelerator
) -> CachedTrainView:
    """The train set's view: the embed stage's (<run>/train_view) when current, else one under
    <output_dir>/../train_view/<key>, reused by every training run on this train set. The main
    process builds it; the others wait, then open it (build_train_view's lock also keeps
    separate runs that start at once from building it twice)."""
    key = view_key(read_table(Path(train_set_path), TRAIN_SET), max_length)
    folder = Path(train_set_path).parent / "train_view"
    if not is_current(folder, key):
        folder = Path(output_dir).parent / "train_view" / key[:16]
        if accelerator.is_main_process:
            build_train_view(train_set_path, text_cache, latent_cache, max_length, folder)
    accelerator.wait_for_everyone()
    return CachedTrainView(folder)


def serve_view(view: CachedTrainView, device: torch.device) -> TrainData:
    """On a GPU with room to spare the whole view moves there once and batches are gathered on
    the device (host work per step: finding the rows). Otherwise, and always on the CPU, where
    the mapped pages already are host memory, each batch is gathered from the mapped pages."""
    if device.type == "cuda" and view.nbytes < RESIDENT_FRACTION * torch.cuda.mem_get_info(device)[0]:
        return DeviceTrainView(view, device)
    return view


@dataclass(frozen=True)
class StepPlan:
    """Batches as a pure function of (seed, epoch, step, rank): resume needs only the step number.

    One latent size (no buckets): each epoch is a permutation from (seed, epoch), padded by
    wrapping so every process gets the same number of samples, dealt round-robin to processes
    and cut into micro-batches. Several sizes (`latent_sizes`, one per sample, with buckets on):
    the epoch's single-size micro-batches come from tasks.buckets.bucket_batches, padded by
    wrapping to a multiple of the process count and dealt round-robin. Either way `accumulation`
    micro-batches (fewer at the epoch's end, as many on every process) make one optimizer update.
    """

    num_samples: int
    batch_size: int
    accumulation: int
    seed: int
    num_processes: int = 1
    latent_sizes: tuple[str, ...] | None = None
    _epoch_cache: dict = field(default_factory=dict, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if self.latent_sizes is not None and len(self.latent_sizes) != self.num_samples:
            raise ValueError(
                f"latent_sizes has {len(self.latent_sizes)} entries for {self.num_samples} samples"
            )

    @cached_property  # cached: per-step calls must not scan every sample's size
    def bucketed(self) -> bool:
        return self.latent_sizes is not None and len(set(self.latent_sizes)) > 1

    @property
    def samples_per_process(self) -> int:
        return math.ceil(self.num_samples / self.num_processes)

    @cached_property
    def micro_batches_per_process(self) -> int:
        if not self.bucketed:
            return math.ceil(self.samples_per_process / self.batch_size)
        _, counts = np.unique(self.latent_sizes, return_counts=True)
        micro_batches = sum(math.ceil(count / self.batch_size) for count in counts.tolist())
        return math.ceil(micro_batches / self.num_processes)

    @property
    def steps_per_epoch(self) -> int:
        return math.ceil(self.micro_batches_per_process / self.accumulation)

    def total_steps(self, train: TrainConfig) -> int:
        return train.max_steps or train.epochs * self.steps_per_epoch

    def batches(self, step: int, rank: int = 0) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """[(sample indices, flip flags)] for each micro-batch of update `step` (0-based) on `rank`."""
        epoch, k = divmod(step, self.steps_per_epoch)
        per_process, flips = self._epoch(epoch)
        chosen = per_process[rank][k * self.accumulation : (k + 1) * self.accumulation]
        return [(torch.from_numpy(index), torch.from_numpy(flips[index])) for index in chosen]

    def batch_shapes(self) -> set[tuple[str | None, int]]:
        """(latent size, micro-batch length) of every micro-batch an epoch holds, on any process.
        Epochs differ only in order, so each pair is one shape the compiled blocks meet."""
        per_process, _ = self._epoch(0)
        return {
            (self.latent_sizes[index[0]] if self.latent_sizes else None, len(index))
            for batches in per_process
            for index in batches
        }

    def _epoch(self, epoch: int) -> tuple[list[list[np.ndarray]], np.ndarray]:
        """Each process's micro-batches of the epoch, and one flip flag per sample. The latest
        epoch is kept: steps ask for it in turn, and building it is O(samples)."""
        if epoch not in self._epoch_cache:
            self._epoch_cache.clear()
            self._epoch_cache[epoch] = (
                self._bucketed_epoch(epoch) if self.bucketed else self._plain_epoch(epoch)
            )
        return self._epoch_cache[epoch]

    def _plain_epoch(self, epoch: int) -> tuple[list[list[np.ndarray]], np.ndarray]:
        rng = np.random.default_rng([self.seed, epoch])
        order = rng.permutation(self.num_samples)
        flips = rng.random(self.num_samples) < 0.5  # per sample, so independent of the process count
        padded, size = np.resize(order, self.samples_per_process * self.num_processes), self.batch_size
        dealt = [padded[rank :: self.num_processes] for rank in range(self.num_processes)]
        return [[rows[i : i + size] for i in range(0, len(rows), size)] for rows in dealt], flips

    def _bucketed_epoch(self, epoch: int) -> tuple[list[list[np.ndarray]], np.ndarray]:
        batches = bucket_batches(self.latent_sizes, self.batch_size, self.seed, epoch)
        flips = np.random.default_rng([self.seed, epoch, 1]).random(self.num_samples) < 0.5
        wrapped = [
            np.asarray(batches[i % len(batches)], dtype=np.int64)
            for i in range(self.micro_batches_per_process * self.num_processes)
        ]
        return [wrapped[rank :: self.num_processes] for rank in range(self.num_processes)], flips


def _step_seed(seed: int, step: int, rank: int) -> int:
    return int(np.random.SeedSequence([seed, step, rank]).generate_state(1)[0])


# ---------------------------------------------------------------------------------------------
# Model, optimizer, loss.


def lora_transformer(config: RunConfig, device: torch.device) -> torch.nn.Module:
    """The frozen transformer in config.dtype with a trainable float32 LoRA injected (seed first)."""
    train = config.train
    transformer = load_transformer(config.models, DTYPES[config.dtype], device).requires_grad_(False)
    lora = LoraConfig(
        r=train.rank,
        lora_alpha=train.resolved_alpha,
        lora_dropout=train.dropout,
        target_modules=train.resolved_targets,
        init_lora_weights="gaussian",
    )
    inject_adapter_in_model(lora, transformer, adapter_name=ADAPTER_NAME)  # suffix-matches the targets
    for param in transformer.parameters():
        if param.requires_grad:
            param.data = param.data.float()  # optimizer state and updates in full precision
    if train.gradient_checkpointing:
        transformer.enable_gradient_checkpointing()
    if train.compile:
        compile_blocks(transformer)
    return transformer.train()


def compile_blocks(transformer: torch.nn.Module, backend: str = "inductor") -> None:
    """torch.compile each transformer block in place, LoRA layers included.

    An eager step launches ~11k small kernels from Python and the GPU waits on the CPU; a
    compiled block fuses its norms, modulation, LoRA casts and adds into a few kernels (on an
    H100: 2.2x faster at batch 2, 2x at batch 16; bench/RESULTS.md). All 28 blocks share one
    compiled graph (same code, parameters passed as inputs): the first step compiles (15-25 s),
    so does the first smaller batch at an epoch's end and each bucket size (allow_recompiles
    makes room for them all), and later steps reuse them. Gradient checkpointing wraps the
    compiled block unchanged.
    """
    for block in transformer.transformer_blocks:
        block.compile(backend=backend, dynamic=False)


def allow_recompiles(batch_shapes: int) -> int:
    """Raise dynamo's per-function recompile limit so every batch shape of the run compiles.

    Each (latent size, batch length) pair compiles the blocks once, and the first block, whose
    input needs no gradient, is a second graph. Past the limit (8 by default) dynamo runs the
    rest eager, several times slower and with only a log warning; with buckets that happens
    from three sizes whose last batches are short. Returns the limit now in force.
    """
    config = torch._dynamo.config
    name = "recompile_limit" if hasattr(config, "recompile_limit") else "cache_size_limit"
    setattr(config, name, max(getattr(config, name), 2 * batch_shapes + 2))
    return getattr(config, name)


def build_optimizer(params: list[torch.nn.Parameter], train: TrainConfig) -> torch.optim.Optimizer:
    kwargs = {"lr": train.learning_rate, "weight_decay": train.weight_decay, "eps": train.adam_epsilon}
    if not train.use_8bit_adam:
        # On the GPU one fused kernel updates every LoRA tensor (~600 of them) at once.
        fused = all(p.is_cuda for p in params) or None
        return torch.optim.AdamW(params, fused=fused, **kwargs)
    try:
        import bitsandbytes as bnb
    except ImportError:
        raise ImportError(
            "train.use_8bit_adam needs bitsandbytes: pip install 'pixart-pipeline[gpu]'"
        ) from None
    return bnb.optim.AdamW8bit(params, **kwargs)


def diffusion_loss(transformer, batch: dict, noise_scheduler, scaling_factor: float, dtype: torch.dtype):
    embeds, mask, mean, std = batch["embeds"], batch["mask"], batch["mean"], batch["std"]
    latents = (mean + std * torch.randn_like(mean)) * scaling_factor
    noise = torch.randn_like(latents)
    steps = noise_scheduler.config.num_train_timesteps
    timesteps = torch.randint(0, steps, (latents.shape[0],), device=latents.device)
    noisy = noise_scheduler.add_noise(latents, noise, timesteps)
    prediction = transformer(
        noisy.to(dtype),
        encoder_hidden_states=embeds.to(dtype),
        encoder_attention_mask=mask,
        timestep=timesteps,
        added_cond_kwargs={"resolution": None, "aspect_ratio": None},
        return_dict=False,
    )[0]
    epsilon = prediction[:, : latents.shape[1]]  # the rest is the learned variance (see module doc)
    return F.mse_loss(epsilon.float(), noise.float())


# ---------------------------------------------------------------------------------------------
# Checkpoints and the log.


def _trainable_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().to("cpu").contiguous() for n, p in model.named_parameters() if p.requires_grad}


def save_checkpoint(root: Path, step: int, model, optimizer, lr_scheduler, limit: int | None) -> Path:
    """checkpoint-<step>/ written atomically, then the oldest beyond `limit` removed."""
    path = root / f"checkpoint-{step}"
    with atomic_dir(path) as tmp:
        save_file(_trainable_state(model), tmp / "lora.safetensors")
        state = {"step": step, "optimizer": optimizer.state_dict(), "lr_scheduler": lr_scheduler.state_dict()}
        torch.save(state, tmp / "state.pt")
    if limit is not None:
        for _, old in list_checkpoints(root)[:-limit]:
            shutil.rmtree(old)
    return path


def list_checkpoints(root: Path) -> list[tuple[int, Path]]:
    """Complete checkpoints, oldest first (temp folders of a killed save start with '.')."""
    found = []
    for path in root.glob("checkpoint-*"):
        suffix = path.name.removeprefix("checkpoint-")
        if suffix.isdigit() and (path / "lora.safetensors").is_file() and (path / "state.pt").is_file():
            found.append((int(suffix), path))
    return sorted(found)


def load_checkpoint(path: Path, model, optimizer, lr_scheduler) -> int:
    weights = load_file(path / "lora.safetensors")
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    if set(weights) != set(params):
        diff = sorted(set(weights) ^ set(params))
        raise ValueError(f"{path}: LoRA weights do not match this model's adapter, e.g. {diff[:2]}")
    with torch.no_grad():
        for name, value in weights.items():
            params[name].copy_(value)
    state = torch.load(path / "state.pt", map_location="cpu", weights_only=True)
    optimizer.load_state_dict(state["optimizer"])
    lr_scheduler.load_state_dict(state["lr_scheduler"])
    return int(state["step"])


def _read_log(path: Path, upto_step: int) -> list[dict]:
    """Records up to `upto_step`; later ones (and a line cut by a kill) belong to the lost run."""
    records = []
    if path.is_file():
        for line in path.read_text().splitlines():
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue
            if record["step"] <= upto_step:
                records.append(record)
    return records


def _summary(records: list[dict]) -> tuple[float, float]:
    k = max(1, min(10, len(records) // 5))
    losses = [r["loss"] for r in records]
    return float(np.mean(losses[:k])), float(np.mean(losses[-k:]))


def _finished(output_dir: Path) -> TrainResult | None:
    done, adapter = output_dir / "done.json", output_dir / "adapter"
    if not (done.is_file() and (adapter / "adapter_model.safetensors").is_file()):
        return None
    info = json.loads(done.read_text())
    return TrainResult(adapter, info["steps"], info["first_loss"], info["final_loss"], info["resumed_from"])


# ---------------------------------------------------------------------------------------------
# Training.


def train_lora(
    train_set_path: Path,
    text_cache: Path,
    latent_cache: Path,
    config: RunConfig,
    output_dir: Path,
    progress: Progress | None = None,
) -> TrainResult:
    """Train (or resume, or find finished) the LoRA of `config.train` into `output_dir`."""
    if (finished := _finished(Path(output_dir))) is not None:
        return finished
    try:
        return _train(train_set_path, text_cache, latent_cache, config, Path(output_dir), progress)
    finally:
        # On CUDA the PEFT-wrapped transformer sits in reference cycles that outlive the function:
        # bench/gpu_style_run.py measured 1.26 GiB still allocated after the train stage without
        # this collection, 0.06 GiB with it (CPU runs show no such cycle).
        release()


def _train(train_set_path, text_cache, latent_cache, config, output_dir, progress) -> TrainResult:
    train = config.train
    accelerator = _accelerator(train.mixed_precision, cpu=pick_device(config.device).type == "cpu")
    rank, main = accelerator.process_index, accelerator.is_main_process
    view = open_train_view(
        train_set_path, text_cache, latent_cache, config.embed.max_length, output_dir, accelerator
    )
    set_seed(train.seed)  # the LoRA init
    transformer = lora_transformer(config, accelerator.device)
    _check_fits(transformer, view)
    data = serve_view(view, accelerator.device)
    params = [p for p in transformer.parameters() if p.requires_grad]  # a list: clipping reuses it
    noise_scheduler = load_noise_scheduler(config.models, "ddpm")
    if noise_scheduler.config.prediction_type != "epsilon":
        raise ValueError(f"{config.models.pixart}: the scheduler does not predict epsilon")
    vae_config = AutoencoderKL.load_config(resolve_model(config.models.pixart), subfolder="vae")

    plan = StepPlan(
        len(view), train.batch_size, train.gradient_accumulation_steps, train.seed,
        accelerator.num_processes, tuple(view.latent_sizes),
    )  # fmt: skip
    total = plan.total_steps(train)
    if train.compile:
        allow_recompiles(len(plan.batch_shapes()))
    optimizer = build_optimizer(params, train)
    # Not passed to accelerator.prepare, which would step it once per process per update.
    lr_scheduler = get_scheduler(
        train.lr_scheduler, optimizer, num_warmup_steps=train.warmup_steps, num_training_steps=total
    )
    model, optimizer = accelerator.prepare(transformer, optimizer)
    start, resumed_from, records = _resume(output_dir, transformer, optimizer, lr_scheduler, main)
    accelerator.wait_for_everyone()

    def loss_of(batch):
        return diffusion_loss(
            model, batch, noise_scheduler, vae_config["scaling_factor"], DTYPES[config.dtype]
        )

    log_path = output_dir / "train_log.jsonl"
    started = time.perf_counter()
    with open(log_path, "a") if main else nullcontext() as log:
        for step in tqdm(range(start, total), initial=start, total=total, desc="train", disable=not main):
            torch.manual_seed(_step_seed(train.seed, step, rank))
            batches = plan.batches(step, rank)
            loss, grad_norm, lr = _update(
                accelerator, model, loss_of, data, batches, optimizer, params, train
            )
            lr_scheduler.step()
            record = {
                "step": step + 1,
                "epoch": step // plan.steps_per_epoch,
                "loss": loss,
                "lr": lr,
                "grad_norm": grad_norm,
                "elapsed": round(time.perf_counter() - started, 3),  # _update's .item() waited for the GPU
            }
            records.append(record)
            if main:
                log.write(json.dumps(record) + "\n")
                log.flush()
            if (step + 1) % train.checkpointing_steps == 0:
                accelerator.wait_for_everyone()
                if main:
                    limit = train.checkpoints_total_limit
                    save_checkpoint(
                        output_dir / "checkpoints", step + 1, transformer, optimizer, lr_scheduler, limit
                    )
            if progress is not None:
                progress(record, total)

    first_loss, final_loss = _summary(records)
    result = TrainResult(output_dir / "adapter", total, first_loss, final_loss, resumed_from)
    accelerator.wait_for_everyone()
    if main:
        save_adapter(accelerator.unwrap_model(model), result.adapter_dir, base_model=config.models.pixart)
        write_text(output_dir / "done.json", json.dumps(asdict(result), indent=2, default=str) + "\n")  # last: marks the folder complete
    accelerator.wait_for_everyone()
    return result


def _update(
    accelerator, model, loss_of, data: TrainData, batches, optimizer, params, train
) -> tuple[float, float, float]:
    """One optimizer update over `batches`; returns (mean loss, grad norm before clipping, lr used)."""
    count = sum(len(index) for index, _ in batches)
    total_loss = torch.zeros((), device=accelerator.device)
    for i, (index, flip) in enumerate(batches):
        # Only the last micro-batch all-reduces gradients across processes.
        with nullcontext() if i == len(batches) - 1 else accelerator.no_sync(model):
            batch = data.batch(index, flip if data.has_flipped else None, accelerator.device)
            loss = loss_of(batch) * (len(index) / count)
            accelerator.backward(loss)
        total_loss += loss.detach()
    grad_norm = accelerator.clip_grad_norm_(params, train.max_grad_norm)  # returns the pre-clip norm
    lr = optimizer.param_groups[0]["lr"]
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return accelerator.reduce(total_loss, "mean").item(), float(grad_norm), lr


def _resume(output_dir: Path, model, optimizer, lr_scheduler, main: bool) -> tuple[int, int | None, list]:
    """(start step, checkpoint step or None, log records so far) from the latest complete checkpoint."""
    start, resumed_from = 0, None
    if found := list_checkpoints(output_dir / "checkpoints"):
        start = resumed_from = load_checkpoint(found[-1][1], model, optimizer, lr_scheduler)
    log_path = output_dir / "train_log.jsonl"
    records = _read_log(log_path, start)
    if main:
        output_dir.mkdir(parents=True, exist_ok=True)
        leftovers = [*output_dir.glob("checkpoints/.checkpoint-*.tmp-*"), *output_dir.glob(".adapter.tmp-*")]
        for leftover in leftovers:  # a save cut short by a kill
            shutil.rmtree(leftover, ignore_errors=True)
        log_path.write_text("".join(json.dumps(r) + "\n" for r in records))  # drop the lost run's tail
    return start, resumed_from, records


def _accelerator(mixed_precision: str, cpu: bool) -> Accelerator:
    try:
        return Accelerator(mixed_precision=mixed_precision, cpu=cpu)
    except ValueError as exc:  # accelerate keeps one global state per process
        raise RuntimeError(
            f"train.mixed_precision={mixed_precision!r} differs from an earlier training run in this process; "
            "accelerate allows one setting per process, so train in a fresh process (python -m tasks.train)"
        ) from exc


def _check_fits(transformer, view: CachedTrainView) -> None:
    cfg = transformer.config
    if view.embed_dim != cfg.caption_channels:
        raise ValueError(
            f"{view.path}: text embeddings are {view.embed_dim} wide, the transformer "
            f"expects caption_channels={cfg.caption_channels}"
        )
    if view.latent_channels != cfg.in_channels:
        raise ValueError(
            f"{view.path}: latents have {view.latent_channels} channels, transformer wants {cfg.in_channels}"
        )


def training_key(train_set_path: str | Path, config: RunConfig) -> str:
    """Content key of a training run: the train set's cache keys, the train settings, the base model."""
    rows = read_table(Path(train_set_path), TRAIN_SET)
    keys = rows.select(["text_key", "latent_key", "flipped_latent_key"]).to_pylist()
    return content_key(
        rows=keys, train=config.train.model_dump(mode="json"), pixart=config.models.pixart, dtype=config.dtype
    )


def main(argv: list[str] | None = None) -> TrainResult:
    parser = argparse.ArgumentParser(prog="python -m tasks.train", description=__doc__.splitlines()[0])
    parser.add_argument("--config", required=True, help="Run config YAML (its train/models/dtype are used).")
    parser.add_argument(
        "--train-set", required=True, type=Path, help="train_set.parquet from the embed stage."
    )
    parser.add_argument("--workdir", default=".", type=Path, help="Work dir holding the caches.")
    parser.add_argument("--text-cache", type=Path, help="Default: <workdir>/cache/text.")
    parser.add_argument("--latent-cache", type=Path, help="Default: <workdir>/cache/latents.")
    parser.add_argument("--output-dir", type=Path, help="Default: <workdir>/cache/train/<training key>.")
    args = parser.parse_args(argv)
    config, workdir = load_config(args.config), WorkDir(args.workdir)
    result = train_lora(
        args.train_set,
        args.text_cache or workdir.text_cache,
        args.latent_cache or workdir.latent_cache,
        config,
        args.output_dir or workdir.train_dir(training_key(args.train_set, config)),
    )
    if PartialState().is_main_process:
        print(json.dumps(asdict(result), default=str))
    return result


@task(name="train-lora")
def train_task(
    train_set_path: str, text_cache: str, latent_cache: str, config: RunConfig, workdir: str
) -> dict:
    """Train the style LoRA (cached by training_key); returns paths and loss summary."""
    logger = get_run_logger()
    output_dir = WorkDir(workdir).train_dir(training_key(train_set_path, config))

    def report(record: dict, total: int) -> None:
        every = max(1, min(100, total // 20))
        if record["step"] % every == 0 or record["step"] == total:
            logger.info(
                "step %d/%d  loss %.4f  lr %.2e  grad norm %.3f",
                record["step"],
                total,
                record["loss"],
                record["lr"],
                record["grad_norm"],
            )

    cached = (output_dir / "done.json").is_file()
    result = train_lora(
        Path(train_set_path), Path(text_cache), Path(latent_cache), config, output_dir, report
    )
    logger.info(
        "%s LoRA in %s: %d steps, loss %.4f -> %.4f%s",
        "cached" if cached else "trained",
        result.adapter_dir,
        result.steps,
        result.first_loss,
        result.final_loss,
        f" (resumed from step {result.resumed_from})" if result.resumed_from else "",
    )
    return {
        "adapter_dir": str(result.adapter_dir),
        "steps": result.steps,
        "first_loss": result.first_loss,
        "final_loss": result.final_loss,
        "output_dir": str(output_dir),
        "resumed_from": result.resumed_from,
        "cached": cached,
    }


if __name__ == "__main__":
    main()

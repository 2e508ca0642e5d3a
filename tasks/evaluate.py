"""Evaluate: the same prompts and seeds through the base model and the LoRA, side by side.

T5 is never loaded: the prompt set's styled prompts and the empty prompt (for classifier-free
guidance) come from the text-embedding cache. The transformer is loaded once; the base images are
sampled first, then the adapter is applied to that same transformer and every prompt is sampled
again with the same per-seed noise, so each base/LoRA pair differs only by the adapter. Training
checkpoints named in `evaluate.checkpoints` (model `checkpoint-N`) are sampled the same way, with
their LoRA weights (train.py's `<train output>/checkpoints/checkpoint-N/lora.safetensors`, found
beside the adapter folder) loaded into the applied adapter.

    <output_dir>/images/<model>/<index:03d>-seed<seed>.png    one image per prompt x model x seed
    <output_dir>/grids/<index:03d>.png                        base | checkpoints | LoRA, a row per seed
    <output_dir>/results.jsonl                                one contracts.RESULT_FIELDS row per image
    <output_dir>/metrics.json, report.md                      style shift (tasks/style_metrics.py),
                                                              per model name as in results' `model`
    <output_dir>/done.json                                    written last: a re-run is a cache hit

EvalResult.timings (also in done.json and the task's log and result) holds the wall seconds of each
phase: load, sample <model> per model name, decode, clip, metrics, write.
"""

from __future__ import annotations

import json
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from prefect import get_run_logger, task
from safetensors.torch import load_file
from tqdm import tqdm

from configs import RunConfig
from tasks import model_loading
from tasks.atomic import write_text
from tasks.buckets import bucket_name
from tasks.cache import content_key, file_sha256
from tasks.contracts import PROMPT_SET, RESULT_FIELDS, TRAIN_SET, read_table
from tasks.embed import load_latent_dist, load_text_embeddings
from tasks.images import PNG_THREADS, save_png
from tasks.lora import PEFT_CONFIG, PEFT_WEIGHTS, apply_lora
from tasks.style_metrics import style_shift
from tasks.timing import timed  # every timed phase here ends with its results on the CPU
from tasks.workdir import WorkDir

LINEAGE_FIELDS = (
    "run_id", "dataset_repo", "dataset_commit", "caption_model", "caption_prompt_hash",
    "lora_path", "lora_rank", "lora_alpha", "config_hash", "code_version",
)  # fmt: skip
ADAPTER_FILES = (PEFT_WEIGHTS, PEFT_CONFIG)  # what apply_lora loads
# Training latents decoded for the colour and CLIP references; the means settle long before this.
MAX_COLOR_REFERENCE = 64
CHECKPOINT_WEIGHTS = "lora.safetensors"  # in train.py's checkpoint-<step>/ folders


def model_names(config: RunConfig) -> list[str]:
    """Every sampled model in training order: base, the checkpoints asked for, the final LoRA."""
    return ["base", *(f"checkpoint-{n}" for n in sorted(set(config.evaluate.checkpoints))), "lora"]


def checkpoint_file(adapter_dir: str | Path, step: int) -> Path:
    path = Path(adapter_dir).parent / "checkpoints" / f"checkpoint-{step}" / CHECKPOINT_WEIGHTS
    if not path.is_file():
        raise FileNotFoundError(
            f"{path.parent}: no training checkpoint for evaluate.checkpoints step {step} (does "
            "train.checkpointing_steps divide it, and does checkpoints_total_limit keep it?)"
        )
    return path


@dataclass(frozen=True)
class EvalResult:
    results_path: Path
    report_path: Path
    grid_paths: list[Path]
    metrics: dict
    image_count: int
    # Wall seconds per phase (see the module docstring); clocks differ between equal results.
    timings: dict[str, float] = field(default_factory=dict, compare=False)
    cached: bool = field(default=False, compare=False)


def evaluation_key(prompt_set_path: str | Path, adapter_dir: str | Path, config: RunConfig) -> str:
    """Hash of everything the images depend on. The prompt rows stand for the prompts file and
    style template, and their text keys hash the embeddings (and the encoder that made them, which
    also made the empty prompt's)."""
    return content_key(
        prompts=read_table(Path(prompt_set_path), PROMPT_SET).to_pylist(),
        adapter={name: file_sha256(_adapter_file(adapter_dir, name)) for name in ADAPTER_FILES},
        checkpoints={
            n: file_sha256(checkpoint_file(adapter_dir, n)) for n in sorted(config.evaluate.checkpoints)
        },
        evaluate=config.evaluate.model_dump(mode="json", exclude={"prompts_file", "style_template"}),
        pixart=config.models.pixart,
        resolution=config.embed.resolution,
        dtype=config.dtype,
    )


# ---- inputs ----------------------------------------------------------------------------------


def load_train_latents(
    train_set_path: str | Path, latent_cache: str | Path, resolution: int
) -> tuple[np.ndarray, np.ndarray]:
    """The training images' cached VAE posteriors (mean, std), unscaled, [n, channels, height, width].

    Only images of the samples' square `resolution` count: with aspect-ratio buckets on, the
    others' latents have other shapes, and the metrics compare distributions of one shape."""
    rows = read_table(Path(train_set_path), TRAIN_SET).select(["latent_key", "bucket"]).to_pylist()
    if not rows:
        raise ValueError(f"{train_set_path}: no training rows to compare the samples with")
    square = bucket_name((resolution, resolution))
    keys = [row["latent_key"] for row in rows if row["bucket"] in (None, square)]
    if not keys:
        raise ValueError(
            f"{train_set_path}: no training image in the {square} bucket to compare the samples with "
            f"(all {len(rows)} are in non-square aspect-ratio buckets)"
        )
    means, stds = load_latent_dist(Path(latent_cache), keys)
    return means.numpy(), stds.numpy()


def load_checkpoint_weights(transformer, path: Path) -> None:
    """Put a training checkpoint's LoRA weights into the applied adapter (same parameter names)."""
    weights = load_file(path)
    params = dict(transformer.named_parameters())
    unknown = sorted(set(weights) - set(params))
    missing = sorted(n for n in params if "lora_" in n and n not in weights)
    if unknown or missing:
        raise ValueError(
            f"{path}: does not fit the applied adapter (unknown {unknown[:2]}, missing {missing[:2]})"
        )
    with torch.no_grad():
        for name, value in weights.items():
            params[name].copy_(value)


# ---- timings ---------------------------------------------------------------------------------


def images_per_second(timings: dict[str, float], image_count: int) -> float | None:
    """Sampling throughput over all models; None when no sampling was timed (an older done.json)."""
    seconds = sum(v for k, v in timings.items() if k.startswith("sample "))
    return round(image_count / seconds, 2) if seconds > 0 else None


def format_timings(timings: dict[str, float]) -> str:
    return ", ".join(f"{name} {seconds:g} s" for name, seconds in timings.items()) or "none recorded"


# ---- sampling --------------------------------------------------------------------------------


def build_pipeline(transformer, vae, config: RunConfig):
    """A PixArt-alpha pipeline without tokenizer or T5: prompts arrive as cached embeddings."""
    from diffusers import PixArtAlphaPipeline

    scheduler = model_loading.load_noise_scheduler(config.models, config.evaluate.sampler)
    pipe = PixArtAlphaPipeline(
        tokenizer=None, text_encoder=None, vae=vae, transformer=transformer, scheduler=scheduler
    )
    pipe.set_progress_bar_config(disable=True)  # our own bar counts batches
    return pipe


def generate_latents(
    pipe,
    embeds: torch.Tensor,
    mask: torch.Tensor,
    items: list[tuple[int, int]],
    config: RunConfig,
    desc: str,
) -> torch.Tensor:
    """Final denoised latents (scaled) for each (prompt row, seed) in `items`; the last row of
    `embeds`/`mask` is the empty prompt. Each item draws its starting noise from its own CPU
    generator, so the noise depends on the seed only, not on the batch or the device."""
    settings, resolution = config.evaluate, config.embed.resolution
    embeds, mask = embeds.to(pipe.device), mask.to(pipe.device)  # the pipeline leaves masks where they are
    chunks = []
    for start in tqdm(range(0, len(items), settings.batch_size), desc=desc):
        batch = items[start : start + settings.batch_size]
        rows = [row for row, _ in batch]
        output = pipe(
            prompt=None,
            negative_prompt=None,  # the default "" would clash with negative_prompt_embeds
            prompt_embeds=embeds[rows],
            prompt_attention_mask=mask[rows],
            negative_prompt_embeds=embeds[-1:].expand(len(batch), -1, -1),
            negative_prompt_attention_mask=mask[-1:].expand(len(batch), -1),
            num_inference_steps=settings.num_inference_steps,
            guidance_scale=settings.guidance_scale,
            height=resolution,
            width=resolution,
            generator=[torch.Generator("cpu").manual_seed(seed) for _, seed in batch],
            output_type="latent",
            use_resolution_binning=False,
            clean_caption=False,
        )
        chunks.append(output.images.float().cpu())
    return torch.cat(chunks)


@torch.no_grad()
def decode_images(vae, latents: torch.Tensor, batch_size: int) -> np.ndarray:
    """Scaled latents -> uint8 RGB [n, height, width, 3], as the pipeline's own decode would."""
    arrays = []
    for chunk in latents.split(batch_size):
        pixels = vae.decode(chunk.to(vae.device, vae.dtype) / vae.config.scaling_factor, return_dict=False)[0]
        pixels = (pixels.float() / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 1).cpu().numpy()
        arrays.append((pixels * 255).round().astype(np.uint8))
    return np.concatenate(arrays)


@torch.no_grad()
def clip_embeddings(model, processor, images: np.ndarray, batch_size: int) -> np.ndarray:
    """CLIP image embeddings [n, d] of uint8 images [n, height, width, 3]."""
    chunks = []
    for start in range(0, len(images), batch_size):
        pixels = processor(
            images=[Image.fromarray(a) for a in images[start : start + batch_size]], return_tensors="pt"
        )
        output = model.get_image_features(pixel_values=pixels["pixel_values"].to(model.device, model.dtype))
        features = output if torch.is_tensor(output) else output.pooler_output  # transformers 5: an output
        chunks.append(features.float().cpu().numpy())
    return np.concatenate(chunks)


@dataclass
class Samples:
    latents: dict[str, np.ndarray]  # model name -> final latents (scaled) [n, c, h, w]
    images: dict[str, np.ndarray]  # model name -> uint8 [n, height, width, 3]
    train_means: np.ndarray  # scaled, like the latents
    train_stds: np.ndarray
    train_images: np.ndarray  # decoded training means, the colour and CLIP reference
    clip: dict[str, np.ndarray] | None  # model name (and 'train') -> CLIP image embeddings
    timings: dict[str, float] = field(default_factory=dict)  # unrounded wall seconds per phase


def sample_all(
    prompts: list[dict], text_cache, latent_cache, train_set_path, empty_text_key: str, adapter_dir: Path,
    config: RunConfig,
) -> Samples:  # fmt: skip
    """Sample every model of model_names(config) for every prompt x seed; decode; embed with CLIP."""
    device, dtype = model_loading.pick_device(config.device), model_loading.DTYPES[config.dtype]
    timings: dict[str, float] = {}
    with timed(timings, "load"):  # everything read from disk before sampling
        transformer = model_loading.load_transformer(config.models, dtype, device)
        vae = model_loading.load_vae(config.models, dtype, device)
        keys = [p["text_key"] for p in prompts] + [empty_text_key]
        embeds, mask = load_text_embeddings(Path(text_cache), keys, config.embed.max_length)
        if embeds.shape[-1] != transformer.config.caption_channels:
            raise ValueError(
                f"{text_cache}: embeddings have {embeds.shape[-1]} values per token, the transformer "
                f"expects {transformer.config.caption_channels} (another text encoder?)"
            )
        pipe = build_pipeline(transformer, vae, config)
        train_latents = load_train_latents(train_set_path, latent_cache, config.embed.resolution)
    means, stds = (a * vae.config.scaling_factor for a in train_latents)
    side = config.embed.resolution // pipe.vae_scale_factor
    if means.shape[1:] != (transformer.config.in_channels, side, side):
        raise ValueError(
            f"{latent_cache}: training latents are {list(means.shape[1:])}, samples will be "
            f"{[transformer.config.in_channels, side, side]}; were they embedded at another resolution?"
        )

    items = [(i, seed) for i in range(len(prompts)) for seed in config.evaluate.seeds]
    with timed(timings, "sample base"):
        latents = {"base": generate_latents(pipe, embeds, mask, items, config, "sampling base")}
    with timed(timings, "load"):  # adapter weights count as loading, not as the LoRA's sampling
        apply_lora(pipe, adapter_dir, scale=1.0)  # in place: the same transformer, now with the adapter
    with timed(timings, "sample lora"):
        latents["lora"] = generate_latents(pipe, embeds, mask, items, config, "sampling LoRA")
    for step in sorted(set(config.evaluate.checkpoints)):  # the same adapter, earlier weights
        with timed(timings, "load"):
            load_checkpoint_weights(transformer, checkpoint_file(adapter_dir, step))
        with timed(timings, f"sample checkpoint-{step}"):
            latents[f"checkpoint-{step}"] = generate_latents(
                pipe, embeds, mask, items, config, f"sampling step {step}"
            )
    batch_size = config.evaluate.batch_size
    with timed(timings, "decode"):  # freeing the sampling models included
        images = {model: decode_images(vae, latents[model], batch_size) for model in latents}
        train_images = decode_images(vae, torch.from_numpy(means[:MAX_COLOR_REFERENCE]), batch_size)
        del pipe, transformer, vae
        model_loading.release()
    clip = None
    if config.evaluate.clip_model:
        with timed(timings, "clip"):  # loading and freeing the CLIP model included
            model, processor = model_loading.load_clip(config.evaluate.clip_model, dtype, device)
            clip = {name: clip_embeddings(model, processor, x, batch_size) for name, x in images.items()}
            clip["train"] = clip_embeddings(model, processor, train_images, batch_size)
            del model
            model_loading.release()
    latents = {name: value.numpy() for name, value in latents.items()}
    return Samples(latents, images, means, stds, train_images, clip, timings)


# ---- outputs ---------------------------------------------------------------------------------


def grid_image(columns: list[list[np.ndarray]]) -> Image.Image:
    """One column per model (base first, LoRA last), one row per seed."""
    height, width = columns[0][0].shape[:2]
    grid = Image.new("RGB", (len(columns) * width, len(columns[0]) * height))
    for col, images in enumerate(columns):
        for row, image in enumerate(images):
            grid.paste(Image.fromarray(image), (col * width, row * height))
    return grid


def image_relpath(model: str, index: int, seed: int) -> str:
    return f"images/{model}/{index:03d}-seed{seed}.png"


def result_rows(prompts: list[dict], config: RunConfig, lineage: dict, created_at: str) -> list[dict]:
    settings, size = config.evaluate, config.embed.resolution
    rows = []
    for index, prompt in enumerate(prompts):
        for model in model_names(config):
            for seed in settings.seeds:
                values = {
                    "prompt": prompt["prompt"], "styled_prompt": prompt["styled_prompt"], "model": model,
                    "seed": seed, "steps": settings.num_inference_steps, "guidance": settings.guidance_scale,
                    "sampler": settings.sampler, "image_path": image_relpath(model, index, seed),
                    "width": size, "height": size, "created_at": created_at, **lineage,
                }  # fmt: skip
                rows.append({name: values[name] for name in RESULT_FIELDS})
    return rows


def render_report(prompts: list[dict], config: RunConfig, lineage: dict, metrics: dict) -> str:
    settings, m = config.evaluate, metrics
    seeds = ", ".join(str(s) for s in settings.seeds)
    names = model_names(config)
    clip = "clip_similarity" in m["models"]["base"]
    lines = [
        "# Evaluation: base vs LoRA",
        "",
        "| setting | value |",
        "| --- | --- |",
        f"| run | {lineage['run_id']} |",
        f"| base model | {config.models.pixart} |",
        f"| adapter | {lineage['lora_path']} (rank {lineage['lora_rank']}, alpha {lineage['lora_alpha']}) |",
        f"| sampler | {settings.sampler}, {settings.num_inference_steps} steps |",
        f"| guidance | {settings.guidance_scale} |",
        f"| seeds | {seeds} |",
        f"| size | {config.embed.resolution} px, {config.dtype} |",
        "",
        "## Style shift (distance to the training images; lower is closer)",
        "",
        "| model | latent Frechet distance (diagonal) | colour distance (0-255) | mean RGB |"
        + (f" CLIP similarity ({settings.clip_model}; higher is closer) |" if clip else ""),
        "| --- | --- | --- | --- |" + (" --- |" if clip else ""),
    ]
    for name in names:
        row = m["models"][name]
        cells = [name, f"{row['latent_fd']:.4g}", f"{row['color_distance']:.2f}", str(row["mean_rgb"])]
        cells += [f"{row['clip_similarity']:.4f}"] if clip else []
        lines.append("| " + " | ".join(cells) + " |")
    lines += [
        "",
        f"Training images' mean RGB: {m['mean_rgb_train']}.",
        f"latent_fd_ratio (base / LoRA) = {m['latent_fd_ratio']:.3f}; above 1 means the LoRA moved",
        "samples toward the training style. How each is measured: tasks/style_metrics.py.",
        "",
        "## Prompts",
        "",
        "| # | category | styled prompt | " + " \\| ".join(names) + " |",
        "| --- | --- | --- | --- |",
    ]
    for index, prompt in enumerate(prompts):
        text = prompt["styled_prompt"].replace("|", "\\|")
        lines.append(f"| {index} | {prompt['category'] or ''} | {text} | [grid](grids/{index:03d}.png) |")
    return "\n".join(lines) + "\n"


def _write_outputs(
    output_dir: Path, prompts: list[dict], images: dict[str, np.ndarray], metrics: dict, config: RunConfig,
    lineage: dict,
) -> EvalResult:  # fmt: skip
    seeds, names = config.evaluate.seeds, model_names(config)
    # Hundreds of PNG encodes dominate this function: threads run them in parallel. Each job builds
    # its own PIL image, so only one job's pixels per worker are held at a time besides the arrays.
    with ThreadPoolExecutor(max_workers=PNG_THREADS, thread_name_prefix="png") as pool:
        image_jobs: list[Future[Path]] = []
        grid_jobs: list[Future[Path]] = []
        for index in range(len(prompts)):
            rows = range(index * len(seeds), (index + 1) * len(seeds))  # sample order: prompt-major
            for model in names:
                for row, seed in zip(rows, seeds, strict=True):
                    path = output_dir / image_relpath(model, index, seed)
                    image_jobs.append(pool.submit(_write_array, path, images[model][row]))
            columns = [[images[model][r] for r in rows] for model in names]
            grid_jobs.append(pool.submit(_write_grid, output_dir / "grids" / f"{index:03d}.png", columns))
        grid_paths = _results(pool, [*image_jobs, *grid_jobs])[len(image_jobs) :]  # prompt order
    created_at = datetime.now(UTC).isoformat(timespec="seconds")
    rows = result_rows(prompts, config, lineage, created_at)
    write_text(output_dir / "metrics.json", json.dumps(metrics, indent=2) + "\n")
    records = _write_records(output_dir, rows, prompts, config, lineage, metrics)
    return EvalResult(records["results.jsonl"], records["report.md"], grid_paths, metrics, image_count=len(rows))


def stamp_lineage(
    eval_dir: str | Path, prompt_set_path: str | Path, config: RunConfig, lineage: dict, metrics: dict,
    out_dir: str | Path,
) -> dict[str, Path]:  # fmt: skip
    """results.jsonl and report.md of the evaluation in `eval_dir`, carrying `lineage`, in `out_dir`.

    An evaluation is stored by what its images depend on (evaluation_key), so runs that differ only
    in lineage share it: a new run name, a new code version, the same data under a new dataset
    commit. Each run's results commit must still name its own run; the flow pushes these copies.
    With the lineage the evaluation was written with, the copies equal its files byte for byte."""
    _check_lineage(lineage)
    rows = [json.loads(line) for line in (Path(eval_dir) / "results.jsonl").read_text().splitlines()]
    stamped = [{**row, **{name: lineage[name] for name in LINEAGE_FIELDS}} for row in rows]
    prompts = read_table(Path(prompt_set_path), PROMPT_SET).to_pylist()
    return _write_records(Path(out_dir), stamped, prompts, config, lineage, metrics)


def _write_records(
    out_dir: Path, rows: list[dict], prompts: list[dict], config: RunConfig, lineage: dict, metrics: dict
) -> dict[str, Path]:
    """results.jsonl (a row per image) and report.md, the two files that carry the lineage."""
    return {
        "results.jsonl": write_text(out_dir / "results.jsonl", "".join(json.dumps(r) + "\n" for r in rows)),
        "report.md": write_text(out_dir / "report.md", render_report(prompts, config, lineage, metrics)),
    }


def _check_lineage(lineage: dict) -> None:
    missing = sorted(set(LINEAGE_FIELDS) - set(lineage))
    unexpected = sorted(set(lineage) - set(LINEAGE_FIELDS))
    if missing or unexpected:
        raise ValueError(f"lineage: missing fields {missing}, unexpected fields {unexpected}")


def _write_done(output_dir: Path, result: EvalResult) -> None:
    record = {
        "results": result.results_path.name,
        "report": result.report_path.name,
        "grids": [str(p.relative_to(output_dir)) for p in result.grid_paths],
        "metrics": result.metrics,
        "image_count": result.image_count,
        "timings": result.timings,
    }
    write_text(output_dir / "done.json", json.dumps(record, indent=2) + "\n")


def _read_done(output_dir: Path) -> EvalResult | None:
    """The finished evaluation in `output_dir`, or None when it is incomplete or absent."""
    try:
        record = json.loads((output_dir / "done.json").read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return None
    result = EvalResult(
        results_path=output_dir / record["results"],
        report_path=output_dir / record["report"],
        grid_paths=[output_dir / p for p in record["grids"]],
        metrics=record["metrics"],
        image_count=record["image_count"],
        timings=record.get("timings", {}),  # absent from done.json files written before timings
        cached=True,
    )
    files = [result.results_path, result.report_path, *result.grid_paths]
    return result if all(p.is_file() for p in files) else None


# ---- the stage -------------------------------------------------------------------------------


def evaluate(
    prompt_set_path: str | Path,
    train_set_path: str | Path,
    text_cache: str | Path,
    latent_cache: str | Path,
    empty_text_key: str,
    adapter_dir: str | Path,
    config: RunConfig,
    output_dir: Path,
    lineage: dict,
) -> EvalResult:
    """Sample base and LoRA images for every prompt x seed, write them, the grids, results.jsonl,
    metrics.json and report.md to `output_dir`; return the finished record if it is already there."""
    output_dir, adapter_dir = Path(output_dir), Path(adapter_dir)
    done = _read_done(output_dir)
    if done is not None:
        return done
    _check_lineage(lineage)
    for name in ADAPTER_FILES:
        _adapter_file(adapter_dir, name)
    prompts = read_table(Path(prompt_set_path), PROMPT_SET).to_pylist()
    if not prompts:
        raise ValueError(f"{prompt_set_path}: no prompts to evaluate")

    for step in config.evaluate.checkpoints:  # before any sampling: a missing one fails fast
        checkpoint_file(adapter_dir, step)
    samples = sample_all(
        prompts, text_cache, latent_cache, train_set_path, empty_text_key, adapter_dir, config
    )
    timings = samples.timings
    with timed(timings, "metrics"):
        metrics = style_shift(
            samples.latents,
            samples.images,
            samples.train_means,
            samples.train_stds,
            samples.train_images,
            samples.clip,
        )
    with timed(timings, "write"):
        result = _write_outputs(output_dir, prompts, samples.images, metrics, config, lineage)
    result = replace(result, timings={name: round(seconds, 2) for name, seconds in timings.items()})
    _write_done(output_dir, result)  # last: its presence means everything above is complete
    return result


def _adapter_file(adapter_dir: str | Path, name: str) -> Path:
    path = Path(adapter_dir) / name
    if not path.is_file():
        raise FileNotFoundError(f"{adapter_dir}: no {name}; expected a PEFT adapter folder")
    return path


def _write_array(path: Path, pixels: np.ndarray) -> Path:
    return save_png(path, Image.fromarray(pixels))


def _write_grid(path: Path, columns: list[list[np.ndarray]]) -> Path:
    return save_png(path, grid_image(columns))


def _results(pool: ThreadPoolExecutor, jobs: list[Future[Path]]) -> list[Path]:
    """Every job's result in order; the first failure is raised once the jobs already running end,
    and the ones not started are dropped rather than written for nothing."""
    try:
        return [job.result() for job in jobs]
    except BaseException:
        pool.shutdown(cancel_futures=True)
        raise


@task(name="evaluate")
def evaluate_task(
    prompt_set_path: str,
    train_set_path: str,
    text_cache: str,
    latent_cache: str,
    empty_text_key: str,
    adapter_dir: str,
    config: RunConfig,
    workdir: str,
    lineage: dict,
) -> dict:
    logger = get_run_logger()
    key = evaluation_key(prompt_set_path, adapter_dir, config)
    output_dir = WorkDir(Path(workdir)).eval_dir(key)
    result = evaluate(
        prompt_set_path, train_set_path, text_cache, latent_cache, empty_text_key, adapter_dir,
        config, output_dir, lineage,
    )  # fmt: skip
    logger.info(
        "%s %d images in %s; latent FD base %.4g, LoRA %.4g (ratio %.3f)",
        "reused" if result.cached else "wrote", result.image_count, output_dir,
        result.metrics["latent_fd_base"], result.metrics["latent_fd_lora"], result.metrics["latent_fd_ratio"],
    )  # fmt: skip
    rate = images_per_second(result.timings, result.image_count)
    logger.info(
        "evaluate timings%s: %s; sampling %s images/s",
        " (of the run that wrote them)" if result.cached else "", format_timings(result.timings),
        "unknown" if rate is None else f"{rate:g}",
    )  # fmt: skip
    return {
        "eval_dir": str(output_dir),
        "key": key,
        "results_path": str(result.results_path),
        "report_path": str(result.report_path),
        "grid_paths": [str(p) for p in result.grid_paths],
        "metrics": result.metrics,
        "image_count": result.image_count,
        "cached": result.cached,
        "timings": result.timings,
        "images_per_s": rate,
    }

"""Run configuration: pydantic models loaded from the YAML files beside this module.

The same models are the Prefect flow's parameters, so the UI form, the CLI and the tests all
validate one schema. Every model forbids unknown keys: a typo fails before any work is done.
"""

from __future__ import annotations

import hashlib
import json
import re
from datetime import UTC, datetime
from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

CONFIG_DIR = Path(__file__).resolve().parent

MISSION_PROMPT = (
    "Give the caption of this image '{caption}', describe this image and its style in a very detailed manner"
)

# The reference script's suffix-matched target set. With random weights the style is only
# learned when the feed-forward layers, proj_out and pos_embed.proj are included.
REFERENCE_TARGETS = [
    "to_k", "to_q", "to_v", "to_out.0", "proj_in", "proj_out",
    "ff.net.0.proj", "ff.net.2", "proj", "linear", "linear_1", "linear_2",
]  # fmt: skip
ATTENTION_TARGETS = ["to_k", "to_q", "to_v", "to_out.0"]
TARGET_PRESETS = {"reference": REFERENCE_TARGETS, "attention": ATTENTION_TARGETS}
BRANCH_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._/-]*[A-Za-z0-9_-]")


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class OxenRepoConfig(Strict):
    """Where an Oxen repository lives: a local folder, or `namespace/name` on a host."""

    repo: str = Field(description="Local repo path, or 'namespace/name' when `host` is set.")
    host: str | None = Field(None, description="Oxen server, e.g. 'hub.oxen.ai' or '127.0.0.1:3000'.")
    scheme: Literal["http", "https"] = Field("https", description="Scheme of the remote host.")

    @property
    def is_remote(self) -> bool:
        return self.host is not None


class DatasetConfig(OxenRepoConfig):
    revision: str = Field("main", description="Branch name or commit id to read.")
    caption_column: str = Field("text", description="Column of the metadata file that holds captions.")
    metadata_file: str = Field("metadata.jsonl", description="metadata.jsonl, .csv or .parquet in the repo.")
    import_from: str | None = Field(
        None,
        description="Folder to commit into a new local repo when `repo` does not exist yet (the demo).",
    )

    @field_validator("metadata_file")
    @classmethod
    def _known_format(cls, value: str) -> str:
        if not value.endswith((".jsonl", ".csv", ".parquet")):
            raise ValueError("must end with .jsonl, .csv or .parquet")
        return value


class ModelsConfig(Strict):
    pixart: str = Field(
        "PixArt-alpha/PixArt-XL-2-512x512",
        description="Hub id or local folder of a PixArt-alpha pipeline ('tiny:pixart' builds a tiny one).",
    )
    text_encoder: str | None = Field(
        None, description="T5 encoder folder or hub id; default: the PixArt repo's text_encoder/tokenizer."
    )
    pixart_revision: str | None = Field(
        None, min_length=1, description="Hub branch, tag or commit of `pixart`; part of the embed cache keys."
    )
    text_encoder_revision: str | None = Field(
        None, min_length=1, description="Hub branch, tag or commit of `text_encoder` (when that is set)."
    )
    llava: str = Field(
        "llava-hf/llava-1.5-7b-hf", description="LLaVA hub id or folder ('tiny:llava' builds a tiny one)."
    )


class RecaptionConfig(Strict):
    enabled: bool = Field(True, description="Replace the original captions with LLaVA's.")
    prompt_template: str = Field(MISSION_PROMPT, description="Prompt; '{caption}' is the original caption.")
    batch_size: int = Field(8, gt=0, description="Images per LLaVA batch.")
    max_new_tokens: int = Field(96, gt=0, le=512, description="Fits T5's 120-token budget by default.")
    quantization: Literal["none", "8bit", "4bit"] = Field(
        "none", description="Load LLaVA's language model in 8 or 4 bits (bitsandbytes; CUDA only)."
    )
    static_cache: bool = Field(
        False,
        description="Static KV cache, so generate compiles its decode step: ~3.7x faster batches on CUDA "
        "(batch 64 on an H100: 15 vs 3.9 images/s) after ~45 s compiling; cache keys unchanged.",
    )
    model_revision: str | None = Field(
        None, min_length=1, description="Hub branch, tag or commit of models.llava; part of the cache key."
    )
    caption_column_out: str = Field(
        "llava_caption", min_length=1, description="Column the captions branch adds to the metadata file."
    )
    branch_template: str = Field(
        "captions/{model_name}", description="Branch of the dataset repo that receives the captions."
    )
    schedule: str | None = Field(
        None, description="Cron expression (5 fields, e.g. '0 3 * * *') for the scheduled recaption job."
    )

    @field_validator("prompt_template")
    @classmethod
    def _has_caption_slot(cls, value: str) -> str:
        if "{caption}" not in value:
            raise ValueError("must contain '{caption}'")
        return value

    @field_validator("caption_column_out")
    @classmethod
    def _not_file_name(cls, value: str) -> str:
        if value == "file_name":
            raise ValueError("'file_name' is the image path column; pick another name")
        return value

    @field_validator("branch_template")
    @classmethod
    def _valid_branch(cls, value: str) -> str:
        try:
            example = value.format(model_name="llava-1.5-7b-hf")
        except (KeyError, IndexError, ValueError):
            raise ValueError("only '{model_name}' may appear in braces") from None
        if not BRANCH_NAME.fullmatch(example) or ".." in example or "//" in example:
            raise ValueError(f"gives {example!r}, not a valid branch name")
        return value

    @field_validator("schedule")
    @classmethod
    def _valid_cron(cls, value: str | None) -> str | None:
        if value is None:
            return None
        from cronsim import CronSim, CronSimError  # stricter than Prefect's croniter: no '@daily' aliases

        try:
            CronSim(value, datetime.now(UTC))
        except CronSimError as exc:
            raise ValueError(f"not a 5-field cron expression such as '0 3 * * *': {exc}") from None
        return value

    def branch(self, model_id: str) -> str:
        """The captions branch for a captioner id: 'llava-hf/llava-1.5-7b-hf' -> 'captions/llava-1.5-7b-hf'."""
        model_name = re.sub(r"[^A-Za-z0-9._-]+", "-", model_id.rstrip("/").split("/")[-1]).strip("-.")
        return self.branch_template.format(model_name=model_name or "model")


class EmbedConfig(Strict):
    resolution: int = Field(512, ge=64, le=2048, multiple_of=64, description="Training image size in pixels.")
    max_length: int = Field(120, gt=0, le=512, description="T5 tokens per caption (PixArt uses 120).")
    batch_size: int = Field(16, gt=0, description="Captions or images per encoder batch.")
    flip: bool = Field(False, description="Also cache horizontally flipped latents (flip augmentation).")
    buckets: bool = Field(
        False, description="Aspect-ratio buckets (PixArt's 512 table, scaled): images are not cropped square."
    )
    max_shard_mb: int = Field(256, ge=1, description="Largest cache shard file, in MiB.")
    compile: bool = Field(
        False,
        description="torch.compile each T5 block (GPU): 550-586 vs 460-494 captions/s on an H100, after "
        "11-18 s compiling; pays off from ~30-50k uncached texts.",
    )


class TrainConfig(Strict):
    rank: int = Field(16, gt=0, le=1024, description="LoRA rank.")
    alpha: float | None = Field(None, gt=0, description="LoRA alpha; default: equal to rank (scale 1).")
    dropout: float = Field(0.0, ge=0, lt=1, description="LoRA dropout.")
    target_modules: list[str] | Literal["reference", "attention"] = Field(
        "reference", description="Preset name or explicit list of module-name suffixes."
    )
    learning_rate: float = Field(3e-4, gt=0, description="Peak learning rate.")
    lr_scheduler: Literal["cosine", "constant", "constant_with_warmup", "linear"] = "cosine"
    warmup_steps: int = Field(0, ge=0)
    batch_size: int = Field(2, gt=0, description="Samples per optimizer step per device.")
    gradient_accumulation_steps: int = Field(1, gt=0)
    epochs: int = Field(100, gt=0, description="Passes over the dataset (ignored when max_steps is set).")
    max_steps: int | None = Field(None, gt=0, description="Stop after this many optimizer steps.")
    weight_decay: float = Field(0.03, ge=0)
    adam_epsilon: float = Field(1e-10, gt=0)
    use_8bit_adam: bool = Field(False, description="bitsandbytes AdamW8bit (GPU only).")
    max_grad_norm: float = Field(1.0, gt=0, description="Gradient clipping norm.")
    gradient_checkpointing: bool = False
    compile: bool = Field(False, description="torch.compile each transformer block: ~2x faster GPU steps.")
    mixed_precision: Literal["no", "bf16", "fp16"] = "no"
    checkpointing_steps: int = Field(500, gt=0, description="Save a resumable checkpoint every N steps.")
    checkpoints_total_limit: int | None = Field(2, gt=0)
    seed: int = 42

    @property
    def resolved_targets(self) -> list[str]:
        if isinstance(self.target_modules, str):
            return list(TARGET_PRESETS[self.target_modules])
        return list(self.target_modules)

    @property
    def resolved_alpha(self) -> float:
        return float(self.alpha if self.alpha is not None else self.rank)


class EvaluateConfig(Strict):
    prompts_file: str = Field("data/eval_prompts.jsonl", description="JSONL with one {'prompt': ...} a row.")
    style_template: str = Field(
        "Image in the demo style, {prompt}", description="Turns a plain prompt into the styled prompt."
    )
    seeds: list[int] = Field(default_factory=lambda: [0], min_length=1, description="One image per seed.")
    num_inference_steps: int = Field(20, gt=0, le=1000)
    guidance_scale: float = Field(4.5, ge=1.0)
    sampler: Literal["dpm", "ddim"] = Field("dpm", description="'ddim' (with sample clipping) suits tiny models.")
    batch_size: int = Field(8, gt=0)
    checkpoints: list[int] = Field(
        default_factory=list, description="Training steps whose checkpoints are sampled too ('checkpoint-N')."
    )
    clip_model: str | None = Field(
        None, description="CLIP hub id or folder: image-embedding similarity to the training set, if set."
    )

    @field_validator("style_template")
    @classmethod
    def _has_prompt_slot(cls, value: str) -> str:
        if "{prompt}" not in value:
            raise ValueError("must contain '{prompt}'")
        return value


class ResultsConfig(OxenRepoConfig):
    repo: str = Field("oxen/results", description="Results repo (relative paths are under the work dir).")
    branch_prefix: str = Field("runs/", description="Each run commits to branch <prefix><run id>.")
    token_secret: str | None = Field(
        None, description="Prefect Secret block holding the host's API token; default: $OXEN_API_KEY."
    )


class DistributedConfig(Strict):
    """Fan re-captioning and embedding out over Dask workers before those stages (flows/fanout.py).

    Outputs do not change: the workers write into the same content-addressed caches, and the
    stages then run as usual and find every value there. So these settings stay out of the run id."""

    engine: Literal["none", "dask"] = Field(
        "none", description="'dask': shards of the dataset run on Dask workers first, one GPU each."
    )
    workers: int = Field(
        2, ge=1, le=1024, description="Shards per run, and processes of a local cluster (one GPU each)."
    )
    address: str | None = Field(
        None,
        min_length=1,
        description="Scheduler of a running Dask cluster, e.g. 'tcp://10.0.0.5:8786' (it needs the work dir "
        "at the same path); default: a local cluster of `workers` processes for this run.",
    )

    @model_validator(mode="after")
    def _address_needs_dask(self) -> DistributedConfig:
        if self.address and self.engine != "dask":
            raise ValueError("address names a Dask scheduler: set engine: dask too")
        return self


class RunConfig(Strict):
    """One style run: dataset in, LoRA and evaluation images out."""

    run_name: str = Field("style", pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
    device: Literal["auto", "cpu", "cuda"] = Field("auto", description="'auto' uses CUDA when present.")
    dtype: Literal["float32", "bfloat16", "float16"] = Field("bfloat16", description="Frozen model dtype.")
    dataset: DatasetConfig
    models: ModelsConfig = Field(default_factory=ModelsConfig)
    recaption: RecaptionConfig = Field(default_factory=RecaptionConfig)
    embed: EmbedConfig = Field(default_factory=EmbedConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    evaluate: EvaluateConfig = Field(default_factory=EvaluateConfig)
    results: ResultsConfig = Field(default_factory=ResultsConfig)
    distributed: DistributedConfig = Field(default_factory=DistributedConfig)

    @model_validator(mode="after")
    def _8bit_adam_needs_cuda(self) -> RunConfig:
        if self.device == "cpu" and self.train.use_8bit_adam:
            raise ValueError("train.use_8bit_adam needs a CUDA device (bitsandbytes)")
        return self

    @model_validator(mode="after")
    def _checkpoints_are_saved(self) -> RunConfig:
        """evaluate.checkpoints must name checkpoints that training writes and keeps."""
        train, wanted = self.train, self.evaluate.checkpoints
        if bad := [n for n in wanted if n <= 0 or n % train.checkpointing_steps]:
            raise ValueError(f"evaluate.checkpoints {bad}: not multiples of train.checkpointing_steps")
        if train.max_steps and train.checkpoints_total_limit:
            saved = range(train.checkpointing_steps, train.max_steps + 1, train.checkpointing_steps)
            kept = list(saved)[-train.checkpoints_total_limit :]
            if missing := [n for n in wanted if n not in kept]:
                raise ValueError(f"evaluate.checkpoints {missing}: training keeps only checkpoints {kept}")
        return self

    @model_validator(mode="after")
    def _recaption_settings_fit(self) -> RunConfig:
        recaption = self.recaption
        if self.device == "cpu" and recaption.quantization != "none":
            raise ValueError("recaption.quantization needs a CUDA device (bitsandbytes)")
        if recaption.enabled and recaption.caption_column_out == self.dataset.caption_column:
            raise ValueError("recaption.caption_column_out must differ from dataset.caption_column")
        return self

    def fingerprint(self) -> str:
        """A short, stable hash of every setting that can change an output; part of the run id and
        the results lineage. Where the work runs (`distributed`) cannot, so it is left out."""
        settings = self.model_dump(mode="json", exclude={"distributed"})
        canonical = json.dumps(settings, sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(canonical.encode()).hexdigest()[:16]


class ConfigError(ValueError):
    """A config file that cannot be used; the message names the file and every bad field."""


def parse_config(data: dict, source: str = "<config>") -> RunConfig:
    try:
        return RunConfig.model_validate(data)
    except ValidationError as exc:
        problems = [
            f"  {'.'.join(str(p) for p in err['loc']) or '(root)'}: {err['msg']}" for err in exc.errors()
        ]
        raise ConfigError(f"{source}: {len(problems)} invalid field(s):\n" + "\n".join(problems)) from None


def load_config(path: str | Path) -> RunConfig:
    path = Path(path)
    if not path.is_file() and (CONFIG_DIR / path.name).is_file() and not path.parent.parts:
        path = CONFIG_DIR / path.name
    try:
        data = yaml.safe_load(path.read_text())
    except FileNotFoundError:
        raise ConfigError(f"{path}: config file not found") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping of settings at the top level")
    return parse_config(data, source=str(path))

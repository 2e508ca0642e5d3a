"""The style run: pull -> re-caption -> embed -> train -> evaluate -> push, as one Prefect flow.

Wiring only: each stage is a task in tasks/, passing paths and small records. On top of the
stages' own content-addressed outputs, every stage is a Prefect cached task keyed by just what
it depends on (flows/caching.py): a re-run with nothing changed shows each stage as Cached and
takes seconds. GPU stages hold a slot of the `gpu` concurrency limit (flows/gpu.py). The run
shows its progress and results in the Prefect UI as artifacts (tasks/artifacts.py builds them).
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Iterator
from pathlib import Path

import torch
from prefect import Task, flow, get_run_logger
from prefect.artifacts import (
    create_image_artifact,
    create_markdown_artifact,
    create_progress_artifact,
    create_table_artifact,
    update_progress_artifact,
)

from configs import RunConfig
from flows.caching import cached, is_cached, missing_files
from flows.fanout import fan_out
from flows.gpu import gpu_slot
from tasks import artifacts
from tasks.embed import embed_task, read_prompts, resolve_prompts_file
from tasks.evaluate import evaluate_task, model_names, stamp_lineage
from tasks.lineage import build_lineage, make_run_id, write_run_files, write_run_summary
from tasks.oxen_repos import use_token
from tasks.pull import pull_task
from tasks.push import push_task, resolve_token
from tasks.recaption import recaption_task
from tasks.train import train_task

CAPTION_ROWS = 20  # captions shown in the UI table


class RunBoard:
    """Runs the stages and shows the run in the UI: a progress artifact updated after every stage,
    and one artifact per result. A failed artifact is a warning, never a failed run.

    It also measures each stage (`usage`): wall seconds and, where CUDA is available, the peak
    GPU memory and what the stage leaves allocated. Each stage's result carries its record under
    "usage", which the run summary gathers (tasks.lineage.write_run_summary)."""

    def __init__(self, config: RunConfig, workdir: str):
        self.workdir = workdir
        self.prefix = artifacts.artifact_key(config.run_name)
        self.states: dict[str, str] = {}
        self.usage: dict[str, dict] = {}
        self.logger = get_run_logger()
        self.progress_id = self.publish(
            create_progress_artifact, progress=0.0, key=self.key("progress"),
            description=artifacts.progress_description({}, "pull"),
        )  # fmt: skip

    def stage(self, name: str, task: Task, *args, gpu: bool = False) -> dict:
        """Run one stage as a cached task; a GPU stage holds a GPU slot unless its result is cached.
        Returns the stage's result with its `usage` (see `measure`; the wait for a slot excluded)."""
        stage = cached(task, name, self.workdir)
        needs_gpu = gpu and not is_cached(task, name, self.workdir, args)
        with gpu_slot(name) if needs_gpu else contextlib.nullcontext(), self.measure() as usage:
            state = stage(*args, return_state=True)
            result = state.result()  # raises the stage's own error
            if state.name == "Cached" and (missing := missing_files(result)):
                self.logger.warning("%s: cached result names deleted files %s; rerunning", name, missing[:3])
                state = stage.with_options(refresh_cache=True)(*args, return_state=True)
                result = state.result()
        self.states[name] = state.name
        self.usage[name] = usage
        self.logger.info("%s: %s", name, ", ".join(f"{k} {v}" for k, v in usage.items() if v is not None))
        done = len(self.states)
        if self.progress_id is not None:
            following = artifacts.STAGES[done] if done < len(artifacts.STAGES) else None
            self.publish(
                update_progress_artifact, artifact_id=self.progress_id,
                progress=100.0 * done / len(artifacts.STAGES),
                description=artifacts.progress_description(self.states, following),
            )  # fmt: skip
        return {**result, "usage": usage}

    @staticmethod
    @contextlib.contextmanager
    def measure() -> Iterator[dict]:
        """Yields a dict filled when the block ends: wall_s, and with CUDA available peak_gib (the
        block's peak allocated), peak_reserved_gib (the allocator's peak hold on the card), and
        allocated_before_gib / allocated_after_gib; None without CUDA. Queries only: CUDA is not
        initialised here, so a CPU run on a GPU machine does not create a context."""
        gpu = torch.cuda.is_available()
        if gpu and torch.cuda.is_initialized():
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated() if gpu else None
        usage: dict = {}
        start = time.perf_counter()
        yield usage
        if gpu and torch.cuda.is_initialized():
            torch.cuda.synchronize()
        usage["wall_s"] = round(time.perf_counter() - start, 3)

        def gib(value: int | None) -> float | None:
            return None if value is None else round(value / 2**30, 3)

        usage["peak_gib"] = gib(torch.cuda.max_memory_allocated() if gpu else None)
        usage["peak_reserved_gib"] = gib(torch.cuda.max_memory_reserved() if gpu else None)
        usage["allocated_before_gib"] = gib(before)
        usage["allocated_after_gib"] = gib(torch.cuda.memory_allocated() if gpu else None)

    def key(self, name: str) -> str:
        return artifacts.artifact_key(self.prefix, name)

    def publish(self, create, **kwargs):
        try:
            return create(**kwargs)
        except Exception as exc:  # the UI is a view of the run; the run's outputs are on disk
            self.logger.warning("could not publish artifact %s: %s", kwargs.get("key"), exc)
            return None

    def table(self, name: str, rows: list[dict], description: str) -> None:
        self.publish(create_table_artifact, key=self.key(name), table=rows, description=description)

    def markdown(self, name: str, text: str, description: str) -> None:
        self.publish(create_markdown_artifact, key=self.key(name), markdown=text, description=description)

    def can_show(self, path: Path) -> bool:
        return self._image_url(path) is not None

    def _image_url(self, path: Path) -> str | None:
        # Set by `pixart-pipeline serve` for the runs it starts (flows/serve.py image_server).
        return artifacts.image_url(
            path, os.environ.get("PIXART_IMAGE_ROOT"), os.environ.get("PIXART_IMAGE_URL")
        )

    def image(self, name: str, path: Path, description: str) -> None:
        url = self._image_url(path)
        if url is None:  # too large to inline, and no image server serves its folder
            self.markdown(name, f"Too large to show here: `{path}`", description)
        elif url.startswith("data:"):  # an image artifact prints its URL under the image: pages of base64
            self.markdown(name, f"![{description}]({url})\n\n`{path}`", description)
        else:
            self.publish(create_image_artifact, image_url=url, key=self.key(name), description=description)


@flow(name="style-run")
def style_run(config: RunConfig, workdir: str = "runs") -> dict:
    """Teach PixArt-alpha the style of an Oxen dataset and push base-vs-LoRA results to Oxen."""
    logger = get_run_logger()
    workdir = str(Path(workdir).resolve())
    run = RunBoard(config, workdir)

    if config.results.is_remote:
        # The Oxen client reads its tokens once, at its first remote call (the pull's, maybe).
        use_token(config.results.host, resolve_token(config.results))
    pulled = run.stage("pull", pull_task, config, workdir)
    run_id = make_run_id(config, pulled["commit_id"])
    run_dir = str(Path(workdir) / "runs" / run_id)
    logger.info("run %s in %s", run_id, run_dir)

    with run.measure() as fanout_usage:  # distributed.engine: dask; nothing to do otherwise
        fanned = fan_out(pulled["manifest"], config, workdir, ["recaption", "embed"])
    captions = run.stage("recaption", recaption_task, pulled["manifest"], config, workdir, run_dir, gpu=True)
    shown = min(CAPTION_ROWS, captions["rows"])
    run.table("captions", artifacts.caption_rows(captions["captions"], CAPTION_ROWS),
              f"First {shown} of {captions['rows']} captions: original and generated")  # fmt: skip

    embeddings = run.stage(
        "embed", embed_task, pulled["manifest"], captions["captions"], config, workdir, run_dir, gpu=True
    )
    caches = embeddings["text_cache"], embeddings["latent_cache"]
    trained = run.stage("train", train_task, embeddings["train_set"], *caches, config, workdir, gpu=True)
    train_log = Path(trained["output_dir"]) / "train_log.jsonl"
    curve_path = Path(run_dir) / "artifacts" / "loss-curve.png"
    curve = artifacts.loss_curve(artifacts.read_train_log(train_log), curve_path)
    run.image("loss-curve", curve, f"Training loss, {trained['steps']} steps")

    lineage = build_lineage(config, run_id, pulled["commit_id"], trained["adapter_dir"])
    evaluated = run.stage(
        "evaluate", evaluate_task, embeddings["prompt_set"], embeddings["train_set"], *caches,
        embeddings["empty_text_key"], trained["adapter_dir"], config, workdir, lineage, gpu=True,
    )  # fmt: skip
    publish_evaluation(run, config, run_id, run_dir, evaluated)

    run_files = write_run_files(config, Path(run_dir), lineage)
    # The evaluation may be shared with an earlier run (same images, other lineage): push this
    # run's lineage in its results.jsonl and report.md.
    run_files |= stamp_lineage(evaluated["eval_dir"], embeddings["prompt_set"], config, lineage,
                               evaluated["metrics"], Path(run_dir) / "results")  # fmt: skip
    extra = {name: str(path) for name, path in run_files.items()}
    extra["train_log.jsonl"] = str(train_log)
    pushed = run.stage(
        "push", push_task, config, workdir, run_id, evaluated["eval_dir"], trained["adapter_dir"], extra
    )
    run.table("results", artifacts.results_rows(run_id, pushed), f"Results commit of {run_id}")

    results = {"pull": pulled, "recaption": captions, "embed": embeddings, "train": trained,
               "evaluate": evaluated, "push": pushed}  # fmt: skip
    stages = {name: {**result, "state": run.states[name]} for name, result in results.items()}
    if fanned:
        workers = len({shard["worker"] for shard in fanned})
        stages = {"fanout": {"shards": len(fanned), "workers": workers, "state": "Completed",
                             "usage": fanout_usage}, **stages}  # fmt: skip
    summary = write_run_summary(Path(run_dir), stages, run_id)
    logger.info(
        "results: %s@%s (%s); summary %s", pushed["repo"], pushed["branch"], pushed["commit_id"], summary
    )
    return {"run_id": run_id, "run_dir": run_dir, "summary": str(summary), "results": pushed,
            "states": run.states}  # fmt: skip


def publish_evaluation(run: RunBoard, config: RunConfig, run_id: str, run_dir: str, evaluated: dict) -> None:
    """The base|LoRA grids on one sheet (a row per prompt) and the style-shift metric."""
    prompts = read_prompts(resolve_prompts_file(config.evaluate.prompts_file), config.evaluate.style_template)
    labels = [f"{i}. {p['prompt']}" for i, p in enumerate(prompts)]
    grids, seeds = evaluated["grid_paths"], config.evaluate.seeds
    columns = len(model_names(config))  # base, checkpoints, LoRA side by side
    if len(labels) != len(grids):
        run.logger.warning("%d grids for %d prompts: no grid sheet", len(grids), len(labels))
    else:
        folder = Path(run_dir) / "artifacts"
        sheet = artifacts.grid_sheet(grids, labels, folder / "lora-grid.png", columns=columns)
        title = f"base | LoRA for {len(labels)} prompts, seeds {', '.join(map(str, seeds))}"
        if not run.can_show(sheet) and len(seeds) > 1:  # too large to inline, no image server: seed 0 only
            preview = folder / "lora-grid-seed0.png"
            sheet = artifacts.grid_sheet(grids, labels, preview, rows=(1, len(seeds)), columns=columns)
            title = f"base | LoRA for {len(labels)} prompts, seed {seeds[0]} (all seeds: results grids/)"
        run.image("lora-grid", sheet, title)
    run.markdown("style-shift", artifacts.metrics_markdown(evaluated["metrics"], run_id),
                 "How far the LoRA moved samples toward the training style")  # fmt: skip

"""The style run: pull -> re-caption -> embed -> train -> evaluate -> push, as one Prefect flow.

Wiring only: each stage is a task in tasks/, passing paths and small records. Every stage is
content-addressed, so re-running with nothing changed recomputes nothing and a killed run
picks up where it stopped.
"""

from __future__ import annotations

from pathlib import Path

from prefect import flow, get_run_logger

from configs import RunConfig
from tasks.embed import embed_task
from tasks.evaluate import evaluate_task
from tasks.lineage import build_lineage, make_run_id, write_run_files, write_run_summary
from tasks.pull import pull_task
from tasks.push import push_task
from tasks.recaption import recaption_task
from tasks.train import train_task


@flow(name="style-run")
def style_run(config: RunConfig, workdir: str = "runs") -> dict:
    """Teach PixArt-alpha the style of an Oxen dataset and push base-vs-LoRA results to Oxen."""
    logger = get_run_logger()
    workdir = str(Path(workdir).resolve())

    pulled = pull_task(config, workdir)
    run_id = make_run_id(config, pulled["commit_id"])
    run_dir = str(Path(workdir) / "runs" / run_id)
    logger.info("run %s in %s", run_id, run_dir)

    captions = recaption_task(pulled["manifest"], config, workdir, run_dir)
    embeddings = embed_task(pulled["manifest"], captions["captions"], config, workdir, run_dir)
    trained = train_task(
        embeddings["train_set"], embeddings["text_cache"], embeddings["latent_cache"], config, workdir
    )
    lineage = build_lineage(config, run_id, pulled["commit_id"], trained["adapter_dir"])
    evaluated = evaluate_task(
        embeddings["prompt_set"], embeddings["train_set"], embeddings["text_cache"], embeddings["latent_cache"],
        embeddings["empty_text_key"], trained["adapter_dir"], config, workdir, lineage,
    )  # fmt: skip
    run_files = write_run_files(config, Path(run_dir), lineage)
    extra = {name: str(path) for name, path in run_files.items()}
    extra["train_log.jsonl"] = str(Path(trained["output_dir"]) / "train_log.jsonl")
    pushed = push_task(config, workdir, run_id, evaluated["eval_dir"], trained["adapter_dir"], extra)

    stages = {"pull": pulled, "recaption": captions, "embed": embeddings, "train": trained,
              "evaluate": evaluated, "push": pushed}  # fmt: skip
    summary = write_run_summary(Path(run_dir), stages, run_id)
    logger.info("results: %s@%s (%s); summary %s", pushed["repo"], pushed["branch"], pushed["commit_id"], summary)
    return {"run_id": run_id, "run_dir": run_dir, "summary": str(summary), "results": pushed}

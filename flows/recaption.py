"""The recaption job: pull the newest dataset revision -> caption new images -> commit the captions.

Meant to run on a schedule (cron from `recaption.schedule`; flows/serve.py deploys it): each run
follows `dataset.revision` (a branch) to its newest commit, LLaVA captions only the images the
caption cache has not seen (none at all when nothing changed: the model is not even loaded), and
the captions land on the dataset repo's captions branch (tasks/caption_versions.py), one commit
per change. Wiring only, like flows/style_run.py.
"""

from __future__ import annotations

from pathlib import Path

from prefect import flow, get_run_logger

from configs import RunConfig
from flows.fanout import fan_out
from flows.gpu import gpu_slot
from tasks.caption_versions import commit_captions_task, recaption_run_id
from tasks.pull import pull_task
from tasks.recaption import recaption_task
from tasks.workdir import WorkDir


@flow(name="recaption")
def recaption_flow(config: RunConfig, workdir: str = "pixart-work") -> dict:
    """Caption the dataset's newest revision with LLaVA and commit the captions to its captions branch."""
    logger = get_run_logger()
    if not config.recaption.enabled:
        raise ValueError("recaption.enabled is false: the recaption job has nothing to do")
    workdir = str(Path(workdir).resolve())

    pulled = pull_task(config, workdir)
    run_dir = str(WorkDir(Path(workdir)).run_dir(recaption_run_id(config, pulled["commit_id"])))
    fan_out(pulled["manifest"], config, workdir, ["recaption"])  # distributed.engine: dask
    with gpu_slot("recaption"):  # waits while a style run's GPU stage holds the card (flows/gpu.py)
        captions = recaption_task(pulled["manifest"], config, workdir, run_dir)
    committed = commit_captions_task(
        config, workdir, pulled["manifest"], captions["captions"], pulled["commit_id"], run_dir
    )
    logger.info(
        "dataset commit %s: %d images, %d newly captioned, %d skipped (see %s); captions %s@%s %s",
        pulled["commit_id"], pulled["rows"], captions["generated"], pulled["skipped"], pulled["report"],
        committed["branch"], committed["commit_id"], "committed" if committed["committed"] else "unchanged",
    )  # fmt: skip
    return {"dataset_commit": pulled["commit_id"], "run_dir": run_dir, "pull": pulled, "recaption": captions,
            "captions": committed}  # fmt: skip

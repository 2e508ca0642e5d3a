"""Tests for the train stage (tasks/train.py) on the tiny PixArt, CPU, float32.

The caches are written directly (seeded random arrays in the embed stage's shapes), so these
tests need neither T5 nor the VAE, just as training does not.
"""

from __future__ import annotations

import itertools
import json
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import ClassVar

import numpy as np
import prefect.logging
import pyarrow as pa
import pytest
import torch
import yaml
from diffusers import PixArtTransformer2DModel
from peft import PeftModel
from safetensors.torch import load_file

from configs import RunConfig
from tasks.cache import ShardedCache
from tasks.cached_dataset import INFO_FILE, CachedTrainView, DeviceTrainView, build_train_view
from tasks.contracts import LATENTS, TEXT_EMBEDDINGS, TRAIN_SET, array_to_bytes, write_table
from tasks.model_loading import load_transformer, resolve_model
from tasks.train import StepPlan, main, serve_view, train_lora, train_task, training_key
from tasks.workdir import WorkDir

REPO = Path(__file__).resolve().parents[1]
MAX_LENGTH = 16
NUM_IMAGES = 8


@pytest.fixture(scope="module")
def _train_home(tiny_models):
    """conftest's tiny models, and one thread: a tiny model's 32-wide matmuls only lose from
    intra-op parallelism (2 threads on 2 busy cores made these tests ~10x slower)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("OMP_NUM_THREADS", "1")  # for the SIGKILL test's subprocess
        yield
    torch.set_num_threads(threads)


def write_caches(
    root: Path, dim: int, flip: bool = False, seed: int = 0, sizes: list[tuple[int, int]] | None = None
) -> Path:
    """train_set.parquet + text/ + latents/ under `root`: NUM_IMAGES samples of 4x8x8 latents
    (64 px) whose means are fixed +-2 patterns with a small std, so there is something to learn.
    `sizes`: each image's latent (height, width) instead, in the aspect-ratio bucket of 8x that."""
    rng = np.random.default_rng(seed)
    text, latents, rows = [], [], []
    for i in range(NUM_IMAGES):
        height, width = sizes[i] if sizes else (8, 8)
        length = int(rng.integers(3, MAX_LENGTH + 1))
        embedding = rng.standard_normal((length, dim)).astype(np.float32)
        text.append(
            {
                "key": f"text-{i}",
                "text": f"caption {i}",
                "length": length,
                "dim": dim,
                "dtype": "float32",
                "embedding": array_to_bytes(embedding),
            }
        )
        for flipped in (False, True) if flip else (False,):
            mean = (2 * np.sign(rng.standard_normal((4, height, width)))).astype(np.float32)
            latents.append(
                {
                    "key": f"latent-{i}-{flipped}",
                    "image_id": f"img-{i}",
                    "flipped": flipped,
                    "channels": 4,
                    "height": height,
                    "width": width,
                    "dtype": "float32",
                    "mean": array_to_bytes(mean),
                    "std": array_to_bytes(np.full((4, height, width), 0.05, np.float32)),
                }
            )
        rows.append(
            {
                "image_id": f"img-{i}",
                "caption": f"caption {i}",
                "text_key": f"text-{i}",
                "latent_key": f"latent-{i}-False",
                "flipped_latent_key": f"latent-{i}-True" if flip else None,
                "bucket": f"{8 * height}x{8 * width}" if sizes else None,
            }
        )
    ShardedCache(root / "text", TEXT_EMBEDDINGS).write(pa.Table.from_pylist(text, schema=TEXT_EMBEDDINGS))
    ShardedCache(root / "latents", LATENTS).write(pa.Table.from_pylist(latents, schema=LATENTS))
    return write_table(pa.Table.from_pylist(rows, schema=TRAIN_SET), TRAIN_SET, root / "train_set.parquet")


@pytest.fixture(scope="module")
def caches(_train_home, tmp_path_factory) -> Path:
    dim = PixArtTransformer2DModel.load_config(resolve_model("tiny:pixart"), subfolder="transformer")
    root = tmp_path_factory.mktemp("caches")
    write_caches(root, dim["caption_channels"], flip=True)
    return root


def make_config(**train) -> RunConfig:
    settings = {
        "rank": 8,
        "learning_rate": 1e-3,
        "lr_scheduler": "constant",
        "batch_size": 4,
        "max_steps": 4,
        "checkpointing_steps": 1000,
    }
    settings.update(train)
    return RunConfig.model_validate(
        {
            "device": "cpu",
            "dtype": "float32",
            "dataset": {"repo": "unused"},
            "models": {"pixart": "tiny:pixart"},
            "embed": {"resolution": 64, "max_length": MAX_LENGTH},
            "train": settings,
        }
    )


def run(caches: Path, out: Path, config: RunConfig, progress=None):
    return train_lora(
        caches / "train_set.parquet", caches / "text", caches / "latents", config, out, progress
    )


def log_of(out: Path, elapsed: bool = False) -> list[dict]:
    """The train log's records; without their clock readings (`elapsed`) unless asked for."""
    records = [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]
    return records if elapsed else [{k: v for k, v in r.items() if k != "elapsed"} for r in records]


# Interrupted runs below use this config: cosine schedule with warmup (scheduler state), dropout
# (RNG), flips, accumulation (batch 3 x 2 over 8 samples: micro-batches 3+3 | 2, 2 updates/epoch).
RESUME = {
    "max_steps": 6,
    "checkpointing_steps": 2,
    "checkpoints_total_limit": 2,
    "batch_size": 3,
    "gradient_accumulation_steps": 2,
    "lr_scheduler": "cosine",
    "warmup_steps": 2,
    "dropout": 0.1,
}


class Interrupt(Exception):
    pass


def stop_after(step: int):
    def progress(record: dict, total: int) -> None:
        if record["step"] == step:
            raise Interrupt

    return progress


@pytest.fixture(scope="module")
def uninterrupted(caches, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("uninterrupted")
    run(caches, out, make_config(**RESUME))
    return out


def assert_same_adapter(a: Path, b: Path) -> None:
    wa, wb = (
        load_file(a / "adapter/adapter_model.safetensors"),
        load_file(b / "adapter/adapter_model.safetensors"),
    )
    assert wa.keys() == wb.keys()
    diff = max((wa[k] - wb[k]).abs().max().item() for k in wa)
    assert diff < 1e-6, f"resumed adapter differs by {diff}"


def test_step_plan_covers_each_sample_once_per_epoch():
    plan = StepPlan(num_samples=7, batch_size=2, accumulation=2, seed=3)
    assert plan.steps_per_epoch == 2  # ceil(7 / (2 * 2))
    assert plan.total_steps(make_config(max_steps=None, epochs=5).train) == 10
    for epoch in range(2):
        seen = [i for s in (2 * epoch, 2 * epoch + 1) for idx, _ in plan.batches(s) for i in idx.tolist()]
        assert sorted(seen) == list(range(7))
    assert [len(i) for i, _ in plan.batches(1)] == [2, 1]  # the epoch's last update is short
    assert not torch.equal(plan.batches(0)[0][0], plan.batches(2)[0][0])  # reshuffled per epoch
    two = StepPlan(num_samples=7, batch_size=2, accumulation=1, seed=3, num_processes=2)
    shards = [
        [i for s in range(two.steps_per_epoch) for idx, _ in two.batches(s, r) for i in idx.tolist()]
        for r in (0, 1)
    ]
    assert len(shards[0]) == len(shards[1]) == 4 and set(shards[0]) | set(shards[1]) == set(range(7))


def test_loss_falls_and_adapter_loads_with_peft(caches, tmp_path):
    out = tmp_path / "run"
    result = run(caches, out, make_config(max_steps=100, checkpointing_steps=50))
    log = log_of(out, elapsed=True)
    assert [r["step"] for r in log] == list(range(1, 101))
    assert {"step", "epoch", "loss", "lr", "grad_norm", "elapsed"} == log[0].keys()
    elapsed = [r["elapsed"] for r in log]
    assert 0 < elapsed[0] and all(a < b for a, b in itertools.pairwise(elapsed)), elapsed[:5]
    assert result.steps == 100 and result.resumed_from is None
    assert result.final_loss < 0.75 * result.first_loss, (result.first_loss, result.final_loss)
    assert np.mean([r["loss"] for r in log[-20:]]) < np.mean([r["loss"] for r in log[:20]])

    base = load_transformer(make_config().models, torch.float32, torch.device("cpu"))
    peft_model = PeftModel.from_pretrained(base, str(result.adapter_dir))
    saved = load_file(result.adapter_dir / "adapter_model.safetensors")
    loaded = {k: v for k, v in peft_model.state_dict().items() if "lora_" in k}
    assert len(loaded) == len(saved) > 0
    for key, value in saved.items():
        assert torch.equal(loaded[key.replace(".weight", ".default.weight")], value)
    assert any(v.abs().sum() > 0 for k, v in saved.items() if "lora_B" in k)  # B starts at zero: it trained
    assert json.loads((out / "done.json").read_text())["steps"] == 100


def test_finished_run_is_a_cache_hit(caches, uninterrupted, monkeypatch):
    stamp = (uninterrupted / "done.json").stat().st_mtime_ns
    monkeypatch.setattr("tasks.train.lora_transformer", lambda *a: pytest.fail("retrained a finished run"))
    result = run(caches, uninterrupted, make_config(**RESUME))
    assert result.steps == 6 and result.adapter_dir == uninterrupted / "adapter"
    assert (uninterrupted / "done.json").stat().st_mtime_ns == stamp


def test_checkpoints_total_limit_is_honoured(uninterrupted):
    names = sorted(p.name for p in (uninterrupted / "checkpoints").iterdir())
    assert names == ["checkpoint-4", "checkpoint-6"]  # 2 was pruned (limit 2)
    state = torch.load(uninterrupted / "checkpoints/checkpoint-6/state.pt", weights_only=True)
    assert state["step"] == 6 and "optimizer" in state and "lr_scheduler" in state


def test_resume_after_interrupt_matches_uninterrupted(caches, uninterrupted, tmp_path):
    out = tmp_path / "interrupted"
    with pytest.raises(Interrupt):
        run(caches, out, make_config(**RESUME), progress=stop_after(5))  # checkpoint 4 exists, 5 is lost
    assert not (out / "done.json").exists() and len(log_of(out)) == 5
    (out / "checkpoints/checkpoint-9").mkdir()  # incomplete (no state.pt): must be ignored
    result = run(caches, out, make_config(**RESUME))
    assert result.resumed_from == 4 and result.steps == 6
    assert_same_adapter(out, uninterrupted)
    assert log_of(out) == log_of(uninterrupted)  # the lost step 5 was dropped and redone identically


def test_resume_after_sigkill_matches_uninterrupted(caches, uninterrupted, tmp_path):
    out = tmp_path / "killed"
    script = textwrap.dedent(f"""
        import os, signal, sys
        sys.path.insert(0, {str(REPO)!r})
        sys.path.insert(0, {str(Path(__file__).parent)!r})
        from pathlib import Path
        from test_train import make_config, run, RESUME

        def kill(record, total):
            if record["step"] == 3:
                os.kill(os.getpid(), signal.SIGKILL)

        run(Path({str(caches)!r}), Path({str(out)!r}), make_config(**RESUME), progress=kill)
    """)
    proc = subprocess.run(
        [sys.executable, "-c", script], check=False, capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == -9, proc.stderr[-2000:]
    result = run(caches, out, make_config(**RESUME))
    assert result.resumed_from == 2
    assert_same_adapter(out, uninterrupted)


class RecordingAdamW(torch.optim.AdamW):
    """Records the norm of the gradients the optimizer actually applies (after clipping)."""

    applied: ClassVar[list[float]] = []

    def step(self, closure=None):
        grads = [p.grad for group in self.param_groups for p in group["params"] if p.grad is not None]
        RecordingAdamW.applied.append(torch.linalg.vector_norm(torch.stack([g.norm() for g in grads])).item())
        return super().step(closure)


@pytest.mark.parametrize("max_norm", [0.05, 1e3])
def test_gradient_clipping_clips_the_applied_gradient(caches, tmp_path, monkeypatch, max_norm):
    monkeypatch.setattr(torch.optim, "AdamW", RecordingAdamW)
    RecordingAdamW.applied = []
    run(caches, tmp_path / "run", make_config(max_steps=3, max_grad_norm=max_norm))
    logged = [r["grad_norm"] for r in log_of(tmp_path / "run")]
    assert len(RecordingAdamW.applied) == 3
    for before, applied in zip(logged, RecordingAdamW.applied):
        if max_norm < 1:
            assert before > max_norm  # the logged norm is the one before clipping
            assert applied == pytest.approx(max_norm, rel=1e-4)
        else:
            assert applied == pytest.approx(before, rel=1e-5)  # nothing to clip: applied == logged


def test_gradient_checkpointing_gives_the_same_steps(caches, tmp_path):
    plain = run(caches, tmp_path / "plain", make_config(max_steps=2))
    checkpointed = run(caches, tmp_path / "ckpt", make_config(max_steps=2, gradient_checkpointing=True))
    a, b = log_of(tmp_path / "plain"), log_of(tmp_path / "ckpt")
    for ra, rb in zip(a, b, strict=True):
        assert rb["loss"] == pytest.approx(ra["loss"], abs=1e-6)
        assert rb["grad_norm"] == pytest.approx(ra["grad_norm"], rel=1e-4)
    assert checkpointed.final_loss == pytest.approx(plain.final_loss, abs=1e-6)


def test_compiled_blocks_give_the_same_steps(caches, tmp_path, monkeypatch):
    import tasks.train as train_module

    compiled, original = [], train_module.compile_blocks

    def eager_backend(transformer):  # dynamo's capture without inductor's C++/Triton toolchain
        original(transformer, backend="eager")
        compiled.extend(block._compiled_call_impl is not None for block in transformer.transformer_blocks)

    monkeypatch.setattr(train_module, "compile_blocks", eager_backend)
    plain = run(caches, tmp_path / "plain", make_config(max_steps=2))
    fast = run(caches, tmp_path / "compiled", make_config(max_steps=2, compile=True))
    assert compiled and all(compiled)
    for ra, rb in zip(log_of(tmp_path / "plain"), log_of(tmp_path / "compiled"), strict=True):
        assert rb["loss"] == pytest.approx(ra["loss"], abs=1e-6)
        assert rb["grad_norm"] == pytest.approx(ra["grad_norm"], rel=1e-4)
    assert fast.final_loss == pytest.approx(plain.final_loss, abs=1e-6)


def test_view_moved_to_the_device_gives_the_same_batches(caches, tmp_path):
    view_dir = build_train_view(
        caches / "train_set.parquet", caches / "text", caches / "latents", MAX_LENGTH, tmp_path / "view"
    )
    view, cpu = CachedTrainView(view_dir), torch.device("cpu")
    assert serve_view(view, cpu) is view  # on the CPU the mapped pages already are host memory
    resident = DeviceTrainView(view, cpu)
    index, flip = torch.tensor([4, 1, 3]), torch.tensor([True, False, True])
    expected, got = view.batch(index, flip, cpu), resident.batch(index, flip, cpu)
    assert expected.keys() == got.keys() == {"embeds", "mask", "mean", "std"}
    for name in expected:
        assert got[name].dtype == expected[name].dtype and torch.equal(got[name], expected[name]), name
    assert torch.equal(got["mean"][1], view.batch([1])["mean"][0])  # not flipped
    assert not torch.equal(got["mean"][0], view.batch([4])["mean"][0])  # flipped: the mirrored latents


def test_the_view_is_built_once_per_train_set_or_taken_from_the_embed_stage(caches, tmp_path):
    run(caches, tmp_path / "a", make_config(max_steps=1))
    views = tmp_path / "train_view"  # next to the output dir, named by its key
    (view_dir,) = [p for p in views.iterdir() if not p.name.startswith(".")]  # (.<key>.lock beside it)
    stamp = (view_dir / INFO_FILE).stat().st_mtime_ns
    run(caches, tmp_path / "b", make_config(max_steps=1, learning_rate=5e-4))
    assert (view_dir / INFO_FILE).stat().st_mtime_ns == stamp  # reused by another training run
    assert [p for p in views.iterdir() if not p.name.startswith(".")] == [view_dir]

    run_dir = tmp_path / "run"  # as the embed stage leaves it: train_set.parquet + a current train_view/
    run_dir.mkdir()
    (run_dir / "train_set.parquet").write_bytes((caches / "train_set.parquet").read_bytes())
    build_train_view(
        run_dir / "train_set.parquet", caches / "text", caches / "latents", MAX_LENGTH, run_dir / "train_view"
    )
    out = tmp_path / "elsewhere" / "c"
    train_lora(
        run_dir / "train_set.parquet", caches / "text", caches / "latents", make_config(max_steps=1), out
    )
    assert sorted(p.name for p in out.parent.iterdir()) == ["c"]  # no second view built
    assert log_of(out) == log_of(tmp_path / "a")  # same data, same steps


BUCKET_SIZES = [(8, 8), (4, 8), (8, 4), (4, 8), (8, 8), (4, 8), (8, 4), (8, 8)]  # latent h, w per image


def test_step_plan_with_buckets_is_single_bucket_and_deals_evenly():
    sizes = tuple(f"{h}x{w}" for h, w in BUCKET_SIZES)  # 3 + 3 + 2 rows: 2 + 2 + 1 batches of 2
    plan = StepPlan(num_samples=8, batch_size=2, accumulation=2, seed=3, latent_sizes=sizes)
    assert plan.bucketed and plan.steps_per_epoch == 3  # ceil(5 micro-batches / 2)
    for epoch in range(2):
        steps = range(3 * epoch, 3 * epoch + 3)
        micro = [idx.tolist() for s in steps for idx, _ in plan.batches(s)]
        assert [len(plan.batches(s)) for s in steps] == [2, 2, 1]
        assert sorted(i for batch in micro for i in batch) == list(range(8))
        assert all(len({sizes[i] for i in batch}) == 1 for batch in micro)
    again = StepPlan(num_samples=8, batch_size=2, accumulation=2, seed=3, latent_sizes=sizes)
    for step in (4, 0, 5):  # a fresh plan, asked out of order: the same batches (resume)
        for (a, fa), (b, fb) in zip(plan.batches(step), again.batches(step), strict=True):
            assert torch.equal(a, b) and torch.equal(fa, fb)
    assert [i.tolist() for i, _ in plan.batches(0)] != [i.tolist() for i, _ in plan.batches(3)]

    two = StepPlan(num_samples=8, batch_size=2, accumulation=2, seed=3, num_processes=2, latent_sizes=sizes)
    assert two.steps_per_epoch == 2  # 5 micro-batches wrapped to 6, 3 per process
    for step in range(4):
        counts = [len(two.batches(step, rank)) for rank in (0, 1)]
        assert counts[0] == counts[1] == (2 if step % 2 == 0 else 1)
        for rank in (0, 1):
            assert all(len({sizes[i] for i in idx.tolist()}) == 1 for idx, _ in two.batches(step, rank))
    seen = {i for s in range(2) for r in (0, 1) for idx, _ in two.batches(s, r) for i in idx.tolist()}
    assert seen == set(range(8))


def test_every_batch_shape_of_a_run_gets_a_compile(monkeypatch):
    from tasks.train import allow_recompiles

    plain = StepPlan(num_samples=7, batch_size=2, accumulation=2, seed=3)
    assert plain.batch_shapes() == {(None, 2), (None, 1)}
    sizes = tuple(f"{h}x{w}" for h, w in BUCKET_SIZES)  # 3 + 3 + 2 rows
    bucketed = StepPlan(num_samples=8, batch_size=2, accumulation=2, seed=3, num_processes=2, latent_sizes=sizes)
    counts = {size: sizes.count(size) for size in sizes}
    expected = {(size, 2) for size in sizes} | {(size, 1) for size, n in counts.items() if n % 2}
    assert bucketed.batch_shapes() == expected and len(expected) == 5

    config = torch._dynamo.config
    name = "recompile_limit" if hasattr(config, "recompile_limit") else "cache_size_limit"
    monkeypatch.setattr(config, name, 8)
    assert allow_recompiles(2) == 8  # a plain run's two shapes fit the default: left alone
    assert allow_recompiles(len(expected)) == 12 == getattr(config, name)  # two graphs a shape, 2 spare
    assert allow_recompiles(1) == 12  # never lowered


@pytest.fixture(scope="module")
def bucketed_caches(_train_home, tmp_path_factory) -> Path:
    dim = PixArtTransformer2DModel.load_config(resolve_model("tiny:pixart"), subfolder="transformer")
    root = tmp_path_factory.mktemp("bucketed")
    write_caches(root, dim["caption_channels"], flip=True, sizes=BUCKET_SIZES)
    return root


def test_bucketed_training_uses_one_bucket_per_batch_and_resumes_exactly(
    bucketed_caches, tmp_path, monkeypatch
):
    import tasks.train as train_module

    shapes, original = [], train_module.diffusion_loss

    def recording_loss(transformer, batch, *args):
        shapes.append(tuple(batch["mean"].shape[-2:]))
        return original(transformer, batch, *args)

    monkeypatch.setattr(train_module, "diffusion_loss", recording_loss)
    whole = run(bucketed_caches, tmp_path / "whole", make_config(**RESUME))
    assert whole.steps == 6 and np.isfinite(whole.final_loss)
    # batch 3 x accumulation 2 over buckets of 3, 3 and 2 images: 3 micro-batches, 2 updates per epoch
    assert len(shapes) == 3 * 3 and set(shapes) == {(8, 8), (4, 8), (8, 4)}  # every bucket, never mixed

    out = tmp_path / "interrupted"
    with pytest.raises(Interrupt):
        run(bucketed_caches, out, make_config(**RESUME), progress=stop_after(5))
    result = run(bucketed_caches, out, make_config(**RESUME))
    assert result.resumed_from == 4
    assert_same_adapter(out, tmp_path / "whole")
    assert log_of(out) == log_of(tmp_path / "whole")


def test_text_width_mismatch_names_the_problem(_train_home, tmp_path):
    write_caches(tmp_path, dim=7)
    with pytest.raises(ValueError, match="caption_channels"):
        run(tmp_path, tmp_path / "out", make_config())


def test_train_task_uses_the_training_key(caches, tmp_path):
    config = make_config(max_steps=2)
    key = training_key(caches / "train_set.parquet", config)
    assert key == training_key(caches / "train_set.parquet", make_config(max_steps=2))
    assert key != training_key(caches / "train_set.parquet", make_config(max_steps=3))
    with prefect.logging.disable_run_logger():
        out = train_task.fn(
            str(caches / "train_set.parquet"),
            str(caches / "text"),
            str(caches / "latents"),
            config,
            str(tmp_path),
        )
    assert out["output_dir"] == str(WorkDir(tmp_path).train_dir(key))
    assert out["adapter_dir"] == str(Path(out["output_dir"]) / "adapter") and out["steps"] == 2
    assert out["resumed_from"] is None and np.isfinite(out["final_loss"])


def test_main_trains_from_the_command_line(caches, tmp_path, capsys):
    config = make_config(max_steps=2)
    (tmp_path / "run.yaml").write_text(yaml.safe_dump(config.model_dump(mode="json")))
    result = main(
        [
            "--config",
            str(tmp_path / "run.yaml"),
            "--train-set",
            str(caches / "train_set.parquet"),
            "--workdir",
            str(caches),
            "--text-cache",
            str(caches / "text"),
            "--latent-cache",
            str(caches / "latents"),
        ]
    )
    key = training_key(caches / "train_set.parquet", config)
    assert result.adapter_dir == WorkDir(caches).train_dir(key) / "adapter" and result.steps == 2
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["steps"] == 2


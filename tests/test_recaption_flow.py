"""The scheduled recaption job (flows/recaption.py) under a real Prefect server, on real Oxen repos,
with the tiny LLaVA on CPU."""

from __future__ import annotations

import io
import json
import shutil
from pathlib import Path

import numpy as np
import oxen
import pytest
from PIL import Image

from configs import DatasetConfig, ModelsConfig, RecaptionConfig, RunConfig
from flows import cli
from tasks import model_loading
from tasks.contracts import CAPTIONS, MANIFEST, read_table
from tasks.oxen_repos import import_folder
from tasks.pull import pull_dataset
from tasks.workdir import WorkDir

DEMO = Path(__file__).resolve().parent.parent / "data" / "demo"
DEMO_ROWS = [json.loads(line) for line in (DEMO / "metadata.jsonl").read_text().splitlines()]
BRANCH = "captions/tiny-llava"


def _config(repo: Path) -> RunConfig:
    return RunConfig(
        device="cpu", dtype="float32", dataset=DatasetConfig(repo=str(repo)), models=ModelsConfig(llava="tiny:llava"),
        recaption=RecaptionConfig(batch_size=4, max_new_tokens=6, schedule="0 3 * * *"),
    )  # fmt: skip


def _write_rows(folder: Path, rows: list[dict]) -> None:
    (folder / "metadata.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))


def _demo_dataset(folder: Path, count: int) -> None:
    (folder / "images").mkdir(parents=True, exist_ok=True)
    for row in DEMO_ROWS[:count]:
        shutil.copy(DEMO / row["file_name"], folder / row["file_name"])
    _write_rows(folder, DEMO_ROWS[:count])


def _branch_log(repo_path: Path, branch: str) -> list[str]:
    repo = oxen.Repo(str(repo_path))
    repo.checkout(branch)
    try:
        return [commit.id for commit in repo.log()]
    finally:
        repo.checkout("main")


def _flow_run_states(flow_name: str) -> list[str]:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowFilter, FlowFilterName

    with get_client(sync_client=True) as client:
        runs = client.read_flow_runs(flow_filter=FlowFilter(name=FlowFilterName(any_=[flow_name])))
    return [run.state.type.value for run in runs]


@pytest.fixture
def count_loads(monkeypatch) -> list[int]:
    loads: list[int] = []
    real = model_loading.load_captioner

    def counting(*args, **kwargs):
        loads.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(model_loading, "load_captioner", counting)
    return loads


def test_scheduled_runs_caption_only_new_images_and_commit_once(
    prefect_server, tiny_models, tmp_path, count_loads
):
    from flows.recaption import recaption_flow

    source, repo_path, workdir = tmp_path / "source", tmp_path / "dataset", str(tmp_path / "work")
    _demo_dataset(source, 5)
    import_folder(source, repo_path, "Import five demo images")
    config = _config(repo_path)

    first = recaption_flow(config=config, workdir=workdir)
    assert (first["recaption"]["generated"], first["captions"]["committed"], first["captions"]["rows"]) == (
        5,
        True,
        5,
    )
    assert first["captions"]["branch"] == BRANCH and len(count_loads) == 1

    second = recaption_flow(config=config, workdir=workdir)  # nothing changed
    assert second["recaption"]["generated"] == 0 and len(count_loads) == 1  # the model was not even loaded
    assert (second["captions"]["committed"], second["captions"]["commit_id"]) == (
        False,
        first["captions"]["commit_id"],
    )

    _demo_dataset(repo_path, 8)  # three more images land on the followed branch
    repo = oxen.Repo(str(repo_path))
    repo.add(str(repo_path / "images"))
    repo.add(str(repo_path / "metadata.jsonl"))
    new_commit = repo.commit("Add three images").id

    third = recaption_flow(config=config, workdir=workdir)
    assert third["dataset_commit"] == new_commit
    assert (third["recaption"]["generated"], third["captions"]["rows"], len(count_loads)) == (3, 8, 2)
    assert _branch_log(repo_path, BRANCH)[:2] == [
        third["captions"]["commit_id"],
        first["captions"]["commit_id"],
    ]

    captions = read_table(Path(third["recaption"]["captions"]), CAPTIONS)
    trained_on = pull_dataset(
        DatasetConfig(repo=str(repo_path), revision=BRANCH, caption_column="llava_caption"),
        WorkDir(tmp_path / "t"),
    )
    assert trained_on.rows == 8
    assert (
        read_table(trained_on.manifest_path, MANIFEST).column("original_caption").to_pylist()
        == captions.column("caption").to_pylist()
    )
    assert _flow_run_states("recaption")[-3:] == ["COMPLETED"] * 3


def test_the_flow_deploys_with_the_configs_cron(prefect_server, tmp_path):
    from prefect.client.orchestration import get_client

    from flows.recaption import recaption_flow

    config = _config(tmp_path / "dataset")
    deployment = recaption_flow.to_deployment(
        name="nightly-captions", cron=config.recaption.schedule,
        parameters={"config": config.model_dump(mode="json"), "workdir": str(tmp_path / "work")},
    )  # fmt: skip
    deployment_id = deployment.apply()
    with get_client(sync_client=True) as client:
        stored = client.read_deployment(deployment_id)
    assert [s.schedule.cron for s in stored.schedules] == ["0 3 * * *"]
    assert RunConfig.model_validate(stored.parameters["config"]) == config


def _odd_images(folder: Path) -> tuple[dict[str, bytes], dict[str, str]]:
    """Every awkward kind of file a dataset may hold: (good files, bad files -> expected problem)."""
    images: dict[str, Image.Image | list[Image.Image]] = {}
    rgba = Image.new("RGBA", (40, 30), (0, 0, 0, 0))
    rgba.paste((200, 40, 40, 255), (10, 5, 30, 25))
    images["rgba.png"] = rgba
    palette = Image.new("P", (32, 32))
    palette.putpalette([0, 0, 0, 30, 120, 200] + [0] * 762)
    palette.paste(1, (8, 8, 24, 24))
    images["palette.png"] = palette
    images["grey_alpha.png"] = Image.new("LA", (24, 24), (90, 200))
    images["sixteen_bit.png"] = Image.fromarray(
        np.linspace(0, 65535, 48 * 32, dtype=np.uint16).reshape(32, 48)
    )
    images["cmyk.jpg"] = Image.new("CMYK", (32, 32), (0, 200, 200, 0))
    images["rotated.jpg"] = Image.new("RGB", (48, 24), (240, 200, 60))
    images["one_pixel.png"] = Image.new("RGB", (1, 1), (10, 200, 10))
    images["large.jpg"] = Image.new("RGB", (4000, 3000), (220, 210, 190))
    images["animated.gif"] = [Image.new("RGB", (16, 16), c) for c in ((255, 0, 0), (0, 0, 255))]
    good: dict[str, bytes] = {}
    for name, image in images.items():
        buffer = io.BytesIO()
        if isinstance(image, list):
            image[0].save(buffer, format="GIF", save_all=True, append_images=image[1:], duration=100, loop=0)
        elif name == "rotated.jpg":
            exif = Image.Exif()
            exif[0x0112] = 6  # shown rotated 90 degrees clockwise
            image.save(buffer, format="JPEG", exif=exif)
        elif name == "palette.png":
            image.save(buffer, format="PNG", transparency=0)
        else:
            image.save(buffer, format="JPEG" if name.endswith(".jpg") else "PNG")
        good[f"images/{name}"] = buffer.getvalue()
    noise = io.BytesIO()
    Image.effect_noise((64, 64), 50).convert("RGB").save(noise, format="PNG")
    bomb = io.BytesIO()
    Image.new("1", (12000, 12000)).save(bomb, format="PNG")  # 144 Mpx from a few kB: over Pillow's limit
    bad = {
        "images/truncated.png": noise.getvalue()[: len(noise.getvalue()) // 2],
        "images/bomb.png": bomb.getvalue(),
    }
    (folder / "images").mkdir(parents=True)
    for name, data in (good | bad).items():
        (folder / name).write_bytes(data)
    problems = {
        "images/truncated.png": "not a readable image",
        "images/bomb.png": "refusing a possible decompression bomb",
    }
    return good, problems


@pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")
def test_odd_images_are_captioned_or_skipped_by_name(prefect_server, tiny_models, tmp_path):
    from flows.recaption import recaption_flow

    source, repo_path = tmp_path / "source", tmp_path / "dataset"
    good, problems = _odd_images(source)
    _write_rows(source, [{"file_name": name, "text": f"an odd image: {name}"} for name in [*good, *problems]])
    import_folder(source, repo_path, "Import odd images")

    result = recaption_flow(config=_config(repo_path), workdir=str(tmp_path / "work"))
    assert (result["pull"]["rows"], result["pull"]["skipped"]) == (len(good), 2)
    assert result["recaption"]["generated"] == len(good) and result["captions"]["committed"]
    lines = Path(result["pull"]["report"]).read_text().splitlines()
    report = {row["file_name"]: row["problem"] for row in map(json.loads, lines)}
    assert set(report) == set(problems)
    for name, expected in problems.items():
        assert report[name].startswith(f"image does not decode: {name}: {expected}"), report[name]

    committed = [json.loads(line) for line in Path(result["captions"]["metadata"]).read_text().splitlines()]
    assert [row["file_name"] for row in committed] == list(good)
    assert all(isinstance(row["llava_caption"], str) and row["llava_caption"] for row in committed)
    manifest = read_table(Path(result["pull"]["manifest"]), MANIFEST).to_pylist()
    sizes = {row["file_name"]: (row["width"], row["height"]) for row in manifest}
    assert sizes["images/rotated.jpg"] == (24, 48)  # upright, as the EXIF tag says
    assert sizes["images/one_pixel.png"] == (1, 1) and sizes["images/large.jpg"] == (4000, 3000)


def test_cli_rejects_a_bad_recaption_config_before_any_work(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text(
        "device: cpu\ndataset: {repo: x}\nrecaption: {schedule: 'every night', quantization: 4bit}\n"
    )
    assert cli.main(["recaption", str(bad), "--workdir", str(tmp_path / "work")]) == 2
    err = capsys.readouterr().err
    assert "recaption.schedule" in err and "5-field cron" in err
    assert not (tmp_path / "work").exists()
    args = cli.build_parser().parse_args(["recaption", "configs/demo.yaml", "--workdir", "w"])
    assert (args.command, args.config, args.workdir) == ("recaption", "configs/demo.yaml", "w")

"""Push to a remote Oxen host: the real oxenai client against the loopback hub double."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import prefect.logging
import pytest

from configs import CONFIG_DIR, ResultsConfig, load_config
from tasks import oxen_repos
from tasks.push import commit_message, gather_results, push_results, push_task, resolve_token
from tasks.workdir import WorkDir
from tests.oxen_hub_double import OxenHubDouble

ROOT = Path(__file__).resolve().parent.parent
RUN_ID = "demo-0123456789"
RESULTS_REPO = "pixart/style-runs"


@pytest.fixture
def hub(tmp_path, monkeypatch):
    monkeypatch.delenv(oxen_repos.TOKEN_ENV, raising=False)
    with OxenHubDouble(tmp_path / "hub") as double:
        double.seed(RESULTS_REPO, {"README.md": b"# style runs\n"}, message="Create results repo")
        yield double


@pytest.fixture
def run_outputs(tmp_path) -> dict:
    """What evaluate and train leave behind, in miniature: eval dir, adapter dir, extra files."""
    eval_dir, adapter_dir = tmp_path / "eval", tmp_path / "adapter"
    files = {
        eval_dir / "results.jsonl": '{"model": "lora"}\n', eval_dir / "report.md": "# report\n",
        eval_dir / "metrics.json": '{"latent_fd_ratio": 12.0}\n', eval_dir / "images/base/000-seed0.png": "b",
        eval_dir / "images/lora/000-seed0.png": "l", eval_dir / "grids/000.png": "g",
        adapter_dir / "adapter_model.safetensors": "w" * 2000, adapter_dir / "adapter_config.json": "{}",
        tmp_path / "config.yaml": "run_name: demo\n", tmp_path / "train_log.jsonl": '{"step": 1}\n',
    }  # fmt: skip
    for path, text in files.items():
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    extra = {
        "config.yaml": str(tmp_path / "config.yaml"),
        "train_log.jsonl": str(tmp_path / "train_log.jsonl"),
    }
    return {"eval_dir": str(eval_dir), "adapter_dir": str(adapter_dir), "extra_files": extra}


EXPECTED = {
    "results.jsonl", "report.md", "metrics.json", "images/base/000-seed0.png", "images/lora/000-seed0.png",
    "grids/000.png", "lora/adapter_model.safetensors", "lora/adapter_config.json", "config.yaml", "train_log.jsonl",
}  # fmt: skip


def _config(host: str):
    config = load_config(CONFIG_DIR / "demo.yaml")
    config.results = ResultsConfig(repo=RESULTS_REPO, host=host, scheme="http")
    return config


def _gather(run_outputs: dict, tmp_path: Path) -> dict[str, Path]:
    extra = {k: Path(v) for k, v in run_outputs["extra_files"].items()}
    push_dir = tmp_path / "work" / "runs" / RUN_ID / "push"
    return gather_results(Path(run_outputs["eval_dir"]), Path(run_outputs["adapter_dir"]), extra, push_dir)


def _push_task(config, tmp_path: Path, run_outputs: dict) -> dict:
    with prefect.logging.disable_run_logger():
        return push_task.fn(config, str(tmp_path / "work"), RUN_ID, **run_outputs)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_remote_push_is_one_commit_on_the_run_branch(hub, run_outputs, tmp_path):
    pushed = _push_task(_config(hub.host), tmp_path, run_outputs)
    branch = f"runs/{RUN_ID}"
    assert pushed["branch"] == branch and pushed["repo"] == f"http://{hub.host}/{RESULTS_REPO}"
    tree = hub.tree(RESULTS_REPO, branch)
    assert [c["message"] for c in tree["commits"]] == [commit_message(RUN_ID), "Create results repo"]
    assert tree["commits"][0]["id"] == pushed["commit_id"]
    assert set(tree["files"]) == EXPECTED | {"README.md"}
    local = Path(pushed["local_copy"]) / "lora/adapter_model.safetensors"
    assert tree["files"]["lora/adapter_model.safetensors"] == _xxh3(local.read_bytes())
    assert hub.tree(RESULTS_REPO, "main")["files"].keys() == {"README.md"}  # main is left alone

    again = _push_task(_config(hub.host), tmp_path, run_outputs)  # the same run: found, nothing written
    assert again["commit_id"] == pushed["commit_id"]
    assert len(hub.tree(RESULTS_REPO, branch)["commits"]) == 2


def test_failed_uploads_are_retried_in_a_fresh_workspace(hub, run_outputs, tmp_path, monkeypatch):
    delays = []
    monkeypatch.setattr(oxen_repos.time, "sleep", delays.append)
    # The client itself tries a batch 5 times; 6 failures make our own retry start over.
    hub.fail("POST", r"/workspaces/[^/]+/files", status=500, times=6)
    files = _gather(run_outputs, tmp_path)
    pushed = push_results(_config(hub.host).results, WorkDir(tmp_path / "work"), RUN_ID, files)
    uploads = [r for r in hub.requests() if r["method"] == "POST" and "/files" in r["path"]]
    assert len(uploads) == 7 and delays == [0.5]
    assert [r["method"] for r in hub.requests() if "/workspaces/" in r["path"]].count(
        "DELETE"
    ) == 1  # cleaned up
    tree = hub.tree(RESULTS_REPO, f"runs/{RUN_ID}")
    assert len(tree["commits"]) == 2 and tree["commits"][0]["id"] == pushed["commit_id"]
    assert set(tree["files"]) == EXPECTED | {"README.md"}


def test_host_down_fails_naming_host_and_repo_and_keeps_the_local_copy(run_outputs, tmp_path, monkeypatch):
    monkeypatch.delenv(oxen_repos.TOKEN_ENV, raising=False)
    delays = []
    monkeypatch.setattr(oxen_repos.time, "sleep", delays.append)
    host = f"127.0.0.1:{_free_port()}"  # nothing listens there
    with pytest.raises(oxen_repos.OxenError) as failure:
        _push_task(_config(host), tmp_path, run_outputs)
    message = str(failure.value)
    assert f"http://{host}/{RESULTS_REPO}" in message and "after 4 attempts" in message
    push_dir = tmp_path / "work" / "runs" / RUN_ID / "push"
    assert str(push_dir) in message
    assert delays == [0.5, 1.0, 2.0]  # exponential backoff
    kept = {p.relative_to(push_dir).as_posix() for p in push_dir.rglob("*") if p.is_file()}
    assert kept == EXPECTED


def test_a_host_that_refuses_the_token_fails_at_once(tmp_path, run_outputs, monkeypatch):
    monkeypatch.delenv(oxen_repos.TOKEN_ENV, raising=False)
    with OxenHubDouble(tmp_path / "hub", token="only-this-token") as hub:
        with pytest.raises(oxen_repos.OxenError, match="refused the credentials"):
            push_results(
                _config(hub.host).results, WorkDir(tmp_path / "work"), RUN_ID, _gather(run_outputs, tmp_path)
            )
        assert not any(r["authorized"] for r in hub.requests())


# The client reads its tokens once per process, so the token run gets a fresh interpreter.
TOKEN_SCRIPT = textwrap.dedent(
    """
    import json, logging, sys
    import prefect.logging
    from configs import CONFIG_DIR, ResultsConfig, load_config
    from tasks.push import push_task

    logging.basicConfig(level=logging.DEBUG, stream=sys.stderr)
    host, work, outputs = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])
    config = load_config(CONFIG_DIR / "demo.yaml")
    config.results = ResultsConfig(repo="pixart/style-runs", host=host, scheme="http")
    with prefect.logging.disable_run_logger():
        print(json.dumps(push_task.fn(config, work, "demo-0123456789", **outputs)))
    """
)


def test_token_from_the_environment_reaches_the_host_and_nowhere_else(tmp_path, run_outputs):
    token = "oxen-token-3f9d2c1e-never-log-me"
    with OxenHubDouble(tmp_path / "hub", token=token) as hub:
        hub.seed(RESULTS_REPO, {"README.md": b"# style runs\n"}, message="Create results repo")
        env = dict(os.environ, OXEN_API_KEY=token, HOME=str(tmp_path / "home"))
        done = subprocess.run(
            [sys.executable, "-c", TOKEN_SCRIPT, hub.host, str(tmp_path / "work"), json.dumps(run_outputs)],
            cwd=ROOT, env=env, capture_output=True, text=True, timeout=300, check=False,
        )  # fmt: skip
        assert done.returncode == 0, done.stderr[-3000:]
        pushed = json.loads(done.stdout.strip().splitlines()[-1])
        assert hub.tree(RESULTS_REPO, pushed["branch"])["commits"][0]["id"] == pushed["commit_id"]
        seen = hub.requests()
        assert seen and all(r["authorized"] for r in seen)
    assert token not in done.stdout + done.stderr
    for path in [*(tmp_path / "work").rglob("*"), *(tmp_path / "home").rglob("*")]:
        assert not path.is_file() or token.encode() not in path.read_bytes(), path


def test_token_secret_names_a_prefect_secret_block(monkeypatch):
    from prefect.blocks.system import Secret

    loaded = []

    def fake_load(name):
        loaded.append(name)
        return Secret(value="from-the-block")

    monkeypatch.setattr(Secret, "load", fake_load)
    cfg = ResultsConfig(repo=RESULTS_REPO, host="hub.example:3000", token_secret="oxen-results-token")
    assert resolve_token(cfg) == "from-the-block" and loaded == ["oxen-results-token"]
    assert resolve_token(cfg.model_copy(update={"token_secret": None})) is None
    assert resolve_token(ResultsConfig(repo="oxen/results", token_secret="x")) is None  # local repo


def _xxh3(data: bytes) -> str:
    import xxhash

    return format(xxhash.xxh3_128_intdigest(data), "x")

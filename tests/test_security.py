"""Secrets stay secret, weights load from safetensors only, no repository code or pickle is trusted.

One demo style run (under a real Prefect server) with fake Oxen and Hugging Face tokens in the
environment and one in a Prefect Secret block: none may appear in any log record, the Prefect
API's logs, artifacts and parameters, or any file the run wrote. The remote push, where the token
must reach the host and nothing else, is tests/test_push.py's
test_token_from_the_environment_reaches_the_host_and_nowhere_else. Then static checks of the
source tree and loaders given pickle-only weights that would run code if anything unpickled them.
"""

from __future__ import annotations

import ast
import json
import logging
import os
import pickle
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from configs import CONFIG_DIR, ModelsConfig, load_config
from tasks import model_loading
from tasks.lora import merge_and_save
from tasks.train import load_checkpoint

ROOT = Path(__file__).resolve().parent.parent
SOURCES = sorted(
    path
    for folder in ("tasks", "flows", "configs", "bench", "data", "scripts")
    for path in (ROOT / folder).rglob("*.py")
)
OXEN_TOKEN = "oxen-SECRET-7f3a9c2e41d8"
HF_TOKEN = "hf_SECRETa8b7c6d5e4f3a2b1"
BLOCK_TOKEN = "block-SECRET-5e6f7a8b9c0d"
SECRETS = (OXEN_TOKEN, HF_TOKEN, BLOCK_TOKEN)
BLOCK_NAME = "pixart-security-test-token"


class Recorder(logging.Handler):
    """Every log record of the process, formatted with its arguments (what a handler would write)."""

    def __init__(self):
        super().__init__(logging.DEBUG)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(record.getMessage() + (self.format(record) if record.exc_info else ""))


@pytest.fixture(scope="module")
def secret_run(tmp_path_factory, prefect_server, tiny_models):
    """The demo (shortened) with tokens in the environment and a Secret block the config names."""
    from prefect.blocks.system import Secret
    from prefect.logging.handlers import APILogHandler

    from flows.style_run import style_run

    Secret(value=BLOCK_TOKEN).save(BLOCK_NAME, overwrite=True)
    workdir = tmp_path_factory.mktemp("secret-run")
    config = load_config(CONFIG_DIR / "demo.yaml")
    config.train.max_steps, config.train.checkpointing_steps = 20, 10
    config.evaluate.num_inference_steps = 4
    config.results.token_secret = BLOCK_NAME
    recorder = Recorder()
    loggers = [logging.getLogger(), logging.getLogger("prefect")]
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("OXEN_API_KEY", OXEN_TOKEN)
        mp.setenv("HF_TOKEN", HF_TOKEN)
        for logger in loggers:
            logger.addHandler(recorder)
        try:
            state = style_run(config=config, workdir=str(workdir), return_state=True)
        finally:
            for logger in loggers:
                logger.removeHandler(recorder)
    APILogHandler().flush()  # send buffered records to the server before reading them back
    return workdir, state, recorder.lines


def api_records(flow_run_id) -> tuple[list[str], list[str], dict]:
    """(log messages, artifact data and descriptions, parameters) the server holds for the run."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import (
        ArtifactFilter,
        ArtifactFilterFlowRunId,
        LogFilter,
        LogFilterFlowRunId,
    )

    with get_client(sync_client=True) as client:
        logs, offset = [], 0
        while batch := client.read_logs(
            LogFilter(flow_run_id=LogFilterFlowRunId(any_=[flow_run_id])), offset=offset
        ):
            logs += [log.message for log in batch]
            offset += len(batch)
        artifacts = client.read_artifacts(
            artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=[flow_run_id]))
        )
        parameters = client.read_flow_run(flow_run_id).parameters
    return logs, [json.dumps([a.data, a.description, a.key]) for a in artifacts], parameters


def test_the_demo_run_completes_with_tokens_present(secret_run):
    _, state, lines = secret_run
    assert state.is_completed(), state
    summary = json.loads(Path(state.result()["summary"]).read_text())
    assert summary["stages"]["push"]["commit_id"]
    assert len(lines) > 20  # the recorder saw the run's logging


def test_no_token_in_logs_api_or_artifacts(secret_run):
    _, state, lines = secret_run
    logs, artifacts, parameters = api_records(state.state_details.flow_run_id)
    assert len(logs) > 10 and len(artifacts) >= 3, (len(logs), len(artifacts))
    assert parameters["config"]["results"]["token_secret"] == BLOCK_NAME  # the name, never the value
    texts = {"process logs": "\n".join(lines), "API logs": "\n".join(logs), "artifacts": "\n".join(artifacts),
             "parameters": json.dumps(parameters)}  # fmt: skip
    for where, text in texts.items():
        for secret in SECRETS:
            assert secret not in text, f"{secret} in {where}"


def test_no_token_or_pickle_in_any_written_file(secret_run):
    """Every file of the work dir (run dir, caches, results repo and its Oxen store, Prefect's
    result records): no token, and nothing in pickle format."""
    workdir, _, _ = secret_run
    files = [p for p in Path(workdir).rglob("*") if p.is_file() and not p.is_symlink()]
    names = {p.name for p in files}
    assert {"run_summary.json", "results.jsonl", "adapter_model.safetensors", "state.pt"} <= names
    records = list((Path(workdir) / "cache" / "prefect").iterdir())
    assert records and all(json.loads(p.read_text()) for p in records)  # JSON results, not pickles
    for path in files:
        data = path.read_bytes()
        for secret in SECRETS:
            assert secret.encode() not in data, f"{secret} in {path}"
        # A raw pickle starts with PROTO 2-5; torch.save's format (state.pt) is a zip archive.
        assert not (len(data) > 1 and data[0] == 0x80 and 2 <= data[1] <= 5), f"{path} is a pickle"


# --- Static checks of the source tree -------------------------------------------------------------


def calls(tree: ast.AST):
    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            yield node


def keyword(call: ast.Call, name: str):
    for kw in call.keywords:
        if kw.arg == name:
            return kw.value
    return None


def is_true(node) -> bool:
    return isinstance(node, ast.Constant) and node.value is True


def parsed() -> dict[Path, ast.AST]:
    return {path: ast.parse(path.read_text(), str(path)) for path in SOURCES}


def test_sources_are_found():
    assert ROOT / "tasks" / "model_loading.py" in SOURCES and len(SOURCES) > 20


def test_no_remote_code_is_trusted():
    for path, tree in parsed().items():
        for call in calls(tree):
            value = keyword(call, "trust_remote_code")
            assert value is None or (isinstance(value, ast.Constant) and value.value is False), (
                f"{path}:{call.lineno}: trust_remote_code"
            )
        assert "trust_remote_code=True" not in path.read_text(), path


def test_torch_load_is_weights_only():
    found = 0
    for path, tree in parsed().items():
        for call in calls(tree):
            func = call.func
            if (
                isinstance(func, ast.Attribute)
                and func.attr == "load"
                and getattr(func.value, "id", None) == "torch"
            ):
                found += 1
                assert is_true(keyword(call, "weights_only")), (
                    f"{path}:{call.lineno}: torch.load without weights_only"
                )
    assert found >= 1  # train.py's checkpoint state


PICKLE_MODULES = {"pickle", "cPickle", "cloudpickle", "dill", "joblib", "shelve", "marshal"}


def test_nothing_unpickles():
    for path, tree in parsed().items():
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                assert not {a.name.split(".")[0] for a in node.names} & PICKLE_MODULES, (
                    f"{path}:{node.lineno}"
                )
            if isinstance(node, ast.ImportFrom):
                assert (node.module or "").split(".")[0] not in PICKLE_MODULES, f"{path}:{node.lineno}"
            if isinstance(node, ast.Call):
                assert not is_true(keyword(node, "allow_pickle")), f"{path}:{node.lineno}: allow_pickle"
                name = getattr(node.func, "attr", getattr(node.func, "id", ""))
                assert name not in {"read_pickle", "load_pickle"}, f"{path}:{node.lineno}"
                serializer = keyword(node, "result_serializer")
                if serializer is not None:  # Prefect's default result serializer is pickle
                    assert isinstance(serializer, ast.Constant) and serializer.value == "json", (
                        f"{path}:{node.lineno}"
                    )
                if is_true(keyword(node, "persist_result")):
                    assert serializer is not None, (
                        f"{path}:{node.lineno}: persisted result without json serializer"
                    )


# Loaders whose from_pretrained reads no weights (tokenizers, processors, configs); PeftModel reads
# adapter_model.safetensors, which merge_and_save checks for first (tested below).
NO_WEIGHTS = {"AutoTokenizer", "AutoProcessor", "AutoImageProcessor", "LoraConfig", "PeftModel"}


def test_every_model_load_asks_for_safetensors():
    checked = 0
    for path, tree in parsed().items():
        if path.parent.name not in ("tasks", "flows") or path.name == "tiny_models.py":
            continue  # tiny_models builds models from configs; it loads nothing
        for call in calls(tree):
            func = call.func
            if not (isinstance(func, ast.Attribute) and func.attr == "from_pretrained"):
                continue
            owner = getattr(func.value, "id", ast.unparse(func.value))
            if owner in NO_WEIGHTS:
                continue
            checked += 1
            assert is_true(keyword(call, "use_safetensors")), f"{path}:{call.lineno}: {owner}.from_pretrained"
    assert checked >= 5  # transformer, VAE, T5, LLaVA (twice), CLIP


# --- Pickle-only weights must never be unpickled --------------------------------------------------


class RunsCode:
    """Unpickling this runs `touch <marker>`: proof that something unpickled untrusted data."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def booby_trap(path: Path, marker: Path) -> None:
    path.write_bytes(pickle.dumps({"weight": RunsCode(marker)}))


def pickle_only_copy(source: Path, dest: Path, marker: Path, subfolder: str, bin_name: str) -> Path:
    shutil.copytree(source, dest)
    for weights in (dest / subfolder).glob("*.safetensors"):
        weights.unlink()
    booby_trap(dest / subfolder / bin_name, marker)
    return dest


@pytest.mark.parametrize(
    "model, subfolder, bin_name, load",
    [
        ("pixart", "transformer", "diffusion_pytorch_model.bin", model_loading.load_transformer),
        ("pixart", "text_encoder", "pytorch_model.bin", model_loading.load_text_encoder),
        ("llava", ".", "pytorch_model.bin", model_loading.load_captioner),
    ],
    ids=["transformer", "text_encoder", "captioner"],
)
def test_pickle_only_model_is_refused(tiny_models, tmp_path, model, subfolder, bin_name, load):
    marker = tmp_path / "code-ran"
    folder = pickle_only_copy(tiny_models[model], tmp_path / model, marker, subfolder, bin_name)
    with pytest.raises(OSError, match=f"models.{model}="):
        load(ModelsConfig(**{model: str(folder)}), torch.float32, torch.device("cpu"))
    assert not marker.exists()


def test_pickle_only_adapter_is_refused(tiny_models, tmp_path):
    marker = tmp_path / "code-ran"
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text(
        json.dumps({"peft_type": "LORA", "r": 4, "target_modules": ["to_q"]})
    )
    booby_trap(adapter / "adapter_model.bin", marker)
    with pytest.raises(FileNotFoundError, match="adapter_model.safetensors"):
        merge_and_save(adapter, ModelsConfig(pixart="tiny:pixart"), tmp_path / "merged")
    assert not marker.exists() and not (tmp_path / "merged").exists()


def test_a_planted_checkpoint_state_is_not_unpickled(tmp_path):
    """A checkpoint's state.pt is loaded with weights_only=True: a planted pickle fails, runs nothing."""
    marker = tmp_path / "code-ran"
    model = torch.nn.Linear(2, 2)
    optimizer = torch.optim.AdamW(model.parameters())
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    checkpoint = tmp_path / "checkpoint-5"
    checkpoint.mkdir()
    save_file({n: p.detach().clone() for n, p in model.named_parameters()}, checkpoint / "lora.safetensors")
    booby_trap(checkpoint / "state.pt", marker)
    with pytest.raises(pickle.UnpicklingError, match="[Ww]eights only load failed"):
        load_checkpoint(checkpoint, model, optimizer, scheduler)
    assert not marker.exists()

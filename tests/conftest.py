"""Shared test set-up: private HOME (Oxen's user config lives there), one tiny-model cache per
session, quiet Prefect, and a real Prefect test server for the tests that need one."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

_SESSION_ROOT = Path(os.environ.get("PIXART_TEST_ROOT", "/tmp/pixart-pipeline-tests")) / str(os.getpid())
_SESSION_ROOT.mkdir(parents=True, exist_ok=True)
# Set before any test module imports prefect or oxen: both read these at import or first use.
os.environ["HOME"] = str(_SESSION_ROOT / "home")
os.environ["PIXART_PIPELINE_HOME"] = os.environ.get("PIXART_PIPELINE_HOME_FOR_TESTS", str(_SESSION_ROOT / "models"))
os.environ["PREFECT_HOME"] = str(_SESSION_ROOT / "prefect")
os.environ["PREFECT_SERVER_ANALYTICS_ENABLED"] = "false"
os.environ["DO_NOT_TRACK"] = "1"
os.environ.pop("PREFECT_API_URL", None)

PROJECT_ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(autouse=True, scope="session")
def _one_torch_thread():
    """Tiny models on 2 shared cores: one thread is ~20x faster than two fighting for the CPU."""
    import torch

    torch.set_num_threads(1)


@pytest.fixture(scope="session")
def project_root() -> Path:
    return PROJECT_ROOT


@pytest.fixture(scope="session")
def tiny_models() -> dict[str, Path]:
    from tasks.model_loading import models_home
    from tasks.tiny_models import ensure_tiny_models

    return ensure_tiny_models(models_home() / "tiny-models")


@pytest.fixture(scope="session")
def prefect_server():
    """A real Prefect server (SQLite) for the session; 60 s start-up allowance for 2 busy cores."""
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=60):
        yield

"""Packaging checks: the Dockerfile lints clean and every shipped config validates."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from configs import CONFIG_DIR, ConfigError, load_config, parse_config

ROOT = Path(__file__).resolve().parent.parent


def test_dockerfile_lints_clean():
    hadolint = shutil.which("hadolint") or str(Path(sys.executable).parent / "hadolint")
    result = subprocess.run([hadolint, str(ROOT / "Dockerfile")], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize("path", sorted(CONFIG_DIR.glob("*.yaml")), ids=lambda p: p.name)
def test_every_shipped_config_validates(path: Path):
    config = load_config(path)
    assert config.run_name and len(config.fingerprint()) == 16


def test_bad_config_names_every_field():
    with pytest.raises(ConfigError) as info:
        parse_config(
            {"dataset": {"repo": "x", "colour": "red"}, "train": {"rank": 0, "batch_size": "two"},
             "embed": {"resolution": 100}, "recaption": {"prompt_template": "no slot"}}  # fmt: skip
        )
    message = str(info.value)
    for field in ("dataset.colour", "train.rank", "train.batch_size", "embed.resolution", "recaption.prompt_template"):
        assert field in message
    assert "5 invalid field(s)" in message


def test_config_file_errors_name_the_file(tmp_path: Path):
    missing = tmp_path / "nope.yaml"
    with pytest.raises(ConfigError, match="nope.yaml: config file not found"):
        load_config(missing)
    broken = tmp_path / "broken.yaml"
    broken.write_text("dataset: [unclosed\n")
    with pytest.raises(ConfigError, match="broken.yaml: not valid YAML"):
        load_config(broken)
    listed = tmp_path / "list.yaml"
    listed.write_text("- a\n- b\n")
    with pytest.raises(ConfigError, match="expected a mapping"):
        load_config(listed)

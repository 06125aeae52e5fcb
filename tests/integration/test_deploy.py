"""The sidecar deployment files: compose.yaml validates, the sidecar configs load."""

from __future__ import annotations

import shutil
import subprocess

import pytest

from sniff import config
from tests.helpers import ROOT


def test_compose_file_validates() -> None:
    exe = shutil.which("docker-compose")
    if exe is None:
        pytest.fail("docker-compose is not installed; run scripts/setup.sh")
    r = subprocess.run(
        [exe, "-f", str(ROOT / "compose.yaml"), "config", "-q"],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=60,
    )
    assert r.returncode == 0, r.stderr


@pytest.mark.parametrize("name", ["sidecar-amqp.toml", "sidecar-mysql.toml"])
def test_sidecar_configs_load(name: str) -> None:
    cfg = config.load(ROOT / "deploy" / name)
    assert cfg.proxies and cfg.export.otlp == "http://otel-collector:4318"

"""The standalone `loratch` binary runs without Python and without LD_LIBRARY_PATH."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

import loratch


@pytest.fixture(scope="module")
def binary() -> Path:
    path = os.environ.get("LORATCH_BIN")
    if not path:
        path = str(Path(__file__).resolve().parents[2] / "target" / "release" / "loratch")
    p = Path(path)
    assert p.is_file(), f"build the binary first (make build): {p} missing"
    return p


def clean_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in {"LD_LIBRARY_PATH", "PYTHONPATH", "VIRTUAL_ENV"}}
    env["PATH"] = "/usr/bin:/bin"
    return env


def test_version(binary: Path) -> None:
    out = subprocess.run([binary, "--version"], capture_output=True, text=True, env=clean_env(), check=True)
    assert out.stdout.strip() == f"loratch {loratch.__version__}"


def test_info_reports_libtorch_and_devices(binary: Path) -> None:
    out = subprocess.run([binary, "info", "--json"], capture_output=True, text=True, env=clean_env(), check=True)
    info = json.loads(out.stdout)
    assert info["torch_version"] == loratch.TORCH_VERSION
    import torch

    assert torch.__version__.startswith(info["torch_version"])
    assert info["devices"][0] == "cpu"
    assert info["cuda_devices"] == torch.cuda.device_count()
    assert info["threads"] >= 1


def test_binary_does_not_link_python(binary: Path) -> None:
    out = subprocess.run(["ldd", str(binary)], capture_output=True, text=True, check=True)
    assert "libpython" not in out.stdout and "libtorch_python" not in out.stdout
    assert "not found" not in out.stdout, out.stdout


def test_generate_answers_with_the_default_model(binary: Path) -> None:
    from loratch.default_model import default_model_dir

    out = subprocess.run(
        [binary, "generate", "--model", str(default_model_dir()), "--prompt", "What is the capital of France?",
         "--max-new-tokens", "16"],
        capture_output=True, text=True, env=clean_env(), timeout=300,
    )
    assert out.returncode == 0, out.stderr
    assert "Paris" in out.stdout


def test_generate_reports_errors_without_crashing(binary: Path, tmp_path: Path) -> None:
    out = subprocess.run(
        [binary, "generate", "--model", str(tmp_path), "--prompt", "hi"], capture_output=True, text=True, env=clean_env()
    )
    assert out.returncode == 1 and out.stderr.startswith("error:") and "config.json" in out.stderr

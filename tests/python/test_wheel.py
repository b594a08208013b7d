"""`make wheel` output: installs into a fresh venv that already has torch==2.11.0, runs a forward,
declares its torch pin and bundles no libtorch."""

from __future__ import annotations

import os
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest

FORWARD = """
import torch, loratch
assert loratch.__file__.startswith({site!r}), loratch.__file__
layer = loratch.torch_lora_linear(8, 4, 2, 4.0)
y = loratch.torch_lora_forward(layer, torch.randn(3, 8))
y.sum().backward()
assert y.shape == (3, 4) and layer.lora_B.grad is not None
print("OK", loratch.__version__)
"""


@pytest.fixture(scope="module")
def wheel() -> Path:
    wheel_dir = Path(os.environ.get("LORATCH_WHEEL_DIR", Path(__file__).resolve().parents[2] / "dist"))
    wheels = sorted(wheel_dir.glob("loratch-*.whl"))
    assert wheels, f"no wheel in {wheel_dir}: run `make wheel` first"
    return wheels[-1]


def test_wheel_contents_and_metadata(wheel: Path) -> None:
    with zipfile.ZipFile(wheel) as z:
        names = z.namelist()
        libs = [n for n in names if ".so" in n]
        assert libs == [n for n in libs if n.startswith("loratch/_loratch")], libs
        assert not any("libtorch" in n or "libc10" in n for n in names)
        assert "loratch/py.typed" in names and "loratch/_loratch.pyi" in names
        meta = next(n for n in names if n.endswith(".dist-info/METADATA"))
        assert "Requires-Dist: torch==2.11.0" in z.read(meta).decode()
        # The extension is small: it links libtorch, it does not contain it.
        assert z.getinfo(libs[0]).file_size < 50 * 2**20


def test_wheel_installs_and_runs_in_a_fresh_venv(wheel: Path, tmp_path: Path) -> None:
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    py = venv / "bin" / "python"
    site = subprocess.run(
        [py, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        capture_output=True, text=True, check=True,
    ).stdout.strip()
    # The fresh venv "already has torch==2.11.0": it sees this environment's site-packages
    # (where torch is installed) through a .pth file, without installing loratch there.
    host_site = sysconfig.get_paths()["purelib"]
    (Path(site) / "host_torch.pth").write_text(host_site + "\n")
    # --no-index: nothing may be downloaded; the torch==2.11.0 requirement must already be met.
    subprocess.run(
        [py, "-m", "pip", "install", "--quiet", "--no-index", str(wheel)], check=True, capture_output=True, text=True
    )
    env = {k: v for k, v in os.environ.items() if k not in {"PYTHONPATH", "VIRTUAL_ENV", "LD_LIBRARY_PATH"}}
    out = subprocess.run(
        [py, "-c", FORWARD.format(site=site)], capture_output=True, text=True, cwd=tmp_path, env=env
    )
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.startswith("OK")

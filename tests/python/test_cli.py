"""The standalone `loratch` binary runs without Python and without LD_LIBRARY_PATH."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

import loratch


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
    assert info["mkl_dispatch_forced"] is cpu_has_avx2_fma()
    assert info["matmul_gflops"] is None  # only measured on request


def cpu_flags() -> tuple[str, set[str]]:
    """(vendor, feature flags) of the first CPU in /proc/cpuinfo."""
    vendor, flags = "", set()
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        key, _, value = line.partition(":")
        if key.strip() == "vendor_id" and not vendor:
            vendor = value.strip()
        if key.strip() == "flags" and not flags:
            flags = set(value.split())
    return vendor, flags


def cpu_has_avx2_fma() -> bool:
    return {"avx2", "fma"} <= cpu_flags()[1]


def mkl_banner(binary: Path, extra_env: dict[str, str]) -> str:
    """oneMKL's first MKL_VERBOSE line (it names the code path it chose) from `loratch info --matmul-peak`."""
    env = {**clean_env(), "MKL_VERBOSE": "1", **extra_env}
    out = subprocess.run([binary, "info", "--matmul-peak"], capture_output=True, text=True, env=env, check=True)
    lines = [ln for ln in out.stdout.splitlines() if ln.startswith("MKL_VERBOSE oneMKL")]
    assert lines, out.stdout[-2000:]
    assert "fp32 matmul:" in out.stdout
    return lines[0]


def test_binary_runs_onemkl_vector_kernels_whatever_the_cpu_vendor(binary: Path) -> None:
    import torch

    if not torch.backends.mkl.is_available():
        pytest.skip("this libtorch has no oneMKL")
    if not cpu_has_avx2_fma():
        pytest.skip("this CPU lacks AVX2/FMA: the binary leaves oneMKL's dispatch alone")
    # The binary answers oneMKL's vendor check: AVX2 (or AVX-512) kernels on any vendor's CPU.
    assert "Advanced Vector Extensions" in mkl_banner(binary, {})
    # LORATCH_MKL_DISPATCH=mkl hands the question back to oneMKL, which on AMD picks its generic path.
    own = mkl_banner(binary, {"LORATCH_MKL_DISPATCH": "mkl"})
    if cpu_flags()[0] == "AuthenticAMD":
        assert "Advanced Vector Extensions" not in own, own


def test_info_measures_the_matmul_peak_on_request(binary: Path) -> None:
    out = subprocess.run(
        [binary, "info", "--json", "--matmul-peak"], capture_output=True, text=True, env=clean_env(), check=True
    )
    gflops = json.loads(out.stdout)["matmul_gflops"]
    assert isinstance(gflops, float) and 0 < gflops < 1e6


def test_info_ends_quietly_when_its_reader_goes_away(binary: Path) -> None:
    # `loratch info | head -0`: stdout's reader is gone before the first write (its end of the pipe is
    # closed before the binary starts), so that write ends the process by SIGPIPE, not a Rust panic.
    import signal

    read_end, write_end = os.pipe()
    os.close(read_end)
    try:
        proc = subprocess.run([binary, "info"], stdout=write_end, stderr=subprocess.PIPE, env=clean_env(), timeout=60)
    finally:
        os.close(write_end)
    assert proc.returncode == -signal.SIGPIPE, (proc.returncode, proc.stderr[-2000:])
    assert b"panicked" not in proc.stderr


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

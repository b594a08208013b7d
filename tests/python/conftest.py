"""Shared test setup: hypothesis profiles chosen by LORATCH_HYPOTHESIS_PROFILE (default "dev";
"thorough" runs many more examples), and the `binary` fixture (the built `loratch` CLI)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from hypothesis import HealthCheck, settings

settings.register_profile(
    "dev", max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)
settings.register_profile(
    "thorough", max_examples=500, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)
settings.load_profile(os.environ.get("LORATCH_HYPOTHESIS_PROFILE", "dev"))


@pytest.fixture(scope="session")
def binary() -> Path:
    """The `loratch` binary: $LORATCH_BIN, or target/release/loratch (built by `make build`)."""
    path = os.environ.get("LORATCH_BIN") or str(Path(__file__).resolve().parents[2] / "target" / "release" / "loratch")
    assert Path(path).is_file(), f"build the binary first (make build): {path} missing"
    return Path(path)

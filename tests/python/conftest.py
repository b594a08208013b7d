"""Shared test setup: hypothesis profiles chosen by LORATCH_HYPOTHESIS_PROFILE (default "dev";
"thorough" runs many more examples), and the fixtures every module may use: the built `loratch`
binary, tiny random models saved once per session, and a trainable tiny model with SmolLM2's
tokenizer and records. The session's model directories are shared: tests read them, and copy
one before changing it. Helpers that are not fixtures live in helpers.py."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

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


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Callable[..., Path]:
    """``tiny_model(family, seed=0, **overrides)``: the directory of ``tiny_models.make_model``'s
    model, built once per session for each set of arguments (read-only: copy it to change it).
    ``helpers.hf_model(dir)`` gives the transformers model (the same weights)."""
    from tiny_models import make_model

    made: dict[str, Path] = {}

    def get(family: str, seed: int = 0, **overrides: Any) -> Path:
        key = f"{family}-{seed}-" + "-".join(f"{k}={v}" for k, v in sorted(overrides.items()))
        if key not in made:
            d = tmp_path_factory.mktemp(f"{family}-{seed}")
            make_model(family, d, seed=seed, **overrides)
            made[key] = d
        return made[key]

    return get


@pytest.fixture(scope="session")
def trainable_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random Llama with SmolLM2's vocabulary size and tokenizer files, and 40 records in
    its ``data.jsonl`` (learnable: the answers share their wording). Read-only."""
    from tiny_models import make_trainable_model, write_records

    d = tmp_path_factory.mktemp("tiny-trainable")
    make_trainable_model(d)
    write_records(d / "data.jsonl", 40)
    return d

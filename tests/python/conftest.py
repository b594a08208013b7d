"""Shared test setup: hypothesis profiles chosen by LORATCH_HYPOTHESIS_PROFILE (default "dev";
"thorough" runs many more examples)."""

from __future__ import annotations

import os

from hypothesis import HealthCheck, settings

settings.register_profile(
    "dev", max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)
settings.register_profile(
    "thorough", max_examples=500, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)
settings.load_profile(os.environ.get("LORATCH_HYPOTHESIS_PROFILE", "dev"))

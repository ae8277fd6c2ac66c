"""Shared fixtures: one local Ray per test session, the fake endpoint, sample data."""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")
os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1")
os.environ.setdefault("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "0")


@pytest.fixture(scope="session")
def ray_local():
    """A real local Ray, started once (``ray.init`` costs seconds and ~1 GiB)."""
    import ray

    started = not ray.is_initialized()
    if started:
        ray.init(num_cpus=2, include_dashboard=False, ignore_reinit_error=True, log_to_driver=False)
    yield ray
    if started:
        ray.shutdown()


@pytest.fixture
def fake_llm():
    from tests.fake_llm import FakeLLM

    with FakeLLM() as fake:
        yield fake

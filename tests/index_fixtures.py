"""Session fixtures for the index and retrieval tests: ``pytest_plugins = ("tests.index_fixtures",)``.

Session-scoped, so the fake endpoint starts once and the shipped corpus is embedded once per test session.
"""

from __future__ import annotations

import pytest

from pipelines.chunking import ChunkSettings
from tests.index_helpers import CORPUS, build, embed_settings


@pytest.fixture(scope="session")
def embed_fake():
    from dspy_ray.testing.fake_llm import FakeLLM

    with FakeLLM() as fake:
        yield fake


@pytest.fixture(scope="session")
def shipped_index(ray_local, embed_fake, tmp_path_factory):
    """The shipped corpus indexed with the fake embedder (exact index); (path, build result)."""
    index = tmp_path_factory.mktemp("shipped") / "index"
    built = build(CORPUS, index, embed_settings(embed_fake), chunking=ChunkSettings())
    return index, built

"""Shared by the index and retrieval tests: settings for the fake embedding endpoint, in-process builds.

The fixtures that use them live in ``tests/index_fixtures.py`` (``pytest_plugins`` in a test module).
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path

from dspy_ray.endpoints.settings import EndpointSettings
from pipelines.index import IndexBuild, IndexOptions, IndexSummary

ROOT = Path(__file__).resolve().parents[1]
CORPUS = ROOT / "data" / "rag" / "corpus"
# A few files of the shipped corpus, one of each kind, for builds that need not read it all.
SMALL = ("dispatch/priority_codes.md", "dispatch/radio_channels.txt", "ems/cardiac_arrest_protocol.rst",
         "dispatch/non_emergency_lines.html", "bulletins.jsonl")
MODEL = "fake-embed"


def embed_settings(fake, **overrides) -> EndpointSettings:
    values = {"base_url": fake.base_url, "model": MODEL, "origin": "configured", "max_attempts": 3,
              "timeout_s": 10.0, **overrides}
    return EndpointSettings(**values)


@dataclass
class Built:
    summary: IndexSummary
    said: list[str]


def build(corpus, index, settings: EndpointSettings, **options) -> Built:
    said: list[str] = []
    opts = IndexOptions(corpus=str(corpus), index=str(index), **options)
    summary = IndexBuild(opts, settings, said.append).run()
    return Built(summary, said)


def copy_corpus(dest: Path, files: tuple[str, ...] | None = None) -> Path:
    if files is None:
        shutil.copytree(CORPUS, dest)
    else:
        for rel in files:
            (dest / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(CORPUS / rel, dest / rel)
    return dest


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]

"""Gold answers for the fake endpoint's few-shot mode, keyed the way the fake keys inputs.

The fake answers an input correctly only for the label values its prompt teaches
(a demo showing the value, or the gold keyword in the instruction); see
``FakeSettings.gold`` in :mod:`dspy_ray.testing.fake_llm`.  That makes prompt optimization
measurably raise the metric, deterministically.

    >>> gold = triage_gold(["data/triage_train.jsonl", "data/triage_dev.jsonl"])   # doctest: +SKIP
    >>> FakeLLM(gold=gold)                                                          # doctest: +SKIP
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from dspy_ray.testing.fake_llm import input_key

ROOT = Path(__file__).resolve().parents[1]


def triage_gold(paths: list[str | Path]) -> dict[str, dict[str, Any]]:
    """input_key(user message as the triage program sends it) -> {priority, category}."""
    from programs.triage import TriageCall
    from dspy_ray.client.json_adapter import CachingJSONAdapter

    adapter = CachingJSONAdapter()
    gold: dict[str, dict[str, Any]] = {}
    for path in paths:
        path = Path(path) if Path(path).is_absolute() else ROOT / path
        for line in path.read_text(encoding="utf-8").splitlines():
            if not line.strip():
                continue
            row = json.loads(line)
            user = adapter.format(TriageCall, demos=[], inputs={"transcript": row["transcript"]})[-1]["content"]
            gold[input_key(user)] = {"priority": row["priority"], "category": row["category"]}
    return gold

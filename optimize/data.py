"""Splits and hashes of a task's labelled examples for an optimization run.

    >>> train, dev = load_task_data(get_task("triage").data)              # doctest: +SKIP
    >>> trainset, valset = split_train_val(train, val_size=100, seed=9)   # doctest: +SKIP

``train`` feeds the optimizer (demos come from ``trainset``, trials are scored
on ``valset``); ``dev`` is held out and only scores the baseline and the result.
"""

from __future__ import annotations

import hashlib
import json
import random
from typing import Any

import dspy

from tasks.examples import DatasetError


def example_row(example: dspy.Example) -> dict[str, Any]:
    return dict(example.toDict())


def dataset_hash(*splits: list[dspy.Example]) -> str:
    """Stable hash of the examples (order included): artifacts and runs record which data they saw."""
    h = hashlib.sha256()
    for split in splits:
        for example in split:
            h.update(json.dumps(example_row(example), sort_keys=True, default=str).encode())
        h.update(b"|")
    return h.hexdigest()[:16]


def split_train_val(train: list[dspy.Example], val_size: int, seed: int) -> tuple[list[dspy.Example], list[dspy.Example]]:
    """(trainset for demos, valset for trials): a seeded shuffle, ``val_size`` held for scoring.

    At least half of ``train`` stays in the trainset, so bootstrapping has material.
    """
    if len(train) < 2:
        raise DatasetError(f"need at least 2 training examples, got {len(train)}")
    val_size = max(1, min(val_size, len(train) // 2))
    order = list(train)
    random.Random(seed).shuffle(order)
    return order[val_size:], order[:val_size]

"""What an optimization run optimizes: the pipeline spec, its labelled examples and their splits.

    >>> spec = PIPELINES["triage"]
    >>> train, dev = load_pipeline_data(spec)            # doctest: +SKIP
    >>> trainset, valset = split_train_val(train, val_size=100, seed=9)   # doctest: +SKIP

``train`` feeds the optimizer (demos come from ``trainset``, trials are scored
on ``valset``); ``dev`` is held out and only scores the baseline and the result.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
from pathlib import Path
from typing import Any

import dspy
from pydantic import BaseModel, ConfigDict, Field

REPO_ROOT = Path(__file__).resolve().parents[1]


class DatasetError(ValueError):
    """A dataset file that cannot be used, named with file and line."""


class PipelineSpec(BaseModel):
    """A program plus the labelled data and fields that score it."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    name: str = Field(..., description="Pipeline name on the command line (--pipeline)")
    program: str = Field(..., description="Program name in programs.PROGRAMS")
    train_path: str = Field(..., description="Training JSONL (relative paths are relative to the repository)")
    dev_path: str = Field(..., description="Held-out dev JSONL")
    input_fields: tuple[str, ...] = Field(..., description="Program inputs, read from each row")
    label_fields: tuple[str, ...] = Field(..., description="Outputs scored by exact match")
    summary_field: str | None = Field(None, description="Free-text output scored by the judge (--judge)")
    reference_field: str | None = Field(None, description="Row key holding the reference for summary_field")


PIPELINES: dict[str, PipelineSpec] = {
    "triage": PipelineSpec(
        name="triage",
        program="triage",
        train_path="data/triage_train.jsonl",
        dev_path="data/triage_dev.jsonl",
        input_fields=("transcript",),
        label_fields=("priority", "category"),
        summary_field="summary",
        reference_field="summary",
    ),
}


def resolve_path(path: str | os.PathLike) -> Path:
    p = Path(path)
    if p.is_absolute() or p.exists():
        return p
    return REPO_ROOT / p  # so `ray job submit --working-dir .` and other working directories find data/


def read_jsonl(path: str | os.PathLike) -> list[dict[str, Any]]:
    """Rows of a JSONL file (a local path, repository-relative, or an object-store URI)."""
    from stages.fs import filesystem_for, is_uri, read_bytes

    rows = []
    p = str(path) if is_uri(path) else resolve_path(path)
    try:
        data = read_bytes(*filesystem_for(p))
    except OSError as exc:
        raise DatasetError(f"{p}: cannot read ({exc})") from None
    if data is None:
        raise DatasetError(f"{p}: dataset file not found")
    lines = data.decode("utf-8").splitlines()
    for lineno, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise DatasetError(f"{p} line {lineno}: not valid JSON ({e.msg})") from None
        if not isinstance(row, dict):
            raise DatasetError(f"{p} line {lineno}: expected a JSON object")
        rows.append(row)
    return rows


def to_examples(rows: list[dict[str, Any]], spec: PipelineSpec, source: str) -> list[dspy.Example]:
    """Rows -> ``dspy.Example`` with inputs marked; every row needs an id, the inputs and the labels."""
    needed = ("id", *spec.input_fields, *spec.label_fields)
    examples, seen = [], set()
    for i, row in enumerate(rows, 1):
        missing = [k for k in needed if row.get(k) in (None, "")]
        if missing:
            raise DatasetError(f"{source} row {i}: missing {missing}")
        if row["id"] in seen:
            raise DatasetError(f"{source} row {i}: duplicate id {row['id']!r}")
        seen.add(row["id"])
        keep = {k: row[k] for k in ("id", *spec.input_fields, *spec.label_fields)}
        if spec.reference_field and row.get(spec.reference_field):
            keep[spec.reference_field] = row[spec.reference_field]
        examples.append(dspy.Example(**keep).with_inputs(*spec.input_fields))
    return examples


def load_pipeline_data(
    spec: PipelineSpec,
    *,
    train_path: str | None = None,
    dev_path: str | None = None,
    train_limit: int | None = None,
    dev_limit: int | None = None,
) -> tuple[list[dspy.Example], list[dspy.Example]]:
    train_src, dev_src = train_path or spec.train_path, dev_path or spec.dev_path
    train = to_examples(read_jsonl(train_src), spec, str(train_src))[:train_limit]
    dev = to_examples(read_jsonl(dev_src), spec, str(dev_src))[:dev_limit]
    overlap = {e.id for e in train} & {e.id for e in dev}
    if overlap:
        raise DatasetError(f"{len(overlap)} id(s) in both train and dev, e.g. {sorted(overlap)[0]!r}")
    return train, dev


def extra_train_examples(path: str, spec: PipelineSpec, min_score: float = 0.8) -> tuple[list[dspy.Example], int]:
    """Extra training rows (e.g. Serve's drift samples): (usable examples, rows skipped).

    A row with gold labels is used as is.  A drift sample (``_output`` = what the
    program answered, ``_score`` = the judge's score) is used only when the judge
    scored it at least ``min_score``, with the program's answer as its label.
    """
    usable, skipped = [], 0
    for i, row in enumerate(read_jsonl(path), 1):
        output = row.get("_output") if isinstance(row.get("_output"), dict) else {}
        labelled = all(row.get(k) not in (None, "") for k in spec.label_fields)
        if not labelled and output and (row.get("_score") or 0) >= min_score:
            row = {**row, **{k: output.get(k) for k in spec.label_fields}}
            if spec.reference_field and not row.get(spec.reference_field):
                row[spec.reference_field] = output.get(spec.summary_field or "", "")
            labelled = all(row.get(k) not in (None, "") for k in spec.label_fields)
        if not labelled or any(row.get(k) in (None, "") for k in spec.input_fields):
            skipped += 1
            continue
        row.setdefault("id", "extra-" + hashlib.sha1(json.dumps(row, sort_keys=True).encode()).hexdigest()[:10])
        usable.extend(to_examples([row], spec, f"{path} row {i}"))
    return usable, skipped


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

"""A task's labelled examples: JSONL rows -> ``dspy.Example``, checked, with file and line in every error.

    >>> train, dev = load_task_data(get_task("triage").data)      # doctest: +SKIP
    >>> train[0].inputs().keys()                                   # doctest: +SKIP
    dict_keys(['transcript'])

Used by the optimizer (train/dev), by Serve's drift monitor (the dev inputs
its baseline is measured on) and for extra training rows (drift samples).
"""

from __future__ import annotations

import hashlib
import json
import os
from typing import Any

import dspy

from dspy_ray.util.fs import filesystem_for, is_uri, json_lines, read_bytes
from tasks.base import TaskData, resolve_repo_path
from dspy_ray.util.cli import EXIT_USAGE


class DatasetError(ValueError):
    """A dataset file that cannot be used, named with file and line."""
    exit_code = EXIT_USAGE  # what a command line exits with (dspy_ray.util.cli)


def read_jsonl(path: str | os.PathLike) -> list[dict[str, Any]]:
    """Rows of a JSONL file (a local path, repository-relative, or an object-store URI)."""
    p = str(path) if is_uri(path) else resolve_repo_path(path)
    try:
        data = read_bytes(*filesystem_for(p))
    except OSError as exc:
        raise DatasetError(f"{p}: cannot read ({exc})") from None
    if data is None:
        raise DatasetError(f"{p}: dataset file not found")
    return [row for _, row in json_lines(data.decode("utf-8").splitlines(), str(p), DatasetError)]


def to_examples(rows: list[dict[str, Any]], data: TaskData, source: str) -> list[dspy.Example]:
    """Rows -> ``dspy.Example`` with inputs marked; every row needs an id, the inputs and the labels.

    Other keys (references for judged fields, gold sources) are kept: metrics may read them."""
    needed = ("id", *data.inputs, *data.labels)
    examples, seen = [], set()
    for i, row in enumerate(rows, 1):
        missing = [k for k in needed if row.get(k) in (None, "")]
        if missing:
            raise DatasetError(f"{source} row {i}: missing {missing}")
        if row["id"] in seen:
            raise DatasetError(f"{source} row {i}: duplicate id {row['id']!r}")
        seen.add(row["id"])
        keep = {k: v for k, v in row.items() if not k.startswith("_")}
        examples.append(dspy.Example(**keep).with_inputs(*data.inputs))
    return examples


def load_task_data(
    data: TaskData,
    *,
    train_path: str | None = None,
    dev_path: str | None = None,
    train_limit: int | None = None,
    dev_limit: int | None = None,
) -> tuple[list[dspy.Example], list[dspy.Example]]:
    train_src, dev_src = train_path or data.train, dev_path or data.dev
    train = to_examples(read_jsonl(train_src), data, str(train_src))[:train_limit]
    dev = to_examples(read_jsonl(dev_src), data, str(dev_src))[:dev_limit]
    overlap = {e.id for e in train} & {e.id for e in dev}
    if overlap:
        raise DatasetError(f"{len(overlap)} id(s) in both train and dev, e.g. {sorted(overlap)[0]!r}")
    return train, dev


def extra_train_examples(path: str, data: TaskData, references: dict[str, str],
                         min_score: float = 0.8) -> tuple[list[dspy.Example], int]:
    """Extra training rows (e.g. Serve's drift samples): (usable examples, rows skipped).

    A row with gold labels is used as is.  A drift sample (``_output`` = what the
    program answered, ``_score`` = the live judge's score) is used only when the
    judge scored it at least ``min_score``, with the program's answer as its
    labels and, for judged fields, as the reference (``references``: judged
    output field -> example key of its reference).
    """
    usable, skipped = [], 0
    for i, row in enumerate(read_jsonl(path), 1):
        output = row.get("_output") if isinstance(row.get("_output"), dict) else {}
        labelled = all(row.get(k) not in (None, "") for k in data.labels)
        if not labelled and output and (row.get("_score") or 0) >= min_score:
            row = {**row, **{k: output.get(k) for k in data.labels}}
            for out_field, ref_key in references.items():
                if not row.get(ref_key) and output.get(out_field) not in (None, ""):
                    row[ref_key] = output[out_field]
            labelled = all(row.get(k) not in (None, "") for k in data.labels)
        if not labelled or any(row.get(k) in (None, "") for k in data.inputs):
            skipped += 1
            continue
        row = {k: v for k, v in row.items() if not k.startswith("_")}
        row.setdefault("id", "extra-" + hashlib.sha1(json.dumps(row, sort_keys=True).encode()).hexdigest()[:10])
        usable.extend(to_examples([row], data, f"{path} row {i}"))
    return usable, skipped

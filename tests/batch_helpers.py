"""Inputs and outputs of batch runs, shared by the pipeline and usage tests."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow.parquet as pq


def write_calls(path: Path, n: int, text: str = "Call {i}: my neighbour's shed is on fire") -> Path:
    """``n`` calls as jsonl, ids ``call-00000`` ...; ``text`` is formatted with the call's number ``i``."""
    with path.open("w") as f:
        for i in range(n):
            f.write(json.dumps({"id": f"call-{i:05d}", "transcript": text.format(i=i)}) + "\n")
    return path


def read_output(out: Path):
    """Every parquet file a run wrote to ``out``, as one table."""
    return pq.read_table(sorted(out.glob("*.parquet")))

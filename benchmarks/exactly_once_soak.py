"""Soak: 10,000 rows through both triage stages against a faulty endpoint, default flags; exactly once?

    python benchmarks/exactly_once_soak.py [--rows 10000]

The fake endpoint answers 20% of requests 429 + ``Retry-After: 1``, 5% HTTP 500, hangs on 1%
(until the client's timeout, 60 s by default) and sends unparseable prose on 5%; it holds
512 requests at once (a queue beyond that) and answers in 0.1 s.  ``python -m pipelines.triage``
runs with its default flags.  Checked and printed:

* rows out = rows in, every id exactly once, the same ids;
* failures only as ``errors`` entries (a row with errors still has its id and input);
* LM calls per row (retries included), from the ``lm_usage`` column, per stage, as a distribution;
* that the calls the rows account for are the requests the endpoint received.

Not a CI test (minutes of run time); the numbers go in the README's table.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import io
import json
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1")
for _var in ("LM_BASE_URL", "LM_MODEL", "LM_MAX_IN_FLIGHT", "LM_TIMEOUT_S", "LM_MAX_ATTEMPTS"):
    os.environ.pop(_var, None)

import pyarrow.parquet as pq  # noqa: E402

from dspy_ray.testing.fake_llm import FakeLLM  # noqa: E402

FAULTS = {"p_429": 0.20, "retry_after": 1.0, "p_500": 0.05, "p_hang": 0.01, "p_malformed": 0.05}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=10_000)
    parser.add_argument("--capacity", type=int, default=512)
    parser.add_argument("--latency", type=float, default=0.1)
    args = parser.parse_args()
    import ray

    from pipelines.cli import main as cli

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    load = os.getloadavg()[0]
    with tempfile.TemporaryDirectory(prefix="soak-") as tmp:
        src, out = Path(tmp) / "calls.jsonl", Path(tmp) / "out"
        ids = [f"soak-{i:06d}" for i in range(args.rows)]
        with src.open("w") as f:
            for i, rid in enumerate(ids):
                f.write(json.dumps({"id": rid, "transcript": f"Call {i}: smoke from a shed behind house {i}"}) + "\n")
        with FakeLLM(latency=args.latency, capacity=args.capacity, seed=7, **FAULTS) as fake:
            start = time.perf_counter()
            buffer = io.StringIO()
            with contextlib.redirect_stdout(buffer):
                code = cli("triage", ["--input", str(src), "--output", str(out), "--lm-base-url", fake.base_url,
                                      "--lm-model", "fake-model"], prog="python -m pipelines.triage")
            seconds = time.perf_counter() - start
            stats = fake.stats()
        table = pq.read_table(sorted(out.glob("*.parquet")))
    print(buffer.getvalue().strip())
    out_ids = table.column("id").to_pylist()
    counts = collections.Counter(out_ids)
    twice = [i for i, n in counts.items() if n > 1]
    errors = table.column("errors").to_pylist()
    usage = table.column("lm_usage").to_pylist()
    print(f"\nexit code {code}; {seconds:.0f} s; machine load {load:.2f} at start, {os.getloadavg()[0]:.2f} at end")
    print(f"rows in {args.rows}, rows out {table.num_rows}, distinct ids {len(counts)}, ids twice {len(twice)}, "
          f"same ids: {set(out_ids) == set(ids)}")
    print(f"rows with errors: {sum(1 for e in errors if e)}; examples: "
          f"{[e for e in errors if e][:3]}")
    print(f"endpoint: {stats['requests']} requests; 429 {stats['rate_limited']}, 500 {stats['server_error']}, "
          f"hung {stats['hung']}, malformed {stats['malformed']}, ok {stats['ok']}")
    total_calls = 0
    for stage in ("triage", "extract_details"):
        calls = [u[stage]["calls"] for u in usage if u and u.get(stage)]
        total_calls += sum(calls)
        dist = collections.Counter(min(c, 6) for c in calls)
        print(f"{stage}: {sum(calls) / len(calls):.2f} LM calls per row (retries included); distribution "
              + ", ".join(f"{k}{'+' if k == 6 else ''}: {v}" for k, v in sorted(dist.items())))
    print(f"calls the rows account for: {total_calls}; requests the endpoint received: {stats['requests']}")
    ok = (table.num_rows == args.rows and not twice and set(out_ids) == set(ids) and code == 0)
    print("EXACTLY ONCE: " + ("yes" if ok else "NO"))


if __name__ == "__main__":
    main()

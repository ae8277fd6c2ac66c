"""Goodput under random faults: the batch engine's client against a naive fixed-concurrency client.

    python benchmarks/fault_goodput.py [--seconds 30] [--warmup 5] [--threads 128] [--cli 5000]

One fake OpenAI-compatible endpoint (capacity 128, latency 0.05 s, FIFO queue) answers, at random
and whatever the load: 20% 429 with ``Retry-After: 1``, 5% 500, 1% a 10-second hang, 5% malformed
answers (HTTP 200 whose content is prose).  Against it, one after the other in this one run:

* **ours**: the triage stage's UDF (``stages/base.py``, what a batch actor runs), driven in this
  process the way Ray Data drives an actor (a few batches at once, a new one as one finishes), with
  its LM client, retries and the adaptive endpoint limit, nothing about the endpoint configured;
* **naive**: ``--threads`` stdlib threads, each sending one request after another over its own
  keep-alive connection, sleeping ``Retry-After`` after a 429 and nothing after other failures.

With ``--cli ROWS``, then also the batch CLI (``python -m pipelines.triage`` over ROWS calls, its default
flags: Ray Data, both stages, their actors) against the same endpoint: its goodput from its first
request to its last good answer, ramp and tail included, against naive's steady state.

Goodput is what the endpoint answered well (HTTP 200 with a real answer, counted by the fake) per
second, over ``--seconds`` after ``--warmup``.  Printed: both goodputs, the ratio ours/naive (the
goal is >= 0.70), the share of 429s each saw, and the limit the adaptive limiter settled at.
"""

from __future__ import annotations

import argparse
import asyncio
import http.client
import json
import logging
import os
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("LM_CACHE", "off")  # every call must reach the endpoint

from dspy_ray.testing.fake_llm import FakeLLM  # noqa: E402

FAULTS = {"capacity": 128, "latency": 0.05, "p_429": 0.20, "retry_after": 1.0, "p_500": 0.05,
          "p_hang": 0.01, "hang_seconds": 10.0, "p_malformed": 0.05, "seed": 7}
BATCH_ROWS = 16


def measure(fake: FakeLLM, warmup: float, seconds: float, running: threading.Event) -> dict:
    """The endpoint's counters over ``seconds`` after ``warmup`` (the client runs meanwhile)."""
    time.sleep(warmup)
    first, t0 = fake.stats(), time.monotonic()
    time.sleep(seconds)
    last, elapsed = fake.stats(), time.monotonic() - t0
    running.clear()
    counts = {k: last[k] - first[k] for k in ("requests", "ok", "rate_limited", "server_error", "hung", "malformed")}
    return {**counts, "goodput": counts["ok"] / elapsed, "share_429": counts["rate_limited"] / max(1, counts["requests"])}


# -- naive: fixed threads, sleep Retry-After -------------------------------------------------

def naive_worker(host: str, port: int, path: str, running: threading.Event, index: int) -> None:
    conn, n = None, 0
    while running.is_set():
        body = json.dumps({"model": "fake-model", "messages": [
            {"role": "user", "content": f"naive caller {index} call {n}: smoke in the hallway"}]}).encode()
        n += 1
        try:
            if conn is None:
                conn = http.client.HTTPConnection(host, port, timeout=60)
            conn.request("POST", path, body, {"Content-Type": "application/json"})
            response = conn.getresponse()
            data = response.read()
            if response.status == 429:
                time.sleep(float(response.getheader("Retry-After") or 1.0))
            elif response.status == 200:
                json.loads(data)
        except (OSError, http.client.HTTPException, ValueError):
            if conn is not None:
                conn.close()
            conn = None


def run_naive(fake: FakeLLM, threads: int, warmup: float, seconds: float) -> dict:
    from urllib.parse import urlsplit

    parts = urlsplit(fake.base_url)
    running = threading.Event()
    running.set()
    workers = [threading.Thread(target=naive_worker, daemon=True,
                                args=(parts.hostname, parts.port, parts.path + "/chat/completions", running, i))
               for i in range(threads)]
    for w in workers:
        w.start()
    result = measure(fake, warmup, seconds, running)
    for w in workers:
        w.join(timeout=15)
    return result


# -- ours: the stage UDF as a batch actor runs it --------------------------------------------

def run_ours(fake: FakeLLM, warmup: float, seconds: float, concurrent_batches: int) -> dict:
    import pyarrow as pa

    from dspy_ray.endpoints.settings import EndpointSettings
    from stages.base import DSPyStageUDF
    from tasks import get_task

    settings = EndpointSettings(base_url=fake.base_url, model="fake-model")
    udf = DSPyStageUDF(**get_task("triage").stages[0].udf_kwargs(settings))
    running = threading.Event()
    running.set()

    async def one_batch(n: int) -> None:
        table = pa.table({"id": [f"b{n}-{i}" for i in range(BATCH_ROWS)],
                          "transcript": [f"call {n}-{i}: smoke in the hallway" for i in range(BATCH_ROWS)]})
        async for _ in udf(table):
            pass

    async def drive() -> None:
        n, tasks = 0, set()
        while running.is_set():
            while len(tasks) < concurrent_batches:
                tasks.add(asyncio.ensure_future(one_batch(n)))
                n += 1
            _, tasks = await asyncio.wait(tasks, timeout=0.2, return_when=asyncio.FIRST_COMPLETED)
        for task in tasks:
            task.cancel()

    driver = threading.Thread(target=lambda: asyncio.run(drive()), daemon=True)
    driver.start()
    result = measure(fake, warmup, seconds, running)
    state = udf.limiter.state() if udf.limiter is not None else {}
    result.update(limit=state.get("limit"), peak_in_flight=state.get("peak_in_flight"))
    return result


# -- the batch CLI: Ray Data, both stages, actors -------------------------------------------

def run_cli_rows(fake: FakeLLM, rows: int) -> dict:
    """``python -m pipelines.triage`` over ``rows`` calls with its default flags (two LM calls a row); goodput over
    the active period, from the first request to the last good answer (its ramp and its tail included)."""
    import tempfile

    from benchmarks.endpoint_capacity import run_cli, write_calls

    fake.configure(sample_interval=0.1)  # the fake's own counters every 0.1 s (fake.samples())
    with tempfile.TemporaryDirectory(prefix="fault-goodput-") as folder:
        source = Path(folder) / "calls.jsonl"
        write_calls(source, rows, "fault")
        code, _ = run_cli(source, Path(folder) / "out", fake.base_url, [])
    counts, seen = fake.stats(), fake.samples()
    fake.configure(sample_interval=0.0)
    start = next(s["seconds"] for s in seen if s["requests"] > 0)
    done = [s["seconds"] for s in seen if s["ok"] >= counts["ok"]]  # when the last good answer had come
    end = done[0] if done else seen[-1]["seconds"]
    result = {k: counts[k] for k in ("requests", "ok", "rate_limited", "server_error", "hung", "malformed")}
    return {**result, "exit": code, "seconds": end - start, "goodput": counts["ok"] / max(1e-9, end - start),
            "share_429": counts["rate_limited"] / max(1, counts["requests"])}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=30.0)
    parser.add_argument("--warmup", type=float, default=5.0)
    parser.add_argument("--threads", type=int, default=128, help="the naive client's fixed concurrency")
    parser.add_argument("--batches", type=int, default=64, help="batches in flight at once for ours (Ray Data's)")
    parser.add_argument("--cli", type=int, default=0, metavar="ROWS",
                        help="also run the batch CLI (python -m pipelines.triage) over this many rows against the "
                             "same endpoint (0: skip)")
    args = parser.parse_args()
    logging.disable(logging.WARNING)  # the faults' retries and refines would fill the screen
    print(f"endpoint: {FAULTS}")
    with FakeLLM(**FAULTS) as fake:
        naive = run_naive(fake, args.threads, args.warmup, args.seconds)
        fake.reset_stats()
        time.sleep(1.0)
        ours = run_ours(fake, args.warmup, args.seconds, args.batches)
        cli = None
        if args.cli:
            fake.reset_stats()
            time.sleep(1.0)
            cli = run_cli_rows(fake, args.cli)
    for name, r in (("naive", naive), ("ours", ours)):
        extra = f"  limit {r['limit']:.0f}" if r.get("limit") is not None else ""
        print(f"{name:>6}: goodput {r['goodput']:7.1f} answered/s   requests {r['requests']:6d}   "
              f"429 share {r['share_429']:.1%}   hung {r['hung']}   malformed {r['malformed']}{extra}")
    print(f"goodput ratio ours/naive: {ours['goodput'] / max(1e-9, naive['goodput']):.2f}  (goal >= 0.70)")
    if cli is not None:
        print(f"   cli: {args.cli} rows (exit {cli['exit']}): goodput {cli['goodput']:7.1f} answered/s over "
              f"{cli['seconds']:.1f} s from its first request to its last good answer   "
              f"requests {cli['requests']:6d}   429 share {cli['share_429']:.1%}   hung {cli['hung']}   "
              f"malformed {cli['malformed']}")
        print(f"goodput ratio cli/naive: {cli['goodput'] / max(1e-9, naive['goodput']):.2f}  (the CLI's ramp and tail "
              f"included; naive's is its steady state)")


if __name__ == "__main__":
    main()

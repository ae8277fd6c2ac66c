"""Where a row's CPU goes in the stage UDF: a sampling profile of every thread, summed by function.

    python benchmarks/stage_profile.py [--rows 6000]            # runs itself under py-spy (pip install py-spy)
    python benchmarks/stage_profile.py --drive [--rows 6000]    # only the measured run, no profiler

The run drives the triage stage's UDF directly (no Ray) against the fake endpoint at zero
latency, 64-row batches, at most 32 rows in flight, after a warm-up; it prints the CPU per row
of this process, with the LM cache off and with it on (a fresh store: every row a miss, its
answer stored), side by side in one run (``--cache off|miss`` for one of them; the profile
is of ``off``, the engine without the cache).

Each is measured on both program paths of :class:`dspy_ray.execution.runner.ProgramRunner`
(``--path thread|async`` for one): ``async``, the shipped ``CallTriager`` (it defines ``aforward``:
the rows are awaited on the event loop, no thread per row; the profile is of this one unless
``--path thread``), and ``thread``, the same program without it (:class:`ThreadCallTriager`, below:
one worker thread per row in flight, the path of a program that defines only ``forward``).

The UDF is built in this process, so the garbage collector is set as a stage actor sets its own
(:func:`dspy_ray.util.gc_tuning.settle_heap`); ``DSPY_RAY_GC_TUNING=0`` measures without it.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import os
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(os.environ.get("STAGE_PROFILE_ROOT", Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(ROOT))
import dspy_ray  # noqa: E402,F401 - first, before dspy: it sets LITELLM_LOCAL_MODEL_COST_MAP
from programs.triage import CallTriager  # noqa: E402


class ThreadCallTriager(CallTriager):
    """``CallTriager`` without its ``aforward``: what a program with only ``forward`` runs (a thread per row)."""

    aforward = None


def drive(rows: int, cache: str = "off", path: str = "thread") -> float:
    """One measured run; ``cache``: ``off``, or ``miss`` (a fresh store in a temporary folder); ``path``:
    ``async`` (the shipped program) or ``thread`` (:class:`ThreadCallTriager`); the CPU per row (ms)."""
    if cache == "off":
        os.environ["LM_CACHE"] = "off"
        return _drive(rows, cache, path)
    with tempfile.TemporaryDirectory(prefix="stage-cache-") as folder:
        os.environ["LM_CACHE"] = folder
        try:
            return _drive(rows, cache, path)
        finally:
            from dspy_ray.client.cache import close_caches

            close_caches()


def _drive(rows: int, cache: str, path: str) -> float:
    import dataclasses

    import pyarrow as pa

    from dspy_ray.client.cache.writer import flush_writes
    from dspy_ray.endpoints.settings import EndpointSettings
    from stages.base import DSPyStageUDF
    from tasks import get_task
    from dspy_ray.testing.fake_llm import FakeLLM
    from dspy_ray.util.gc_tuning import settle_heap

    with FakeLLM(latency=0.0) as fake:
        stage = get_task("triage").stages[0]
        update = {"max_in_flight_per_actor": 32}
        if path == "thread":
            update["program"] = dataclasses.replace(stage.program, cls=ThreadCallTriager)
        stage = stage.model_copy(update=update)
        udf = DSPyStageUDF(**stage.udf_kwargs(EndpointSettings(base_url=fake.base_url, model="fake-model")))
        # What the stage does in its actor (this process is no Ray worker); DSPY_RAY_GC_TUNING=0 turns it off.
        settle_heap(force=True)
        table = pa.Table.from_pylist([{"id": f"r{i}", "transcript": f"[cpu {i}] Caller reports smoke near house {i}."}
                                      for i in range(rows)])

        async def measured_run(t: pa.Table) -> int:
            count = 0
            for offset in range(0, t.num_rows, 64):
                async for out in udf(t.slice(offset, 64)):
                    count += out.num_rows
            return count

        async def main() -> float:
            await measured_run(pa.Table.from_pylist([{"id": f"w{i}", "transcript": f"warm {i}"} for i in range(256)]))
            cpu, wall = time.process_time(), time.perf_counter()
            assert await measured_run(table) == rows
            flush_writes(30.0)  # the cache writes the run left pending count too
            per_row = (time.process_time() - cpu) / rows * 1e3
            print(f"{path:6} cache {cache:4}: CPU per row {per_row:.3f} ms; {rows / (time.perf_counter() - wall):.0f} "
                  f"rows/s on one process; {threading.active_count()} threads", flush=True)
            return per_row

        return asyncio.run(main())


def summarize(raw: Path, top: int) -> None:
    """Sum py-spy's raw stacks of the measured run (the event loop, the rows' tasks or threads) by function."""
    own, inclusive, total = collections.Counter(), collections.Counter(), 0
    for line in raw.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        frames = [re.sub(r":\d+\)$", ")", f) for f in stack.split(";")]
        if any("importlib._bootstrap" in f for f in frames):
            continue
        # The measured run, the rows' threads (thread path), the rows' tasks and the HTTP reads on the loop (async).
        if not any(("measured_run" in f) or ("_worker (" in f and "thread" in f) or ("dspy-row" in f)
                   or ("ThreadHop._worker" in f) or ("_run_row" in f) or ("_AsyncConnection" in f) for f in frames):
            continue
        n = int(count)
        total += n
        own[frames[-1]] += n
        for f in set(frames):
            inclusive[f] += n
    print(f"\n{total} samples of the measured run (the warm-up and the imports left out)")
    print("self (the function itself)")
    for name, n in own.most_common(top):
        print(f"  {n / total:6.1%}  {name[:110]}")
    print("inclusive (the function and what it calls), without the thread/loop frames")
    shown = 0
    for name, n in inclusive.most_common():
        if any(skip in name for skip in ("_bootstrap", "Thread.run", "_worker (", "run_forever", "run_until_complete",
                                          "_run_once", "Handle._run", "Runner.run", "<module>", "run (asyncio")):
            continue
        print(f"  {n / total:6.1%}  {name[:110]}")
        shown += 1
        if shown >= top:
            break


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=6000)
    parser.add_argument("--drive", action="store_true", help="only the measured run (what py-spy samples)")
    parser.add_argument("--top", type=int, default=15)
    parser.add_argument("--cache", choices=["both", "off", "miss"], default="both",
                        help="with --drive: the LM cache off, on with every row a miss, or both side by side")
    parser.add_argument("--path", choices=["both", "thread", "async"], default="both",
                        help="with --drive: the shipped program on the event loop, the same on a thread per row, or both")
    args = parser.parse_args()
    if args.drive:
        caches = ["off", "miss"] if args.cache == "both" else [args.cache]
        paths = ["thread", "async"] if args.path == "both" else [args.path]
        runs = {(path, cache): [] for path in paths for cache in caches}
        for _ in range(2 if len(runs) > 1 else 1):  # interleaved: the machine's load falls on all alike
            for path, cache in runs:
                runs[path, cache].append(drive(args.rows, cache, path))
        for path in paths:
            best = {cache: min(runs[path, cache]) for cache in caches}
            line = ", ".join(f"cache {'off' if c == 'off' else 'on (all misses)'} {best[c]:.3f} ms/row" for c in caches)
            extra = (f": the cache adds {best['miss'] - best['off']:.3f} ms ({best['miss'] / best['off']:.2f}x)"
                     if len(caches) == 2 else "")
            print(f"{path} path, best of {len(runs[path, caches[0]])}: {line}{extra}")
        return None
    spy = shutil.which("py-spy")
    if spy is None:
        raise SystemExit("py-spy is not installed (pip install py-spy); --drive runs without it")
    with tempfile.TemporaryDirectory(prefix="profile-") as tmp:
        raw = Path(tmp) / "stacks.txt"
        subprocess.run([spy, "record", "--gil", "-r", "400", "-f", "raw", "-o", str(raw), "--", sys.executable,
                        __file__, "--drive", "--cache", "off", "--path", "thread" if args.path == "thread" else "async",
                        "--rows", str(args.rows)], check=True)
        summarize(raw, args.top)


if __name__ == "__main__":
    main()

"""Where a row's CPU goes in the stage UDF: a sampling profile of every thread, summed by function.

    python benchmarks/stage_profile.py [--rows 6000]            # runs itself under py-spy (pip install py-spy)
    python benchmarks/stage_profile.py --drive [--rows 6000]    # only the measured run, no profiler

The run drives the triage stage's UDF directly (no Ray) against the fake endpoint at zero
latency, 64-row batches, at most 32 rows in flight, after a warm-up; it prints the CPU per row
of this process, with the LM cache off and with it on (a fresh store: every row a miss, its
answer stored), side by side in one run (``--cache off|miss`` for one of them; the profile
is of ``off``, the engine without the cache).  Under ``py-spy record --gil`` (samples only the thread holding the GIL: where
the CPU goes) the samples of the measured run are summed by function, self and inclusive, and
the top of each list printed: the README's before/after tables come from here.
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
import time
from pathlib import Path

ROOT = Path(os.environ.get("STAGE_PROFILE_ROOT", Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(ROOT))
import dspy_ray  # noqa: E402,F401 - first, before dspy: it sets LITELLM_LOCAL_MODEL_COST_MAP


def drive(rows: int, cache: str = "off") -> float:
    """One measured run; ``cache``: ``off``, or ``miss`` (a fresh store in a temporary folder); the CPU per row (ms)."""
    if cache == "off":
        os.environ["LM_CACHE"] = "off"
        return _drive(rows, cache)
    with tempfile.TemporaryDirectory(prefix="stage-cache-") as folder:
        os.environ["LM_CACHE"] = folder
        try:
            return _drive(rows, cache)
        finally:
            from dspy_ray.client.cache import close_caches

            close_caches()


def _drive(rows: int, cache: str) -> float:
    import pyarrow as pa

    from dspy_ray.endpoints.settings import EndpointSettings
    from stages.base import DSPyStageUDF
    from tasks import get_task
    from dspy_ray.testing.fake_llm import FakeLLM

    with FakeLLM(latency=0.0) as fake:
        stage = get_task("triage").stages[0].model_copy(update={"max_in_flight_per_actor": 32})
        udf = DSPyStageUDF(**stage.udf_kwargs(EndpointSettings(base_url=fake.base_url, model="fake-model")))
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
            per_row = (time.process_time() - cpu) / rows * 1e3
            print(f"cache {cache:4}: CPU per row {per_row:.3f} ms; {rows / (time.perf_counter() - wall):.0f} "
                  f"rows/s on one process", flush=True)
            return per_row

        return asyncio.run(main())


def summarize(raw: Path, top: int) -> None:
    """Sum py-spy's raw stacks of the measured run (the event loop and the row threads) by function."""
    own, inclusive, total = collections.Counter(), collections.Counter(), 0
    for line in raw.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        frames = [re.sub(r":\d+\)$", ")", f) for f in stack.split(";")]
        if any("importlib._bootstrap" in f for f in frames):
            continue
        if not any(("measured_run" in f) or ("_worker (" in f and "thread" in f) or ("dspy-row" in f)
                   or ("ThreadHop._worker" in f) for f in frames):
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
    args = parser.parse_args()
    if args.drive:
        if args.cache != "both":
            drive(args.rows, args.cache)
            return None
        runs = {mode: [] for mode in ("off", "miss")}
        for _ in range(2):  # interleaved: the machine's load falls on both alike
            for mode in runs:
                runs[mode].append(drive(args.rows, mode))
        best = {mode: min(values) for mode, values in runs.items()}
        print(f"best of 2: cache off {best['off']:.3f} ms/row, cache on (all misses) {best['miss']:.3f} ms/row: "
              f"the cache adds {best['miss'] - best['off']:.3f} ms ({best['miss'] / best['off']:.2f}x)")
        return None
    spy = shutil.which("py-spy")
    if spy is None:
        raise SystemExit("py-spy is not installed (pip install py-spy); --drive runs without it")
    with tempfile.TemporaryDirectory(prefix="profile-") as tmp:
        raw = Path(tmp) / "stacks.txt"
        subprocess.run([spy, "record", "--gil", "-r", "400", "-f", "raw", "-o", str(raw), "--", sys.executable,
                        __file__, "--drive", "--cache", "off", "--rows", str(args.rows)], check=True)
        summarize(raw, args.top)


if __name__ == "__main__":
    main()

"""Where a row's CPU goes in the stage UDF: a sampling profile of every thread, summed by function.

    python benchmarks/stage_profile.py [--rows 6000]            # runs itself under py-spy (pip install py-spy)
    python benchmarks/stage_profile.py --drive [--rows 6000]    # only the measured run, no profiler

The run drives the triage stage's UDF directly (no Ray) against the fake endpoint at zero
latency, 64-row batches, at most 32 rows in flight, after a warm-up; it prints the CPU per row
of this process.  Under ``py-spy record --gil`` (samples only the thread holding the GIL: where
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


def drive(rows: int) -> None:
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

        async def main() -> None:
            await measured_run(pa.Table.from_pylist([{"id": f"w{i}", "transcript": f"warm {i}"} for i in range(256)]))
            cpu, wall = time.process_time(), time.perf_counter()
            assert await measured_run(table) == rows
            print(f"CPU per row {(time.process_time() - cpu) / rows * 1e3:.3f} ms; {rows / (time.perf_counter() - wall):.0f} "
                  f"rows/s on one process", flush=True)

        asyncio.run(main())


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
    args = parser.parse_args()
    if args.drive:
        return drive(args.rows)
    spy = shutil.which("py-spy")
    if spy is None:
        raise SystemExit("py-spy is not installed (pip install py-spy); --drive runs without it")
    with tempfile.TemporaryDirectory(prefix="profile-") as tmp:
        raw = Path(tmp) / "stacks.txt"
        subprocess.run([spy, "record", "--gil", "-r", "400", "-f", "raw", "-o", str(raw), "--", sys.executable,
                        __file__, "--drive", "--rows", str(args.rows)], check=True)
        summarize(raw, args.top)


if __name__ == "__main__":
    main()

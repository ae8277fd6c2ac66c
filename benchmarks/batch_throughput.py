"""Batch throughput and CPU cost, measured side by side in one run against the fake endpoint.

    python benchmarks/batch_throughput.py [--rows 4000] [--seed-rows 160]

Against a fake OpenAI-compatible endpoint with capacity C (default 128) and
latency L (default 0.25 s), so one stage can do at most C/L rows/s (512), with
unique rows and DSPy's cache off, it measures the rows/s of:

  (a) the seed recipe's shape: ActorPoolStrategy(size=4), one blocking call per row;
  (b) dspy.Parallel with 16 threads in one process;
  (c) this framework: the triage stage on 2 async actors with default settings (the
      endpoint's limit is found at run time; nothing about C is passed);

and (d) the CPU cost per call of a bare ``dspy.Predict`` loop against the CPU cost
per row of the framework's stage UDF (same endpoint at zero latency).
Every figure and the ratios are printed; a JSON copy goes to benchmarks/results/.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import dspy_ray  # noqa: E402,F401 - first, before dspy: it sets LITELLM_LOCAL_MODEL_COST_MAP
os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1")

import dspy  # noqa: E402
import pyarrow as pa  # noqa: E402

from dspy_ray.client.lm import build_lm  # noqa: E402
from dspy_ray.endpoints.settings import EndpointSettings  # noqa: E402
from programs.triage import CallTriager  # noqa: E402
from stages.base import DSPyStageUDF  # noqa: E402
from tasks import get_task  # noqa: E402
from dspy_ray.testing.fake_llm import FakeLLM  # noqa: E402


def triage_stage(**overrides):
    return get_task("triage").stages[0].model_copy(update=overrides)


def unique_rows(n: int, tag: str) -> list[dict]:
    return [{"id": f"{tag}-{i}", "transcript": f"[{tag} {i}] Caller reports smoke near house number {i}."}
            for i in range(n)]


def plain_lm(base_url: str) -> dspy.LM:
    """How the seed recipe builds its LM: a model string, no provider declaration."""
    return dspy.LM("openai/fake-model", api_base=base_url, api_key="x", cache=False, num_retries=3,
                   temperature=0.0, max_tokens=256)


class SeedShapeStage:
    """The seed recipe's adapter: LM set up once per actor, one blocking call per row."""

    def __init__(self, base_url: str):
        self.lm = plain_lm(base_url)
        self.module = CallTriager()

    def __call__(self, row: dict) -> dict:
        try:
            with dspy.context(lm=self.lm):
                pred = self.module(transcript=row["transcript"])
            row.update(priority=pred.priority, category=pred.category, summary=pred.summary, errors=[])
        except Exception as exc:  # noqa: BLE001
            row.update(priority=None, category=None, summary=None, errors=[str(exc)])
        return row


def run_seed_shape(base_url: str, n: int) -> float:
    import ray
    from ray.data import ActorPoolStrategy

    ds = ray.data.from_items(unique_rows(n, "seed"), override_num_blocks=16)
    ds = ds.map(SeedShapeStage, fn_constructor_kwargs={"base_url": base_url},
                compute=ActorPoolStrategy(size=4), num_cpus=0.25)
    start = time.perf_counter()
    count = ds.materialize().count()
    assert count == n, count
    return n / (time.perf_counter() - start)


def run_parallel(base_url: str, n: int) -> float:
    lm = plain_lm(base_url)
    module = CallTriager()
    rows = unique_rows(n, "par")
    pairs = [(module, dspy.Example(transcript=r["transcript"]).with_inputs("transcript")) for r in rows]
    start = time.perf_counter()
    with dspy.context(lm=lm):
        out = dspy.Parallel(num_threads=16, disable_progress_bar=True, max_errors=n)(pairs)
    assert len(out) == n
    return n / (time.perf_counter() - start)


def run_framework(base_url: str, n: int, in_flight: int | None, batch_size: int = 16,
                  block_rows: int = 64) -> tuple[float, int]:
    import ray

    settings = EndpointSettings(base_url=base_url, model="fake-model",
                                **({"max_in_flight": in_flight} if in_flight else {}))
    stage = triage_stage(num_actors=2, batch_size=batch_size)
    table = pa.Table.from_pylist([{**r, "errors": []} for r in unique_rows(n, "fw")],
                                 schema=pa.schema([("id", pa.string()), ("transcript", pa.string()),
                                                   ("errors", pa.list_(pa.string()))]))
    ds = ray.data.from_arrow(table).repartition(max(8, n // block_rows))
    # Warm the actor pool first so actor start-up (imports, LM setup) is not timed.
    warm = ray.data.from_arrow(table.slice(0, 64)).repartition(2)
    stage.apply(warm, settings, rows_per_block=32).materialize()
    ds = stage.apply(ds, settings, rows_per_block=block_rows)
    start = time.perf_counter()
    out = ds.materialize()
    seconds = time.perf_counter() - start
    table_out = pa.concat_tables(ray.get(out.to_arrow_refs()))
    assert table_out.num_rows == n, table_out.num_rows
    assert len(set(table_out.column("id").to_pylist())) == n
    failed = sum(1 for e in table_out.column("errors").to_pylist() if e)
    return n / seconds, failed


def cpu_bare_predict(base_url: str, n: int) -> dict[str, float]:
    """CPU seconds per call of a sequential dspy.Predict loop, with and without a provider declaration."""
    results = {}
    module = CallTriager()
    variants = {
        "bare dspy.LM('openai/...')": (plain_lm(base_url), None),
        "declared provider + JSONAdapter": (
            build_lm(EndpointSettings(base_url=base_url, model="fake-model")), dspy.JSONAdapter()),
    }
    for name, (lm, adapter) in variants.items():
        rows = unique_rows(n, name[:4])
        with dspy.context(lm=lm, adapter=adapter):
            module(transcript="warm up")
            start = time.process_time()
            for r in rows:
                module(transcript=r["transcript"])
            results[name] = (time.process_time() - start) / n
    return results


def cpu_framework_row(base_url: str, n: int) -> float:
    """CPU seconds per row of the stage UDF (adapter, retries, Refine hand-off, arrow merge)."""
    stage = triage_stage(max_in_flight_per_actor=32)
    settings = EndpointSettings(base_url=base_url, model="fake-model")
    udf = DSPyStageUDF(**stage.udf_kwargs(settings))
    rows = unique_rows(n, "cpu")
    table = pa.Table.from_pylist(rows)

    async def drive(t: pa.Table) -> int:
        count = 0
        for offset in range(0, t.num_rows, 64):
            async for out in udf(t.slice(offset, 64)):
                count += out.num_rows
        return count

    async def measure() -> float:
        await drive(pa.Table.from_pylist(unique_rows(64, "warm")))  # caches, connection pool, threads
        start = time.process_time()
        assert await drive(table) == n
        return (time.process_time() - start) / n

    return asyncio.run(measure())


def cpu_only(args) -> None:
    with FakeLLM(latency=0.0) as fake:
        bare = cpu_bare_predict(fake.base_url, args.cpu_rows)
        fw = cpu_framework_row(fake.base_url, args.cpu_rows)
    for name, seconds in bare.items():
        print(f"(d) CPU per call, {name}: {seconds * 1e3:6.2f} ms")
    print(f"(d) CPU per row, framework stage UDF:  {fw * 1e3:6.2f} ms")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=4000, help="rows for (c)")
    parser.add_argument("--seed-rows", type=int, default=160, help="rows for (a) (slow by design)")
    parser.add_argument("--parallel-rows", type=int, default=640, help="rows for (b)")
    parser.add_argument("--cpu-rows", type=int, default=400, help="calls for (d)")
    parser.add_argument("--capacity", type=int, default=128)
    parser.add_argument("--latency", type=float, default=0.25)
    parser.add_argument("--cpu-only", action="store_true", help="only measure (d)")
    parser.add_argument("--framework-only", action="store_true", help="only measure (c)")
    parser.add_argument("--in-flight", type=int, default=None, help="LM_MAX_IN_FLIGHT for (c) (default: the default)")
    parser.add_argument("--batch-size", type=int, default=16)
    args = parser.parse_args()
    if args.cpu_only:
        return cpu_only(args)
    if args.framework_only:
        import ray

        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
        with FakeLLM(latency=args.latency, capacity=args.capacity) as fake:
            rate, failed = run_framework(fake.base_url, args.rows, args.in_flight, args.batch_size)
            peak = fake.stats()["max_in_flight"]
        print(f"(c) {rate:.1f} rows/s = {rate / (args.capacity / args.latency):.1%} of C/L; peak in flight {peak}")
        return None
    ceiling = args.capacity / args.latency

    import ray

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    report: dict[str, float] = {"ceiling_rows_per_s": ceiling}
    with FakeLLM(latency=args.latency, capacity=args.capacity) as fake:
        report["a_seed_shape_rows_per_s"] = run_seed_shape(fake.base_url, args.seed_rows)
        print(f"(a) seed shape, 4 actors, blocking:   {report['a_seed_shape_rows_per_s']:8.1f} rows/s", flush=True)
        report["b_dspy_parallel_rows_per_s"] = run_parallel(fake.base_url, args.parallel_rows)
        print(f"(b) dspy.Parallel, 16 threads:        {report['b_dspy_parallel_rows_per_s']:8.1f} rows/s", flush=True)
        rate, failed = run_framework(fake.base_url, args.rows, args.in_flight, args.batch_size)
        report["c_framework_rows_per_s"], report["c_rows_with_errors"] = rate, failed
        print(f"(c) this framework, default settings: {rate:8.1f} rows/s ({failed} rows with errors)", flush=True)
    ray.shutdown()
    with FakeLLM(latency=0.0) as fake:
        bare = cpu_bare_predict(fake.base_url, args.cpu_rows)
        fw = cpu_framework_row(fake.base_url, args.cpu_rows)
    for name, seconds in bare.items():
        report[f"d_cpu_ms_per_call[{name}]"] = seconds * 1e3
        print(f"(d) CPU per call, {name}: {seconds * 1e3:6.2f} ms")
    report["d_cpu_ms_per_row_framework"] = fw * 1e3
    print(f"(d) CPU per row, framework stage UDF:  {fw * 1e3:6.2f} ms")

    bare_ms = report["d_cpu_ms_per_call[bare dspy.LM('openai/...')]"]
    print("\nratios")
    print(f"  (c) / ceiling C/L ({ceiling:.0f} rows/s): {report['c_framework_rows_per_s'] / ceiling:6.1%}")
    print(f"  (c) / (a): {report['c_framework_rows_per_s'] / report['a_seed_shape_rows_per_s']:6.1f}x")
    print(f"  (c) / (b): {report['c_framework_rows_per_s'] / report['b_dspy_parallel_rows_per_s']:6.1f}x")
    print(f"  (d) framework CPU per row / bare DSPy CPU per call: {fw * 1e3 / bare_ms:5.2f}")
    out = ROOT / "benchmarks" / "results"
    out.mkdir(parents=True, exist_ok=True)
    (out / "batch_throughput.json").write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()

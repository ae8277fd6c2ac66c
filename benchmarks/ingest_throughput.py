"""Ingestion throughput against a simulated embedding endpoint, as a share of what the endpoint allows.

    python benchmarks/ingest_throughput.py [--passages 20000] [--capacity 8] [--latency 0.2] [--batch 32]

The fake endpoint (``dspy_ray/testing/fake_llm/``, its own process) works on at most C
requests at once and takes L seconds per request; with B inputs per request
its limit is C x B / L passages/s.  One run measures, side by side:

* (a) ``pipelines.index`` (in-process ``IndexBuild``, local Ray, 2 embedding
  actors) on a generated jsonl corpus of unique ~80-word passages: the
  embedding stage's passages/s, over its whole run (actor start-up included)
  and from its first result on; the endpoint's mean requests in flight
  (sampled) as a share of C; CPU per passage of this process and its Ray
  processes (the fake server excluded) over the whole build;
* (b) the stage's UDF alone (``EmbedStageUDF``, no Ray, one event loop): its
  passages/s and CPU per passage - the client's own cost.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1")

TICKS = os.sysconf("SC_CLK_TCK")


def make_corpus(folder: Path, n: int, seed: int = 7) -> Path:
    rng = random.Random(seed)
    words = [f"{a}{b}" for a in ("fire", "road", "unit", "call", "zone", "dam", "bay", "crew", "ward", "hose")
             for b in ("", "s", "ing", "ed", "er", "man", "way", "side", "line", "post")]
    path = folder / "records.jsonl"
    with path.open("w") as f:
        for i in range(n):
            text = " ".join(rng.choice(words) for _ in range(80)) + f". Record {i}."
            f.write(json.dumps({"id": f"r{i}", "title": f"Record {i}", "text": text}) + "\n")
    return path


def _proc_table() -> dict[int, tuple[int, float]]:
    """pid -> (parent pid, CPU seconds) for every process."""
    out = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                fields = open(f"/proc/{entry}/stat").read().rsplit(")", 1)[1].split()
            except OSError:
                continue
            out[int(entry)] = (int(fields[1]), (int(fields[11]) + int(fields[12])) / TICKS)
    return out


def tree_cpu(root: int, exclude: set[int]) -> float:
    """CPU seconds of ``root`` and its descendants, minus the ``exclude`` subtrees."""
    table = _proc_table()
    children: dict[int, list[int]] = {}
    for pid, (ppid, _) in table.items():
        children.setdefault(ppid, []).append(pid)
    total, stack = 0.0, [root]
    while stack:
        pid = stack.pop()
        if pid in exclude or pid not in table:
            continue
        total += table[pid][1]
        stack.extend(children.get(pid, []))
    return total


class InFlightSampler(threading.Thread):
    def __init__(self, fake, every_s: float = 0.05):
        super().__init__(daemon=True)
        self.fake, self.every_s, self.samples, self.stop = fake, every_s, [], threading.Event()

    def run(self) -> None:
        while not self.stop.is_set():
            self.samples.append(self.fake.stats()["in_flight"])
            time.sleep(self.every_s)


def run_pipeline(corpus: Path, fake, args) -> dict:
    import ray

    from dspy_ray.endpoints.settings import EndpointSettings
    from pipelines.index import IndexBuild, IndexOptions
    from stages.embed import EmbedStage

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    settings = EndpointSettings(base_url=fake.base_url, model="fake-embed", batch_size=args.batch,
                                max_in_flight=args.max_in_flight, origin="configured")
    options = IndexOptions(corpus=str(corpus), index=str(corpus.parent / "index"),
                           stage=EmbedStage(num_actors=args.actors, max_in_flight_per_actor=args.concurrency))
    fake.reset_stats()
    sampler = InFlightSampler(fake)
    cpu_before = tree_cpu(os.getpid(), {fake.proc.pid})
    sampler.start()
    summary = IndexBuild(options, settings, lambda line: print("  " + line, flush=True)).run()
    sampler.stop.set()
    cpu = tree_cpu(os.getpid(), {fake.proc.pid}) - cpu_before
    ray.shutdown()
    steady = summary.embed_seconds - summary.first_result_s
    steady_rows = summary.embedded_now - summary.first_result_rows
    busy = [s for s in sampler.samples if s > 0]
    return {"passages": summary.embedded_now, "embed_s": summary.embed_seconds, "first_s": summary.first_result_s,
            "rate": summary.embedded_now / summary.embed_seconds,
            "steady_rate": steady_rows / steady if steady > 0 else 0.0,
            "in_flight": sum(busy) / len(busy) if busy else 0.0, "cpu_ms": 1000 * cpu / summary.embedded_now,
            "build_s": summary.seconds}


def run_udf(texts: list[str], fake, args) -> dict:
    import pyarrow as pa

    from dspy_ray.retrieval.passages import content_hash
    from dspy_ray.endpoints.settings import EndpointSettings
    from stages.embed import EmbedStageUDF

    settings = EndpointSettings(base_url=fake.base_url, model="fake-embed", batch_size=args.batch)
    udf = EmbedStageUDF(settings=settings.with_key(), max_in_flight=args.concurrency)
    batch_rows = 256
    batches = [pa.table({"hash": [content_hash(t) for t in texts[i:i + batch_rows]],
                         "embedding_text": texts[i:i + batch_rows]}) for i in range(0, len(texts), batch_rows)]

    async def drive():
        async def one(batch):
            async for _ in udf(batch):
                pass

        await asyncio.gather(*(one(b) for b in batches))

    cpu0, t0 = time.process_time(), time.perf_counter()
    asyncio.run(drive())
    wall, cpu = time.perf_counter() - t0, time.process_time() - cpu0
    return {"passages": len(texts), "rate": len(texts) / wall, "cpu_ms": 1000 * cpu / len(texts)}


def main() -> None:
    from dspy_ray.testing.fake_llm import FakeLLM

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--passages", type=int, default=20_000)
    parser.add_argument("--capacity", type=int, default=8, help="C: requests the endpoint works on at once")
    parser.add_argument("--latency", type=float, default=0.2, help="L: seconds per request")
    parser.add_argument("--batch", type=int, default=32, help="B: inputs per request (EMBED_BATCH_SIZE)")
    parser.add_argument("--actors", type=int, default=2)
    parser.add_argument("--concurrency", type=int, default=64, help="requests in flight per actor")
    parser.add_argument("--max-in-flight", type=int, default=256, help="EMBED_MAX_IN_FLIGHT")
    args = parser.parse_args()
    limit = args.capacity * args.batch / args.latency
    print(f"endpoint: C={args.capacity}, L={args.latency}s, B={args.batch} -> limit {limit:,.0f} passages/s; "
          f"{args.passages:,} passages; {os.cpu_count()} CPUs", flush=True)
    with tempfile.TemporaryDirectory() as tmp, FakeLLM(latency=args.latency, capacity=args.capacity) as fake:
        corpus = make_corpus(Path(tmp), args.passages)
        texts = [json.loads(line)["text"] for line in corpus.read_text().splitlines()]
        print("(a) pipelines.index ...", flush=True)
        a = run_pipeline(corpus, fake, args)
        print("(b) EmbedStageUDF alone ...", flush=True)
        b = run_udf(texts, fake, args)
    print()
    print(f"{'':<44} {'passages/s':>10} {'share of limit':>14} {'CPU ms/passage':>14}")
    print(f"{'(a) pipelines.index, whole embedding stage':<44} {a['rate']:>10,.0f} {a['rate'] / limit:>14.1%} "
          f"{a['cpu_ms']:>14.3f}")
    print(f"{'(a) ... from its first result on':<44} {a['steady_rate']:>10,.0f} "
          f"{a['steady_rate'] / limit:>14.1%} {'':>14}")
    print(f"{'(b) EmbedStageUDF alone (no Ray)':<44} {b['rate']:>10,.0f} {b['rate'] / limit:>14.1%} "
          f"{b['cpu_ms']:>14.3f}")
    print(f"endpoint requests in flight while busy: {a['in_flight']:.1f} of C={args.capacity} "
          f"({a['in_flight'] / args.capacity:.0%}); actors' first result after {a['first_s']:.1f} s; "
          f"embedding stage {a['embed_s']:.1f} s of a {a['build_s']:.1f} s build "
          f"(reading, chunking, FAISS, BM25, writing included)")
    print("(a)'s CPU counts this process and every Ray process it started; the fake server is excluded.")


if __name__ == "__main__":
    main()

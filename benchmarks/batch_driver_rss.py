"""Driver peak RSS and time to the first batch: the corpus read on the workers against the table built on the driver.

    python benchmarks/batch_driver_rss.py [--rows 10000] [--scale 10] [--files 16]

Two generated jsonl corpora (``--rows`` and ``--scale`` times as many, in ``--files`` files of ~300-byte
calls), each path in a fresh driver process of its own attached to one local Ray (its peak RSS is
``ru_maxrss``; Ray's own processes are not counted), side by side:

* ``workers``: what ``pipelines.runner`` does now: list the files, the validation pre-pass on the workers
  (:func:`dspy_ray.corpus.precheck.precheck`), :func:`dspy_ray.corpus.source.corpus_dataset` -> a
  stand-in stage (``map_batches`` adding a label; no LM, so the numbers are the reader's) ->
  ``write_parquet`` -> the Arrow summary;
* ``driver``: the old way: every row read into one table on the driver (``load_corpus``), shipped with
  ``from_arrow``, the same stage and write, the output read back with ``to_pylist``.

"first batch" is the seconds from the start until the stand-in stage's first output block, on a fresh
dataset (with the pre-pass for ``workers``, as a run does; ``--no-precheck`` starts sooner still).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1")

WORDS = "fire smoke dog barking caller reports neighbour shed street bridge quay car crash injured loud".split()


def make_corpus(folder: Path, rows: int, files: int) -> None:
    rng = random.Random(rows)
    folder.mkdir(parents=True)
    per = -(-rows // files)
    for part in range(files):
        with (folder / f"part-{part:03d}.jsonl").open("w") as f:
            for i in range(part * per, min(rows, (part + 1) * per)):
                text = " ".join(rng.choice(WORDS) for _ in range(45))
                f.write(json.dumps({"id": f"call-{i:08d}", "transcript": text}) + "\n")


def _label(batch):
    import pyarrow as pa

    return batch.append_column("priority", pa.array(["urgent"] * batch.num_rows))


def child(mode: str, folder: str, out: str) -> dict:
    import ray

    from dspy_ray.corpus import InputSpec, discover
    from dspy_ray.corpus.precheck import precheck
    from dspy_ray.corpus.source import corpus_dataset
    from pipelines.inputs import load_corpus, to_dataset
    from pipelines.runner import summarize

    ray.init(address=os.environ["BENCH_RAY_ADDRESS"], log_to_driver=False)
    spec = InputSpec(folder, text_column="transcript")
    start = time.perf_counter()
    if mode == "workers":
        found = discover(spec)
        precheck(found, spec)
        make = lambda: corpus_dataset(found, spec, rows_per_block=256)
    else:
        table = load_corpus(spec)
        make = lambda: to_dataset(table, rows_per_block=256)
    next(iter(make().map_batches(_label, batch_format="pyarrow").iter_batches(batch_format="pyarrow")))
    first = time.perf_counter() - start
    make().map_batches(_label, batch_format="pyarrow").write_parquet(out)
    if mode == "workers":
        rows = summarize(out, 0, 0.0, ("priority",)).rows_total
    else:
        import pyarrow.parquet as pq

        rows = len(pq.read_table(out).to_pylist())
    total = time.perf_counter() - start
    ray.shutdown()
    return {"rows": rows, "first_batch_s": first, "total_s": total,
            "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rows", type=int, default=10_000)
    parser.add_argument("--scale", type=int, default=10)
    parser.add_argument("--files", type=int, default=16)
    parser.add_argument("--child", nargs=3, metavar=("MODE", "INPUT", "OUTPUT"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(*args.child)))
        return
    import ray

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)  # one cluster; each driver attaches to it
    env = {**os.environ, "BENCH_RAY_ADDRESS": ray.get_runtime_context().gcs_address}
    results = {}
    with tempfile.TemporaryDirectory(prefix="rss-") as tmp:
        for rows in (args.rows, args.rows * args.scale):
            corpus = Path(tmp) / f"corpus-{rows}"
            make_corpus(corpus, rows, args.files)
            for mode in ("workers", "driver"):
                proc = subprocess.run([sys.executable, __file__, "--child", mode, str(corpus),
                                       str(Path(tmp) / f"out-{mode}-{rows}")], capture_output=True, text=True,
                                      timeout=900, env=env)
                if proc.returncode:
                    sys.exit(proc.stderr[-3000:])
                results[mode, rows] = json.loads(proc.stdout.strip().splitlines()[-1])
                r = results[mode, rows]
                print(f"{mode:8} {rows:>9,} rows: driver peak RSS {r['peak_rss_mb']:7.0f} MB, first batch "
                      f"{r['first_batch_s']:5.1f} s, all {r['total_s']:6.1f} s ({r['rows']:,} rows written)", flush=True)
    small, large = args.rows, args.rows * args.scale
    for mode in ("workers", "driver"):
        grow = results[mode, large]["peak_rss_mb"] - results[mode, small]["peak_rss_mb"]
        print(f"{mode}: driver peak RSS at {args.scale}x the rows: {grow:+.0f} MB "
              f"({results[mode, large]['peak_rss_mb'] / results[mode, small]['peak_rss_mb']:.2f}x)")


if __name__ == "__main__":
    main()

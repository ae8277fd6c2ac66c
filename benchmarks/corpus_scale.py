"""Corpus scale: what the driver holds and how soon the first LM call goes out, as the corpus grows.

    python benchmarks/corpus_scale.py [--sizes 50000,500000,2000000] [--files 64] [--watch 20]
                                      [--full 50000] [--index-sizes 50000,500000] [--index-full 50000]
                                      [--capacity 512] [--latency 0.05] [--results DIR]

For each size, a corpus of that many jsonl rows in ``--files`` files (made once, kept under
``$TMPDIR/dspy-ray-corpus-scale``) is run, side by side, by the following (``--files 1``: one large file,
which ours reads as byte ranges in several tasks and Ray Data's ``read_json`` in one):

* **ours**: ``python -m pipelines.triage`` (its own local Ray, the fake endpoint);
* **ours-no-precheck**: the same with ``--no-precheck`` (no validation pass before the first call);
* **ray-data**: Ray Data's own ``read_json -> map_batches -> write_parquet`` over the same folder,
  its map sending one chat request per row to the same fake endpoint (a floor: no DSPy, no retries).

Then the index build over the same files (``--index-sizes``; each jsonl row one record, one passage) against
the fake ``/v1/embeddings``, side by side with Ray Data's ``read_json -> map_batches`` (one embeddings
request per batch of 64) ``-> write_parquet``; ``--index-full`` runs to the end (publish and BM25 included).

Each driver process is watched from outside: its peak RSS (``VmHWM`` in ``/proc``), the seconds from
its start to the endpoint's first request, and the requests answered in the ``--watch`` seconds after
that.  A run is then stopped, except at the ``--full`` size, which runs to the end for rows/s against
the endpoint's limit (capacity / latency).  Prints a table and the ratios; writes
``corpus_scale.json`` and a plot of driver RSS against rows (``corpus_scale.png``) into ``--results``
(``benchmarks/results``).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from dspy_ray.testing.fake_llm import FakeLLM  # noqa: E402

WORDS = ("smoke", "kitchen", "neighbour", "car", "crash", "dog", "loud", "music", "bleeding", "fall",
         "window", "broken", "stairs", "fire", "alarm", "street", "party", "child", "lost", "injured")

RAY_DATA_FLOOR = r'''
import json, sys, urllib.request
from concurrent.futures import ThreadPoolExecutor
import ray

folder, out, base_url = sys.argv[1:4]
def ask(text):
    body = json.dumps({"model": "fake-model", "messages": [{"role": "user", "content": str(text)}]}).encode()
    req = urllib.request.Request(base_url + "/chat/completions", body, {"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=60) as r:
        return json.loads(r.read())["choices"][0]["message"]["content"][:200]

def call(batch):
    with ThreadPoolExecutor(16) as pool:
        return {"id": batch["id"], "answer": list(pool.map(ask, batch["transcript"]))}

ray.init()
ds = ray.data.read_json(folder, file_extensions=["jsonl"])
ds.map_batches(call, batch_size=64, batch_format="numpy", num_cpus=0.25).write_parquet(out)
'''


RAY_DATA_EMBED_FLOOR = r'''
import json, sys, urllib.request
import ray

folder, out, base_url = sys.argv[1:4]
def embed(batch):
    texts = [str(t) for t in batch["transcript"]]
    body = json.dumps({"model": "fake-embed", "input": texts}).encode()
    req = urllib.request.Request(base_url + "/embeddings", body, {"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=60) as r:
        vectors = [d["embedding"] for d in json.loads(r.read())["data"]]
    return {"id": batch["id"], "dim": [len(v) for v in vectors]}

ray.init()
ds = ray.data.read_json(folder, file_extensions=["jsonl"])
ds.map_batches(embed, batch_size=64, batch_format="numpy", num_cpus=0.25).write_parquet(out)
'''


def index_command(folder: Path, index: str, base_url: str) -> list[str]:
    """The index CLI over ``folder`` (each jsonl row a record, one passage) against the fake embeddings endpoint."""
    return [sys.executable, "-m", "pipelines.index", "--corpus", str(folder), "--index", index, "--text-column",
            "transcript", "--id-column", "id", "--embed-base-url", base_url, "--embed-model", "fake-embed"]


def make_corpus(rows: int, files: int) -> Path:
    folder = Path(tempfile.gettempdir()) / "dspy-ray-corpus-scale" / f"{rows}x{files}"
    done = folder / ".complete"
    if done.exists():
        return folder
    folder.mkdir(parents=True, exist_ok=True)
    rng = random.Random(rows)
    for f in range(files):  # rows spread evenly: no file left empty (the reader refuses one)
        with (folder / f"calls-{f:03d}.jsonl").open("w") as out:
            for i in range(f * rows // files, (f + 1) * rows // files):
                text = " ".join(rng.choice(WORDS) for _ in range(40))
                out.write(json.dumps({"id": f"c{i:09d}", "transcript": f"Caller {i}: {text}"}) + "\n")
    done.touch()
    return folder


def peak_rss_mb(pid: int) -> float:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return 0.0


def gone(group: int, wait_s: float = 60.0) -> None:
    """Wait until every process of the run's session is gone (its local Ray cluster shutting down would
    otherwise take CPU from the next run's start), then kill what is left."""
    deadline = time.monotonic() + wait_s
    while time.monotonic() < deadline:
        try:
            os.killpg(group, 0)
        except ProcessLookupError:
            return
        time.sleep(0.5)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(group, signal.SIGKILL)


def chat_counts(stats: dict) -> tuple[int, int]:
    """(requests, answered) of the chat endpoint."""
    return stats["requests"], stats["ok"]


def embed_counts(stats: dict) -> tuple[int, int]:
    """(requests, passages embedded) of the embeddings endpoint."""
    e = stats["embeddings"]
    return e["requests"], e["inputs"]


def index_counts(stats: dict) -> tuple[int, int]:
    """:func:`embed_counts` less the index build's probe (one text: the dimension check before the embedding starts)."""
    e = stats["embeddings"]
    return max(0, e["requests"] - 1), max(0, e["inputs"] - 1)


def watch(cmd: list[str], fake: FakeLLM, watch_s: float, full: bool, env: dict, counts=chat_counts) -> dict:
    """Run ``cmd``; its peak RSS, seconds to the first request, answers in the watch window (``counts``:
    the endpoint's (requests, answered) from its stats)."""
    fake.reset_stats()
    start = time.monotonic()
    # stderr to a file, not a pipe: an undrained pipe blocks the run once Ray's log lines fill it
    log = tempfile.TemporaryFile(mode="w+")
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=log,
                            text=True, start_new_session=True)
    first, peak, stop_at = None, 0.0, None
    while proc.poll() is None:
        peak = max(peak, peak_rss_mb(proc.pid))
        now = time.monotonic()
        if first is None and counts(fake.stats())[0] > 0:
            first, stop_at = now - start, now + watch_s
            at_first = counts(fake.stats())[1]
        if stop_at is not None and now >= stop_at and not full:
            answered = counts(fake.stats())[1] - at_first
            os.killpg(proc.pid, signal.SIGINT)
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
            gone(proc.pid)
            return {"peak_rss_mb": round(peak, 1), "first_call_s": round(first, 2),
                    "answered_per_s": round(answered / watch_s, 1)}
        time.sleep(0.1)
    seconds = time.monotonic() - start
    gone(proc.pid)
    if proc.returncode != 0:
        log.seek(0)
        raise SystemExit(f"{cmd[1:4]} exited {proc.returncode}: {log.read()[-1500:]}")
    ok = counts(fake.stats())[1]
    return {"peak_rss_mb": round(peak, 1), "first_call_s": None if first is None else round(first, 2),
            "answered_per_s": round(ok / max(seconds - (first or 0), 1e-9), 1), "seconds": round(seconds, 1)}


def read_tasks(folder: Path) -> int:
    """The read tasks of the pre-pass's plan on a local cluster of this machine's CPUs (a large file cut
    into ranges: dspy_ray.corpus.split; ranges are planned for twice the cluster's CPUs)."""
    from dspy_ray.corpus import InputSpec, discover
    from dspy_ray.corpus.source import plan_groups

    found = discover(InputSpec(str(folder), text_column="transcript"))
    return len(plan_groups(found, min(64, 2 * (os.cpu_count() or 1))))


def ours_command(folder: Path, output: str, base_url: str, *flags: str) -> list[str]:
    """The batch CLI over ``folder`` into ``output`` against the fake endpoint."""
    return [sys.executable, "-m", "pipelines.triage", "--input", str(folder), "--output", output,
            "--lm-base-url", base_url, "--lm-model", "fake-model", *flags]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", default="50000,500000,2000000")
    p.add_argument("--files", type=int, default=64)
    p.add_argument("--watch", type=float, default=20.0, help="seconds watched after the first LM call")
    p.add_argument("--full", type=int, default=0, help="this size runs to the end (rows/s); 0 = none")
    p.add_argument("--index-sizes", default="50000,500000",
                   help="corpus sizes the index build runs over (each row one passage); '' = none")
    p.add_argument("--index-full", type=int, default=50000,
                   help="this index size runs to the end (build time, peak RSS through publish); 0 = none")
    p.add_argument("--capacity", type=int, default=512)
    p.add_argument("--latency", type=float, default=0.05)
    p.add_argument("--results", default=str(ROOT / "benchmarks" / "results"), help="folder for the json and the plot")
    args = p.parse_args()
    sizes = [int(s) for s in args.sizes.split(",") if s]
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "LM_BASE_URL")}
    env.update(PYTHONPATH=str(ROOT), RAY_DATA_DISABLE_PROGRESS_BARS="1", LM_CACHE="off")
    rows, results = [], {}
    with FakeLLM(latency=args.latency, capacity=args.capacity) as fake, tempfile.TemporaryDirectory() as tmp:
        for n in sizes:
            folder = make_corpus(n, args.files)
            print(f"{n:,} rows in {args.files} files ({sum(f.stat().st_size for f in folder.glob('*.jsonl')) / 1e6:,.0f} MB; "
                  f"the pre-pass reads it in {read_tasks(folder)} tasks)", flush=True)
            floor = [sys.executable, "-c", RAY_DATA_FLOOR, str(folder), f"{tmp}/floor-{n}", fake.base_url]
            variants = (("ours", ours_command(folder, f"{tmp}/ours-{n}", fake.base_url)),
                        ("ours-no-precheck",
                         ours_command(folder, f"{tmp}/ours-unchecked-{n}", fake.base_url, "--no-precheck")),
                        ("ray-data", floor))
            for name, cmd in variants:
                r = watch(cmd, fake, args.watch, full=n == args.full, env=env)
                results[f"{name}@{n}"] = r
                rows.append((name, n, r))
                print(f"  {name:16s} peak driver RSS {r['peak_rss_mb']:8.0f} MB   first LM call {r['first_call_s']} s   "
                      f"{r['answered_per_s']} answered/s", flush=True)
        index_rows = index_leg(args, fake, tmp, env, results)
    report(rows, sizes, args)
    report_index(index_rows)
    out = Path(args.results)
    out.mkdir(parents=True, exist_ok=True)
    (out / "corpus_scale.json").write_text(json.dumps(results, indent=1))
    plot(rows + index_rows, out / "corpus_scale.png")


def index_leg(args, fake: FakeLLM, tmp: str, env: dict, results: dict) -> list:
    """The index build (``pipelines.index``) and Ray Data's read -> embed -> write over the same files."""
    rows = []
    for n in [int(s) for s in args.index_sizes.split(",") if s]:
        folder = make_corpus(n, args.files)
        print(f"index: {n:,} passages (rows) in {args.files} files", flush=True)
        variants = (("index", index_command(folder, f"{tmp}/index-{n}", fake.base_url)),
                    ("ray-data-embed", [sys.executable, "-c", RAY_DATA_EMBED_FLOOR, str(folder), f"{tmp}/embed-{n}",
                                        fake.base_url]))
        for name, cmd in variants:
            counts = index_counts if name == "index" else embed_counts
            r = watch(cmd, fake, args.watch, full=n == args.index_full, env=env, counts=counts)
            results[f"{name}@{n}"] = r
            rows.append((name, n, r))
            total = f"   whole run {r['seconds']} s" if "seconds" in r else ""
            print(f"  {name:16s} peak driver RSS {r['peak_rss_mb']:8.0f} MB   first embedding request "
                  f"{r['first_call_s']} s   {r['answered_per_s']} passages/s{total}", flush=True)
    return rows


def report_index(rows: list) -> None:
    if not rows:
        return
    by = {(name, n): r for name, n, r in rows}
    sizes = sorted({n for _, n, _ in rows})
    small, large = sizes[0], sizes[-1]
    print(f"index build at {large:,} passages: driver RSS {by[('index', large)]['peak_rss_mb']:.0f} MB "
          f"({by[('index', large)]['peak_rss_mb'] - by[('index', small)]['peak_rss_mb']:+.0f} MB from {small:,}), "
          f"first embedding request {by[('index', large)]['first_call_s']} s against Ray Data's "
          f"{by[('ray-data-embed', large)]['first_call_s']} s")


def report(rows: list, sizes: list[int], args) -> None:
    if not rows:
        return
    by = {(name, n): r for name, n, r in rows}
    small, large = sizes[0], sizes[-1]
    ours_small, ours_large = by[("ours", small)], by[("ours", large)]
    floor_large = by[("ray-data", large)]
    print(f"\ndriver RSS growth {small:,} -> {large:,} rows: ours {ours_large['peak_rss_mb'] - ours_small['peak_rss_mb']:+.0f} MB "
          f"(goal <= +300 MB), ray-data {floor_large['peak_rss_mb'] - by[('ray-data', small)]['peak_rss_mb']:+.0f} MB")
    print(f"first LM call at {large:,} rows: ours {ours_large['first_call_s']} s (validation pre-pass first), "
          f"ours --no-precheck {by[('ours-no-precheck', large)]['first_call_s']} s, "
          f"ray-data {floor_large['first_call_s']} s (goal: within +15 s)")
    limit = args.capacity / args.latency
    if args.full:
        print(f"rows/s at {args.full:,} (full run): ours {by[('ours', args.full)]['answered_per_s'] / 2:.0f} rows/s "
              f"(two calls a row; the endpoint's limit {limit:.0f} calls/s)")


def plot(rows: list, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for name in ("ours", "ours-no-precheck", "ray-data", "index", "ray-data-embed"):
        pts = sorted((n, r["peak_rss_mb"]) for nm, n, r in rows if nm == name)
        ax.plot([n for n, _ in pts], [m for _, m in pts], marker="o", label=name)
    ax.set_xscale("log")
    ax.set_xlabel("rows in the corpus")
    ax.set_ylabel("driver peak RSS (MB)")
    ax.set_title("Driver memory against corpus size")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    print(f"plot: {path}")


if __name__ == "__main__":
    main()

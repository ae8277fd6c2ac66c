"""Sharded vs whole FAISS build of one embedding store: build time, the build process's peak memory, recall@10.

    python benchmarks/index_scale.py [--n 200000] [--dim 384] [--shard-above 50000] [--queries 500]
    python benchmarks/index_scale.py --bm25 25000,50000,100000,200000
    python benchmarks/index_scale.py --read 500,2000

An embedding store of ``n`` synthetic vectors (shaped like text embeddings, as in
``benchmarks/ann_recall.py``) is written in shards of 8,192, as the embedding actors
would; then each build runs in a process of its own, the way publish runs it
(:mod:`pipelines.index.sharded`): **whole** streams every vector through the build
process into one in-memory IVF index; **sharded** plans from the hash columns, has Ray
tasks draw the training sample and add their shards to partial indexes, trains and
merges here into on-disk lists.  Ray is started before the clock (a build has it up
from embedding).  Memory: the build process's peak RSS (``VmHWM``, which counts pages
of mapped files it touched) and its peak anonymous RSS (sampled every 20 ms: what it
allocated itself).  recall@10 is against exact search, at the index's default nprobe;
"same top 10" is the share of queries whose ten rows are identical in the two indexes.

``--bm25 N,...``: BM25 (which publish builds in its own process, in memory) over N synthetic
passages of 120 words each, drawn from a Zipf (s = 1.1) vocabulary of 500,000 words (the
shape of English text; the default chunk is 160 tokens, ~120 words): build time, the
process's peak RSS above what it held with the texts made, and the index's size on disk.

``--read N,...``: the read step of a build (:class:`pipelines.index.read.CorpusReader`, Ray up)
over a synthetic corpus of N markdown files of ~8 KB each, chunked by the read tasks, which write
the passages to parts in the index folder: the build process's peak RSS above what it held with
Ray started (it holds a row per file, never a passage), and the passages made.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from ann_recall import make_vectors, recall_at  # noqa: E402

from dspy_ray.retrieval import dense  # noqa: E402
from dspy_ray.retrieval.store import SHARD_ROWS, EmbeddingStore  # noqa: E402


def _hash(i: int) -> str:
    return f"{i:032x}"


def make_store(index: str, n: int, dim: int) -> None:
    store = EmbeddingStore(index)
    for start in range(0, n, SHARD_ROWS):
        stop = min(n, start + SHARD_ROWS)
        vectors = make_vectors(stop - start, dim, seed=1_000 + start // SHARD_ROWS)
        store.write_shard(f"part-bench-{start // SHARD_ROWS:05d}.parquet", [_hash(i) for i in range(start, stop)],
                          vectors, dim)


def base_vectors(index: str, n: int, dim: int) -> np.ndarray:
    ids, vectors = zip(*EmbeddingStore(index).vectors({_hash(i): [i] for i in range(n)}, dim))
    out = np.empty((n, dim), dtype=np.float32)
    out[np.concatenate(ids)] = np.concatenate(vectors)
    return out


class _AnonPeak:
    """The process's anonymous RSS, sampled every 20 ms: its peak in MB."""

    def __init__(self):
        self.peak, self.stop = 0, threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while not self.stop.is_set():
            with open("/proc/self/status") as f:
                for line in f:
                    if line.startswith("RssAnon:"):
                        self.peak = max(self.peak, int(line.split()[1]) // 1024)
            time.sleep(0.02)

    def done(self) -> int:
        self.stop.set()
        self.thread.join()
        return self.peak


def child(kind: str, index: str, out: str, n: int, dim: int, above: int) -> None:
    """One build, in this process; prints a JSON line."""
    from dspy_ray.util.ray_runtime import init_ray
    from pipelines.index.base import IndexDir
    from pipelines.index.sharded import ShardedBuild, drop_parts, whole_index

    if kind == "sharded":
        init_ray(num_cpus=os.cpu_count(), include_dashboard=False)
    wanted = {_hash(i): [i] for i in range(n)}
    spec = dense.choose_index(n, dim)
    said: list[str] = []
    anon, start = _AnonPeak(), time.perf_counter()
    if kind == "whole":
        built = whole_index(EmbeddingStore(index), spec, wanted, n, dim, said.append)
    else:
        built = ShardedBuild(IndexDir.at(index), spec, dim, said.append, above).build(wanted, n)
    names = built.write(out)
    drop_parts(IndexDir.at(index))
    seconds = time.perf_counter() - start
    print(json.dumps({"kind": kind, "seconds": seconds, "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
                      // 1024, "peak_anon_mb": anon.done(), "parts": built.parts, "factory": spec.factory,
                      "nprobe": spec.nprobe, "files": {name: os.path.getsize(os.path.join(out, name)) for name in names},
                      "said": said}))


def bm25_child(n: int) -> None:
    """BM25 over ``n`` synthetic passages, in this process; prints a JSON line."""
    from dspy_ray.retrieval.sparse import BM25Index

    rng = np.random.default_rng(0)
    words = rng.zipf(1.1, size=(n, 120)) % 500_000
    texts = [" ".join(f"w{w}" for w in row) for row in words]
    del words
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024
    start = time.perf_counter()
    bm25 = BM25Index.build(texts)
    seconds = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024
    with tempfile.TemporaryDirectory(prefix="bm25-") as folder:
        bm25.save(folder)
        size = sum(f.stat().st_size for f in Path(folder).rglob("*") if f.is_file())
    print(json.dumps({"n": n, "seconds": seconds, "before_mb": before, "peak_mb": peak, "disk_mb": size / 2**20}))


def bm25_table(counts: list[int]) -> None:
    print(f"{'passages':>9} {'build s':>8} {'peak RSS above texts MB':>24} {'on disk MB':>10}")
    for n in counts:
        proc = subprocess.run([sys.executable, __file__, "--bm25-child", str(n)], capture_output=True, text=True,
                              check=True)
        r = json.loads(proc.stdout.strip().splitlines()[-1])
        print(f"{n:>9,} {r['seconds']:>8.1f} {r['peak_mb'] - r['before_mb']:>24,} {r['disk_mb']:>10.1f}", flush=True)


def make_corpus(folder: str, files: int) -> None:
    """``files`` markdown files of ~8 KB: a heading and paragraphs of Zipf-drawn words."""
    rng = np.random.default_rng(0)
    for i in range(files):
        words = rng.zipf(1.1, size=1_300) % 500_000
        paragraphs = [" ".join(f"w{w}" for w in words[j:j + 100]) for j in range(0, len(words), 100)]
        path = Path(folder) / f"d{i % 100:02d}" / f"doc{i:06d}.md"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(f"# Document {i}\n\n" + "\n\n".join(paragraphs) + "\n")


def read_child(corpus: str, index: str) -> None:
    """The read step of a build over ``corpus``, in this process with Ray up; prints a JSON line."""
    from dspy_ray.util.ray_runtime import init_ray
    from pipelines.documents import scan_corpus
    from pipelines.index.base import IndexDir, IndexOptions, IndexSummary
    from pipelines.index.parts import PassageParts
    from pipelines.index.read import CorpusReader

    init_ray(num_cpus=os.cpu_count(), include_dashboard=False)
    where = IndexDir.at(index)
    where.fs.create_dir(where.root, recursive=True)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024
    anon, start = _AnonPeak(), time.perf_counter()
    parts = PassageParts.start(where)
    read = CorpusReader(IndexOptions(corpus, index), where, None, IndexSummary(index), lambda _: None).read(
        scan_corpus(corpus), parts)
    seconds = time.perf_counter() - start
    print(json.dumps({"files": len(read.files), "passages": parts.total, "parts": len(parts.paths),
                      "seconds": seconds, "before_mb": before, "peak_anon_mb": anon.done(),
                      "peak_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024}))
    parts.drop()


def read_table(sizes: list[int]) -> None:
    print(f"{'files':>7} {'passages':>9} {'parts':>5} {'read s':>7} {'peak RSS above Ray MB':>22} "
          f"{'peak anon MB':>12}")
    for files in sizes:
        with tempfile.TemporaryDirectory(prefix="index-read-") as tmp:
            corpus, index = os.path.join(tmp, "corpus"), os.path.join(tmp, "index")
            make_corpus(corpus, files)
            proc = subprocess.run([sys.executable, __file__, "--read-child", corpus, index], capture_output=True,
                                  text=True, check=True)
            r = json.loads(proc.stdout.strip().splitlines()[-1])
        print(f"{r['files']:>7,} {r['passages']:>9,} {r['parts']:>5} {r['seconds']:>7.1f} "
              f"{r['peak_mb'] - r['before_mb']:>22,} {r['peak_anon_mb']:>12,}", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=200_000)
    parser.add_argument("--dim", type=int, default=384)
    parser.add_argument("--shard-above", type=int, default=50_000)
    parser.add_argument("--queries", type=int, default=500)
    parser.add_argument("--bm25", help="passage counts, comma-separated: measure BM25 instead")
    parser.add_argument("--read", help="corpus sizes in files, comma-separated: measure the read step instead")
    parser.add_argument("--child", nargs=3, metavar=("KIND", "INDEX", "OUT"), help=argparse.SUPPRESS)
    parser.add_argument("--bm25-child", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--read-child", nargs=2, metavar=("CORPUS", "INDEX"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(*args.child, args.n, args.dim, args.shard_above)
        return
    if args.bm25_child:
        bm25_child(args.bm25_child)
        return
    if args.bm25:
        bm25_table([int(n) for n in args.bm25.split(",")])
        return
    if args.read_child:
        read_child(*args.read_child)
        return
    if args.read:
        read_table([int(n) for n in args.read.split(",")])
        return
    import faiss

    with tempfile.TemporaryDirectory(prefix="index-scale-") as tmp:
        index = os.path.join(tmp, "index")
        make_store(index, args.n, args.dim)
        print(f"{args.n:,} vectors x {args.dim} in {len(EmbeddingStore(index).shards())} store shards; "
              f"sharded above {args.shard_above:,}; {os.cpu_count()} CPUs; faiss {faiss.__version__}", flush=True)
        rows = {}
        for kind in ("whole", "sharded"):
            out = os.path.join(tmp, kind)
            os.makedirs(out)
            proc = subprocess.run([sys.executable, __file__, "--n", str(args.n), "--dim", str(args.dim),
                                   "--shard-above", str(args.shard_above), "--child", kind, index, out],
                                  capture_output=True, text=True, check=True)
            rows[kind] = json.loads(proc.stdout.strip().splitlines()[-1])
            print(f"{kind}: {rows[kind]['seconds']:.1f} s; {'; '.join(rows[kind]['said'])}", flush=True)
        base = base_vectors(index, args.n, args.dim)
        queries = make_vectors(args.queries, args.dim, seed=2)
        truth = np.argsort(-(queries @ base.T), axis=1)[:, :10]
        found = {}
        for kind, row in rows.items():
            out = os.path.join(tmp, kind)
            idx = dense.read_index(os.path.join(out, "index.faiss"), "ivf_flat", on_disk=kind == "sharded")
            dense.apply_search_params(idx, row["nprobe"], None)
            found[kind] = dense.search(idx, queries, 10)[1]
            row["recall"] = recall_at(found[kind], truth)
    same = float(np.mean((found["whole"] == found["sharded"]).all(axis=1)))
    print()
    print(f"{'build':<8} {'index':<16} {'parts':>5} {'build s':>8} {'peak RSS MB':>11} {'peak anon MB':>12} "
          f"{'recall@10':>9} {'files MB':>9}")
    for kind, r in rows.items():
        size = sum(r["files"].values()) / 2**20
        print(f"{kind:<8} {r['factory']:<16} {r['parts']:>5} {r['seconds']:>8.1f} {r['peak_rss_mb']:>11,} "
              f"{r['peak_anon_mb']:>12,} {r['recall']:>9.3f} {size:>9.1f}")
    print(f"same top 10 in both: {same:.3f} of queries")


if __name__ == "__main__":
    main()

"""Approximate vs exact search at 200,000+ vectors: recall@10 against exact, queries/s, build time, memory.

    python benchmarks/ann_recall.py [--n 200000] [--dim 384] [--queries 1000] [--threads 1]

Vectors are synthetic but shaped like text embeddings: 200 broad, overlapping
clusters in a 64-dimensional subspace of R^384 plus isotropic noise,
L2-normalised; a query's 10th neighbour sits at cosine ~0.48 (uniform random
vectors have no neighbours worth finding; tight clusters make every index look
perfect).  Queries come from the same distribution, not from the base.

Each index is built the way :mod:`dspy_ray.retrieval.dense` builds it (same
factory strings, same nlist rule, same training sample size) and searched
at several nprobe / efSearch values; recall@10 is the share of the exact
top 10 found.  The default rows are marked ``*``.  A plot of recall vs QPS goes
to ``benchmarks/results/ann_recall.png``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dspy_ray.retrieval import dense  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"


def make_vectors(n: int, dim: int, seed: int, clusters: int = 200, latent: int = 64) -> np.ndarray:
    rng = np.random.default_rng(seed)
    basis = np.linalg.qr(np.random.default_rng(12345).normal(size=(dim, latent)))[0].T  # shared subspace
    centers = np.random.default_rng(54321).normal(size=(clusters, latent))
    which = rng.integers(0, clusters, size=n)
    x = (centers[which] + 1.5 * rng.normal(size=(n, latent))) @ basis + 0.1 * rng.normal(size=(n, dim))
    x = x.astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def recall_at(found: np.ndarray, truth: np.ndarray, k: int = 10) -> float:
    return float(np.mean([len(set(f[:k]) & set(t[:k])) / k for f, t in zip(found, truth)]))


def timed_search(index, queries: np.ndarray, k: int, repeat: int = 1) -> tuple[np.ndarray, float]:
    best = float("inf")
    for _ in range(repeat):
        start = time.perf_counter()
        _, ids = index.search(queries, k)
        best = min(best, time.perf_counter() - start)
    return ids, len(queries) / best


def main() -> None:
    import faiss

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=200_000)
    parser.add_argument("--dim", type=int, default=384)
    parser.add_argument("--queries", type=int, default=1000)
    parser.add_argument("--threads", type=int, default=1, help="FAISS threads while searching (a replica's share)")
    args = parser.parse_args()
    print(f"{args.n:,} vectors x {args.dim}, {args.queries} queries; {os.cpu_count()} CPUs; "
          f"faiss {faiss.__version__}; search threads {args.threads}", flush=True)
    base = make_vectors(args.n, args.dim, seed=1)
    queries = make_vectors(args.queries, args.dim, seed=2)

    rows = []  # (name, param, recall, qps, build_s, bytes_per_vector, default?)
    faiss.omp_set_num_threads(os.cpu_count() or 1)
    flat_spec = dense.DenseIndexSpec("flat", "IDMap,Flat")
    start = time.perf_counter()
    flat = dense.build_index(flat_spec, args.dim, [(np.arange(args.n), base)])
    flat_build = time.perf_counter() - start
    faiss.omp_set_num_threads(args.threads)
    truth, flat_qps = timed_search(flat, queries, 10, repeat=2)
    rows.append(("exact (IDMap,Flat)", "-", 1.0, flat_qps, flat_build, args.dim * 4 + 8, False))
    print(f"exact: {flat_qps:,.0f} q/s", flush=True)

    specs = [dense.choose_index(args.n, args.dim, exact_below=0, ann=ann) for ann in dense.ANN_TYPES]
    with tempfile.TemporaryDirectory() as tmp:
        for spec in specs:
            faiss.omp_set_num_threads(os.cpu_count() or 1)
            start = time.perf_counter()
            train = base[np.random.default_rng(0).choice(args.n, spec.train_size(args.n), replace=False)] \
                if spec.needs_training else None
            index = dense.build_index(spec, args.dim, [(np.arange(args.n), base)], train)
            build_s = time.perf_counter() - start
            path = os.path.join(tmp, f"{spec.type}.faiss")
            dense.write_index(index, path)
            per_vector = os.path.getsize(path) / args.n
            index = dense.read_index(path, spec.type, mmap=True)  # searched as a retriever would: mapped
            faiss.omp_set_num_threads(args.threads)
            print(f"{spec.factory}: built in {build_s:.1f} s, {per_vector:.0f} bytes/vector", flush=True)
            if spec.type == "hnsw":
                params = [("efSearch", v) for v in (16, 32, 64, 96, 128, 256)]
                default = ("efSearch", spec.ef_search)
            else:
                params = [("nprobe", v) for v in (1, 4, 8, 16, 24, 32, 64, 128) if v <= spec.nlist]
                default = ("nprobe", spec.nprobe)
            if default not in params:
                params.append(default)
                params.sort(key=lambda p: p[1])
            for name, value in params:
                dense.apply_search_params(index, value if name == "nprobe" else None,
                                          value if name == "efSearch" else None)
                found, qps = timed_search(index, queries, 10, repeat=3)
                rows.append((spec.factory, f"{name}={value}", recall_at(found, truth), qps, build_s, per_vector,
                             (name, value) == default))

    print()
    print(f"{'index':<22} {'search':<13} {'recall@10':>9} {'queries/s':>10} {'vs exact':>8} {'build s':>8} "
          f"{'bytes/vec':>9}")
    for name, param, recall, qps, build_s, per_vector, is_default in rows:
        mark = "*" if is_default else " "
        print(f"{name:<22} {param:<13} {recall:>9.3f} {qps:>10,.0f} {qps / flat_qps:>7.1f}x {build_s:>8.1f} "
              f"{per_vector:>9.0f} {mark}")
    print("* = the default search setting (dspy_ray/retrieval/dense.py)")
    RESULTS.mkdir(exist_ok=True)
    keys = ("index", "search", "recall_at_10", "queries_per_s", "build_s", "bytes_per_vector", "default")
    (RESULTS / "ann_recall.json").write_text(json.dumps({"n": args.n, "dim": args.dim, "queries": args.queries,
                                                         "threads": args.threads,
                                                         "rows": [dict(zip(keys, r)) for r in rows]}, indent=1))
    plot(rows, flat_qps, args)


def plot(rows, flat_qps: float, args) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    RESULTS.mkdir(exist_ok=True)
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for name in dict.fromkeys(r[0] for r in rows[1:]):
        pts = [r for r in rows if r[0] == name]
        ax.plot([r[2] for r in pts], [r[3] for r in pts], marker="o", label=name)
        for r in pts:
            if r[6]:
                ax.scatter([r[2]], [r[3]], s=160, facecolors="none", edgecolors="black")
    ax.axhline(flat_qps, color="grey", linestyle="--", label=f"exact ({flat_qps:,.0f} q/s)")
    ax.set_yscale("log")
    ax.set_xlabel("recall@10 vs exact search")
    ax.set_ylabel("queries/s (log)")
    ax.set_title(f"{args.n:,} x {args.dim}-d vectors, {args.threads} search thread(s); circled = default")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    out = RESULTS / "ann_recall.png"
    fig.savefig(out, dpi=120)
    print(f"plot: {out}")


if __name__ == "__main__":
    main()

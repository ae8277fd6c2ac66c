"""The FAISS side of an index: which index for how many passages, building it from batches, loading it mapped.

Vectors are L2-normalised, so inner product is cosine similarity.  The choice
(FAISS wiki, "Guidelines to choose an index"):

* fewer than ``exact_below`` passages (default 50,000): ``IDMap,Flat``, exact.
  Brute force over 50k x 384 floats is a few milliseconds per query, and
  nothing to train or tune.
* from there up, approximate, ``IVF-Flat`` by default: ``nlist`` ~ 4 sqrt(N)
  lists (a power of two, at least 39 training points each), the coarse
  quantizer trained on a sample of 64 x nlist vectors, ``nprobe`` lists searched
  per query.  Vectors are stored uncompressed, so scores are exact for
  what it finds; the index file is memory-mapped on load (the OS page cache
  shares it between actors on a node).
* ``ivf_pq`` (``IVF{nlist},PQ{d/4}x8``: 8 bits per 4 dimensions, 96 bytes per
  384-d vector) when uncompressed vectors do not fit; ``hnsw``
  (``IDMap,HNSW32``) when memory is plenty and latency matters most.

``nprobe`` (1/32 of the lists) and ``efSearch`` (256) defaults are what
``benchmarks/ann_recall.py`` needed for recall@10 >= 0.95 against exact search
on 200,000 hard (broadly overlapping) synthetic vectors; clustered real
embeddings need fewer.  A retriever's setting overrides them (``?nprobe=16``).

    >>> spec = choose_index(2_000, 384)
    >>> spec.type, spec.factory
    ('flat', 'IDMap,Flat')
    >>> spec = choose_index(1_000_000, 384)
    >>> spec.type, spec.factory, spec.nprobe
    ('ivf_flat', 'IVF4096,Flat', 128)
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np

EXACT_BELOW = 50_000
ANN_TYPES = ("ivf_flat", "ivf_pq", "hnsw")
TRAIN_POINTS_PER_LIST = 64  # FAISS warns under 39; 64 keeps training time modest
HNSW_M = 32
DEFAULT_EF_SEARCH = 256


@dataclass(frozen=True)
class DenseIndexSpec:
    type: str  # flat | ivf_flat | ivf_pq | hnsw
    factory: str
    nlist: int | None = None
    nprobe: int | None = None
    ef_search: int | None = None

    @property
    def needs_training(self) -> bool:
        return self.type in ("ivf_flat", "ivf_pq")

    def train_size(self, n: int) -> int:
        return min(n, TRAIN_POINTS_PER_LIST * self.nlist) if self.needs_training else 0


def default_nprobe(nlist: int) -> int:
    """Lists searched per query: 1/32 of the lists, at least 16 (see the module docstring)."""
    return min(nlist, max(16, nlist // 32))


def choose_index(n: int, dim: int, *, exact_below: int = EXACT_BELOW, ann: str = "ivf_flat") -> DenseIndexSpec:
    """The index for ``n`` passages of dimension ``dim`` (see the module docstring)."""
    if n < exact_below:
        return DenseIndexSpec("flat", "IDMap,Flat")
    if ann not in ANN_TYPES:
        raise ValueError(f"approximate index must be one of {ANN_TYPES}, got {ann!r}")
    if ann == "hnsw":
        return DenseIndexSpec("hnsw", f"IDMap,HNSW{HNSW_M}", ef_search=DEFAULT_EF_SEARCH)
    # 4 sqrt(N) lists, rounded to a power of two, with at least 39 training points per list.
    nlist = 2 ** round(math.log2(max(1.0, 4 * math.sqrt(n))))
    nlist = max(1, min(nlist, n // 39))
    if ann == "ivf_pq":
        m = next(m for m in (dim // 4, dim // 2, dim) if m and dim % m == 0)
        return DenseIndexSpec("ivf_pq", f"IVF{nlist},PQ{m}x8", nlist, default_nprobe(nlist))
    return DenseIndexSpec("ivf_flat", f"IVF{nlist},Flat", nlist, default_nprobe(nlist))


def new_index(spec: DenseIndexSpec, dim: int):
    import faiss

    return faiss.index_factory(dim, spec.factory, faiss.METRIC_INNER_PRODUCT)


def build_index(spec: DenseIndexSpec, dim: int, batches: Iterable[tuple[np.ndarray, np.ndarray]],
                train: np.ndarray | None = None):
    """A FAISS index of ``batches`` of (ids int64, vectors float32), trained first on ``train`` when it needs it.

    Batches are added one at a time, so no list of every vector is held
    beyond what the index itself stores.
    """
    import faiss

    index = new_index(spec, dim)
    if spec.needs_training:
        if train is None or len(train) == 0:
            raise ValueError(f"a {spec.type} index needs training vectors")
        index.train(np.ascontiguousarray(train, dtype=np.float32))
    for ids, vectors in batches:
        if len(ids):
            index.add_with_ids(np.ascontiguousarray(vectors, dtype=np.float32), np.asarray(ids, dtype=np.int64))
    apply_search_params(index, spec.nprobe, spec.ef_search)
    faiss.omp_set_num_threads(os.cpu_count() or 1)
    return index


def apply_search_params(index, nprobe: int | None, ef_search: int | None) -> None:
    import faiss

    params = faiss.ParameterSpace()
    if nprobe:
        params.set_index_parameter(index, "nprobe", int(nprobe))
    if ef_search:
        params.set_index_parameter(index, "efSearch", int(ef_search))


def write_index(index, path: str) -> None:
    """Write to a local ``path`` through a temporary name, so a reader never maps half a file."""
    import faiss

    tmp = f"{path}.tmp-{os.getpid()}"
    faiss.write_index(index, tmp)
    os.replace(tmp, path)


def read_index(path: str, index_type: str, *, mmap: bool = True):
    """Load a local index file; memory-mapped where FAISS allows it (the file must then stay in place).

    IVF indexes map their inverted lists (``IO_FLAG_MMAP``); flat and HNSW
    indexes map their vector storage (``IO_FLAG_MMAP_IFC``).  FAISS refuses the
    two flags together.
    """
    import faiss

    if not mmap:
        return faiss.read_index(path)
    flag = faiss.IO_FLAG_MMAP if index_type.startswith("ivf") else faiss.IO_FLAG_MMAP_IFC
    return faiss.read_index(path, flag)


def search(index, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """(scores, rows) of the ``k`` nearest rows per query; a missing hit has row -1."""
    k = max(1, min(k, index.ntotal)) if index.ntotal else 1
    return index.search(np.ascontiguousarray(queries, dtype=np.float32), k)

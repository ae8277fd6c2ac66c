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

**Sharded IVF** (:func:`shard_above`: more vectors than :data:`SHARD_BUDGET_BYTES` of index):
no process holds every vector.  The trained, empty index is copied to tasks that each add
some vectors and write a partial index (:func:`trained_index`, :func:`add_batches`);
:func:`merge_parts` concatenates their inverted lists, list by list, into one file of
on-disk inverted lists (FAISS ``OnDiskInvertedLists``) that :func:`read_index` maps
(``on_disk=True``): ``index.faiss`` keeps the quantizer and the lists' offsets,
``index.ivfdata`` the ids and vectors.  Ids are the adders' own, and a list's entries keep
the parts' order, so the merged index is the one a single process adding the same
batches in that order builds.

    >>> spec = choose_index(2_000, 384)
    >>> spec.type, spec.factory
    ('flat', 'IDMap,Flat')
    >>> spec = choose_index(1_000_000, 384)
    >>> spec.type, spec.factory, spec.nprobe
    ('ivf_flat', 'IVF4096,Flat', 128)
"""

from __future__ import annotations

import contextlib
import math
import os
import sys
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass

import numpy as np

EXACT_BELOW = 50_000
ANN_TYPES = ("ivf_flat", "ivf_pq", "hnsw")
TRAIN_POINTS_PER_LIST = 64  # FAISS warns under 39; 64 keeps training time modest
HNSW_M = 32
DEFAULT_EF_SEARCH = 256
# Above this much index (codes + ids), an IVF index is built in parts by tasks and merged on disk.
# 4 GiB is ~2.8M 384-d IVF-Flat vectors (1,544 B each), ~1M at 1,024-d: what a build process shares
# with the passages table and BM25 on a 16 GB head node; bigger indexes are also where adding in
# parallel pays (one process adds ~50k 384-d vectors/s to IVF4096).
SHARD_BUDGET_BYTES = 4 << 30


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


def bytes_per_vector(spec: DenseIndexSpec, dim: int) -> int:
    """What the index holds per vector: its code (float32s, or PQ bytes) and its id (and HNSW's links)."""
    if spec.type == "ivf_pq":
        return int(spec.factory.rsplit("PQ", 1)[1].split("x")[0]) + 8
    links = 2 * HNSW_M * 4 if spec.type == "hnsw" else 0
    return 4 * dim + 8 + links


def shard_above(spec: DenseIndexSpec, dim: int, budget: int = SHARD_BUDGET_BYTES) -> int:
    """The vector count above which an IVF index is built in parts (``budget`` bytes of index)."""
    return max(1, budget // bytes_per_vector(spec, dim))


def builds_sharded(spec: DenseIndexSpec, n: int, dim: int, above: int | None = None) -> bool:
    """Whether ``n`` vectors get a sharded build: IVF only (a flat or HNSW index is built whole), more than
    ``above`` vectors (None: :func:`shard_above`)."""
    return spec.needs_training and n > (above or shard_above(spec, dim))


def new_index(spec: DenseIndexSpec, dim: int):
    import faiss

    return faiss.index_factory(dim, spec.factory, faiss.METRIC_INNER_PRODUCT)


def trained_index(spec: DenseIndexSpec, dim: int, train: np.ndarray | None = None):
    """An empty index of ``spec``, trained on ``train`` when it needs training."""
    index = new_index(spec, dim)
    if spec.needs_training:
        if train is None or len(train) == 0:
            raise ValueError(f"a {spec.type} index needs training vectors")
        index.train(np.ascontiguousarray(train, dtype=np.float32))
    return index


def add_batches(index, batches: Iterable[tuple[np.ndarray, np.ndarray]]):
    """Add ``batches`` of (ids int64, vectors float32) one at a time; the index."""
    for ids, vectors in batches:
        if len(ids):
            index.add_with_ids(np.ascontiguousarray(vectors, dtype=np.float32), np.asarray(ids, dtype=np.int64))
    return index


def build_index(spec: DenseIndexSpec, dim: int, batches: Iterable[tuple[np.ndarray, np.ndarray]],
                train: np.ndarray | None = None):
    """A FAISS index of ``batches`` of (ids int64, vectors float32), trained first on ``train`` when it needs it.

    Batches are added one at a time, so no list of every vector is held
    beyond what the index itself stores.
    """
    import faiss

    index = add_batches(trained_index(spec, dim, train), batches)
    apply_search_params(index, spec.nprobe, spec.ef_search)
    faiss.omp_set_num_threads(os.cpu_count() or 1)
    return index


def merge_parts(trained, parts: Sequence[str], lists_path: str):
    """One IVF index of the partial index files ``parts`` (each ``trained`` plus vectors), its inverted lists
    on disk at ``lists_path``; write it with :func:`write_index` next to that file.

    The parts are mapped, not loaded, and each list is copied from them in turn (FAISS
    ``OnDiskInvertedLists.merge_from_multiple``), so memory holds pages of files, not the vectors.
    """
    import faiss

    if trained.ntotal:
        raise ValueError("merge_parts: the trained index must be empty")
    opened = [faiss.read_index(path, faiss.IO_FLAG_MMAP | faiss.IO_FLAG_READ_ONLY) for path in parts]
    lists = faiss.InvertedListsPtrVector()
    for index in opened:  # kept open (in ``opened``) until the merge is done
        lists.push_back(faiss.extract_index_ivf(index).invlists)
    merged = faiss.clone_index(trained)
    ivf = faiss.extract_index_ivf(merged)
    on_disk = faiss.OnDiskInvertedLists(ivf.nlist, ivf.code_size, lists_path)
    with _c_stdout_to_stderr():  # FAISS prints "resizing <file>" on stdout, where a CLI prints its result
        total = on_disk.merge_from_multiple(lists.data(), lists.size(), False)
    on_disk.filename = os.path.basename(lists_path)  # found next to the index file when read (read_index)
    ivf.replace_invlists(on_disk, True)
    on_disk.this.disown()  # the index owns it now
    merged.ntotal = ivf.ntotal = total
    del opened
    return merged


@contextlib.contextmanager
def _c_stdout_to_stderr() -> Iterator[None]:
    """Send what C code prints on file descriptor 1 to 2 meanwhile."""
    import ctypes

    sys.stdout.flush()
    ctypes.CDLL(None).fflush(None)
    saved = os.dup(1)
    try:
        os.dup2(2, 1)
        yield
    finally:
        ctypes.CDLL(None).fflush(None)
        os.dup2(saved, 1)
        os.close(saved)


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


def read_index(path: str, index_type: str, *, mmap: bool = True, on_disk: bool = False):
    """Load a local index file; memory-mapped where FAISS allows it (the file must then stay in place).

    IVF indexes map their inverted lists (``IO_FLAG_MMAP``); flat and HNSW
    indexes map their vector storage (``IO_FLAG_MMAP_IFC``).  FAISS refuses the
    two flags together.  ``on_disk``: a merged index (:func:`merge_parts`), whose
    lists are mapped read-only from the file of that name next to ``path``, whatever
    ``mmap`` says (wherever the folder has been copied to).
    """
    import faiss

    if on_disk:
        index = faiss.read_index(path, faiss.IO_FLAG_SKIP_IVF_DATA | faiss.IO_FLAG_READ_ONLY)
        lists = faiss.downcast_InvertedLists(faiss.extract_index_ivf(index).invlists)
        lists.filename = os.path.join(os.path.dirname(os.path.abspath(path)), os.path.basename(lists.filename))
        lists.read_only = True
        lists.prefetch_nthread = 0  # the page cache reads ahead; no threads started per search
        lists.do_mmap()
        return index
    if not mmap:
        return faiss.read_index(path)
    flag = faiss.IO_FLAG_MMAP if index_type.startswith("ivf") else faiss.IO_FLAG_MMAP_IFC
    return faiss.read_index(path, flag)


def search(index, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """(scores, rows) of the ``k`` nearest rows per query; a missing hit has row -1."""
    k = max(1, min(k, index.ntotal)) if index.ntotal else 1
    return index.search(np.ascontiguousarray(queries, dtype=np.float32), k)

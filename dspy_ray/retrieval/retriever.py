"""The retriever a RAG program is given: an index folder loaded once per process, searched by text.

    >>> retriever = open_retriever("out/index?mode=hybrid&k=5", embed_settings)   # doctest: +SKIP
    >>> [(p.id, p.source, round(p.score, 3)) for p in retriever.search("where is station 7?")][:2]  # doctest: +SKIP
    [('fire/stations/station_7_kettle_bay.txt:0', 'fire/stations/station_7_kettle_bay.txt', 0.032), ...]

The setting is the index folder or URI, optionally followed by ``?`` and options:

============  ==============================================================  ==================
option        meaning                                                         default
============  ==============================================================  ==================
mode          ``dense`` (FAISS), ``bm25`` or ``hybrid`` (reciprocal-rank      the manifest's
              fusion of both)                                                 (``hybrid``)
k             passages returned when ``search`` is given no ``k``             the manifest's (5)
candidates    hits taken from each side before fusion (hybrid)                the manifest's (50)
nprobe        IVF lists searched per query (approximate indexes)              the manifest's
ef_search     HNSW search breadth                                             the manifest's
mmap          ``0`` loads the FAISS and BM25 files into memory instead        ``1``
decompose     ``1``: also search the parts of a multi-part question (split    ``1``
              at conjunctions, :mod:`~dspy_ray.retrieval.decompose`) and
              fuse all rankings; ``0``: the question alone
per_source    at most this many passages of one document in the results       ``2``
              (``0``: no cap)
============  ==============================================================  ==================

Dense and hybrid modes embed the query with ``embed`` (the ``EMBED`` endpoint);
an index built with another model, dimension or prefixes is refused with
both named.  ``bm25`` needs no embedder.  An index on object storage is
copied once to a local cache folder (FAISS maps local files only).
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass, fields
from urllib.parse import parse_qsl

import pyarrow as pa
import pyarrow.parquet as pq

from dspy_ray.util.fs import filesystem_for, is_uri
from dspy_ray.retrieval.decompose import cap_per_source, cover_parts, subqueries
from dspy_ray.retrieval.dense import apply_search_params, read_index
from dspy_ray.retrieval.dense import search as dense_search
from dspy_ray.retrieval.manifest import (
    BM25_DIR,
    FAISS_INDEX,
    PASSAGES,
    IndexManifest,
    RetrievalIndexError,
    check_embedder,
    join,
    read_manifest,
)
from dspy_ray.retrieval.passages import Passage
from dspy_ray.retrieval.sparse import BM25Index
from dspy_ray.endpoints.settings import EndpointSettings

MODES = ("dense", "bm25", "hybrid")
_LOADED_COLUMNS = ["id", "source", "title", "section", "text", "start", "end", "chunk"]


@dataclass(frozen=True)
class RetrieverOptions:
    """What may follow ``?`` in a retriever setting (None: the manifest's default)."""

    mode: str | None = None
    k: int | None = None
    candidates: int | None = None
    nprobe: int | None = None
    ef_search: int | None = None
    mmap: bool = True
    decompose: bool = True
    per_source: int | None = None  # None: DEFAULT_PER_SOURCE; 0: no cap


DEFAULT_PER_SOURCE = 2  # measured in benchmarks/pydocs_rag.py (docs/rag.md, "Multi-part questions")


def parse_setting(setting: str) -> tuple[str, RetrieverOptions]:
    """``"out/index?mode=bm25&k=3"`` -> (``"out/index"``, options); unknown or bad options raise ValueError."""
    location, _, query = str(setting).partition("?")
    if not location:
        raise ValueError(f"retriever setting {setting!r}: no index path")
    known = {f.name: f for f in fields(RetrieverOptions)}
    values: dict = {}
    for key, raw in parse_qsl(query, keep_blank_values=True):
        if key not in known:
            raise ValueError(f"retriever setting {setting!r}: unknown option {key!r}; options are {sorted(known)}")
        if key == "mode":
            if raw not in MODES:
                raise ValueError(f"retriever setting {setting!r}: mode must be one of {MODES}, got {raw!r}")
            values[key] = raw
        elif key in ("mmap", "decompose"):
            values[key] = raw.lower() not in ("0", "false", "no")
        else:
            try:
                values[key] = int(raw)
            except ValueError:
                raise ValueError(f"retriever setting {setting!r}: {key} must be a whole number, got {raw!r}") from None
            if values[key] < (0 if key == "per_source" else 1):
                raise ValueError(f"retriever setting {setting!r}: {key} must be 1 or more")
    return location, RetrieverOptions(**values)


def reciprocal_rank_fusion(rankings: Sequence[Sequence[int]], rrf_k: int = 60) -> list[tuple[int, float]]:
    """Rows ranked by the sum over rankings of 1 / (rrf_k + rank), rank from 1; ties keep first-seen order.

    >>> reciprocal_rank_fusion([[7, 3], [3, 9]], rrf_k=60)[0][0]
    3
    """
    scores: dict[int, float] = {}
    for ranking in rankings:
        for rank, row in enumerate(ranking, 1):
            scores[row] = scores.get(row, 0.0) + 1.0 / (rrf_k + rank)
    return sorted(scores.items(), key=lambda item: -item[1])


class Retriever:
    """Dense, BM25 or hybrid search over one index folder; thread-safe for searching.

    Build one with :meth:`open` (or :func:`open_retriever` from a setting string).
    """

    def __init__(self, *, location: str, manifest: IndexManifest, passages: pa.Table, mode: str, k: int,
                 candidates: int, dense_index=None, bm25: BM25Index | None = None, client=None,
                 decompose: bool = True, per_source: int | None = DEFAULT_PER_SOURCE):
        self.location, self.manifest, self.passages = location, manifest, passages
        self.mode, self.k, self.candidates = mode, k, candidates
        self.dense_index, self.bm25, self.client = dense_index, bm25, client
        self.decompose, self.per_source = decompose, per_source
        self.sources = passages.column("source").to_pylist()

    @classmethod
    def open(cls, location: str, embed: EndpointSettings | None = None, options: RetrieverOptions | None = None
             ) -> Retriever:
        from dspy_ray.client.embeddings import EmbeddingClient

        options = options or RetrieverOptions()
        manifest = read_manifest(location)
        mode = options.mode or manifest.retrieval.mode
        client = None
        if mode in ("dense", "hybrid"):
            if embed is None or not embed.base_url:
                raise RetrievalIndexError(f"retriever mode {mode!r} embeds queries: it needs an embedding "
                                          f"endpoint (EMBED_BASE_URL, or the embedded embedder); "
                                          f"mode=bm25 does not")
            check_embedder(manifest, embed.model, None, location, embed.query_prefix, embed.passage_prefix)
            client = EmbeddingClient(embed)
            check_embedder(manifest, embed.model, client.probe(), location)
        local = local_copy(location, manifest)
        passages = pq.read_table(join(local, PASSAGES), columns=_LOADED_COLUMNS)
        if passages.num_rows != manifest.passages:
            raise RetrievalIndexError(f"index {location}: {PASSAGES} has {passages.num_rows} rows, the manifest "
                                      f"says {manifest.passages}; rebuild it with `python -m pipelines.index`")
        index = None
        if mode in ("dense", "hybrid"):
            index = read_index(join(local, FAISS_INDEX), manifest.index.type, mmap=options.mmap,
                               on_disk=bool(manifest.index.lists_file))
            apply_search_params(index, options.nprobe or manifest.index.nprobe,
                                      options.ef_search or manifest.index.ef_search)
        bm25 = BM25Index.load(join(local, BM25_DIR), mmap=options.mmap) if mode in ("bm25", "hybrid") else None
        return cls(location=location, manifest=manifest, passages=passages, mode=mode,
                   k=options.k or manifest.retrieval.k, candidates=options.candidates or manifest.retrieval.candidates,
                   dense_index=index, bm25=bm25, client=client, decompose=options.decompose,
                   per_source=DEFAULT_PER_SOURCE if options.per_source is None else options.per_source)

    # -- searching ----------------------------------------------------------------

    def search(self, query: str, k: int | None = None, *, per_source: int | None = None) -> list[Passage]:
        """The ``k`` best passages for ``query`` (default: the retriever's ``k``), best first; ``per_source``
        overrides the retriever's cap of passages per document (0: no cap; None: the retriever's)."""
        return self.search_many([query], k, per_source=per_source)[0]

    def search_many(self, queries: Sequence[str], k: int | None = None, mode: str | None = None, *,
                    decompose: bool | None = None, per_source: int | None = None) -> list[list[Passage]]:
        """:meth:`search` for many queries at once (one embedding request per ``batch_size`` queries).

        ``mode`` may pick another mode this retriever has loaded (a hybrid one has all three);
        ``decompose`` and ``per_source`` override the retriever's (see the module docstring)."""
        k = k or self.k
        mode = mode or self.mode
        decompose = self.decompose if decompose is None else decompose
        per_source = self.per_source if per_source is None else per_source
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        if (mode != "bm25" and self.dense_index is None) or (mode != "dense" and self.bm25 is None):
            raise ValueError(f"this retriever was opened in mode {self.mode!r}; it cannot search in mode {mode!r}")
        # Fused rankings (hybrid, or a query with parts) look deeper; a per-source cap needs spare hits.
        depth = max(k * 4 if per_source else k, self.candidates if decompose or mode == "hybrid" else 0)
        # Every text searched: each query, then its parts; rankings[i] lists query i's rankings.
        texts: list[str] = []
        owners: list[int] = []
        for i, q in enumerate(queries):
            if isinstance(q, str) and q.strip():  # a blank query finds nothing
                for text in [q] + (subqueries(q) if decompose else []):
                    texts.append(text)
                    owners.append(i)
        dense_hits = self._dense(texts, depth) if mode != "bm25" and texts else []
        sparse_hits = self.bm25.search(texts, depth) if mode != "dense" and texts else []
        # rankings[i][t]: the rankings (dense, BM25) of query i's t-th text (0: the query, then its parts).
        rankings: list[list[list[list[int]]]] = [[] for _ in queries]
        scored: dict[int, list[tuple[int, float]]] = {}
        for n, owner in enumerate(owners):
            lists = [found[n] for found in (dense_hits, sparse_hits) if found]
            scored.setdefault(owner, lists[0])  # the query's own ranking, scores kept, when it is the only one
            rankings[owner].append([[r for r, _ in hits] for hits in lists])
        return [self._passages(self._fuse(i, ranked, scored.get(i, []), k, per_source))
                for i, ranked in enumerate(rankings)]

    def _fuse(self, i: int, ranked: list[list[list[int]]], own: list[tuple[int, float]], k: int,
              per_source: int | None) -> list[tuple[int, float]]:
        """One query's hits: its rankings fused (each part's best kept in the top k), then capped per source."""
        flat = [lst for text in ranked for lst in text]
        if not flat:
            return []
        rrf_k = self.manifest.retrieval.rrf_k
        hits = reciprocal_rank_fusion(flat, rrf_k) if len(flat) > 1 else own
        if len(ranked) > 1:  # a question with parts: the best passage of each part stays in
            best = [reciprocal_rank_fusion(part, rrf_k)[:1] for part in ranked[1:]]
            hits = cover_parts(hits, [b[0][0] for b in best if b], k)
        return cap_per_source(hits, self.sources, per_source, k)

    def _dense(self, queries: Sequence[str], depth: int) -> list[list[tuple[int, float]]]:
        vectors = self.client.embed_queries(list(queries))
        scores, rows = dense_search(self.dense_index, vectors, depth)
        return [[(int(r), float(s)) for r, s in zip(row_ids, row_scores) if r >= 0]
                for row_ids, row_scores in zip(rows, scores)]

    def _passages(self, hits: list[tuple[int, float]]) -> list[Passage]:
        if not hits:
            return []
        rows = self.passages.take(pa.array([r for r, _ in hits], pa.int64())).to_pylist()
        return [Passage(**row, score=score) for row, (_, score) in zip(rows, hits)]

    def close(self) -> None:
        if self.client is not None:
            self.client.close()

    # One per process, shared by every program copy: DSPy deep-copies modules (optimizers, Refine)
    # and must not duplicate an index; shipping one to another process would copy it whole.
    def __copy__(self) -> Retriever:
        return self

    def __deepcopy__(self, memo) -> Retriever:
        return self

    def __reduce__(self):
        raise TypeError("a Retriever is not sent between processes: open it in each one from its setting "
                        "(dspy_ray.execution.loading.Resource(open=open_retriever) does, once per process)")

    def __repr__(self) -> str:
        return (f"Retriever({self.location!r}, mode={self.mode!r}, k={self.k}, passages={self.manifest.passages}, "
                f"index={self.manifest.index.type})")


def open_retriever(setting: str, embed: EndpointSettings | None) -> Retriever:
    """A :class:`Retriever` from a setting string (see the module docstring); a ``dspy_ray.execution.loading.Resource`` opener.

    >>> Resource("retriever", open=open_retriever, needs_embedder=True,          # doctest: +SKIP
    ...          help="index folder or URI [?mode=dense|bm25|hybrid&k=5]")
    """
    location, options = parse_setting(setting)
    return Retriever.open(location, embed, options)


def local_copy(location: str, manifest: IndexManifest) -> str:
    """``location`` itself when local; else a local cache folder holding its search files (copied once per build)."""
    if not is_uri(location):
        return os.path.abspath(location)
    import pyarrow.fs as pafs

    key = hashlib.blake2b(f"{location}\n{manifest.build.created_at}".encode(), digest_size=8).hexdigest()
    cache = os.path.join(tempfile.gettempdir(), "dspy-ray-indexes", key)
    if os.path.isdir(cache):
        return cache
    fs, root = filesystem_for(location)
    tmp = f"{cache}.tmp-{os.getpid()}"
    os.makedirs(tmp, exist_ok=True)
    local = pafs.LocalFileSystem()
    for name in (PASSAGES, FAISS_INDEX, *([manifest.index.lists_file] if manifest.index.lists_file else [])):
        pafs.copy_files(join(root, name), os.path.join(tmp, name), source_filesystem=fs, destination_filesystem=local)
    os.makedirs(os.path.join(tmp, BM25_DIR), exist_ok=True)
    pafs.copy_files(join(root, BM25_DIR), os.path.join(tmp, BM25_DIR), source_filesystem=fs,
                    destination_filesystem=local)
    try:
        os.rename(tmp, cache)
    except OSError:  # another process of this node finished first
        import shutil

        shutil.rmtree(tmp, ignore_errors=True)
    return cache

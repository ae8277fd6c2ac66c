"""The index folder's layout and its manifest: what was built, with which embedder, from which corpus.

An index is a folder (or an object-store prefix)::

    INDEX/
      manifest.json     written last: its presence means the index is complete
      passages.parquet  one row per indexed passage; row i is FAISS id i and BM25 document i
      index.faiss       dense index: inner product over L2-normalised vectors
      index.ivfdata     a sharded build's inverted lists (ids and vectors), mapped by index.faiss
      bm25/             the bm25s index over the same passages
      files.parquet     one row per corpus file: path, sha256, bytes, kind, passages, error
      errors.parquet    what was left out and why: unreadable files, bad records, failed embeddings
      embeddings/       the embedding store (content hash -> vector), what --resume reuses
      build.json        the settings of a build in progress (checked by --resume)

    >>> m = read_manifest("out/index")                                    # doctest: +SKIP
    >>> m.embedder.model, m.embedder.dim, m.passages, m.index.type        # doctest: +SKIP
    ('all-minilm-l6-v2', 384, 412, 'flat')

The manifest never holds an API key; the embedder's base URL is stored
redacted (no credentials, no query string).
"""

from __future__ import annotations

import json

from pydantic import BaseModel, ConfigDict, Field

from dspy_ray.util.fs import filesystem_for, read_bytes, write_bytes
from dspy_ray.util.cli import EXIT_USAGE

MANIFEST = "manifest.json"
PASSAGES = "passages.parquet"
FAISS_INDEX = "index.faiss"
FAISS_LISTS = "index.ivfdata"  # only when the index was built in parts (DenseIndexInfo.lists_file)
BM25_DIR = "bm25"
FILES = "files.parquet"
ERRORS = "errors.parquet"
EMBEDDINGS_DIR = "embeddings"
BUILD_STATE = "build.json"
FORMAT = 1


class RetrievalIndexError(RuntimeError):
    """An index folder that cannot be used as asked."""
    exit_code = EXIT_USAGE  # what a command line exits with (dspy_ray.util.cli)


class IndexNotFoundError(RetrievalIndexError):
    """No complete index at the path."""


class IndexMismatchError(RetrievalIndexError):
    """The index was built with another embedder (model, dimension, prefixes) than the one given."""


class _Model(BaseModel):
    model_config = ConfigDict(extra="ignore")


class EmbedderInfo(_Model):
    model: str = Field(..., description="embedding model id the passages were embedded with")
    dim: int = Field(..., description="vector dimension")
    base_url: str = Field("", description="endpoint base URL, redacted (no credentials)")
    origin: str = Field("", description="configured, discovery or embedded")
    query_prefix: str = ""
    passage_prefix: str = ""


class DenseIndexInfo(_Model):
    type: str = Field(..., description="flat (exact), ivf_flat, ivf_pq or hnsw")
    factory: str = Field(..., description="FAISS index_factory string")
    nlist: int | None = None
    nprobe: int | None = Field(None, description="IVF lists searched per query (default for retrievers)")
    ef_search: int | None = Field(None, description="HNSW search breadth (default for retrievers)")
    trained_on: int = Field(0, description="vectors the coarse quantizer / PQ was trained on")
    exact_below: int = Field(..., description="corpora with fewer passages get the exact index")
    parts: int = Field(0, description="partial indexes built by Ray tasks and merged (0: built in one process)")
    lists_file: str | None = Field(None, description="the merged inverted lists' file, next to the index file "
                                                     "(memory-mapped); None: the lists are in the index file")


class RetrievalDefaults(_Model):
    mode: str = "hybrid"
    k: int = 5
    rrf_k: int = Field(60, description="reciprocal-rank fusion constant: score = sum 1 / (rrf_k + rank)")
    candidates: int = Field(50, description="hits taken from each retriever before fusion")


class CorpusInfo(_Model):
    root: str
    fingerprint: str = Field(..., description="sha256 over (path, sha256) of every file read")
    files: int
    records: int = 0
    skipped: int = 0


class ChunkingInfo(_Model):
    unit: str
    size: int
    overlap: int


class BuildInfo(_Model):
    created_at: str
    seconds: float
    embedded_now: int
    reused: int
    removed: int
    failed: int
    versions: dict[str, str] = {}


class IndexManifest(_Model):
    format: int = FORMAT
    embedder: EmbedderInfo
    normalized: bool = True
    metric: str = "inner_product"
    passages: int
    index: DenseIndexInfo
    bm25: dict = {}
    retrieval: RetrievalDefaults = RetrievalDefaults()
    corpus: CorpusInfo
    chunking: ChunkingInfo
    build: BuildInfo


def join(root: str, name: str) -> str:
    return f"{root.rstrip('/')}/{name}"


def read_manifest(index: str) -> IndexManifest:
    """The manifest of the index at ``index`` (path or URI); :class:`IndexNotFoundError` when there is none."""
    fs, root = filesystem_for(index)
    raw = read_bytes(fs, join(root, MANIFEST))
    if raw is None:
        hint = (" (a build was interrupted: re-run `python -m pipelines.index ... --resume`)"
                if read_bytes(fs, join(root, BUILD_STATE)) is not None else "")
        raise IndexNotFoundError(f"no index at {index}: {MANIFEST} is missing{hint}")
    try:
        return IndexManifest.model_validate(json.loads(raw))
    except ValueError as exc:
        raise IndexNotFoundError(f"{join(index, MANIFEST)} is not a valid manifest: "
                                 f"{' '.join(str(exc).split())[:300]}") from None


def write_manifest(index: str, manifest: IndexManifest) -> None:
    """Write the manifest whole (never part of it); a build writes it last, as it marks the index complete."""
    fs, root = filesystem_for(index)
    write_bytes(fs, join(root, MANIFEST), manifest.model_dump_json(indent=2).encode())


def check_embedder(manifest: IndexManifest, model: str, dim: int | None, where: str,
                   query_prefix: str | None = None, passage_prefix: str | None = None) -> None:
    """Refuse an embedder other than the index's, naming both (``dim`` None: not known yet)."""
    built = manifest.embedder
    problems = []
    if model != built.model:
        problems.append(f"model {model!r} (index: {built.model!r})")
    if dim is not None and dim != built.dim:
        problems.append(f"dimension {dim} (index: {built.dim})")
    if query_prefix is not None and query_prefix != built.query_prefix:
        problems.append(f"query prefix {query_prefix!r} (index: {built.query_prefix!r})")
    if passage_prefix is not None and passage_prefix != built.passage_prefix:
        problems.append(f"passage prefix {passage_prefix!r} (index: {built.passage_prefix!r})")
    if problems:
        raise IndexMismatchError(
            f"index {where} was built with embedder {built.model!r} ({built.dim}-d); the embedder given has "
            + ", ".join(problems)
            + ": use the index's embedder (EMBED_MODEL / EMBED_BASE_URL) or rebuild the index")

"""Step 1 of a build, before any embedding: the index folder can take this build, and the embedder matches it.

An index, or a killed build's embeddings, already in the folder need ``--resume``, and must have
been made with the same chunking (:func:`check_index_dir`) and, once the endpoint answers a probe,
the same embedder model, dimension and prefixes (:func:`check_embedder`)::

    >>> index = IndexDir.at("out/idx")                                            # doctest: +SKIP
    >>> previous = check_index_dir(index, IndexOptions("data/rag/corpus", "out/idx"))  # doctest: +SKIP
    >>> check_embedder(index, settings, previous)                                 # doctest: +SKIP
    384
"""

from __future__ import annotations

import json

import pyarrow.fs as pafs

from dspy_ray.client.embeddings import EmbeddingClient
from dspy_ray.endpoints.settings import EndpointSettings
from dspy_ray.retrieval.manifest import BUILD_STATE, MANIFEST, IndexManifest, RetrievalIndexError, read_manifest
from dspy_ray.retrieval.manifest import check_embedder as check_manifest_embedder
from dspy_ray.retrieval.store import EmbeddingStore
from pipelines.index.base import IndexDir, IndexDirError, IndexOptions
from pipelines.runner import OutputError, check_writable


def check_index_dir(index: IndexDir, options: IndexOptions) -> IndexManifest | None:
    """Refuse a folder this build cannot use; the manifest of the index it holds (None: no index yet)."""
    try:
        kind = index.fs.get_file_info(index.root).type
    except (OSError, ValueError) as exc:
        raise IndexDirError(f"index {index.location}: cannot open ({' '.join(str(exc).split())[:300]})") from None
    if kind == pafs.FileType.File:
        raise IndexDirError(f"index {index.location} exists and is not a folder")
    has_manifest = index.read(MANIFEST) is not None
    state = index.read(BUILD_STATE)
    has_store = bool(EmbeddingStore(index.location).shards())
    if (has_manifest or state is not None or has_store) and not options.resume:
        raise IndexDirError(f"index {index.location} already holds an index or a build's embeddings; pass --resume "
                            f"to update it (only new and changed passages are embedded), or choose a new --index")
    try:
        check_writable(index.location, index.fs, index.root)
    except OutputError as exc:
        raise IndexDirError(str(exc).replace("output", "index", 1)) from None
    chunking = options.chunking.model_dump()
    previous = None
    if has_manifest:
        previous = read_manifest(index.location)
        _same_chunking(previous.chunking.model_dump(), chunking, index.location)
    if state is not None:
        _same_chunking(json.loads(state).get("chunking", {}), chunking, index.location)
    return previous


def check_embedder(index: IndexDir, settings: EndpointSettings, previous: IndexManifest | None) -> int:
    """Probe the endpoint (a bad URL, key or model fails here) and compare it with what the folder holds;
    the embedding dimension."""
    client = EmbeddingClient(settings)
    try:
        dim = client.probe()
    finally:
        client.close()
    if previous is not None:
        check_manifest_embedder(previous, settings.model, dim, index.location, settings.query_prefix,
                                settings.passage_prefix)
    raw = index.read(BUILD_STATE)
    if raw is not None:
        built = json.loads(raw).get("embedder", {})
        if (built.get("model"), built.get("dim")) != (settings.model, dim):
            raise RetrievalIndexError(
                f"index {index.location} holds embeddings of an interrupted build with embedder "
                f"{built.get('model')!r} ({built.get('dim')}-d); this run's embedder is {settings.model!r} "
                f"({dim}-d): use that embedder, or a new --index")
    store_dim = EmbeddingStore(index.location).dim()
    if store_dim is not None and store_dim != dim:
        raise RetrievalIndexError(f"index {index.location}: stored embeddings are {store_dim}-d, the embedder "
                                  f"{settings.model!r} gives {dim}-d; use a new --index")
    return dim


def _same_chunking(before: dict, now: dict, where: str) -> None:
    if before and before != now:
        raise IndexDirError(f"index {where} was built with chunking {before}; this run asks for {now}: "
                            f"use the same --chunk-* flags, or a new --index")

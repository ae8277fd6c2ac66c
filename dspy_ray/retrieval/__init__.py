"""Retrieval: passages, the index folder (FAISS + BM25 + manifest), and the retriever programs are given.

    >>> from dspy_ray.retrieval import open_retriever, Passage                       # doctest: +SKIP
    >>> retriever = open_retriever("out/index?mode=hybrid&k=5", embed_settings)   # doctest: +SKIP
    >>> retriever.search("how do I report a barking dog?")                        # doctest: +SKIP

Building an index is :mod:`pipelines.index`'s job; this package reads what it wrote.
"""

from dspy_ray.retrieval.manifest import (
    IndexManifest,
    IndexMismatchError,
    IndexNotFoundError,
    RetrievalIndexError,
    read_manifest,
)
from dspy_ray.retrieval.passages import Passage
from dspy_ray.retrieval.retriever import MODES, Retriever, RetrieverOptions, open_retriever, parse_setting

__all__ = ["MODES", "IndexManifest", "IndexMismatchError", "IndexNotFoundError", "Passage", "RetrievalIndexError",
           "Retriever", "RetrieverOptions", "open_retriever", "parse_setting", "read_manifest"]

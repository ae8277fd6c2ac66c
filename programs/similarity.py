"""The cosine of a question and sentences, from the embedder a retriever already holds (when it holds one).

The extractive RAG answer ranks sentences and decides whether to decline
partly on how close each sentence is to the question in embedding space
(:mod:`programs.sentence_rank`).  The program is given a retriever, not an
embedder: the framework's dense or hybrid retriever embeds its queries with an
``EmbeddingClient`` (its ``client``), and that is the one used here.  A
retriever without one (BM25 mode, a test stub) gives None and the ranker
goes without the signal.

    >>> similarity_of(object()) is None
    True
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

MAX_SENTENCES = 96  # one embedding request's worth; more sentences than this are scored as unknown


def similarity_of(retriever: Any):
    """``similarity(question, sentences) -> cosines`` through ``retriever``'s embedding client, or None.

    The client is anything with ``embed(texts, kind) -> result`` whose ``vectors`` are unit rows and
    ``errors`` per text (``dspy_ray.client.embeddings.EmbeddingClient``).  A sentence that fails to embed,
    or any failure of the call, scores None for that question: the caller treats it as unknown.
    """
    client = getattr(retriever, "client", None)
    if client is None or not callable(getattr(client, "embed", None)):
        return None

    def similarity(question: str, sentences: Sequence[str]) -> list[float] | None:
        texts = list(sentences[:MAX_SENTENCES])
        try:
            asked = client.embed([question], kind="query")
            found = client.embed(texts, kind="passage")
        except Exception:  # noqa: BLE001 - the signal is optional: rank without it rather than fail the answer
            return None
        if asked.errors[0] is not None:
            return None
        cosines = np.asarray(found.vectors, dtype=np.float32) @ np.asarray(asked.vectors[0], dtype=np.float32)
        return [float(c) if error is None else None for c, error in zip(cosines, found.errors)] + \
            [None] * (len(sentences) - len(texts))

    return similarity

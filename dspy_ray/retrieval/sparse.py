"""BM25 over the same passages as the dense index, with ``bm25s`` (sparse matrices, numpy, memory-mappable).

Text is lower-cased, split into words, English stop words dropped, and words
stemmed (Snowball English, PyStemmer), so "licensed" matches "license".

    >>> bm25 = BM25Index.build(["Dogs must be licensed every year", "Station 7 has a ladder truck"])
    >>> [(row, round(score, 2)) for row, score in bm25.search(["ladder truck"], k=2)[0]]
    [(1, 0.58)]

Rows with no query word in them are not returned (BM25 scores them 0).
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import numpy as np

SETTINGS = {"method": "lucene", "k1": 1.5, "b": 0.75, "stopwords": "en", "stemmer": "english"}


def _quiet() -> None:
    import logging

    # bm25s sets its own logger to DEBUG at import, which logs every index build.
    logging.getLogger("bm25s").setLevel(logging.WARNING)


def _stemmer():
    import Stemmer

    return Stemmer.Stemmer(SETTINGS["stemmer"])


class BM25Index:
    def __init__(self, model):
        self.model = model
        self._stemmer = _stemmer()

    @classmethod
    def build(cls, texts: Sequence[str]) -> BM25Index:
        import bm25s

        _quiet()
        tokens = bm25s.tokenize(list(texts), stopwords=SETTINGS["stopwords"], stemmer=_stemmer(),
                                show_progress=False)
        model = bm25s.BM25(method=SETTINGS["method"], k1=SETTINGS["k1"], b=SETTINGS["b"])
        model.index(tokens, show_progress=False)
        return cls(model)

    @classmethod
    def load(cls, folder: str, *, mmap: bool = True) -> BM25Index:
        import bm25s

        _quiet()
        return cls(bm25s.BM25.load(folder, mmap=mmap))

    def save(self, folder: str) -> None:
        os.makedirs(folder, exist_ok=True)
        self.model.save(folder)

    def search(self, queries: Sequence[str], k: int) -> list[list[tuple[int, float]]]:
        """Per query, up to ``k`` (row, score) pairs, best first."""
        import bm25s

        tokens = bm25s.tokenize(list(queries), stopwords=SETTINGS["stopwords"], stemmer=self._stemmer,
                                return_ids=False, show_progress=False)
        out: list[list[tuple[int, float]]] = [[] for _ in queries]
        asked = [i for i, t in enumerate(tokens) if t]  # a query of stop words only matches nothing
        n = self.model.scores["num_docs"]
        if not asked or not n:
            return out
        rows, scores = self.model.retrieve([tokens[i] for i in asked], k=min(k, n), show_progress=False,
                                           n_threads=1)
        for i, r, s in zip(asked, np.atleast_2d(rows), np.atleast_2d(scores)):
            out[i] = [(int(row), float(score)) for row, score in zip(r, s) if score > 0]
        return out

"""Per-input demos: a predictor holding a large pool of labelled demos shows each call only the nearest few.

Small models copy the labels of a demo that resembles the input well, and a
whole training set in every prompt is far too long.  When a predictor's
``demos`` hold more than ``pool_threshold`` examples, :class:`NearestDemos`
picks the ``k`` whose input text is most similar to this call's (cosine of
TF-IDF-weighted word counts; no model, no server, deterministic) and passes
only those to the predictor.  The pool is ordinary DSPy state, so an artifact
holding one is DSPy's own JSON and ``Module.load`` reads it.

    >>> pool = [dspy.Example(text="dog barking all night", label="noise"),
    ...         dspy.Example(text="kitchen on fire", label="fire"),
    ...         dspy.Example(text="smoke from the kitchen", label="fire")]
    >>> [d.label for d in NearestDemos(k=2, pool_threshold=2).select(pool, "text", "fire in my kitchen")]
    ['fire', 'fire']
"""

from __future__ import annotations

import math
import re
import threading
from collections import Counter
from typing import Any

import dspy

from programs.fields import field_of

_WORD = re.compile(r"[a-z0-9]+")


def _words(text: str) -> list[str]:
    return _WORD.findall(str(text).lower())


class NearestDemos:
    """Chooses, per call, the ``k`` demos of a large pool nearest to the input (see the module docstring)."""

    def __init__(self, k: int = 4, pool_threshold: int = 16):
        self.k, self.pool_threshold = k, pool_threshold
        self._index: dict[int, tuple[Any, list[dict[str, float]], dict[str, float]]] = {}
        self._lock = threading.Lock()

    def __deepcopy__(self, memo) -> NearestDemos:  # DSPy's optimizers deepcopy programs; the index is a cache
        return NearestDemos(self.k, self.pool_threshold)

    def __getstate__(self) -> dict[str, int]:
        return {"k": self.k, "pool_threshold": self.pool_threshold}

    def __setstate__(self, state: dict[str, int]) -> None:
        self.__init__(**state)

    def select(self, pool: list, field: str, text: str) -> list:
        """``pool`` unchanged when it is small; otherwise its ``k`` demos nearest to ``text`` (field ``field``)."""
        if len(pool) <= self.pool_threshold:
            return pool
        vectors, idf = self._vectors(pool, field)
        query = self._vector(_words(text), idf)
        scored = sorted(range(len(pool)), key=lambda i: (-_dot(query, vectors[i]), i))
        # Nearest last: the demo closest to the input sits next to it in the prompt.
        return [pool[i] for i in reversed(scored[: self.k])]

    def _vectors(self, pool: list, field: str) -> tuple[list[dict[str, float]], dict[str, float]]:
        key = id(pool)
        with self._lock:
            cached = self._index.get(key)
            if cached is None or cached[0] is not pool:  # built once per pool object (a loaded artifact)
                docs = [_words(_get(d, field)) for d in pool]
                df = Counter(w for doc in docs for w in set(doc))
                idf = {w: math.log((1 + len(docs)) / (1 + n)) + 1 for w, n in df.items()}
                cached = (pool, [self._vector(doc, idf) for doc in docs], idf)
                self._index = {key: cached}
            return cached[1], cached[2]

    @staticmethod
    def _vector(words: list[str], idf: dict[str, float]) -> dict[str, float]:
        counts = Counter(w for w in words if w in idf)
        vec = {w: (1 + math.log(n)) * idf[w] for w, n in counts.items()}
        norm = math.sqrt(sum(v * v for v in vec.values())) or 1.0
        return {w: v / norm for w, v in vec.items()}


def _dot(a: dict[str, float], b: dict[str, float]) -> float:
    if len(a) > len(b):
        a, b = b, a
    return sum(v * b.get(w, 0.0) for w, v in a.items())


def _get(demo: Any, field: str) -> str:
    value = field_of(demo, field)
    return "" if value is None else str(value)


def demo_pool(examples: list[dspy.Example], fields: tuple[str, ...]) -> list[dspy.Example]:
    """Labelled examples as demos holding only ``fields`` (what the signature shows)."""
    return [dspy.Example(**{f: e.get(f) for f in fields if e.get(f) is not None}) for e in examples]

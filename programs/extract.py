"""Extractive answers' text tools: passages cut into sentences, sentences into weighted terms; no model.

A small model (the embedded 135M one) cannot write an answer: asked to, it
answers "True" or "1".  So the RAG program takes the answer from a passage
itself - one of its sentences, ranked by :mod:`programs.sentence_rank` on the
terms and weights made here.

    >>> sentences("Station 7 sits at Kettle Bay. It opened in 1998.")
    ['Station 7 sits at Kettle Bay.', 'It opened in 1998.']
    >>> terms("Stations opened in 1998")
    ['station', 'open', '1998']

Words are lower-cased, stop words dropped and stemmed as the BM25 index stems
them (Snowball English), so "licensed" meets "license".  Pure Python but for
the stemmer (PyStemmer, which BM25 uses too): no model, no server, deterministic.
"""

from __future__ import annotations

import functools
import math
import re
import threading
from collections.abc import Sequence

_WORD = re.compile(r"[a-z0-9]+(?:[.,:/-][a-z0-9]+)*")
# Prose is hard-wrapped: a line break inside a paragraph is a space, unless the next line starts a list item,
# a table row or a heading.  A sentence ends at . ! ? before a capital letter or a quote.
_PARAGRAPH = re.compile(r"\n\s*\n")
_ITEM_START = re.compile(r"\n(?=\s*(?:[-*+|#]|\d+[.)]\s))")
_SENTENCE_END = re.compile(r"(?<!\bSt\.)(?<!\bNo\.)(?<!\bDr\.)(?<!\bMt\.)(?<!\bMr\.)(?<!\bMs\.)(?<!\bMrs\.)"
                           r"(?<=[.!?])\s+(?=[\"'(\[A-Z])")
STOP_WORDS = frozenset(
    "a about above after again all also am an and any are as at be been before being below between both but by "
    "can could did do does doing down during each few for from further had has have having he her here hers "
    "him his how i if in into is it its itself just me more most my no nor not now of off on once only or other "
    "our out over own same she should so some such than that the their them then there these they this those "
    "through to too under until up very was we were what when where which while who whom why will with would "
    "you your yours many much".split())
MAX_SENTENCE_CHARS = 400


_STEMMERS = threading.local()  # a PyStemmer object is not safe to share between threads


@functools.lru_cache(maxsize=65536)
def stem(word: str) -> str:
    """The Snowball (Porter 2) English stem of a lower-cased word, as BM25 stems it: "licensed"/"license",
    "subscribed"/"subscribers" and "stations"/"station" meet."""
    stemmer = getattr(_STEMMERS, "stemmer", None)
    if stemmer is None:
        import Stemmer

        stemmer = _STEMMERS.stemmer = Stemmer.Stemmer("english")
    return stemmer.stemWord(word)


def terms(text: str) -> list[str]:
    """The content words of ``text``, stemmed, in order (numbers kept whole: "7,412", "4:30"; a hyphenated
    word in its parts: "school-zone" is "school", "zone")."""
    out = []
    for word in _WORD.findall(str(text).lower()):
        parts = word.split("-") if "-" in word and not any(ch.isdigit() for ch in word) else [word]
        out.extend(stem(w) for w in parts if w and w not in STOP_WORDS)
    return out


def sentences(text: str) -> list[str]:
    """``text`` cut into sentences (and list items, table rows, headings), empty pieces dropped."""
    out = []
    for paragraph in _PARAGRAPH.split(str(text)):
        for line in _ITEM_START.split(paragraph):
            line = " ".join(line.split())
            for piece in _SENTENCE_END.split(line):
                piece = piece.strip(" |#*-")
                if len(piece) > MAX_SENTENCE_CHARS:  # a run-on table or list: cut at clause marks
                    out.extend(p.strip() for p in re.split(r"(?<=[;:|])\s+", piece) if p.strip())
                elif piece:
                    out.append(piece)
    return out


def idf_weights(texts: Sequence[str]) -> dict[str, float]:
    """Inverse document frequency of each term over ``texts`` (the retrieved passages)."""
    df: dict[str, int] = {}
    for text in texts:
        for term in set(terms(text)):
            df[term] = df.get(term, 0) + 1
    n = len(texts)
    return {t: math.log(1 + (n + 1) / (d + 0.5)) for t, d in df.items()}


def answer_text(sentence: str) -> str:
    """A sentence as an answer: markdown emphasis and a leading list number dropped."""
    return re.sub(r"^\s*\d+[.)]\s+", "", sentence.replace("**", "").replace("__", "")).strip()

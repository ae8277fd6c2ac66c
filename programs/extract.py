"""Extractive answers: the sentence of a passage that best answers a question, found without a model.

A small model (the embedded 135M one) can choose which retrieved passage answers
a question far more reliably than it can write the answer: asked to write, it
answers "True" or "1".  So the RAG program can take the answer from the passage
itself - the sentence whose words match the question's best, weighted by how
rare each word is among the retrieved passages - and the model only chooses.

    >>> passage = "Station 7 sits at Kettle Bay and has a ladder truck. It opened in 1998."
    >>> best_sentence("In what year did Station 7 open?", passage, [passage])
    'It opened in 1998.'

Words are lower-cased, stop words dropped and a plain English suffix (``-s``,
``-es``, ``-ed``, ``-ing``, ``-ly``) cut, so "licensed" meets "license".  Pure
Python: no model, no server, deterministic.
"""

from __future__ import annotations

import math
import re
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
    "you your yours county wrenhaven".split())
MAX_SENTENCE_CHARS = 400


def stem(word: str) -> str:
    """A crude English stem: enough for "licensed"/"license" and "stations"/"station" to meet."""
    for suffix in ("ing", "ed", "es", "ly", "s"):
        if len(word) > len(suffix) + 2 and word.endswith(suffix):
            return word[: -len(suffix)]
    return word


def terms(text: str) -> list[str]:
    """The content words of ``text``, stemmed, in order (numbers kept whole: "7,412", "4:30")."""
    return [stem(w) for w in _WORD.findall(str(text).lower()) if w not in STOP_WORDS]


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


def overlap(question: str, text: str, idf: dict[str, float]) -> float:
    """The share (0..1) of the question's term weight that ``text`` contains."""
    wanted = set(terms(question))
    if not wanted:
        return 0.0
    default = max(idf.values(), default=1.0)
    total = sum(idf.get(t, default) for t in wanted)
    found = set(terms(text))
    return sum(idf.get(t, default) for t in wanted & found) / total


_NUMBER = re.compile(r"\d|\b(?:one|two|three|four|five|six|seven|eight|nine|ten|eleven|twelve|twenty|thirty|"
                     r"forty|fifty|hundred|thousand|half|dozen)\b", re.I)
_NAME = re.compile(r"(?<![.!?]\s)(?<!^)\b[A-Z][a-z]+(?:\s+[A-Z][a-z]+)+")
_DAY = re.compile(r"\b(?:mon|tues|wednes|thurs|fri|satur|sun)days?\b", re.I)
_EXPECTS = (  # what the question asks for, and what a sentence answering it holds
    (re.compile(r"^\s*(?:how (?:many|much|long|old|high|tall|far|deep|thick|often|fast|big|large|wide|heavy)|"
                r"(?:what|which) (?:year|time|age|percentage|share|number|ages|date|hours|times|months?)|in what year|when|by what time|"
                r"at what|what is the (?:phone |telephone )?number|which number)", re.I), _NUMBER),
    (re.compile(r"^\s*(?:which|what) day", re.I), _DAY),
    (re.compile(r"^\s*(?:who|whom|whose)\b", re.I), _NAME),
)


def expected_kind(question: str) -> re.Pattern | None:
    """The pattern an answer to ``question`` should contain (a number, a day, a name), or None."""
    for asks, holds in _EXPECTS:
        if asks.search(question):
            return holds
    return None


def sentence_score(question: str, sentence: str, idf: dict[str, float], kind: re.Pattern | None = None) -> float:
    """How well ``sentence`` answers ``question``: its share of the question's term weight, plus a bonus
    when it holds what the question asks for (a number for "how many"), less a penalty for adding nothing
    to the question (a heading that restates it) and a little for its length."""
    words = terms(sentence)
    if not words:
        return -1.0
    asked = set(terms(question))
    new = [w for w in words if w not in asked]
    score = overlap(question, sentence, idf) + (0.05 if new else -0.5) - 0.002 * len(words)
    if len(words) < 8 and not sentence.rstrip().endswith((".", "!", "?", "|")) and "|" not in sentence:
        score -= HEADING_PENALTY  # a heading or a caption names the topic; the answer is in a sentence
    if kind is not None and kind.search(" ".join(w for w in sentence.split() if stem(w.lower()) not in asked)):
        score += KIND_BONUS
    return score


KIND_BONUS = 0.25
HEADING_PENALTY = 0.15


def best_sentence(question: str, passage: str, context: Sequence[str] = ()) -> str:
    """The sentence of ``passage`` that best answers ``question`` (:func:`sentence_score`, IDF over ``context``)."""
    idf = idf_weights(list(context) or [passage])
    kind = expected_kind(question)
    scored = [(sentence_score(question, s, idf, kind), -len(s), s) for s in sentences(passage)]
    best = max(scored, default=None)
    return best[2] if best else str(passage).strip()[:MAX_SENTENCE_CHARS]


def ranked_sentences(question: str, passages: Sequence, n: int = 4, from_top: int = 3,
                     rank_penalty: float = 0.1) -> list[tuple[str, object]]:
    """The ``n`` sentences of the first ``from_top`` passages that best answer ``question``, best first, each
    with its passage (anything with a ``text``).  A passage ranked lower by the retriever pays
    ``rank_penalty`` per place: the retriever's order is evidence too."""
    texts = [str(getattr(p, "text", "")) for p in passages]
    idf = idf_weights(texts)
    kind = expected_kind(question)
    scored = []
    for rank, (passage, text) in enumerate(zip(passages[:from_top], texts)):
        for sentence in sentences(text):
            score = sentence_score(question, sentence, idf, kind) - rank_penalty * rank
            scored.append((score, -len(sentence), -rank, sentence, passage))
    scored.sort(key=lambda s: s[:3], reverse=True)
    seen: set[str] = set()
    out = []
    for *_, sentence, passage in scored:
        if sentence not in seen:
            seen.add(sentence)
            out.append((sentence, passage))
        if len(out) == n:
            break
    return out

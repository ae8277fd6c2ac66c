"""Extractive answers' text tools: passages cut into sentences, sentences into weighted terms; no model.

A small model (the embedded 135M one) cannot write an answer: asked to, it
answers "True" or "1".  So the RAG program takes the answer from a passage
itself - one of its sentences, ranked by :mod:`programs.sentence_rank` on the
terms and weights made here, cut down to the quantity asked for when it states
exactly one (:func:`answer_span`: "How long is the ladder?" - "107-foot").

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

from programs.answer_kinds import NUMBER, QUANTITY_KINDS, answer_kind, counted_words, quantity_pattern

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


def answer_text(sentence: str, question: str | None = None) -> str:
    """A sentence as an answer: markdown emphasis and a leading list number dropped; given the ``question``, cut
    down to the quantity it asks for when the sentence states exactly one (:func:`answer_span`)."""
    text = re.sub(r"^\s*\d+[.)]\s+", "", sentence.replace("**", "").replace("__", "")).strip()
    return (answer_span(question, text) if question else None) or text


# A question that asks two things ("When was it built and when was it rebuilt?") is answered by the whole sentence.
_TWO_ASKS = re.compile(r"\band\s+(?:\w+\s+)?(?:how|what|when|where|who|which|why)\b", re.IGNORECASE)
# Words before a quantity that belong to the answer: "about 1,100", "within 45 seconds", "at least 16".
_LEAD = re.compile(r"\b(?:about|approximately|around|nearly|almost|roughly|over|under|more than|fewer than|"
                   r"less than|at least|at most|up to|within|every|only|between|from)\s+$", re.IGNORECASE)
_RANGE = re.compile(r"\s*(?:to|and|through|until|-|–|—)\s*", re.IGNORECASE)
_RANGE_START = re.compile(rf"\b{NUMBER}(?:{_RANGE.pattern})$", re.IGNORECASE)
_BARE_NUMBER = re.compile(rf"[$£€]?\d[\d,.]*|{NUMBER}", re.IGNORECASE)
_TAIL_WORDS = 2  # "ten telecommunicators", "14 tower sites"


def answer_span(question: str, sentence: str) -> str | None:
    """The phrase of ``sentence`` that states the quantity ``question`` asks for ("How long is the ladder on
    Ladder 1?" - "107-foot"), or None when there is no confident one: the question asks for no quantity
    (:data:`~programs.answer_kinds.QUANTITY_KINDS`) or for two things, or the sentence states none or several
    of the kind outside the question's own words (two joined as a range count as one: "between 30 and 35").

    Why: the whole sentence is graded against a short answer, and a long one fails ("Marine 7 is a 28-foot
    aluminium fireboat with a 750-gallon-per-minute pump that ..." for "750 gallons per minute"); the quantity
    alone is what was asked.  The phrase keeps the words before it that qualify it ("about", "within", "at
    least"), and a bare number keeps the words it counts ("ten telecommunicators"); the citation stays the
    sentence's passage."""
    kind = answer_kind(question)
    if kind not in QUANTITY_KINDS or _TWO_ASKS.search(question):
        return None
    values = _quantities(question, kind, sentence)
    if len(values) == 2 and _RANGE.fullmatch(sentence[values[0].end():values[1].start()]):
        start, end = values[0].start(), values[1].end()
    elif len(values) == 1:
        start, end = values[0].span()
    else:
        return None
    while start > 0 and not sentence[start - 1].isspace():  # whole words: "750" is "750-gallon-per-minute"
        start -= 1
    while end < len(sentence) and not sentence[end].isspace():
        end += 1
    low = _RANGE_START.search(sentence[:start])  # "4 to 6 weeks": the unit follows the range's second number
    start = low.start() if low else start
    lead = _LEAD.search(sentence[:start])
    span = (lead.group(0) if lead else "") + sentence[start:end]
    if _BARE_NUMBER.fullmatch(span.split()[-1]):
        span += "".join(f" {w}" for w in _counted_after(sentence[end:]))
    return _unwrapped(span)


def _quantities(question: str, kind: str, sentence: str) -> list[re.Match]:
    """The quantities of ``kind`` in ``sentence`` that are not the question's own words (but the unit a "how many"
    counts: "ten years" answers "How many years ...")."""
    own = set(terms(question)) - set(terms(" ".join(counted_words(question))))
    return [m for m in quantity_pattern(kind).finditer(sentence) if any(t not in own for t in terms(m.group(0)))]


def _counted_after(text: str) -> list[str]:
    """The words after a bare number that say what it counts: up to :data:`_TAIL_WORDS`, up to a stop word or
    the end of a clause."""
    out = []
    for word in text.split()[:_TAIL_WORDS]:
        if not terms(word) or word.lower().strip(".,;:()") in STOP_WORDS:
            break
        out.append(word)
        if word[-1] in ",;:.)":
            break
    return out


def _unwrapped(span: str) -> str:
    """``span`` without the clause punctuation around it ("16 years old," or "(30 days)")."""
    span = re.sub(r"[.,;:]+$", "", span.strip())
    if span.count("(") != span.count(")"):
        span = span.strip("()")
    return span.strip()

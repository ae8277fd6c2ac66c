"""Which retrieved sentence answers a question, and how sure to be of it: a small linear ranker, no model.

The extractive RAG answer (``CitedRAG(answer_style="extract")``) is a sentence
of a retrieved passage.  Each sentence of the top passages gets a few signals
(:func:`sentence_features`): how much of the question's term weight it holds,
split into the question's names (which may sit anywhere in the passage: the
passage is about them) and its other words (which the answering sentence
itself should hold); whether it holds the kind of answer asked for
(:mod:`programs.answer_kinds`: a number next to the counted noun, a time, a
name); what the sentence before it covers ("It began ... and burned 41
buildings" follows the sentence naming the fire); the retriever's rank of its
passage.  The score is their weighted sum (:data:`WEIGHTS`).

    >>> from types import SimpleNamespace as P
    >>> passage = P(text="The county radio system went into service in 2009. It uses 14 tower sites.",
    ...             title="Radio", section="")
    >>> [c.sentence for c in rank_candidates("How many tower sites does the radio system use?", [passage])]
    ['It uses 14 tower sites.', 'The county radio system went into service in 2009.']

:func:`answer_confidence` turns the ranking into the probability that the top
sentence answers the question (:data:`CONFIDENCE_WEIGHTS`, a logistic model);
below a threshold the program declines.  Both sets of weights were fitted on
``data/rag_train.jsonl`` only, by ``benchmarks/rag_rank_fit.py`` (which prints
them); the dev questions are the report.  Pure Python, deterministic.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

from programs.answer_kinds import HOLDS, answer_kind, counted_words, holds_kind
from programs.extract import idf_weights, sentences, stem, terms

FROM_TOP = 3  # sentences come from the retriever's first three passages
# Fitted on data/rag_train.jsonl by benchmarks/rag_rank_fit.py (a softmax over each question's sentences).
WEIGHTS: Mapping[str, float] = {
    "overlap": 2.13, "names_in_passage": 0.94, "other_words": 2.28, "names_in_sentence": -0.02, "before": 0.99,
    "rank": -0.5, "kind": 1.88, "kind_near": 0.68, "count_near": 0.31, "new_share": -1.3, "restates": -0.38,
    "heading": -0.88, "length": -0.15, "first": -0.29, "similarity": 1.95,
}
# Fitted likewise: a logistic model of "the top sentence is right" over the training questions (raw features).
CONFIDENCE_WEIGHTS: Mapping[str, float] = {"bias": -4.37, "similarity": 2.77, "margin": 0.39, "other_words": 1.35,
                                           "kind": 0.73, "names_in_passage": 1.84}
PER_SOURCE = 3  # the extract artifact's cap of passages per document (0: none), chosen likewise (cross-validated)
MARGIN_ALONE = 3.0  # the margin of a lone candidate
SIMILARITY_UNKNOWN = 0.64  # the training questions' mean cosine of question and top sentence
DECLINE_BELOW = 0.4  # answer_confidence under this: the program says the documents do not answer
# Kinds whose answers have a form no other text has (a clock time, a sum of money, a date ...): when the
# question asks for one and no candidate sentence holds one, the documents do not say (see kind_missing).
EXACT_KINDS = frozenset({"time", "phone", "frequency", "money", "percent", "year", "date", "day"})

# (question, sentences) -> a cosine per sentence (None: unknown), or None when nothing could be embedded
Similarity = Callable[[str, Sequence[str]], "Sequence[float | None] | None"]
_NAME_WORD = re.compile(r"(?<!^)(?<![.?!] )\b(?:[A-ZÀ-Ý][\w'’-]*|\w*\d\w*)")
_HEADING_END = (".", "!", "?", "|")


@dataclass
class Candidate:
    """One sentence of a retrieved passage, with its ranking signals and score."""

    sentence: str
    passage: object
    rank: int  # the passage's place in the retriever's results, from 0
    features: dict[str, float] = field(default_factory=dict)
    score: float = 0.0


@dataclass(frozen=True)
class Question:
    """A question's terms as the ranker uses them: names (capitalised words, numbers) and the other words."""

    text: str
    asked: frozenset[str]
    names: frozenset[str]
    kind: str | None
    counted: frozenset[str]

    @classmethod
    def of(cls, question: str) -> Question:
        asked = frozenset(terms(question))
        names = frozenset(stem(w.lower()) for w in _NAME_WORD.findall(str(question))) & asked
        counted = frozenset(terms(" ".join(counted_words(question))))
        return cls(str(question), asked, names, answer_kind(question), counted)


def share(wanted: frozenset[str] | set[str], found: set[str], idf: Mapping[str, float]) -> float:
    """The share (0..1) of the IDF weight of ``wanted`` that ``found`` holds (0 when nothing is wanted)."""
    if not wanted:
        return 0.0
    default = max(idf.values(), default=1.0)
    total = sum(idf.get(t, default) for t in wanted)
    return sum(idf.get(t, default) for t in wanted & found) / total


def _words(text: str) -> list[tuple[int, str, str]]:
    """(offset, token, lower-cased word without punctuation) for each whitespace-separated token of ``text``."""
    return [(m.start(), m.group(0), re.sub(r"^\W+|\W+$", "", m.group(0).lower())) for m in re.finditer(r"\S+", text)]


def _kind_signals(q: Question, sentence: str) -> tuple[float, float, float]:
    """(kind, kind_near, count_near) for ``sentence``: +1/-1 when, outside the question's own words, it
    holds / does not hold the kind of answer asked for (0: the question names no kind); 1 when such an
    answer starts within 40 characters of a question word; 1 when a number comes just before a word that a
    "how many" question counts ("14 tower sites")."""
    words = _words(sentence)
    # The question's own words cannot be its answer, but the unit a "how many" counts is part of one ("ten years")
    rest = " ".join(token for _, token, w in words if stem(w) not in q.asked - q.counted)
    kind = 0.0 if q.kind is None else (1.0 if holds_kind(q.kind, rest) else -1.0)
    near = 0.0
    if kind > 0:
        asked_at = [at for at, _, w in words if stem(w) in q.asked]
        for match in HOLDS[q.kind].finditer(sentence):
            new = [w for w in terms(match.group(0)) if w not in q.asked]
            if new and any(abs(match.start() - at) < 40 for at in asked_at):
                near = 1.0
                break
    return kind, near, float(_number_before(sentence, q.counted))


def _number_before(sentence: str, wanted: frozenset[str]) -> bool:
    """Whether a count (a number that is not part of a date: "14 March 1992" counts nothing) comes just before
    (within three words) a word whose stem is ``wanted``: "14 tower sites"."""
    return bool(wanted) and any(any(stem(w) in wanted for *_, w in _words(sentence[m.end():])[:3])
                                for m in HOLDS["count"].finditer(sentence))


def sentence_features(q: Question, sentence: str, before: str, passage_words: set[str], rank: int, position: int,
                      idf: Mapping[str, float]) -> dict[str, float]:
    """The ranking signals of one sentence (keys of :data:`WEIGHTS`); ``before`` is the sentence before it in
    its passage ("" for the first), ``passage_words`` the terms of its passage with its title and section."""
    words = terms(sentence)
    found = set(words)
    new = [w for w in words if w not in q.asked]
    kind, near, count = _kind_signals(q, sentence)
    heading = len(words) < 8 and not sentence.rstrip().endswith(_HEADING_END) and "|" not in sentence
    return {
        "overlap": share(q.asked, found, idf),
        "names_in_passage": share(q.names, passage_words, idf) if q.names else 1.0,
        "other_words": share(q.asked - q.names, found, idf),
        "names_in_sentence": share(q.names, found, idf),
        "before": share(q.asked, set(terms(before)), idf),
        "rank": float(rank),
        "kind": kind, "kind_near": near, "count_near": count,
        "new_share": len(new) / max(1, len(words)),
        "restates": float(not new),
        "heading": float(heading),
        "length": math.log1p(len(words)),
        "first": float(position == 0),
    }


def rank_candidates(question: str, passages: Sequence, from_top: int = FROM_TOP,
                    weights: Mapping[str, float] = WEIGHTS, similarity: Similarity | None = None) -> list[Candidate]:
    """Every distinct sentence of the first ``from_top`` passages (anything with ``text``; ``title`` and
    ``section`` are used when present), best first; IDF over all of ``passages``.  ``similarity(question,
    sentences)`` (an embedder's cosine, :mod:`programs.similarity`) adds its signal; without it every sentence
    gets :data:`SIMILARITY_UNKNOWN`, which leaves the order to the other signals."""
    texts = [str(getattr(p, "text", "")) for p in passages]
    idf = idf_weights(texts)
    q = Question.of(question)
    out: dict[str, Candidate] = {}
    for rank, (passage, text) in enumerate(zip(passages[:from_top], texts)):
        heading = f"{getattr(passage, 'title', '') or ''} {getattr(passage, 'section', '') or ''}"
        passage_words = set(terms(f"{heading} {text}"))
        pieces = sentences(text)
        for position, sentence in enumerate(pieces):
            if sentence in out or not terms(sentence):
                continue
            before = pieces[position - 1] if position else ""
            features = sentence_features(q, sentence, before, passage_words, rank, position, idf)
            out[sentence] = Candidate(sentence, passage, rank, features)
    candidates = list(out.values())
    sims = similarity(question, [c.sentence for c in candidates]) if similarity and candidates else None
    for n, c in enumerate(candidates):
        known = sims is not None and sims[n] is not None
        c.features["similarity"] = float(sims[n]) if known else SIMILARITY_UNKNOWN
        c.score = sum(weights.get(name, 0.0) * value for name, value in c.features.items())
    return sorted(candidates, key=lambda c: (-c.score, c.rank, len(c.sentence)))


def confidence_features(candidates: Sequence[Candidate]) -> dict[str, float]:
    """Question-level signals (keys of :data:`CONFIDENCE_WEIGHTS`, but ``bias``): the top sentence's embedding
    similarity to the question and share of the question's other words, its score's margin over the next,
    whether it holds the kind of answer asked for (``kind``: +1 / -1, 0 when the question names no kind: "How
    tall is the dam?" answered by a sentence with no measure in it is likely about something else), and the
    share of the question's names its passage holds (``names_in_passage``: a question about "Fire Station 2"
    answered from a passage that never names it asks what the documents do not say)."""
    if not candidates:
        return {"similarity": 0.0, "margin": 0.0, "other_words": 0.0, "kind": 0.0, "names_in_passage": 0.0}
    top = candidates[0]
    second = candidates[1].score if len(candidates) > 1 else top.score - MARGIN_ALONE
    return {"similarity": top.features["similarity"], "margin": top.score - second,
            "other_words": top.features["other_words"], "kind": top.features["kind"],
            "names_in_passage": top.features["names_in_passage"]}


def kind_missing(question: str, candidates: Sequence[Candidate]) -> bool:
    """Whether the candidate sentences lack the kind of answer ``question`` asks for, so the documents do not say:

    * an exact kind (:data:`EXACT_KINDS`) that none holds outside the question's own words ("What time does the
      transfer station open on Saturdays?" over passages that give its days but no hours);
    * a "how many X" count that none states: no number comes just before X or another of the question's words
      but its names ("How many ambulances does Brennock County operate?" over passages whose numbers count
      zones and incidents).  Any of its words, not only X, counts: the documents may name X otherwise
      ("84,300 registered subscribers" answers "How many people were subscribed ..."); a number before a
      name ("Station 7") counts nothing.

    The other loose kinds (a name, a measure) are left to :func:`answer_confidence`: their patterns also match
    text that answers a differently worded question."""
    if not candidates:
        return False
    q = Question.of(question)
    if q.kind in EXACT_KINDS:
        return all(c.features["kind"] < 0 for c in candidates)
    if q.kind == "count" and q.counted:
        stated = q.counted | (q.asked - q.names)
        return not any(_number_before(c.sentence, stated) for c in candidates)
    return False


def answer_confidence(features: Mapping[str, float], weights: Mapping[str, float] = CONFIDENCE_WEIGHTS) -> float:
    """The probability (0..1) that the top sentence answers the question, from :func:`confidence_features`."""
    z = weights.get("bias", 0.0) + sum(weights.get(name, 0.0) * value for name, value in features.items())
    return 1.0 / (1.0 + math.exp(-max(-30.0, min(30.0, z))))

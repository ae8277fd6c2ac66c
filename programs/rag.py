"""Answer questions over a document index, with citations: pure DSPy, the retriever is given to it.

The shape of a cited-answer RAG program: rewrite the question into a search
query (ChainOfThought), retrieve passages, answer from them (ChainOfThought)
citing the ids of the passages used - or say the documents do not hold the
answer, citing nothing.

    >>> rag = CitedRAG(retriever=my_retriever)                       # doctest: +SKIP
    >>> out = rag(question="What is the non-emergency number?")      # doctest: +SKIP
    >>> out.answer, out.citations, out.answerable                    # doctest: +SKIP

The retriever is anything with ``search(query, k) -> passages`` whose passages
have ``id``, ``source`` and ``text`` (the framework's FAISS/BM25 retriever,
or a stub in tests); ``k=None`` takes the retriever's own default.  Nothing
here knows about Ray, files or endpoints.

Two ways to answer (``answer_style``, a program setting saved with its state):

* ``generate`` (default): the model writes the answer and cites passages;
* ``extract``: for a small model, which cannot write answers (SmolLM2-135M
  answers "True" or "1"): the question itself is the search query, and the
  sentences of the top passages are ranked without a model
  (:mod:`programs.sentence_rank`: question terms, the kind of answer asked
  for, the sentence before, the passage's rank, embedding similarity when the
  retriever has an embedder).  The answer is one sentence - or, when the
  question asks for a quantity and the sentence states exactly one, that
  phrase (:func:`programs.extract.answer_span`) - the citation its passage;
  when the ranker's confidence in its top sentence is under ``decline_below``,
  or the candidates lack the kind of answer asked for
  (:func:`programs.sentence_rank.kind_missing`), the program declines
  (``answerable`` false, nothing cited).  ``chooser`` says who picks the sentence: ``ranker`` (default) takes
  the top one, with no model call; ``model`` lets the model choose among the
  best few or ``none`` (an enum) - measured on the embedded 135M model it
  does no better than the ranker's order, at three times the time, so the
  shipped artifact uses ``ranker`` (``benchmarks/rag_quality.py``, docs/rag.md).

``per_source`` is the program's own cap of passages per document, passed to
the retriever's ``search`` (``0``: no cap; None, the default: the retriever's
own, 2 for the framework's, which suits multi-part questions).  The artifact
shipped for the extract style sets it to
:data:`programs.sentence_rank.PER_SOURCE` (3): a single fact is often in the
third passage of a document already represented, and the ranker reads only
the top 3 passages.

The settings (``answer_style``, ``chooser``, ``decline_below``,
``per_source``) are saved in the program's JSON; an artifact written before a
setting existed loads with the constructor's default (``ranker``,
:data:`programs.sentence_rank.DECLINE_BELOW`, the retriever's cap).
"""

from __future__ import annotations

from typing import Any, Literal

import dspy
from pydantic import BaseModel, Field

from programs.demo_pool import NearestDemos
from programs.extract import answer_text
from programs.fields import field_of
from programs.sentence_rank import DECLINE_BELOW, answer_confidence, confidence_features, kind_missing, rank_candidates
from programs.similarity import similarity_of

SNIPPET_CHARS = 240
MAX_ANSWER_WORDS = 60
ANSWER_STYLES = ("generate", "extract")
CHOOSERS = ("ranker", "model")
SETTINGS = ("answer_style", "chooser", "decline_below", "per_source")
CANDIDATE_SENTENCES = 4
NOT_ANSWERED = "The documents do not say."


class RewriteQuery(dspy.Signature):
    """Rewrite a question into a short search query for a document index: the key terms, no filler."""

    question: str = dspy.InputField()
    search_query: str = dspy.OutputField(desc="a few key words or a short phrase")


class AnswerFromPassages(dspy.Signature):
    """Answer the question using only the passages. Cite the ids (in brackets) of the passages the answer
    comes from. If the passages do not contain the answer, set answerable to false, say that the documents
    do not say, and cite nothing."""

    question: str = dspy.InputField()
    passages: str = dspy.InputField(desc="retrieved passages, each starting with its [id]")
    answerable: bool = dspy.OutputField(desc="true when the passages contain the answer")
    answer: str = dspy.OutputField(desc="a short, direct answer in one or two sentences")
    citations: list[str] = dspy.OutputField(desc="ids of the passages the answer is taken from")


class ChooseSentence(dspy.Signature):
    """Which numbered sentence answers the question? Answer with its number, or none when none of them
    answers it."""

    question: str = dspy.InputField()
    sentences: str = dspy.InputField(desc="numbered sentences from the documents, the likeliest first")
    choice: str = dspy.OutputField(desc="the number of the sentence that answers the question, or none")


class CitedPassage(BaseModel):
    """A passage the answer cites, as the API returns it."""

    id: str = Field(..., description="passage id (source path and chunk number)")
    source: str = Field(..., description="the document the passage comes from")
    snippet: str = Field(..., description="the start of the passage text")


class CitedRAG(dspy.Module):
    def __init__(self, retriever: Any, k: int | None = None, answer_style: str = "generate", chooser: str = "ranker",
                 decline_below: float = DECLINE_BELOW, per_source: int | None = None):
        super().__init__()
        self.retriever = retriever
        self.k = k
        self.answer_style = _style(answer_style)
        self.chooser = _chooser(chooser)
        self.decline_below = _threshold(decline_below)
        self.per_source = _per_source(per_source)
        self.rewrite = dspy.ChainOfThought(RewriteQuery)
        self.respond = dspy.ChainOfThought(AnswerFromPassages)
        self.choose = dspy.Predict(ChooseSentence)
        self.nearest = NearestDemos(k=2, pool_threshold=8)

    def forward(self, question: str) -> dspy.Prediction:
        if self.answer_style == "extract":
            return self._extract(question)
        query = self.rewrite(question=question).search_query
        passages = self._search(query or question)
        context = "\n\n".join(f"[{p.id}] {p.text}" for p in passages)
        signature = self.respond.predict.signature
        if passages:  # citations can only be ids of these passages: an enum in the JSON schema (vLLM, llama.cpp)
            ids = tuple(dict.fromkeys(p.id for p in passages))
            signature = signature.with_updated_fields("citations", type_=list[Literal[ids]])
        out = self.respond(question=question, passages=context, signature=signature)
        citations = [c.strip().strip("[]") for c in (out.citations or [])]
        return _prediction(out.answer, out.answerable, citations, passages, query)

    def _extract(self, question: str) -> dspy.Prediction:
        """The best-ranked sentence (or the model's pick of the best few) is the answer; declined when the
        ranker is not confident enough."""
        passages = self._search(question)
        candidates = rank_candidates(question, passages, similarity=similarity_of(self.retriever))
        confidence = answer_confidence(confidence_features(candidates))
        if not candidates or confidence < self.decline_below or kind_missing(question, candidates):
            return _prediction(NOT_ANSWERED, False, [], passages, question)
        chosen = candidates[0]
        if self.chooser == "model":
            few = candidates[:CANDIDATE_SENTENCES]
            labels = tuple(str(n) for n in range(1, len(few) + 1)) + ("none",)
            signature = self.choose.signature.with_updated_fields("choice", type_=Literal[labels])  # an enum
            listed = "\n".join(f"{n}. {c.sentence}" for n, c in enumerate(few, 1))
            demos = self.nearest.select(self.choose.demos, "question", question)
            choice = str(self.choose(question=question, sentences=listed, signature=signature, demos=demos).choice)
            if choice not in labels[:-1]:
                return _prediction(NOT_ANSWERED, False, [], passages, question)
            chosen = few[int(choice) - 1]
        return _prediction(answer_text(chosen.sentence, question), True, [chosen.passage.id], passages, question)

    def _search(self, query: str) -> list:
        if self.per_source is None:  # the retriever's own cap; any ``search(query, k)`` will do
            return self.retriever.search(query, k=self.k)
        return self.retriever.search(query, k=self.k, per_source=self.per_source)

    # The settings are part of the program's saved state (DSPy's JSON), so an artifact can set them; one written
    # before a setting existed loads with the constructor's value.
    def dump_state(self, json_mode=True):
        settings = {"answer_style": self.answer_style, "chooser": self.chooser, "decline_below": self.decline_below,
                    "per_source": self.per_source}
        return {**super().dump_state(json_mode=json_mode), "settings": settings}

    def load_state(self, state, *, allow_unsafe_lm_state=False):
        state = dict(state)
        settings = state.pop("settings", None) or {}
        unknown = sorted(set(settings) - set(SETTINGS))
        if unknown:
            raise ValueError(f"unknown CitedRAG settings {unknown}; known: {', '.join(SETTINGS)}")
        super().load_state(state, allow_unsafe_lm_state=allow_unsafe_lm_state)
        self.answer_style = _style(settings.get("answer_style", self.answer_style))
        self.chooser = _chooser(settings.get("chooser", self.chooser))
        self.decline_below = _threshold(settings.get("decline_below", self.decline_below))
        self.per_source = _per_source(settings.get("per_source", self.per_source))
        return self


def _style(answer_style: str) -> str:
    if answer_style not in ANSWER_STYLES:
        raise ValueError(f"answer_style must be one of {ANSWER_STYLES}, got {answer_style!r}")
    return answer_style


def _chooser(chooser: str) -> str:
    if chooser not in CHOOSERS:
        raise ValueError(f"chooser must be one of {CHOOSERS}, got {chooser!r}")
    return chooser


def _threshold(decline_below: Any) -> float:
    if isinstance(decline_below, bool) or not isinstance(decline_below, (int, float)) or not 0 <= decline_below <= 1:
        raise ValueError(f"decline_below must be a number from 0 to 1, got {decline_below!r}")
    return float(decline_below)


def _per_source(per_source: Any) -> int | None:
    if per_source is not None and (isinstance(per_source, bool) or not isinstance(per_source, int) or per_source < 0):
        raise ValueError(f"per_source must be a whole number from 0 (no cap) or None, got {per_source!r}")
    return per_source


def _prediction(answer: str, answerable: Any, citations: list[str], passages: list, query: str) -> dspy.Prediction:
    by_id = {p.id: p for p in passages}
    cited = [CitedPassage(id=c, source=by_id[c].source, snippet=by_id[c].text[:SNIPPET_CHARS])
             for c in citations if c in by_id]
    return dspy.Prediction(answer=answer, answerable=answerable, citations=citations, cited=cited,
                           search_query=query, retrieved_ids=[p.id for p in passages],
                           retrieved_sources=[p.source for p in passages])


def citation_reward(inputs: dict, prediction: Any) -> float:
    """Refine's reward: citations are ids of passages actually retrieved, and the answer is short and present.

    An answer that says the documents do not hold it (``answerable`` false) must cite nothing.
    """
    answer = (field_of(prediction, "answer") or "").strip()
    citations = list(field_of(prediction, "citations") or [])
    retrieved = set(field_of(prediction, "retrieved_ids") or [])
    if not answer or len(answer.split()) > MAX_ANSWER_WORDS:
        return 0.0
    if not field_of(prediction, "answerable"):
        return 1.0 if not citations else 0.5
    if not citations:
        return 0.5
    valid = sum(1 for c in citations if c in retrieved) / len(citations)
    return 0.5 + 0.5 * valid if valid < 1 else 1.0

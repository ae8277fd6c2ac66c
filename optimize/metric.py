"""Scoring one prediction: exact match per label field, plus an optional judge on the summary.

An example's score is the mean of its parts: one 0/1 part per label field
(priority, category) and, with a judge, the judge's 0..1 verdict on the summary.
Failures are data, never a silent zero:

* the judge fails (endpoint down, unparseable verdict): the example keeps its
  exact-match score and ``judge_error`` says why; summaries count them;
* the program fails (no parseable output): the example scores 0, as DSPy's
  ``Evaluate`` does, and ``program_error`` says why.

    >>> spec = PIPELINES["triage"]
    >>> gold = dspy.Example(id="c1", transcript="...", priority="urgent", category="fire").with_inputs("transcript")
    >>> s = score_prediction(gold, dspy.Prediction(priority="urgent", category="crime", summary="x"), spec)
    >>> s.fields, s.score
    ({'priority': True, 'category': False}, 0.5)
"""

from __future__ import annotations

import threading
from typing import Any, Literal

import dspy
from pydantic import BaseModel, ConfigDict, Field

from optimize.data import PIPELINES, PipelineSpec  # noqa: F401 - PIPELINES is used in the docstring

Verdict = Literal["good", "partial", "bad"]
VERDICT_SCORES: dict[str, float] = {"good": 1.0, "partial": 0.5, "bad": 0.0}


class JudgeSummary(dspy.Signature):
    """Judge a dispatcher's one-line summary of a 911 call against a reference summary.

    good: states the same incident, location and danger as the reference; partial: right incident but
    misses or garbles an important detail; bad: wrong, invented or empty."""

    transcript: str = dspy.InputField(desc="what the caller said")
    reference_summary: str = dspy.InputField(desc="a correct summary written by a dispatcher")
    candidate_summary: str = dspy.InputField(desc="the summary to judge")
    verdict: Verdict = dspy.OutputField(desc="good, partial or bad")


class ExampleScore(BaseModel):
    """How one prediction scored; errors are recorded, not folded into the score silently."""

    model_config = ConfigDict(extra="forbid")

    example_id: str = Field(..., description="Id of the scored example")
    fields: dict[str, bool] = Field(default_factory=dict, description="Label field -> exact match")
    judge: float | None = Field(None, description="Judge score 0..1; None without a judge or when it failed")
    judge_error: str | None = Field(None, description="Why the judge gave no score")
    program_error: str | None = Field(None, description="Why the program gave no usable output (scores 0)")
    lm_failure: bool = Field(False, description="program_error came from the LM endpoint, not from the output")
    outputs: dict[str, Any] = Field(default_factory=dict, description="The prediction's output fields")

    @property
    def score(self) -> float:
        if self.program_error is not None:
            return 0.0
        parts = [float(v) for v in self.fields.values()]
        if self.judge is not None:
            parts.append(self.judge)
        return sum(parts) / len(parts) if parts else 0.0

    @property
    def exact(self) -> bool:
        """Every label field right (the bootstrapping criterion)."""
        return self.program_error is None and bool(self.fields) and all(self.fields.values())


class EvalSummary(BaseModel):
    """Aggregate of many ExampleScores."""

    n: int = Field(0, description="Examples scored")
    score: float = Field(0.0, description="Mean example score, 0..1")
    field_accuracy: dict[str, float] = Field(default_factory=dict, description="Label field -> accuracy")
    judge_mean: float | None = Field(None, description="Mean judge score over examples the judge scored")
    judge_errors: int = Field(0, description="Examples the judge failed on (scored on exact match only)")
    program_errors: int = Field(0, description="Examples the program failed on (scored 0)")
    lm_failures: int = Field(0, description="Of program_errors, those where the LM endpoint failed")

    @classmethod
    def of(cls, scores: list[ExampleScore], label_fields: tuple[str, ...] | list[str]) -> EvalSummary:
        n = len(scores)
        if not n:
            return cls()
        judged = [s.judge for s in scores if s.judge is not None]
        return cls(
            n=n,
            score=sum(s.score for s in scores) / n,
            field_accuracy={f: sum(1 for s in scores if s.fields.get(f)) / n for f in label_fields},
            judge_mean=sum(judged) / len(judged) if judged else None,
            judge_errors=sum(1 for s in scores if s.judge_error is not None),
            program_errors=sum(1 for s in scores if s.program_error is not None),
            lm_failures=sum(1 for s in scores if s.lm_failure),
        )


class SummaryJudge:
    """A separate judge LM (temperature 0) that scores a summary against the reference."""

    def __init__(self, lm: dspy.BaseLM, adapter: dspy.Adapter | None = None):
        from stages.adapter import CachingJSONAdapter

        self.lm = lm
        self.adapter = adapter or CachingJSONAdapter()
        self.predict = dspy.Predict(JudgeSummary)

    def __call__(self, transcript: str, reference: str, candidate: str) -> float:
        with dspy.context(lm=self.lm, adapter=self.adapter):
            verdict = self.predict(
                transcript=transcript, reference_summary=reference, candidate_summary=candidate or ""
            ).verdict
        if verdict not in VERDICT_SCORES:
            raise ValueError(f"judge verdict {verdict!r} is not one of {sorted(VERDICT_SCORES)}")
        return VERDICT_SCORES[verdict]


def _norm(value: Any) -> str:
    return str(value).strip().lower() if value is not None else ""


def score_prediction(
    example: dspy.Example,
    prediction: Any,
    spec: PipelineSpec,
    judge: SummaryJudge | None = None,
) -> ExampleScore:
    """Score one prediction; a judge failure is recorded in ``judge_error``, never raised."""
    outputs = {k: prediction.get(k) for k in (*spec.label_fields, spec.summary_field) if k} if prediction else {}
    fields = {f: _norm(outputs.get(f)) == _norm(example.get(f)) for f in spec.label_fields}
    score = ExampleScore(example_id=str(example.get("id", "")), fields=fields, outputs=_jsonable(outputs))
    if judge is not None and spec.summary_field:
        reference = example.get(spec.reference_field or "")
        if not reference:
            score.judge_error = "no reference summary in the example"
        else:
            try:
                score.judge = judge(
                    " ".join(str(example.get(f, "")) for f in spec.input_fields),
                    str(reference),
                    str(outputs.get(spec.summary_field) or ""),
                )
            except Exception as exc:  # noqa: BLE001 - any judge failure is counted, not scored 0
                score.judge_error = f"{type(exc).__name__}: {str(exc)[:300]}"
    return score


def _jsonable(outputs: dict[str, Any]) -> dict[str, Any]:
    return {k: (v if v is None or isinstance(v, (str, int, float, bool)) else str(v)) for k, v in outputs.items()}


class MetricTally(BaseModel):
    """Counts a DSPy-called metric keeps, since DSPy only sees the float it returns."""

    calls: int = 0
    judge_errors: int = 0
    program_errors: int = 0


class PipelineMetric:
    """The metric as DSPy's own optimizers call it: ``metric(example, prediction, trace=None)``.

    While bootstrapping (``trace`` is set) it answers whether every label field is
    right, without calling the judge.  Otherwise it returns the example score and
    counts judge failures in ``tally`` (thread-safe), because DSPy keeps only the
    returned number.  ``feedback=True`` returns what GEPA wants: a score plus text
    naming the wrong fields.
    """

    def __init__(self, spec: PipelineSpec, judge: SummaryJudge | None = None, *, feedback: bool = False):
        self.spec = spec
        self.judge = judge
        self.feedback = feedback
        self.tally = MetricTally()
        self._lock = threading.Lock()
        self.__name__ = f"{spec.name}_metric"  # DSPy logs metric names

    def __call__(self, example, prediction, trace=None, pred_name=None, pred_trace=None):
        if trace is not None and not self.feedback:
            return score_prediction(example, prediction, self.spec).exact
        result = score_prediction(example, prediction, self.spec, self.judge)
        with self._lock:
            self.tally.calls += 1
            self.tally.judge_errors += result.judge_error is not None
        if not self.feedback:
            return result.score
        wrong = [f"{f} should be {example.get(f)!r}, got {result.outputs.get(f)!r}" for f, ok in result.fields.items() if not ok]
        text = "; ".join(wrong) if wrong else "all labels correct"
        if result.judge is not None:
            text += f"; summary judged {result.judge:.1f} against the reference {example.get(self.spec.reference_field)!r}"
        return dspy.Prediction(score=result.score, feedback=text)

"""Scoring a prediction against a labelled example: the one metric of a task, for optimize, batch and drift.

A task declares a :class:`TaskMetric`; an example's score is the mean of its parts:

* one 0/1 part per ``exact`` field (a label such as ``priority``), normalised exact match;
* one 0..1 part per :class:`JudgedField` (free text such as a summary or an answer):
  a judge LM's verdict against the reference (good 1, partial 0.5, bad 0),
  or, without a judge, the field's ``fallback`` (token F1 against the
  reference) when it has one;
* one 0..1 part per named ``check`` (e.g. "every citation was retrieved").

Failures are data, never a silent zero:

* the judge fails (endpoint down, unparseable verdict): the part falls back
  (or is left out) and ``judge_error`` says why; summaries count them;
* the program fails (no usable output): the example scores 0, as DSPy's
  ``Evaluate`` does, and ``program_error`` says why.

    >>> metric = TaskMetric(exact=("priority", "category"))
    >>> gold = dspy.Example(id="c1", transcript="...", priority="urgent", category="fire").with_inputs("transcript")
    >>> s = score_prediction(gold, dspy.Prediction(priority="urgent", category="crime", summary="x"), metric)
    >>> s.fields, s.score
    ({'priority': True, 'category': False}, 0.5)

Drift monitoring has no gold labels: :class:`LiveJudge` rates an output from
the request alone with the task's ``live_rubric``, on the same 0..1 scale, and
the monitor compares it with the same judge's score on the dev set.
"""

from __future__ import annotations

import json
import re
import threading
from collections import Counter
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

import dspy
from pydantic import BaseModel, ConfigDict, Field

from programs.fields import field_of

Verdict = Literal["good", "partial", "bad"]
VERDICT_SCORES: dict[str, float] = {"good": 1.0, "partial": 0.5, "bad": 0.0}


@dataclass(frozen=True)
class JudgedField:
    """A free-text output scored against a reference text."""

    field: str
    reference: str  # example key holding the gold text
    rubric: str  # what good / partial / bad mean for this field (the judge's instructions)
    fallback: Literal["none", "token_f1"] = "none"  # score without a judge ("none": the part is left out)


@dataclass(frozen=True)
class TaskMetric:
    """How a task's predictions are scored; see the module docstring."""

    exact: tuple[str, ...] = ()
    judged: tuple[JudgedField, ...] = ()
    checks: Mapping[str, Callable[[Any, Any], float]] = field(default_factory=dict)
    live_rubric: str = "Rate whether the response is a correct, complete and useful answer to the request."
    bootstrap_threshold: float = 1.0  # score a traced example needs to become a demo

    @property
    def output_fields(self) -> tuple[str, ...]:
        return (*self.exact, *(j.field for j in self.judged))


def _verdict_signature(instructions: str, inputs: dict[str, str]) -> type[dspy.Signature]:
    fields = {name: (str, dspy.InputField(desc=desc)) for name, desc in inputs.items()}
    fields["verdict"] = (Verdict, dspy.OutputField(desc="good, partial or bad"))
    return dspy.Signature(fields, instructions)


class FieldJudge:
    """A separate judge LM (temperature 0) scoring free-text fields against their references."""

    def __init__(self, lm: dspy.BaseLM, adapter: dspy.Adapter | None = None):
        from dspy_ray.client.json_adapter import CachingJSONAdapter

        self.lm = lm
        self.adapter = adapter or CachingJSONAdapter()
        self._predictors: dict[str, dspy.Predict] = {}
        self._lock = threading.Lock()

    def _predictor(self, rubric: str) -> dspy.Predict:
        with self._lock:
            if rubric not in self._predictors:
                sig = _verdict_signature(rubric, {
                    "task_input": "the input the program was given",
                    "reference": "a correct answer written by a person",
                    "candidate": "the output to judge",
                })
                self._predictors[rubric] = dspy.Predict(sig)
            return self._predictors[rubric]

    def __call__(self, judged: JudgedField, task_input: str, reference: str, candidate: str) -> float:
        with dspy.context(lm=self.lm, adapter=self.adapter):
            verdict = self._predictor(judged.rubric)(
                task_input=task_input, reference=reference, candidate=candidate or "").verdict
        if verdict not in VERDICT_SCORES:
            raise ValueError(f"judge verdict {verdict!r} is not one of {sorted(VERDICT_SCORES)}")
        return VERDICT_SCORES[verdict]


class LiveJudge:
    """Rates an output from its request alone (no gold), for drift monitoring; 0..1 like the metric."""

    def __init__(self, lm: dspy.BaseLM, rubric: str, adapter: dspy.Adapter | None = None):
        from dspy_ray.client.json_adapter import CachingJSONAdapter

        self.lm = lm
        self.adapter = adapter or CachingJSONAdapter()
        self.predict = dspy.Predict(_verdict_signature(rubric, {
            "request": "the request the program received (JSON)",
            "response": "what the program answered (JSON)",
        }))

    def __call__(self, request: Mapping[str, Any], response: Mapping[str, Any]) -> float:
        with dspy.context(lm=self.lm, adapter=self.adapter):
            verdict = self.predict(request=_as_json(request), response=_as_json(response)).verdict
        if verdict not in VERDICT_SCORES:
            raise ValueError(f"judge verdict {verdict!r} is not one of {sorted(VERDICT_SCORES)}")
        return VERDICT_SCORES[verdict]

    async def acall(self, request: Mapping[str, Any], response: Mapping[str, Any]) -> float:
        import asyncio

        return await asyncio.to_thread(self, request, response)


class ExampleScore(BaseModel):
    """How one prediction scored; errors are recorded, not folded into the score silently."""

    model_config = ConfigDict(extra="forbid")

    example_id: str = Field(..., description="Id of the scored example")
    fields: dict[str, bool] = Field(default_factory=dict, description="Exact field -> match")
    judged: dict[str, float] = Field(default_factory=dict, description="Judged field -> 0..1 (judge or fallback)")
    judge_used: bool = Field(False, description="At least one judged part came from the judge LM")
    checks: dict[str, float] = Field(default_factory=dict, description="Named check -> 0..1")
    judge_error: str | None = Field(None, description="Why the judge gave no score")
    program_error: str | None = Field(None, description="Why the program gave no usable output (scores 0)")
    lm_failure: bool = Field(False, description="program_error came from the LM endpoint, not from the output")
    outputs: dict[str, Any] = Field(default_factory=dict, description="The prediction's output fields")

    @property
    def score(self) -> float:
        if self.program_error is not None:
            return 0.0
        parts = [float(v) for v in self.fields.values()] + list(self.judged.values()) + list(self.checks.values())
        return sum(parts) / len(parts) if parts else 0.0

    @property
    def exact(self) -> bool:
        """Every exact field right (with no exact fields: judged and checks all perfect)."""
        if self.program_error is not None:
            return False
        if self.fields:
            return all(self.fields.values())
        return self.score >= 1.0


class EvalSummary(BaseModel):
    """Aggregate of many ExampleScores."""

    n: int = Field(0, description="Examples scored")
    score: float = Field(0.0, description="Mean example score, 0..1")
    field_accuracy: dict[str, float] = Field(default_factory=dict, description="Exact field -> accuracy")
    judged_mean: dict[str, float] = Field(default_factory=dict, description="Judged field -> mean 0..1")
    check_mean: dict[str, float] = Field(default_factory=dict, description="Check -> mean 0..1")
    judge_errors: int = Field(0, description="Examples the judge failed on (scored without it)")
    program_errors: int = Field(0, description="Examples the program failed on (scored 0)")
    lm_failures: int = Field(0, description="Of program_errors, those where the LM endpoint failed")

    @classmethod
    def of(cls, scores: list[ExampleScore], metric: TaskMetric) -> EvalSummary:
        n = len(scores)
        if not n:
            return cls()

        def mean_of(key: str, attr: str) -> float:
            values = [getattr(s, attr)[key] for s in scores if key in getattr(s, attr)]
            return sum(values) / len(values) if values else 0.0

        return cls(
            n=n,
            score=sum(s.score for s in scores) / n,
            field_accuracy={f: sum(1 for s in scores if s.fields.get(f)) / n for f in metric.exact},
            judged_mean={j.field: mean_of(j.field, "judged") for j in metric.judged
                         if any(j.field in s.judged for s in scores)},
            check_mean={c: mean_of(c, "checks") for c in metric.checks},
            judge_errors=sum(1 for s in scores if s.judge_error is not None),
            program_errors=sum(1 for s in scores if s.program_error is not None),
            lm_failures=sum(1 for s in scores if s.lm_failure),
        )


# -- scoring ------------------------------------------------------------------------


def _norm(value: Any) -> str:
    return str(value).strip().lower() if value is not None else ""


_TOKEN = re.compile(r"\w+")


def token_f1(candidate: Any, reference: Any) -> float:
    """SQuAD-style token F1 between two texts (lower-cased word tokens)."""
    cand = _TOKEN.findall(_norm(candidate))
    ref = _TOKEN.findall(_norm(reference))
    if not cand or not ref:
        return float(cand == ref)
    common = sum((Counter(cand) & Counter(ref)).values())
    if not common:
        return 0.0
    precision, recall = common / len(cand), common / len(ref)
    return 2 * precision * recall / (precision + recall)


def _jsonable(value: Any) -> Any:
    if value is None or isinstance(value, (str, int, float, bool)):
        return value
    if hasattr(value, "model_dump"):
        return value.model_dump(mode="json")
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v) for k, v in value.items()}
    return str(value)


def _as_json(data: Mapping[str, Any]) -> str:
    return json.dumps({k: _jsonable(v) for k, v in data.items()}, ensure_ascii=False)


def score_prediction(
    example: dspy.Example,
    prediction: Any,
    metric: TaskMetric,
    judge: FieldJudge | None = None,
) -> ExampleScore:
    """Score one prediction; a judge failure is recorded in ``judge_error``, never raised."""
    outputs = {k: _jsonable(field_of(prediction, k)) for k in metric.output_fields}
    score = ExampleScore(
        example_id=str(example.get("id", "")),
        fields={f: _norm(outputs.get(f)) == _norm(example.get(f)) for f in metric.exact},
        outputs=outputs,
    )
    task_input = _as_json({k: example.get(k) for k in example.inputs().keys()})
    for judged in metric.judged:
        reference = example.get(judged.reference)
        candidate = outputs.get(judged.field)
        if reference in (None, ""):
            continue  # nothing to compare with (e.g. a question the documents do not answer)
        if judge is not None:
            try:
                score.judged[judged.field] = judge(judged, task_input, str(reference), _text(candidate))
                score.judge_used = True
                continue
            except Exception as exc:  # noqa: BLE001 - any judge failure is counted, not scored 0
                score.judge_error = f"{type(exc).__name__}: {' '.join(str(exc).split())[:300]}"
        if judged.fallback == "token_f1":
            score.judged[judged.field] = token_f1(_text(candidate), reference)
    for name, check in metric.checks.items():
        try:
            score.checks[name] = float(check(example, prediction))
        except Exception as exc:  # noqa: BLE001 - a broken check scores 0 and says why
            score.checks[name] = 0.0
            score.judge_error = score.judge_error or f"check {name}: {type(exc).__name__}: {exc}"
    return score


def _text(value: Any) -> str:
    if value is None:
        return ""
    return value if isinstance(value, str) else json.dumps(value, ensure_ascii=False)


# -- as DSPy's optimizers call it ----------------------------------------------------


class MetricTally(BaseModel):
    """Counts a DSPy-called metric keeps, since DSPy only sees the float it returns."""

    calls: int = 0
    judge_errors: int = 0
    program_errors: int = 0


class DSPyMetric:
    """A task metric as DSPy's optimizers call it: ``metric(example, prediction, trace=None)``.

    While bootstrapping (``trace`` is set) it answers whether the example is
    good enough to become a demo, without calling the judge.  Otherwise it
    returns the example score and counts judge failures in ``tally``
    (thread-safe), because DSPy keeps only the returned number.
    ``feedback=True`` returns what GEPA wants: a score plus text naming what was wrong.
    """

    def __init__(self, metric: TaskMetric, judge: FieldJudge | None = None, *, name: str = "task",
                 feedback: bool = False):
        self.metric = metric
        self.judge = judge
        self.feedback = feedback
        self.tally = MetricTally()
        self._lock = threading.Lock()
        self.__name__ = f"{name}_metric"  # DSPy logs metric names

    def __call__(self, example, prediction, trace=None, pred_name=None, pred_trace=None):
        if trace is not None and not self.feedback:
            result = score_prediction(example, prediction, self.metric)
            return result.exact if result.fields else result.score >= self.metric.bootstrap_threshold
        result = score_prediction(example, prediction, self.metric, self.judge)
        with self._lock:
            self.tally.calls += 1
            self.tally.judge_errors += result.judge_error is not None
        if not self.feedback:
            return result.score
        return dspy.Prediction(score=result.score, feedback=feedback_text(example, result, self.metric))


def feedback_text(example: Any, result: ExampleScore, metric: TaskMetric) -> str:
    wrong = [f"{f} should be {example.get(f)!r}, got {result.outputs.get(f)!r}"
             for f, ok in result.fields.items() if not ok]
    parts = ["; ".join(wrong) if wrong else "all labels correct"] if result.fields else []
    for judged in metric.judged:
        if judged.field in result.judged:
            parts.append(f"{judged.field} scored {result.judged[judged.field]:.2f} against the reference "
                         f"{example.get(judged.reference)!r}")
    parts += [f"{name} {value:.2f}" for name, value in result.checks.items()]
    return "; ".join(parts) or "no feedback"

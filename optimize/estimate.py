"""How many LM calls a run will make, worked out before it makes any.

The numbers are estimates where the optimizer decides at run time (how many
teacher calls bootstrapping needs before it has its demos: assumed two per demo
wanted, at most the trainset; how long GEPA reflects).  Program calls count
one per example; with ``--judge`` every scored example adds a judge call.

    >>> est = CallEstimate()
    >>> est.add("bootstrap 4 demo sets", 32)
    >>> est.add("dev evaluation (baseline + result) x 100", 200)
    >>> est.total
    232

Each optimizer adds its own phases (:mod:`optimize.optimizers`); a resumed run
counts only the phases it has not finished.

With a price for the model (``LM_PRICE_IN`` / ``LM_PRICE_OUT`` or ``MODEL_PRICES``) the
estimate also says what the calls may cost (:func:`tokens_per_call`, :func:`cost_line`):
the prompt of one dev example formatted by the program's own adapter, plus the demos a
candidate may carry, and the labels' length for the answer (``max_tokens`` as the upper bound).

    >>> cost_line(1000, TokenEstimate(prompt=400, completion=50, completion_max=512), 0.15, 0.60)
    'cost: about $0.0900 (1,000 calls x ~400 prompt + ~50 completion tokens; at most $0.3672)'
"""

from __future__ import annotations

import json
from dataclasses import dataclass

from pydantic import BaseModel, Field

# Bootstrapping stops once it has its demos; assume half of the teacher's answers pass the metric.
TRIES_PER_BOOTSTRAPPED_DEMO = 2
COPRO_AUTO = {"light": (4, 2), "medium": (8, 3), "heavy": (12, 4)}  # (breadth, depth)


class CallEstimate(BaseModel):
    """LM calls by phase; ``total`` is what ``--max-calls`` is checked against."""

    lines: list[tuple[str, int]] = Field(default_factory=list, description="(phase, calls)")

    def add(self, phase: str, calls: int) -> None:
        self.lines.append((phase, int(calls)))

    @property
    def total(self) -> int:
        return sum(n for _, n in self.lines)

    def table(self) -> str:
        width = max([len(p) for p, _ in self.lines] + [5])
        rows = [f"  {p:<{width}}  {n:>9,}" for p, n in self.lines]
        rows.append(f"  {'total':<{width}}  {self.total:>9,}")
        return "\n".join(rows)


def bootstrap_calls(n_train: int, max_bootstrapped: int) -> int:
    return min(n_train, TRIES_PER_BOOTSTRAPPED_DEMO * max(1, max_bootstrapped))


@dataclass(frozen=True)
class TokenEstimate:
    """Tokens one program call is expected to take: prompt, answer, and the answer's ceiling (max_tokens)."""

    prompt: int
    completion: int
    completion_max: int


def _tokens(text: str) -> int:
    return max(1, len(text) // 4)  # ~4 characters a token for English text and JSON


def tokens_per_call(program, example, *, demos: int, max_tokens: int) -> TokenEstimate:
    """Format ``example`` for the program's first predictor as the adapter would send it; add ``demos`` demos."""
    from dspy_ray.client.json_adapter import CachingJSONAdapter

    predictors = program.predictors()
    signature = predictors[0].signature
    inputs = {k: v for k, v in example.inputs().items() if k in signature.input_fields}
    inputs.update({k: "" for k in signature.input_fields if k not in inputs})
    messages = CachingJSONAdapter().format(signature, demos=[], inputs=inputs)
    prompt = sum(_tokens(str(m.get("content", ""))) for m in messages)
    outputs = {k: example.get(k) for k in signature.output_fields if example.get(k) is not None}
    completion = _tokens(json.dumps(outputs, default=str)) + 8 if outputs else max_tokens // 4
    per_demo = _tokens(json.dumps({**inputs, **outputs}, default=str))
    return TokenEstimate(prompt=prompt + demos * per_demo, completion=completion, completion_max=max_tokens)


def cost_line(calls: int, tokens: TokenEstimate | None, price_in: float | None, price_out: float | None) -> str:
    """One line: what ``calls`` calls of ``tokens`` each may cost at these prices (USD per million tokens)."""
    if tokens is None or (price_in is None and price_out is None):
        return "cost: no price set for the model (LM_PRICE_IN / LM_PRICE_OUT or MODEL_PRICES)"
    pin, pout = price_in or 0.0, price_out or 0.0
    likely = calls * (tokens.prompt * pin + tokens.completion * pout) / 1e6
    most = calls * (tokens.prompt * pin + tokens.completion_max * pout) / 1e6
    return (f"cost: about ${likely:,.4f} ({calls:,} calls x ~{tokens.prompt:,} prompt + ~{tokens.completion:,} "
            f"completion tokens; at most ${most:,.4f})")


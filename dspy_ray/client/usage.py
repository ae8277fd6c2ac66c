"""Tokens, calls and cost: per LM call, per row, per stage and per run, and a run's budget.

Every LM call made through :mod:`dspy_ray.client.lm` (batch, optimize, serve) is counted:

* **per row**: :class:`dspy_ray.execution.runner.ProgramRunner` runs each row inside :func:`metered`, and
  the LM adds every request it sends to that row's :class:`Usage`: requests (retries
  included), retries, prompt and completion tokens, and their cost when the endpoint has a
  price (``price_in`` / ``price_out``, USD per million tokens: ``LM_PRICE_IN`` ..., or the
  ``MODEL_PRICES`` table of :mod:`dspy_ray.endpoints.settings`); an answer served from the LM
  cache adds ``cached=1`` and nothing else;
* **per process**: :func:`process_usage` sums every call by endpoint (optimization workers
  report theirs);
* **per run**: a batch run's stage actors send their totals to the run's :class:`RunMeter`
  (a small Ray actor of the driver), which also holds the budget (``--max-tokens``,
  ``--max-cost``) and says when to stop taking new rows.

    >>> u = Usage(calls=2, retries=1, prompt_tokens=300, completion_tokens=40)
    >>> u.add(Usage(calls=1, prompt_tokens=100, completion_tokens=10, cost_usd=0.002))
    >>> u.calls, u.tokens, u.cost_usd
    (3, 450, 0.002)
    >>> call_cost(1_000_000, 0, price_in=0.15, price_out=0.60)
    0.15
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterable, Iterator, Mapping
from contextvars import ContextVar
from dataclasses import dataclass, fields
from typing import Any


@dataclass
class Usage:
    """What LM calls cost: requests sent (retries included), retries, tokens and USD (None: no price set).

    ``cached`` counts answers served from the LM cache (:mod:`dspy_ray.client.cache`): nothing was
    sent for them, so they add no calls, tokens or cost, and a budget counts only what was paid.
    """

    calls: int = 0
    retries: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cost_usd: float | None = None
    cached: int = 0

    @property
    def tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens

    def add(self, other: Usage) -> None:
        self.calls += other.calls
        self.retries += other.retries
        self.prompt_tokens += other.prompt_tokens
        self.completion_tokens += other.completion_tokens
        self.cached += other.cached
        if other.cost_usd is not None:
            self.cost_usd = (self.cost_usd or 0.0) + other.cost_usd

    def as_dict(self) -> dict[str, Any]:
        return {"calls": self.calls, "retries": self.retries, "prompt_tokens": self.prompt_tokens,
                "completion_tokens": self.completion_tokens, "cost_usd": self.cost_usd, "cached": self.cached}

    @classmethod
    def from_dict(cls, data: dict[str, Any] | None) -> Usage:
        names = {f.name for f in fields(cls)}
        # A count missing (a row written before ``cached`` existed) or null is 0; a null cost is "no price".
        return cls(**{k: v for k, v in (data or {}).items() if k in names and (v is not None or k == "cost_usd")})

    def describe(self) -> str:
        """One line: ``'3 calls sent (0 retries), 2 answered from the cache, 10 prompt + 0 completion tokens'``."""
        cost = f", ${self.cost_usd:,.4f}" if self.cost_usd is not None else ""
        cached = f", {self.cached:,} answered from the cache" if self.cached else ""
        return (f"{self.calls:,} calls sent ({self.retries:,} retries){cached}, {self.prompt_tokens:,} prompt + "
                f"{self.completion_tokens:,} completion tokens{cost}")


def call_cost(prompt_tokens: int, completion_tokens: int, *, price_in: float | None,
              price_out: float | None) -> float | None:
    """USD for one call at USD-per-million-token prices; None when the endpoint has no price."""
    if price_in is None and price_out is None:
        return None
    return ((price_in or 0.0) * prompt_tokens + (price_out or 0.0) * completion_tokens) / 1_000_000


# -- per row: the meter of the code running now ----------------------------------------

_current: ContextVar[Usage | None] = ContextVar("dspy_ray_row_usage", default=None)
_process: dict[str, Usage] = {}
_process_lock = threading.Lock()


@contextlib.contextmanager
def metered() -> Iterator[Usage]:
    """Count every LM call made inside the block (in this thread or context) into the yielded Usage."""
    usage = Usage()
    token = _current.set(usage)
    try:
        yield usage
    finally:
        _current.reset(token)


def record(usage: Usage, endpoint: str = "") -> None:
    """Add one call's usage to the running row (if any) and to this process's totals for ``endpoint``."""
    current = _current.get()
    if current is not None:
        current.add(usage)
    with _process_lock:
        _process.setdefault(endpoint, Usage()).add(usage)


def process_usage() -> dict[str, dict[str, Any]]:
    """This process's totals since start, by endpoint (``base_url|model``)."""
    with _process_lock:
        return {k: v.as_dict() for k, v in _process.items()}


def usage_since(before: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """This process's usage since ``before`` (an earlier :func:`process_usage`), by endpoint."""
    out = {}
    for endpoint, data in process_usage().items():
        now, then = Usage.from_dict(data), Usage.from_dict(before.get(endpoint))
        diff = Usage(now.calls - then.calls, now.retries - then.retries, now.prompt_tokens - then.prompt_tokens,
                     now.completion_tokens - then.completion_tokens,
                     None if now.cost_usd is None else now.cost_usd - (then.cost_usd or 0.0),
                     now.cached - then.cached)
        if diff.calls or diff.prompt_tokens or diff.completion_tokens or diff.cached:
            out[endpoint] = diff.as_dict()
    return out


# -- sums: over endpoints, stages or workers -----------------------------------------


def total_of(usages: Iterable[Usage | Mapping[str, Any] | None]) -> Usage:
    """The sum of ``usages`` (each a Usage or its ``as_dict()``; extra keys such as ``rows`` are ignored).

        >>> total_of([{"calls": 2, "prompt_tokens": 10}, Usage(calls=1, cost_usd=0.5)]).describe()
        '3 calls sent (0 retries), 10 prompt + 0 completion tokens, $0.5000'
    """
    total = Usage()
    for usage in usages:
        total.add(usage if isinstance(usage, Usage) else Usage.from_dict(usage))
    return total


def merge_by_key(*parts: Mapping[str, Mapping[str, Any]]) -> dict[str, dict[str, Any]]:
    """Several ``{endpoint or stage: usage dict}`` maps summed key by key (e.g. every worker's totals)."""
    keys = dict.fromkeys(key for part in parts for key in part)
    return {key: total_of(part.get(key) for part in parts).as_dict() for key in keys}


# -- per run: totals per stage and the budget -------------------------------------------


class Budget:
    """``--max-tokens`` / ``--max-cost``: a run stops taking new rows once either is reached."""

    def __init__(self, max_tokens: int | None = None, max_cost: float | None = None):
        self.max_tokens, self.max_cost = max_tokens, max_cost

    @property
    def set(self) -> bool:
        return self.max_tokens is not None or self.max_cost is not None

    def reached(self, spent: Usage) -> str | None:
        """Why the budget is spent (one line), or None."""
        if self.max_tokens is not None and spent.tokens >= self.max_tokens:
            return f"{spent.tokens:,} tokens >= --max-tokens {self.max_tokens:,}"
        if self.max_cost is not None and (spent.cost_usd or 0.0) >= self.max_cost:
            return f"${spent.cost_usd or 0.0:,.4f} >= --max-cost ${self.max_cost:,.4f}"
        return None


class RunMeter:
    """One batch run's usage per stage and its budget; run as a Ray actor by the driver.

    Stage actors call :meth:`add` with what their rows spent since their last report; the
    answer says whether the budget is reached, and the first stage then stops taking rows.
    """

    def __init__(self, max_tokens: int | None = None, max_cost: float | None = None):
        self.budget = Budget(max_tokens, max_cost)
        self.stages: dict[str, Usage] = {}
        self.rows: dict[str, int] = {}
        self.stop_reason: str | None = None

    def add(self, stage: str, usage: dict[str, Any], rows: int = 0) -> str | None:
        self.stages.setdefault(stage, Usage()).add(Usage.from_dict(usage))
        self.rows[stage] = self.rows.get(stage, 0) + rows
        if self.stop_reason is None and self.budget.set:
            self.stop_reason = self.budget.reached(self.total())
        return self.stop_reason

    def total(self) -> Usage:
        return total_of(self.stages.values())

    def report(self) -> dict[str, Any]:
        return {"stages": {k: v.as_dict() for k, v in self.stages.items()}, "rows": dict(self.rows),
                "total": self.total().as_dict(), "stop_reason": self.stop_reason}

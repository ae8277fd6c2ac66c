"""What shapes the fake's behaviour: :class:`FakeSettings`, its fault knobs and the draw among them.

    >>> settings = FakeSettings(p_429=0.25, capacity=8).updated({"p_500": 0.5})
    >>> [draw_fault(random.Random(seed), settings) for seed in (0, 1, 2)]   # draws 0.84, 0.13, 0.96
    [None, 'rate_limited', None]
    >>> FakeSettings(capacity=-1)
    Traceback (most recent call last):
    ValueError: capacity must be positive or None, got -1
"""

from __future__ import annotations

import dataclasses
import random
import re
from dataclasses import dataclass, field
from typing import Any

HOST = "127.0.0.1"
# The line the server prints once it listens (``FakeServer.serve``); the parent reads the port from it.
BANNER = re.compile(r"fake LLM serving at (http://127\.0\.0\.1:(\d+)/v1)")
# Fault setting -> the outcome it names, in the order one draw is matched against them.
FAULTS = (("p_429", "rate_limited"), ("p_500", "server_error"), ("p_hang", "hung"), ("p_malformed", "malformed"))


@dataclass
class FakeSettings:
    """Everything that shapes the fake's behaviour; all of it can change at runtime."""

    model: str = "fake-model"
    latency: float = 0.0  # seconds each successful / malformed answer takes
    capacity: int | None = None  # requests worked on at once; None (or 0) = unlimited
    reject_over: int | None = None  # chat: requests allowed to wait for a slot; beyond that 429 (None = all wait)
    sample_interval: float = 0.0  # seconds between in-flight samples (GET /admin/samples); 0 = off
    p_429: float = 0.0
    retry_after: float = 1.0  # seconds, sent as the Retry-After header of a 429
    p_500: float = 0.0
    p_hang: float = 0.0
    hang_seconds: float = 3600.0
    p_malformed: float = 0.0
    seed: int = 0
    answers: dict[str, dict[str, Any]] = field(default_factory=dict)  # input_key(user text) -> field values
    field_overrides: dict[str, Any] = field(default_factory=dict)  # field -> value, in every answer
    # Few-shot mode (optimizer tests): input_key(user text) -> correct field values, answered only for
    # the values the prompt teaches: a demo (an assistant turn) shows that value for that field, or
    # gold_keyword appears in the system message (the instruction).  Empty = off.
    gold: dict[str, dict[str, Any]] = field(default_factory=dict)
    gold_keyword: str = ""
    # POST /v1/embeddings (see the package docstring).
    embed_dim: int = 256
    embed_max_chars: int = 0  # 0 = no limit; longer inputs get HTTP 400, like a context-length error
    embed_api_key: str = ""  # "" = no auth; else a wrong or missing bearer token gets HTTP 401

    def __post_init__(self) -> None:
        if not self.capacity:
            self.capacity = None
        elif self.capacity < 0:
            raise ValueError(f"capacity must be positive or None, got {self.capacity}")
        probs = {name: getattr(self, name) for name, _ in FAULTS}
        if any(not 0.0 <= p <= 1.0 for p in probs.values()) or sum(probs.values()) > 1.0 + 1e-9:
            raise ValueError(f"fault probabilities must lie in [0, 1] and sum to at most 1: {probs}")
        if min(self.latency, self.retry_after, self.hang_seconds, self.sample_interval) < 0:
            raise ValueError("latency, retry_after, hang_seconds and sample_interval must not be negative")
        if self.reject_over is not None and self.reject_over < 0:
            raise ValueError(f"reject_over must be None or >= 0, got {self.reject_over}")

    def updated(self, changes: dict[str, Any]) -> FakeSettings:
        """A validated copy with ``changes`` applied; unknown names raise ``ValueError``."""
        unknown = set(changes) - {f.name for f in dataclasses.fields(self)}
        if unknown:
            raise ValueError(f"unknown setting(s): {sorted(unknown)}")
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def draw_fault(rng: random.Random, settings: FakeSettings) -> str | None:
    """One draw from ``rng`` decides a request's outcome: a name from :data:`FAULTS`, or ``None`` (answer it)."""
    draw = rng.random()
    for setting, outcome in FAULTS:
        probability = getattr(settings, setting)
        if draw < probability:
            return outcome
        draw -= probability
    return None

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
"""

from __future__ import annotations

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

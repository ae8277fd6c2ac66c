"""What a run shows at the end: a baseline-vs-optimized table and a trajectory plot.

    >>> print(score_table(baseline, optimized))          # doctest: +SKIP
    >>> plot_trajectory(points, "artifacts/triage_....png", title="triage miprov2")  # doctest: +SKIP
"""

from __future__ import annotations

from pathlib import Path

from pydantic import BaseModel, Field

from dspy_ray.execution.scoring import EvalSummary


class TrajectoryPoint(BaseModel):
    """One evaluation during the search, for the plot and the run record."""

    step: int = Field(..., description="Minibatch trials finished when this evaluation finished")
    score: float = Field(..., description="Score, 0..1")
    kind: str = Field(..., description="'minibatch', 'full' (valset; the baseline at step 0) or 'dev' (held out)")
    n: int = Field(..., description="Examples scored")


def score_table(baseline: EvalSummary, optimized: EvalSummary) -> str:
    """Dev-set scores side by side, per-field accuracy and error counts included."""
    rows: list[tuple[str, str, str]] = [("dev score", f"{baseline.score:.3f}", f"{optimized.score:.3f}")]
    for name in optimized.field_accuracy or baseline.field_accuracy:
        rows.append((f"  {name} accuracy", f"{baseline.field_accuracy.get(name, 0):.3f}",
                     f"{optimized.field_accuracy.get(name, 0):.3f}"))
    fmt = lambda v: "-" if v is None else f"{v:.3f}"  # noqa: E731
    for name in {**baseline.judged_mean, **optimized.judged_mean}:
        rows.append((f"  {name} (judged)", fmt(baseline.judged_mean.get(name)), fmt(optimized.judged_mean.get(name))))
    for name in {**baseline.check_mean, **optimized.check_mean}:
        rows.append((f"  {name}", fmt(baseline.check_mean.get(name)), fmt(optimized.check_mean.get(name))))
    rows.append(("examples", str(baseline.n), str(optimized.n)))
    rows.append(("program errors (scored 0)", str(baseline.program_errors), str(optimized.program_errors)))
    rows.append(("  of which LM failures", str(baseline.lm_failures), str(optimized.lm_failures)))
    rows.append(("judge errors (not scored)", str(baseline.judge_errors), str(optimized.judge_errors)))
    width = max(len(r[0]) for r in rows)
    lines = [f"{'':<{width}}  {'baseline':>9}  {'optimized':>9}"]
    lines += [f"{name:<{width}}  {a:>9}  {b:>9}" for name, a, b in rows]
    return "\n".join(lines)


def plot_trajectory(points: list[TrajectoryPoint], path: str | Path, *, title: str) -> Path:
    """Score per trial (minibatch dots, full evaluations as squares) with the best-so-far full score."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path = Path(path)
    fig, ax = plt.subplots(figsize=(8, 4.5), dpi=110)
    mini = [p for p in points if p.kind == "minibatch"]
    full = sorted((p for p in points if p.kind == "full"), key=lambda p: p.step)
    if mini:
        ax.scatter([p.step for p in mini], [p.score for p in mini], s=18, alpha=0.6, color="tab:blue",
                   label=f"minibatch trial (n={mini[0].n})")
    if full:
        ax.scatter([p.step for p in full], [p.score for p in full], s=60, marker="s", color="tab:orange",
                   label=f"full evaluation (n={full[0].n})", zorder=3)
        steps, best, running = [], [], float("-inf")
        for p in full:
            running = max(running, p.score)
            steps.append(p.step)
            best.append(running)
        last = max([p.step for p in points] + steps)
        ax.step(steps + [last], best + [best[-1]], where="post", color="tab:green", label="best so far (full)")
    dev = [p for p in points if p.kind == "dev"]
    if dev:
        ax.scatter([p.step for p in dev], [p.score for p in dev], s=70, marker="D", color="black",
                   label=f"dev set: baseline, result (n={dev[0].n})", zorder=4)
    ax.set_xlabel("trials finished")
    ax.set_ylabel("score")
    ax.set_ylim(-0.02, 1.02)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(loc="lower right")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path

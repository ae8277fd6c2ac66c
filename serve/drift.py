"""Drift monitor: judge a sample of live traffic, and re-optimize when quality drops.

One monitor per app (a single-replica Serve deployment) so decisions are made
once.  Replicas send it a sampled (inputs, outputs) pair fire-and-forget; the
monitor rates it with the task's live judge (:class:`dspy_ray.execution.scoring.LiveJudge`:
the judge LM and the task's ``live_rubric``, 0..1), stores it in SQLite, and
compares the rolling score over the window with the same judge's score of the
same program on the task's dev inputs (measured once per artifact and stored):
like with like, on one scale.  When the rolling score is at least
``drop_points`` below that baseline, with enough samples, it submits one
re-optimization Ray job (recent samples + original trainset) and will not
submit another while that one runs.  When the job finishes with a
better score, the new artifact is deployed (or only registered when
``auto_deploy`` is off).  Every decision is logged and stored in ``decisions``.

    >>> store = SampleStore(":memory:")
    >>> store.add({"transcript": "x"}, {"priority": "urgent"}, 0.9, None)
    >>> round(store.rolling(window_s=3600)[0], 2)
    0.9
"""

from __future__ import annotations

import json
import logging
import sqlite3
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from serve.options import ServeOptions

logger = logging.getLogger("serve.drift")


class DriftPolicy(BaseModel):
    model_config = ConfigDict(extra="forbid")

    window_s: float = Field(7 * 24 * 3600, gt=0, description="Rolling window of samples considered")
    drop_points: float = Field(5.0, gt=0, description="Trigger when rolling score is this many points below dev")
    min_samples: int = Field(50, ge=1, description="Samples needed in the window before any decision")
    auto_deploy: bool = Field(True, description="Deploy a better re-optimized artifact, or only register it")
    calibration_examples: int = Field(50, ge=1, description="Dev examples the baseline is measured on")
    job_entrypoint: str = Field(
        "python -m optimize --task {task} --optimizer miprov2 --auto light --out {artifact_dir} "
        "--extra-train {samples}{resource_flags}",
        description="Re-optimization command; {task}, {artifact_dir}, {samples}, {resource_flags} are filled in",
    )
    job_address: str | None = Field(None, description="Ray job API address (default: the current cluster)")
    job_runtime_env: dict[str, Any] | None = Field(
        None, description="runtime_env of the job (e.g. env_vars with LM_BASE_URL); secrets belong in the cluster's env")


class SampleStore:
    """Sampled requests and judge scores in SQLite, plus a log of decisions and jobs."""

    def __init__(self, path: str):
        if path != ":memory:":
            Path(path).parent.mkdir(parents=True, exist_ok=True)
        self.db = sqlite3.connect(path, check_same_thread=False)
        self.lock = threading.Lock()
        with self.lock, self.db:
            self.db.execute("CREATE TABLE IF NOT EXISTS samples (ts REAL, inputs TEXT, outputs TEXT, "
                            "score REAL, error TEXT, artifact TEXT)")
            self.db.execute("CREATE TABLE IF NOT EXISTS decisions (ts REAL, kind TEXT, detail TEXT)")
            self.db.execute("CREATE TABLE IF NOT EXISTS jobs (job_id TEXT PRIMARY KEY, ts REAL, status TEXT)")
            self.db.execute("CREATE TABLE IF NOT EXISTS baselines (artifact TEXT PRIMARY KEY, score REAL, n INTEGER, "
                            "ts REAL)")

    def add(self, inputs: dict, outputs: dict, score: float | None, error: str | None,
            artifact: str | None = None) -> None:
        with self.lock, self.db:
            self.db.execute("INSERT INTO samples VALUES (?, ?, ?, ?, ?, ?)",
                            (time.time(), json.dumps(inputs), json.dumps(outputs), score, error, artifact))

    def rolling(self, window_s: float, artifact: str | None = None, any_artifact: bool = True) -> tuple[float | None, int]:
        """Mean judge score and sample count in the window (only ``artifact``'s when any_artifact is False)."""
        since = time.time() - window_s
        query = "SELECT AVG(score), COUNT(score) FROM samples WHERE score IS NOT NULL"
        args: tuple = ()
        if not any_artifact:
            query += " AND artifact IS ?"
            args = (artifact,)
        with self.lock:
            # Old samples leave the window here, so the file stays bounded.
            with self.db:
                self.db.execute("DELETE FROM samples WHERE ts < ?", (since,))
            mean, n = self.db.execute(query, args).fetchone()
        return mean, n

    def recent_inputs(self, limit: int = 1000) -> list[dict]:
        with self.lock:
            rows = self.db.execute("SELECT inputs, outputs, score FROM samples ORDER BY ts DESC LIMIT ?", (limit,))
            return [{**json.loads(i), "_output": json.loads(o), "_score": s} for i, o, s in rows.fetchall()]

    def log(self, kind: str, **detail: Any) -> None:
        logger.info("drift decision %s %s", kind, detail)
        with self.lock, self.db:
            self.db.execute("INSERT INTO decisions VALUES (?, ?, ?)", (time.time(), kind, json.dumps(detail)))

    def decisions(self) -> list[tuple[str, dict]]:
        with self.lock:
            return [(k, json.loads(d)) for k, d in self.db.execute("SELECT kind, detail FROM decisions ORDER BY ts")]

    def set_job(self, job_id: str, status: str) -> None:
        with self.lock, self.db:
            self.db.execute("INSERT OR REPLACE INTO jobs VALUES (?, ?, ?)", (job_id, time.time(), status))

    def baseline(self, artifact: str | None) -> float | None:
        with self.lock:
            row = self.db.execute("SELECT score FROM baselines WHERE artifact = ?", (artifact or "",)).fetchone()
        return row[0] if row else None

    def set_baseline(self, artifact: str | None, score: float, n: int) -> None:
        with self.lock, self.db:
            self.db.execute("INSERT OR REPLACE INTO baselines VALUES (?, ?, ?, ?)", (artifact or "", score, n, time.time()))

    def running_job(self) -> str | None:
        with self.lock:
            row = self.db.execute("SELECT job_id FROM jobs WHERE status = 'RUNNING' ORDER BY ts DESC").fetchone()
        return row[0] if row else None


@dataclass
class Decision:
    kind: str  # "wait" | "ok" | "trigger" | "busy"
    rolling: float | None
    samples: int
    baseline: float | None


def decide(rolling: float | None, samples: int, baseline: float | None, policy: DriftPolicy,
           job_running: bool) -> Decision:
    """Pure decision rule: the live judge's rolling score against its dev baseline, both 0..1."""
    if rolling is None or baseline is None or samples < policy.min_samples:
        return Decision("wait", rolling, samples, baseline)
    if (baseline - rolling) * 100 < policy.drop_points:
        return Decision("ok", rolling, samples, baseline)
    return Decision("busy" if job_running else "trigger", rolling, samples, baseline)


class DriftMonitor:
    """Serve deployment (one replica): judges samples, decides, runs and adopts re-optimizations."""

    def __init__(self, options: dict[str, Any], policy: dict[str, Any] | None, lm: dict[str, Any],
                 judge: dict[str, Any], embed: dict[str, Any] | None = None, job_client_factory=None):
        from dspy_ray.client.lm import build_lm
        from dspy_ray.execution.scoring import LiveJudge
        from dspy_ray.endpoints.settings import EndpointSettings
        from serve.metrics import JudgeMetrics
        from tasks import get_task

        self.options = ServeOptions(**options)
        self.policy = DriftPolicy(**(policy or {}))
        self.task = get_task(self.options.program)
        self.store = SampleStore(self.options.drift_db)
        self.lm_settings = EndpointSettings(**lm)
        self.embed_settings = EndpointSettings(**embed) if embed else None
        self.judge = LiveJudge(build_lm(EndpointSettings(**judge)), self.task.metric.live_rubric)
        self.metrics = JudgeMetrics(self.task.name)
        # Ray's JobSubmissionClient by default; injectable so the decision loop is testable.
        self._job_client_factory = job_client_factory
        self.active_artifact: str | None = self.options.artifact

    async def record(self, inputs: dict, outputs: dict, artifact: str | None) -> Decision:
        try:
            score, error = await self.judge.acall(inputs, outputs), None
        except Exception as exc:  # noqa: BLE001 - a judge failure is counted, never scored as 0
            score, error = None, f"{type(exc).__name__}: {' '.join(str(exc).split())[:200]}"
        self.store.add(inputs, outputs, score, error, artifact)
        rolling, n = self.store.rolling(self.policy.window_s)
        self.metrics.record(score is not None, rolling)
        return await self.evaluate()

    async def baseline(self) -> float | None:
        """The live judge's mean score of the active program on the task's dev inputs (measured once per artifact)."""
        import asyncio

        cached = self.store.baseline(self.active_artifact)
        if cached is None and self.task.data is not None:
            cached = await asyncio.to_thread(self._calibrate)
        return cached

    def _calibrate(self) -> float | None:
        from dspy_ray.client.lm import build_lm
        from dspy_ray.execution.evaluation import evaluate
        from dspy_ray.execution.loading import load_program
        from programs.fields import field_of
        from tasks.examples import load_task_data

        _, dev = load_task_data(self.task.data, dev_limit=self.policy.calibration_examples)
        spec = self.task.program
        resources = spec.open_resources(self.options.resources, self.embed_settings)
        loaded = load_program(spec, self.active_artifact, resources=resources, artifact_dir=self.options.artifact_dir)
        fields = self.task.output_fields()

        def judged(example, outcome) -> float | None:
            if outcome.prediction is None:
                return 0.0  # what a failing request would have scored live
            try:
                return self.judge(dict(example.inputs()), {f: field_of(outcome.prediction, f) for f in fields})
            except Exception:  # noqa: BLE001 - a judge failure is not a score
                return None

        outcomes = evaluate(self.task.runner(loaded.program, build_lm(self.lm_settings)), dev, judged)
        scores = [s for s in outcomes if s is not None]
        if not scores:
            return None
        mean = sum(scores) / len(scores)
        self.store.set_baseline(self.active_artifact, mean, len(scores))
        self.store.log("baseline", artifact=self.active_artifact, score=mean, examples=len(scores))
        return mean

    async def evaluate(self) -> Decision:
        self._poll_job()
        # Only the active artifact's samples say whether the active artifact has drifted.
        rolling, n = self.store.rolling(self.policy.window_s, self.active_artifact, any_artifact=False)
        baseline = await self.baseline() if n >= self.policy.min_samples else None
        decision = decide(rolling, n, baseline, self.policy, self.store.running_job() is not None)
        if decision.kind == "trigger":
            job_id = self._submit_job()
            self.store.log("trigger", rolling=rolling, samples=n, baseline=decision.baseline, job_id=job_id)
        elif decision.kind == "busy":
            self.store.log("busy", rolling=rolling, samples=n, job_id=self.store.running_job())
        return decision

    def current_artifact(self) -> str | None:
        return self.active_artifact

    def decisions(self) -> list[tuple[str, dict]]:
        return self.store.decisions()

    # -- the re-optimization job ------------------------------------------------

    def _client(self):
        if self._job_client_factory is not None:
            return self._job_client_factory()
        from ray.job_submission import JobSubmissionClient

        return JobSubmissionClient(self.policy.job_address)

    def _submit_job(self) -> str:
        import shlex

        from dspy_ray.util.fs import filesystem_for, is_uri, write_bytes

        name = f"drift_samples_{int(time.time())}.jsonl"
        # The job may run on another node: with an object-store registry the samples go there too.
        samples = (f"{self.options.artifact_dir.rstrip('/')}/drift/{name}" if is_uri(self.options.artifact_dir)
                   else str(Path(self.options.drift_db).resolve().with_name(name)))
        rows = "".join(json.dumps(row) + "\n" for row in self.store.recent_inputs())
        write_bytes(*filesystem_for(samples), rows.encode())
        flag_of = {r.name: r.flag for r in self.task.resources}
        resource_flags = "".join(f" {flag_of.get(name, '--' + name)} {shlex.quote(value)}"
                                 for name, value in self.options.resources.items())
        entrypoint = self.policy.job_entrypoint.format(
            task=shlex.quote(self.options.program), artifact_dir=shlex.quote(self.options.artifact_dir),
            samples=shlex.quote(samples), resource_flags=resource_flags)
        job_id = self._client().submit_job(entrypoint=entrypoint, runtime_env=self.policy.job_runtime_env)
        self.store.set_job(job_id, "RUNNING")
        return job_id

    def _poll_job(self) -> None:
        job_id = self.store.running_job()
        if job_id is None:
            return
        status = str(self._client().get_job_status(job_id)).split(".")[-1]
        if status in ("PENDING", "RUNNING"):
            return
        self.store.set_job(job_id, status)
        if status != "SUCCEEDED":
            self.store.log("job_failed", job_id=job_id, status=status)
            return
        self._adopt_best(job_id)

    def _adopt_best(self, job_id: str) -> None:
        """Adopt the registry's best artifact when its dev score beats the active one's (same metric, same data)."""
        from dspy_ray.execution.artifacts import best_artifact, read_metadata

        record = best_artifact(self.options.artifact_dir, self.task.program.name)
        candidate = str(record.path) if record else None
        score = record.metadata.dev_score if record else None
        active = read_metadata(self.active_artifact) if self.active_artifact else None
        current = active.dev_score if active is not None and active.dev_score is not None else float("-inf")
        if candidate is None or score is None or score <= current or candidate == self.active_artifact:
            self.store.log("kept", job_id=job_id, candidate=candidate, score=score,
                           active_dev_score=None if current == float("-inf") else current)
            return
        if self.policy.auto_deploy:
            self.active_artifact = candidate
            self.store.log("deployed", job_id=job_id, artifact=candidate, score=score)
        else:
            self.store.log("registered", job_id=job_id, artifact=candidate, score=score)

"""Ray Serve app hosting a compiled DSPy program behind an HTTP API derived from its signature.

Routes (``<p>`` is the program name)::

    POST /<p>/predict   one input  -> outputs            (422 names a bad field)
    POST /<p>/batch     {"items": [...]} -> per-item output or error
    GET  /<p>/info      artifact metadata, model, version
    GET  /healthz       liveness
    GET  /docs          OpenAPI docs

Replicas are async and hold many requests in flight; each request runs the
program under ``dspy.context(lm=...)`` through the same :class:`stages.predict.ProgramRunner`
the batch stages use.  Overload past ``max_queued_requests`` answers 503 with
``Retry-After`` (Serve's backpressure); an LM that still fails after retries
answers 502 with a short reason.  ``reconfigure`` (Serve ``user_config``) swaps
the program without downtime: requests in flight finish on the program they
started with.

    >>> app = build_app(ServeOptions(program="triage"))          # doctest: +SKIP
    >>> serve.run(app, route_prefix="/")                          # doctest: +SKIP
"""

# No `from __future__ import annotations`: FastAPI must see the real request models below.

import asyncio
import hmac
import os
import random
import time
from typing import Any

from fastapi import Depends, FastAPI, HTTPException, Request
from pydantic import BaseModel, ConfigDict, Field

from stages.config import EndpointSettings

TOKEN_ENV = "SERVE_API_TOKEN"
ARTIFACT_SYNC_S = 10.0  # how often replicas ask the drift monitor which artifact is active


class ServeOptions(BaseModel):
    """Everything ``python -m serve`` and ``serve_config.yaml`` can set."""

    model_config = ConfigDict(extra="forbid")

    program: str = Field("triage", description="Program name (programs.PROGRAMS) or 'pkg.module:Class'")
    artifact: str | None = Field(None, description="Optimized program JSON, or 'latest'/'best' from the registry")
    artifact_dir: str = Field("artifacts", description="Registry folder for 'latest'/'best'")
    lm: dict[str, Any] = Field(default_factory=dict, description="EndpointSettings fields for the target LM")
    judge: dict[str, Any] = Field(default_factory=dict, description="EndpointSettings fields for the judge LM")
    refine_attempts: int = Field(2, ge=1, description="dspy.Refine attempts when output fails validation")
    max_batch: int = Field(256, ge=1, description="Largest accepted /batch request")
    # Serve scaling knobs (applied by build_app as deployment options).
    min_replicas: int = Field(1, ge=0, description="Autoscaling lower bound")
    max_replicas: int = Field(4, ge=1, description="Autoscaling upper bound")
    target_ongoing_requests: float = Field(32, gt=0, description="Queue depth per replica the autoscaler aims for")
    upscale_delay_s: float = Field(5.0, ge=0, description="How long load must stay high before adding replicas")
    downscale_delay_s: float = Field(30.0, ge=0, description="How long load must stay low before removing replicas")
    max_ongoing_requests: int = Field(64, ge=1, description="Requests one replica works on at once")
    max_queued_requests: int = Field(256, ge=1, description="Waiting requests before 503 + Retry-After")
    retry_after_s: float = Field(1.0, ge=0, description="Retry-After sent with 503 on overload")
    # Drift monitoring (serve/drift.py).
    drift_sample_rate: float = Field(0.02, ge=0, le=1, description="Share of live requests sent to the judge")
    drift_db: str = Field("artifacts/drift.sqlite", description="Where sampled requests and scores are stored")
    drift_policy: dict[str, Any] = Field(default_factory=dict, description="serve.drift.DriftPolicy fields")


def build_app(options: ServeOptions):
    """The Serve application: one ingress deployment (+ the drift monitor when a judge is set)."""
    from ray import serve
    from ray.serve.config import AutoscalingConfig, BackpressureConfig

    deployment = serve.deployment(
        serve.ingress()(ProgramServer),
        name=f"{options.program}-server",
        max_ongoing_requests=options.max_ongoing_requests,
        max_queued_requests=options.max_queued_requests,
        backpressure_config=BackpressureConfig(status_code=503, retry_after_s=options.retry_after_s),
        autoscaling_config=AutoscalingConfig(
            min_replicas=options.min_replicas,
            max_replicas=options.max_replicas,
            target_ongoing_requests=options.target_ongoing_requests,
            upscale_delay_s=options.upscale_delay_s,
            downscale_delay_s=options.downscale_delay_s,
        ),
        ray_actor_options=_actor_options(),
        user_config={"artifact": options.artifact},
    )
    monitor = None
    if options.judge.get("base_url") or os.environ.get("JUDGE_BASE_URL"):
        from serve.drift import DriftMonitor

        monitor = serve.deployment(DriftMonitor, name="drift-monitor", num_replicas=1,
                                   ray_actor_options={"num_cpus": 0.1}).bind(options.model_dump(),
                                                                             options.drift_policy)
    return deployment.bind(options.model_dump(), monitor)


def _actor_options() -> dict[str, Any]:
    options: dict[str, Any] = {"num_cpus": 0.25}
    # The token reaches replicas as an environment variable, never as a deployment argument
    # (those are shown by `serve status`).
    if os.environ.get(TOKEN_ENV):
        options["runtime_env"] = {"env_vars": {TOKEN_ENV: os.environ[TOKEN_ENV]}}
    return options


class ProgramServer:
    """One replica: LM configured once, program swapped by ``reconfigure``."""

    def __init__(self, options: dict[str, Any], monitor=None):
        from programs import load_program
        from serve.metrics import ServeMetrics
        from serve.schemas import ProgramAPI
        from stages.lm import build_lm
        from stages.predict import ProgramRunner

        self.options = ServeOptions(**options)
        from stages.discovery import discover_endpoints

        # An unset LM_BASE_URL is filled from the cluster's Serve LLM app (serve/llm.py), if one runs.
        self.settings, _ = discover_endpoints(EndpointSettings.resolve("LM", flags=self.options.lm))
        self.metrics = ServeMetrics(self.options.program)
        self.lm = build_lm(self.settings)
        self.lm.usage_hook = self.metrics.record_usage
        self.program = load_program(self.options.program)
        self.api = ProgramAPI.from_program(self.options.program, self.program, self.options.max_batch)
        self.runner = ProgramRunner(self.program, self.lm, output_fields=tuple(self.api.response_model.model_fields),
                                    refine_attempts=self.options.refine_attempts,
                                    max_in_flight=self.options.max_ongoing_requests)
        self.artifact_info: dict[str, Any] = {"artifact": None}
        self.version = 0
        self.monitor = monitor
        self._last_sync = time.monotonic()
        self.token = os.environ.get(TOKEN_ENV) or None
        self.http_app = self._routes()

    # Serve calls this with user_config on deploy and on every config change.
    def reconfigure(self, user_config: dict[str, Any]) -> None:
        from programs.artifacts import load_artifact

        loaded = load_artifact(user_config.get("artifact"), self.options.program, self.options.artifact_dir)
        program = loaded.program
        info = {"artifact": loaded.path, "metadata": loaded.metadata.model_dump() if loaded.metadata else {}}
        # One assignment: a request that already read self.program keeps its version.
        self.program, self.artifact_info = program, info
        self.version += 1

    def __serve_build_asgi_app__(self) -> FastAPI:
        # Serve asks for the ASGI app after __init__: its routes and models come from the program.
        return self.http_app

    # -- routes ---------------------------------------------------------------

    def _routes(self) -> FastAPI:
        api, name = self.api, self.options.program
        app = FastAPI(title=f"{name} program", version="1", description=f"DSPy program {name!r} on Ray Serve")

        async def authorized(request: Request) -> None:
            if self.token is None:
                return
            given = request.headers.get("authorization", "")
            if not hmac.compare_digest(given.encode(), f"Bearer {self.token}".encode()):
                raise HTTPException(401, "missing or wrong bearer token", headers={"WWW-Authenticate": "Bearer"})

        @app.get("/healthz")
        async def healthz() -> dict:
            return {"status": "ok", "program": name, "version": self.version}

        @app.get(f"/{name}/info", dependencies=[Depends(authorized)])
        async def info() -> dict:
            return {"program": name, "version": self.version, "model": self.settings.model,
                    "endpoint": self.settings.redacted()["base_url"], **self.artifact_info}

        @app.post(f"/{name}/predict", response_model=api.response_model, dependencies=[Depends(authorized)])
        async def predict(body: api.request_model):  # type: ignore[valid-type]
            output, error = await self._predict_one(body.model_dump())
            if error:
                raise HTTPException(502, error)
            return output

        @app.post(f"/{name}/batch", response_model=api.batch_response_model, dependencies=[Depends(authorized)])
        async def batch(body: api.batch_request_model):  # type: ignore[valid-type]
            items = [item.model_dump() for item in body.items]
            results = await asyncio.gather(*(self._predict_one(item) for item in items))
            return {"results": [{"output": out, "error": err} for out, err in results]}

        return app

    async def _predict_one(self, inputs: dict[str, Any]) -> tuple[dict | None, str | None]:
        program = self.program  # pinned for this request, across a concurrent reconfigure
        start = time.perf_counter()
        outcome = await self.runner.predict(inputs, program=program)
        elapsed = time.perf_counter() - start
        fields = tuple(self.api.response_model.model_fields)
        if outcome.prediction is None:
            self.metrics.record_request(elapsed, ok=False)
            # A short reason, never a traceback: the first line of the first error.
            return None, (outcome.errors[0] if outcome.errors else "no output")[:300]
        output = {f: outcome.prediction.get(f) for f in fields}
        self.metrics.record_request(elapsed, ok=True)
        if self.monitor is not None:
            if random.random() < self.options.drift_sample_rate:
                # Fire and forget: the judge runs in the monitor, never on this request's path.
                self.monitor.record.remote(inputs, output, self.artifact_info.get("artifact"))
            if time.monotonic() - self._last_sync > ARTIFACT_SYNC_S:
                self._last_sync = time.monotonic()
                asyncio.get_running_loop().create_task(self._sync_artifact())
        return output, None

    async def _sync_artifact(self) -> None:
        """Adopt the artifact the drift monitor deployed after a re-optimization."""
        wanted = await self.monitor.current_artifact.remote()
        if wanted != self.artifact_info.get("artifact"):
            self.reconfigure({"artifact": wanted})


__all__ = ["ProgramServer", "ServeOptions", "build_app"]


def app_builder(args: dict[str, Any]):
    """Entry point for ``serve run`` / ``serve deploy``: ``import_path: serve.app:app_builder``."""
    return build_app(ServeOptions(**args))

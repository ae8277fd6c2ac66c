"""Ray Serve app hosting a compiled DSPy program behind an HTTP API derived from its signature.

Routes (``<p>`` is the program name)::

    POST /<p>/predict   one input  -> outputs            (422 names a bad field)
    POST /<p>/batch     {"items": [...]} -> per-item output or error
    GET  /<p>/info      artifact metadata, model, version
    GET  /healthz       liveness
    GET  /docs          OpenAPI docs

With ``ServeOptions.cache`` (``python -m serve --cache``; off by default) the LM answers repeated
identical calls from the LM cache (:mod:`dspy_ray.client.cache`), and ``/predict`` and ``/batch``
responses carry ``X-Cache: hit`` when every LM call they needed was answered from it, else
``X-Cache: miss``.

The program is a registered task's (``tasks/``), loaded by
:func:`dspy_ray.execution.loading.load_program`.  Replicas are async and hold many requests in
flight; each request runs the program under ``dspy.context(lm=...)`` through
the same :class:`dspy_ray.execution.runner.ProgramRunner` as the batch stages and the
optimizer, with the task's Refine policy.  Overload past ``max_queued_requests`` answers 503 with
``Retry-After`` (Serve's backpressure); an LM that still fails after retries
answers 502 with a short reason.  ``reconfigure`` (Serve ``user_config``) swaps
the program without downtime: requests in flight finish on the program they
started with.

    >>> app = build_app(ServeOptions(program="triage"), lm=settings)    # doctest: +SKIP
    >>> serve.run(app, route_prefix="/")                                 # doctest: +SKIP

Endpoint settings (keys included) and the API token reach replicas as
constructor arguments, resolved once by the caller (:mod:`dspy_ray.endpoints.settings`):
never through ``runtime_env``, which Ray writes to its logs.
"""

# No `from __future__ import annotations`: FastAPI must see the real request models below.

import asyncio
import os
import random
import time
from typing import Any

from fastapi import Depends, FastAPI, HTTPException, Request, Response
from fastapi.exceptions import RequestValidationError
from pydantic import ValidationError

from dspy_ray.client.cache.flags import cache_choice
from dspy_ray.endpoints.settings import EndpointSettings, resolve_settings
from dspy_ray.util.gc_tuning import settle_heap
from serve.drift import DriftMonitor
from serve.http import (
    ERROR_RESPONSES,
    add_component_schemas,
    bearer_auth,
    describe_errors,
    harden,
    request_body_schema,
)
from serve.options import ServeOptions

TOKEN_ENV = "SERVE_API_TOKEN"
ARTIFACT_SYNC_S = 10.0  # how often replicas ask the drift monitor which artifact is active


def build_app(options: ServeOptions, lm: EndpointSettings, judge: EndpointSettings | None = None,
              token: str | None = None, embed: EndpointSettings | None = None):
    """The Serve application: one ingress deployment (+ the drift monitor when a judge is given).

    ``lm``/``judge``/``embed``: fully resolved endpoint settings (:mod:`dspy_ray.endpoints.fallback`); they
    and ``token`` are passed to the replicas as constructor arguments.
    """
    from ray import serve
    from ray.serve.config import AutoscalingConfig, BackpressureConfig

    from tasks import get_task

    task = get_task(options.program)
    lm, judge = cache_choice(lm, options.cache), cache_choice(judge, options.cache)  # serving caches only if asked
    deployment = serve.deployment(
        serve.ingress()(ProgramServer),
        name=f"{task.name}-server",
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
        ray_actor_options={"num_cpus": 0.25},
        user_config={"artifact": options.artifact},
    )
    monitor = None
    if judge is not None:
        monitor = serve.deployment(DriftMonitor, name="drift-monitor", num_replicas=1,
                                   ray_actor_options={"num_cpus": 0.1}).bind(
            options.model_dump(), options.drift_policy, lm.with_key(), judge.with_key(), _with_key(embed))
    return deployment.bind(options.model_dump(), lm.with_key(), token, monitor, _with_key(embed))


def _with_key(settings: EndpointSettings | None) -> dict[str, Any] | None:
    return settings.with_key() if settings is not None else None


class ProgramServer:
    """One replica: LM and resources set up once, program swapped by ``reconfigure``."""

    def __init__(self, options: dict[str, Any], lm: dict[str, Any], token: str | None = None, monitor=None,
                 embed: dict[str, Any] | None = None):
        from dspy_ray.client.lm import build_lm
        from dspy_ray.execution.loading import load_program
        from serve.metrics import ServeMetrics
        from serve.schemas import ProgramAPI
        from tasks import get_task

        self.options = ServeOptions(**options)
        self.task = get_task(self.options.program)
        self.name = self.task.name
        self.settings = EndpointSettings(**lm)
        self.metrics = ServeMetrics(self.name)
        self.lm = build_lm(self.settings)
        self.lm.usage_hook = self.metrics.record_usage
        self.caching = self.lm.cache_store is not None  # responses say X-Cache: hit / miss only when caching
        spec = self.task.program
        self.resources = spec.open_resources(self.options.resources, EndpointSettings(**embed) if embed else None)
        self.program = load_program(spec, resources=self.resources).program
        self.output_fields = self.task.output_fields()
        self.api = ProgramAPI.from_program(self.name, self.program, self.output_fields, spec.output_types,
                                           self.options.max_batch)
        self.runner = self.task.runner(self.program, self.lm, max_in_flight=self.options.max_ongoing_requests)
        self.artifact_info: dict[str, Any] = {"artifact": None}
        self.version = 0
        self.monitor = monitor
        self._last_sync = time.monotonic()
        self.token = token or None
        self.http_app = self._routes()
        settle_heap()  # young collections less often (Serve freezes the replica's setup heap itself)

    # Serve calls this with user_config on deploy and on every config change.
    def reconfigure(self, user_config: dict[str, Any]) -> None:
        from dspy_ray.execution.loading import load_program

        loaded = load_program(self.task.program, user_config.get("artifact"), resources=self.resources,
                              artifact_dir=self.options.artifact_dir)
        info = {"artifact": loaded.path, "metadata": loaded.metadata.model_dump() if loaded.metadata else {}}
        # One assignment: a request that already read self.program keeps its version.
        self.program, self.artifact_info = loaded.program, info
        self.version += 1

    def __serve_build_asgi_app__(self) -> FastAPI:
        # Serve asks for the ASGI app after __init__: its routes and models come from the program.
        return self.http_app

    # -- routes ---------------------------------------------------------------

    def _routes(self) -> FastAPI:
        api, name = self.api, self.name
        app = FastAPI(title=f"{name} program", version="1", description=self.task.description, docs_url=None,
                      redoc_url=None)
        harden(app, max_body_bytes=self.options.max_body_bytes, title=name)
        # No token, no dependency: FastAPI resolves a route's dependencies on every request (~40 us here), and the
        # OpenAPI document then declares no scheme, as no credentials are asked for.
        auth = [Depends(bearer_auth(self.token))] if self.token else []

        @app.get("/healthz")
        async def healthz() -> dict:
            return {"status": "ok", "program": name, "version": self.version}

        @app.get(f"/{name}/info", dependencies=auth, responses=ERROR_RESPONSES)
        async def info() -> dict:
            note = ("no LM endpoint was configured: this is the embedded smoke-test model"
                    if self.settings.origin == "embedded" else None)
            return {"program": name, "version": self.version, "model": self.settings.model,
                    "endpoint": self.settings.redacted()["base_url"], "endpoint_origin": self.settings.origin,
                    "note": note, **self.artifact_info,
                    # This replica's X-Cache results and LM calls the cache answered (caching on only).
                    **({"cache": dict(self.metrics.cache_counts)} if self.caching else {})}

        @app.post(f"/{name}/predict", response_model=api.response_model, dependencies=auth,
                  responses=ERROR_RESPONSES)
        async def predict(body: api.request_model, response: Response):  # type: ignore[valid-type]
            output, error, cached = await self._predict_one(body.model_dump())
            if error:
                raise HTTPException(502, error)
            self._cache_header(response, [cached])
            return output

        @app.post(f"/{name}/batch", response_model=api.batch_response_model, dependencies=auth,
                  responses=ERROR_RESPONSES, openapi_extra=request_body_schema(api.batch_request_model))
        async def batch(request: Request, response: Response):
            """Per-item results: valid items run, each invalid one gets an ``error`` naming its field (200)."""
            items = await self._batch_items(request)
            checked = [self._check_item(i, item) for i, item in enumerate(items)]
            results = await asyncio.gather(*(self._predict_one(inputs) if inputs is not None else _failed(err)
                                             for inputs, err in checked))
            self._cache_header(response, [cached for _, _, cached in results])
            return {"results": [{"output": out, "error": err} for out, err, _ in results]}

        add_component_schemas(app, api.batch_request_model)
        return app

    async def _batch_items(self, request: Request) -> list[Any]:
        try:
            body = await request.json()
        except ValueError:
            raise RequestValidationError([{"loc": ("body",), "msg": "not valid JSON", "type": "json_invalid"}])
        items = body.get("items") if isinstance(body, dict) else None
        if not isinstance(items, list) or not 1 <= len(items) <= self.options.max_batch:
            raise RequestValidationError([{"loc": ("body", "items"), "type": "items",
                                           "msg": f"'items' must be a list of 1 to {self.options.max_batch} objects",
                                           "ctx": {"max_length": self.options.max_batch}}])
        return items

    def _check_item(self, index: int, item: Any) -> tuple[dict | None, str | None]:
        try:
            return self.api.request_model.model_validate(item).model_dump(), None
        except ValidationError as exc:
            detail = describe_errors(exc.errors(), prefix=("items", index))[:3]
            return None, "; ".join(f"{'.'.join(map(str, d['loc']))}: {d['msg']}" for d in detail)[:500]

    def _cache_header(self, response: Response, cached: list[int]) -> None:
        """``X-Cache: hit`` when every item was answered from the LM cache alone, else ``miss`` (caching on only);
        counted in the replica's metrics with the LM calls the cache answered.  ``cached``: per item, its LM calls
        answered from the cache when none was sent, else 0."""
        if self.caching:
            hit = bool(cached) and all(cached)
            response.headers["X-Cache"] = "hit" if hit else "miss"
            self.metrics.record_cache(hit, sum(cached))

    async def _predict_one(self, inputs: dict[str, Any]) -> tuple[dict | None, str | None, int]:
        """(output, error, its LM calls answered from the cache when none was sent, else 0)."""
        program = self.program  # pinned for this request, across a concurrent reconfigure
        start = time.perf_counter()
        outcome = await self.runner.predict(inputs, program=program)
        elapsed = time.perf_counter() - start
        if outcome.prediction is None:
            self.metrics.record_request(elapsed, ok=False)
            # A short reason, never a traceback: the first line of the first error.
            return None, (outcome.errors[0] if outcome.errors else "no output")[:300], 0
        output = {f: outcome.prediction.get(f) for f in self.output_fields}
        self.metrics.record_request(elapsed, ok=True)
        if self.monitor is not None:
            if random.random() < self.options.drift_sample_rate:
                # Fire and forget: the judge runs in the monitor, never on this request's path.
                self.monitor.record.remote(inputs, _jsonable(output), self.artifact_info.get("artifact"))
            if time.monotonic() - self._last_sync > ARTIFACT_SYNC_S:
                self._last_sync = time.monotonic()
                asyncio.get_running_loop().create_task(self._sync_artifact())
        return output, None, outcome.usage.cached if outcome.usage.calls == 0 else 0

    async def _sync_artifact(self) -> None:
        """Adopt the artifact the drift monitor deployed after a re-optimization."""
        wanted = await self.monitor.current_artifact.remote()
        if wanted != self.artifact_info.get("artifact"):
            self.reconfigure({"artifact": wanted})


async def _failed(error: str | None) -> tuple[None, str | None, int]:
    return None, error, 0


def _jsonable(output: dict[str, Any]) -> dict[str, Any]:
    return {k: v.model_dump(mode="json") if hasattr(v, "model_dump") else v for k, v in output.items()}


__all__ = ["ProgramServer", "ServeOptions", "app_builder", "build_app"]


def app_builder(args: dict[str, Any]):
    """Entry point for ``serve run`` / ``serve deploy``: ``import_path: serve.app:app_builder``.

    Endpoints resolve here as everywhere (flags in ``args`` > environment > ``.env`` > discovery);
    an LM that is still unset is an error: a cluster deployment does not start the embedded model.
    """

    from dspy_ray.endpoints.discovery import discover_endpoints

    from tasks import get_task

    options = ServeOptions(**args)
    needs_embedder = get_task(options.program).needs_embedder
    wanted = {"LM": resolve_settings("LM", flags=options.lm),
              "JUDGE": resolve_settings("JUDGE", flags=options.judge) if options.judge or _judge_configured() else None,
              "EMBED": resolve_settings("EMBED") if needs_embedder else None}
    found = discover_endpoints(wanted)
    for role, what in (("LM", "LM"), ("EMBED", "embedding")):
        if found[role] is not None and not found[role].base_url:
            raise ValueError(f"no {what} endpoint for the served program: set {role}_BASE_URL (environment or "
                             f".env), or deploy the cluster's LLM app for discovery")
    judge = found["JUDGE"] if found["JUDGE"] is not None and found["JUDGE"].base_url else None
    return build_app(options, found["LM"], judge, os.environ.get(TOKEN_ENV) or None, found["EMBED"])


def _judge_configured() -> bool:
    return bool(resolve_settings("JUDGE").base_url)

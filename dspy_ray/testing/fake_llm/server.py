"""The fake's aiohttp server, run in the child process: capacity slots, faults, stats, samples, admin routes.

:class:`FakeServer` holds the running state (settings, RNG, capacity, counters) and answers every route the
package docstring lists; replies are composed by :mod:`dspy_ray.testing.fake_llm.answers`.  aiohttp is
imported inside the methods that need it, so this module loads where aiohttp is never used (the parent).
"""

from __future__ import annotations

import asyncio
import functools
import os
import random
import signal
import socket
import time
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

from dspy_ray.testing.fake_llm.answers import (
    MALFORMED_CONTENT,
    answer_content,
    completion_body,
    embedding_body,
    input_key,
)
from dspy_ray.testing.fake_llm.capacity import Capacity
from dspy_ray.testing.fake_llm.prompt import last_text
from dspy_ray.testing.fake_llm.settings import HOST, FakeSettings, draw_fault

if TYPE_CHECKING:  # aiohttp is only needed in the server process
    from aiohttp import web


class FakeServer:
    """The aiohttp application and its state: settings, RNG, capacity and counters."""

    def __init__(self, settings: FakeSettings) -> None:
        self.settings = settings
        self.rng = random.Random(settings.seed)
        self.capacity = Capacity(settings.capacity)
        self.stats: dict[str, Any] = {}
        self.tasks: set[asyncio.Task] = set()  # handlers holding or awaiting a slot, cancelled on shutdown
        self.completions = 0
        self.samples: list[list[float]] = []  # [seconds since reset, in flight, queued, chat requests, 429s]
        self.started = time.monotonic()
        self.reset_stats()

    def reset_stats(self) -> None:
        """Zero the counters; ``in_flight`` stays the live gauge and seeds the new peak."""
        self.capacity.reset_peak()
        self.stats = {"requests": 0, "ok": 0, "rate_limited": 0, "server_error": 0, "hung": 0, "malformed": 0,
                      "over_capacity": 0, "max_in_flight": self.capacity.peak, "inputs": {},
                      "response_format": None}
        self.samples, self.started = [], time.monotonic()
        self.stats["embeddings"] = {"requests": 0, "inputs": 0, "ok": 0, "rate_limited": 0, "server_error": 0,
                                    "hung": 0, "malformed": 0, "rejected": 0, "unauthorized": 0}

    def snapshot(self) -> dict[str, Any]:
        """The counters and gauges ``GET /admin/stats`` answers."""
        capacity = self.capacity
        return {**self.stats, "max_in_flight": capacity.peak, "in_flight": capacity.in_flight,
                "queued": capacity.queued}

    def app(self) -> web.Application:
        from aiohttp import web

        app = web.Application(client_max_size=64 * 1024 * 1024)
        app.add_routes([
            web.get("/health", self.health),
            web.get("/v1/models", self.models),
            web.post("/v1/chat/completions", self.chat),
            web.post("/v1/embeddings", self.embeddings),
            web.get("/admin/config", self.get_config),
            web.post("/admin/config", self.set_config),
            web.get("/admin/stats", self.get_stats),
            web.get("/admin/samples", self.get_samples),
            web.post("/admin/reset", self.reset),
        ])
        return app

    # -- chat ----------------------------------------------------------------

    async def chat(self, request: web.Request) -> web.Response:
        try:
            body = await request.json()
        except ValueError:
            return _error(400, "request body is not JSON", "invalid_request_error", "invalid_json")
        if not isinstance(body, dict) or not isinstance(body.get("messages"), list):
            return _error(400, "'messages' must be a list", "invalid_request_error", "invalid_messages")
        if body.get("stream"):
            return _error(400, "the fake does not stream", "invalid_request_error", "stream_unsupported")
        key = input_key(last_text(body["messages"], "user"))
        self.stats["requests"] += 1
        self.stats["inputs"][key] = self.stats["inputs"].get(key, 0) + 1
        self.stats["response_format"] = body.get("response_format")  # the last one sent, as the client sent it
        if self.capacity.full(self.settings.reject_over):
            return self._reject()
        return await self._in_slot(functools.partial(self._respond, body))

    async def _in_slot(self, respond: Callable[[], Awaitable[web.Response]]) -> web.Response:
        """``respond()`` run holding a capacity slot, and cancelled if the server shuts down meanwhile."""
        task = asyncio.current_task()
        self.tasks.add(task)
        try:
            async with self.capacity.slot():
                return await respond()
        finally:
            self.tasks.discard(task)

    def _reject(self) -> web.Response:
        """429 + Retry-After for a request the endpoint cannot hold (counted as rate_limited too)."""
        self.stats["rate_limited"] += 1
        self.stats["over_capacity"] += 1
        wait = self.settings.retry_after
        return _error(429, "the server is at capacity", "rate_limit_error", "rate_limit_exceeded",
                      {"Retry-After": f"{wait:g}", "retry-after-ms": f"{wait * 1000:g}"})

    async def _respond(self, body: dict[str, Any]) -> web.Response:
        settings = self.settings
        fault = draw_fault(self.rng, self.settings)
        if fault == "rate_limited":
            self.stats["rate_limited"] += 1
            await asyncio.sleep(0)
            wait = f"{settings.retry_after:g}"
            return _error(429, "rate limited", "rate_limit_error", "rate_limit_exceeded",
                          {"Retry-After": wait, "retry-after-ms": f"{settings.retry_after * 1000:g}"})
        if fault == "server_error":
            self.stats["server_error"] += 1
            await asyncio.sleep(0)
            return _error(500, "internal server error", "server_error", "internal_error")
        if fault == "hung":
            self.stats["hung"] += 1
            await asyncio.sleep(settings.hang_seconds)  # cancelled on disconnect / shutdown
        if settings.latency > 0:
            await asyncio.sleep(settings.latency)
        if fault == "malformed":
            self.stats["malformed"] += 1
            content = MALFORMED_CONTENT
        else:
            self.stats["ok"] += 1
            content = answer_content(body, self.settings)
        return self._completion(body, content)

    def _completion(self, body: dict[str, Any], content: str) -> web.Response:
        from aiohttp import web

        self.completions += 1
        return web.json_response(completion_body(body, content, self.settings.model, self.completions))

    # -- embeddings ------------------------------------------------------------

    async def embeddings(self, request: web.Request) -> web.Response:
        """``POST /v1/embeddings``: the chat path's slots and faults, then hashed bag-of-words vectors."""
        counts = self.stats["embeddings"]
        counts["requests"] += 1
        key = self.settings.embed_api_key
        if key and request.headers.get("Authorization", "") != f"Bearer {key}":
            counts["unauthorized"] += 1
            return _error(401, "invalid api key", "authentication_error", "invalid_api_key")
        try:
            body = await request.json()
        except ValueError:
            return _error(400, "request body is not JSON", "invalid_request_error", "invalid_json")
        inputs = body.get("input") if isinstance(body, dict) else None
        if isinstance(inputs, str):
            inputs = [inputs]
        if not isinstance(inputs, list) or not inputs or not all(isinstance(t, str) for t in inputs):
            return _error(400, "'input' must be a string or a non-empty list of strings",
                          "invalid_request_error", "invalid_input")
        counts["inputs"] += len(inputs)
        limit = self.settings.embed_max_chars
        too_long = [i for i, text in enumerate(inputs) if limit and len(text) > limit]
        if too_long:
            counts["rejected"] += 1
            return _error(400, f"input {too_long[0]} is longer than the model's context ({limit} characters)",
                          "invalid_request_error", "context_length_exceeded")
        return await self._in_slot(functools.partial(self._embed_response, body, inputs))

    async def _embed_response(self, body: dict[str, Any], inputs: list[str]) -> web.Response:
        from aiohttp import web

        settings, counts = self.settings, self.stats["embeddings"]
        fault = draw_fault(self.rng, self.settings)
        if fault == "rate_limited":
            counts["rate_limited"] += 1
            return _error(429, "rate limited", "rate_limit_error", "rate_limit_exceeded",
                          {"Retry-After": f"{settings.retry_after:g}"})
        if fault == "server_error":
            counts["server_error"] += 1
            return _error(500, "internal server error", "server_error", "internal_error")
        if fault == "hung":
            counts["hung"] += 1
            await asyncio.sleep(settings.hang_seconds)
        if settings.latency > 0:
            await asyncio.sleep(settings.latency)
        model = body.get("model") or settings.model
        if fault == "malformed":
            counts["malformed"] += 1
            return web.json_response({"object": "list", "model": model})
        counts["ok"] += 1
        as_base64 = body.get("encoding_format") == "base64"
        return web.json_response(embedding_body(inputs, settings.embed_dim, model, as_base64))

    # -- health and admin ------------------------------------------------------

    async def health(self, _: web.Request) -> web.Response:
        from aiohttp import web

        return web.json_response({"status": "ok"})

    async def models(self, _: web.Request) -> web.Response:
        from aiohttp import web

        model = {"id": self.settings.model, "object": "model", "created": 0, "owned_by": "fake-llm"}
        return web.json_response({"object": "list", "data": [model]})

    async def get_config(self, _: web.Request) -> web.Response:
        from aiohttp import web

        return web.json_response(self.settings.to_dict())

    async def set_config(self, request: web.Request) -> web.Response:
        from aiohttp import web

        try:
            changes = await request.json()
            if not isinstance(changes, dict):
                raise TypeError("the body must be a JSON object of settings")
            settings = self.settings.updated(changes)
        except (ValueError, TypeError) as exc:
            return _error(400, str(exc), "invalid_request_error", "invalid_config")
        if settings.capacity != self.settings.capacity:
            self.capacity.resize(settings.capacity)
        if "seed" in changes:
            self.rng.seed(settings.seed)
        self.settings = settings
        return web.json_response(settings.to_dict())

    async def get_stats(self, _: web.Request) -> web.Response:
        from aiohttp import web

        return web.json_response(self.snapshot())

    async def get_samples(self, _: web.Request) -> web.Response:
        from aiohttp import web

        return web.json_response({"columns": ["seconds", "in_flight", "queued", "requests", "rate_limited", "ok"],
                                  "rows": self.samples})

    async def _sample(self) -> None:
        """Every ``sample_interval`` s, one row of gauges and counters (kept to the last 200,000)."""
        while True:
            interval = self.settings.sample_interval
            if interval <= 0:
                await asyncio.sleep(0.1)
                continue
            capacity = self.capacity
            self.samples.append([round(time.monotonic() - self.started, 4), capacity.in_flight, capacity.queued,
                                 self.stats["requests"], self.stats["rate_limited"], self.stats["ok"]])
            if len(self.samples) > 200_000:
                del self.samples[:100_000]
            await asyncio.sleep(interval)

    async def reset(self, _: web.Request) -> web.Response:
        from aiohttp import web

        self.reset_stats()
        return web.json_response(self.snapshot())

    # -- lifecycle -------------------------------------------------------------

    async def serve(self, port: int, parent_pid: int | None = None) -> None:
        """Serve on 127.0.0.1:``port`` (0 = any free port) until SIGTERM/SIGINT or the parent dies."""
        from aiohttp import web

        runner = web.AppRunner(self.app(), access_log=None, handle_signals=False,
                               handler_cancellation=True, shutdown_timeout=1.0)
        await runner.setup()
        sock = socket.create_server((HOST, port), backlog=4096)
        await web.SockSite(runner, sock).start()
        print(f"fake LLM serving at http://{HOST}:{sock.getsockname()[1]}/v1", flush=True)
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        watchdog = asyncio.create_task(_watch_parent(parent_pid, stop)) if parent_pid else None
        sampler = asyncio.create_task(self._sample())
        await stop.wait()
        sampler.cancel()
        if watchdog:
            watchdog.cancel()
        for task in list(self.tasks):  # hung and sleeping requests end now, not after a timeout
            task.cancel()
        await runner.cleanup()


async def _watch_parent(parent_pid: int, stop: asyncio.Event) -> None:
    """Stop when the process that started us is gone (it may have been SIGKILLed)."""
    while os.getppid() == parent_pid:
        await asyncio.sleep(0.5)
    stop.set()


def _error(status: int, message: str, kind: str, code: str, headers: dict[str, str] | None = None) -> web.Response:
    from aiohttp import web

    return web.json_response({"error": {"message": message, "type": kind, "code": code}},
                             status=status, headers=headers)

"""A fault-injecting fake OpenAI-compatible chat endpoint, run in its own process on 127.0.0.1.

Answers are deterministic and built from what DSPy sends: the JSON schema in
``response_format`` (enum values picked by a stable hash of the input) or, with
no schema, the output fields listed in the system message.  Faults are drawn per
request from a seeded RNG: 429 with ``Retry-After``, 500, hangs and malformed
output; ``capacity`` bounds how many requests are worked on at once (the rest
queue), and ``latency`` is how long each takes.

    with FakeLLM(latency=0.25, capacity=128, p_429=0.05) as fake:
        lm = dspy.LM("openai/fake-model", api_base=fake.base_url, api_key="x")
        fake.configure(p_429=0.0)     # change settings while it runs
        fake.stats()                  # counts by outcome, peak concurrency, distinct inputs

Standalone: ``python -m tests.fake_llm --port 8001 --latency 0.1``.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import hashlib
import json
import os
import random
import re
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]


@dataclass
class FakeSettings:
    model: str = "fake-model"
    latency: float = 0.0
    capacity: int | None = None
    p_429: float = 0.0
    retry_after: float = 1.0
    p_500: float = 0.0
    p_hang: float = 0.0
    hang_seconds: float = 3600.0
    p_malformed: float = 0.0
    seed: int = 0
    answers: dict[str, dict[str, Any]] = field(default_factory=dict)  # sha1(user text) -> field values
    field_overrides: dict[str, Any] = field(default_factory=dict)  # applied to every answer


# -- answers ------------------------------------------------------------------


def text_hash(text: str) -> str:
    return hashlib.sha1(text.encode()).hexdigest()


def _pick(options: list, key: str) -> Any:
    return options[int(text_hash(key)[:8], 16) % len(options)]


def value_for(schema: dict, name: str, user: str, defs: dict) -> Any:
    if "$ref" in schema:
        schema = defs.get(schema["$ref"].rsplit("/", 1)[-1], {})
    if "anyOf" in schema:
        schema = next((s for s in schema["anyOf"] if s.get("type") != "null"), schema["anyOf"][0])
    if "enum" in schema:
        return _pick(schema["enum"], name + user)
    kind = schema.get("type", "string")
    if kind == "object":
        return {k: value_for(v, k, user, defs) for k, v in (schema.get("properties") or {}).items()}
    if kind == "array":
        return []
    if kind == "boolean":
        return int(text_hash(name + user)[:2], 16) % 2 == 0
    if kind in ("integer", "number"):
        return int(text_hash(name + user)[:2], 16) % 2
    return f"{name} for {user[:40]}"


def fields_from_system(system: str) -> dict[str, list[str] | None]:
    """Output fields (name -> Literal options or None) from DSPy's 'Your output fields are:' block."""
    _, found, rest = system.partition("Your output fields are:\n")
    fields: dict[str, list[str] | None] = {}
    for line in rest.splitlines() if found else []:
        named = re.match(r"\s*\d+\.\s*`(\w+)`\s*(?:\((.*)\))?", line)
        if not named:
            break  # the numbered list ended
        kind = named.group(2) or ""
        fields[named.group(1)] = re.findall(r"'([^']*)'", kind) if "Literal" in kind else None
    return fields


def answer(body: dict, settings: FakeSettings) -> str:
    messages = body.get("messages") or []
    system = "\n".join(m.get("content") or "" for m in messages if m.get("role") == "system")
    user = next((m.get("content") or "" for m in reversed(messages) if m.get("role") == "user"), "")
    fmt = body.get("response_format") or {}
    schema = (fmt.get("json_schema") or {}).get("schema") if isinstance(fmt, dict) else None
    if schema:
        obj = value_for(schema, "", user, schema.get("$defs", {}))
    else:
        obj = {name: (_pick(opts, name + user) if opts else f"{name} for {user[:40]}")
               for name, opts in fields_from_system(system).items()}
    obj.update(settings.answers.get(text_hash(user), {}))
    obj.update({k: v for k, v in settings.field_overrides.items() if k in obj or not obj})
    if schema is None and "[[ ## completed ## ]]" in system:  # ChatAdapter's format
        parts = [f"[[ ## {k} ## ]]\n{v if isinstance(v, str) else json.dumps(v)}\n" for k, v in obj.items()]
        return "\n".join(parts) + "\n[[ ## completed ## ]]"
    return json.dumps(obj)


# -- server (runs in the child process) ------------------------------------------


def make_app(settings: FakeSettings):
    from aiohttp import web

    rng = random.Random(settings.seed)
    stats: dict[str, Any] = {}
    state = {"sem": asyncio.Semaphore(settings.capacity) if settings.capacity else None}

    def reset() -> None:
        stats.clear()
        stats.update(requests=0, ok=0, rate_limited=0, server_error=0, hung=0, malformed=0,
                     in_flight=0, max_in_flight=0, inputs={})

    reset()

    def error(status: int, message: str, kind: str, headers: dict | None = None):
        return web.json_response({"error": {"message": message, "type": kind, "code": kind}},
                                 status=status, headers=headers)

    async def chat(request):
        body = await request.json()
        stats["requests"] += 1
        user = next((m.get("content") or "" for m in reversed(body.get("messages") or [])
                     if m.get("role") == "user"), "")
        key = text_hash(user)
        stats["inputs"][key] = stats["inputs"].get(key, 0) + 1
        draw = rng.random()
        if draw < settings.p_429:
            stats["rate_limited"] += 1
            return error(429, "rate limited", "rate_limit_exceeded", {"Retry-After": f"{settings.retry_after:g}"})
        draw -= settings.p_429
        if draw < settings.p_500:
            stats["server_error"] += 1
            return error(500, "internal error", "server_error")
        draw -= settings.p_500
        sem = state["sem"]
        if sem:
            await sem.acquire()
        stats["in_flight"] += 1
        stats["max_in_flight"] = max(stats["max_in_flight"], stats["in_flight"])
        try:
            if draw < settings.p_hang:
                stats["hung"] += 1
                await asyncio.sleep(settings.hang_seconds)
            draw -= settings.p_hang
            if settings.latency:
                await asyncio.sleep(settings.latency)
            if draw < settings.p_malformed:
                stats["malformed"] += 1
                content = "I'm sorry, I cannot help with that ###"
            else:
                stats["ok"] += 1
                content = answer(body, settings)
        finally:
            stats["in_flight"] -= 1
            if sem:
                sem.release()
        prompt = sum(len(m.get("content") or "") for m in body.get("messages") or []) // 4
        return web.json_response({
            "id": f"chatcmpl-{stats['requests']}", "object": "chat.completion", "created": int(time.time()),
            "model": settings.model,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": content}, "finish_reason": "stop"}],
            "usage": {"prompt_tokens": prompt, "completion_tokens": len(content) // 4,
                      "total_tokens": prompt + len(content) // 4},
        })

    async def health(_):
        return web.json_response({"status": "ok"})

    async def models(_):
        return web.json_response({"object": "list", "data": [{"id": settings.model, "object": "model"}]})

    async def get_config(_):
        return web.json_response(dataclasses.asdict(settings))

    async def set_config(request):
        for key, value in (await request.json()).items():
            if not hasattr(settings, key):
                return web.json_response({"error": f"unknown setting {key}"}, status=400)
            setattr(settings, key, value)
            if key == "capacity":
                state["sem"] = asyncio.Semaphore(value) if value else None
            if key == "seed":
                rng.seed(value)
        return web.json_response(dataclasses.asdict(settings))

    async def get_stats(_):
        return web.json_response(stats)

    async def post_reset(_):
        reset()
        return web.json_response(stats)

    app = web.Application(client_max_size=64 * 1024 * 1024)
    app.add_routes([
        web.get("/health", health), web.get("/v1/models", models),
        web.post("/v1/chat/completions", chat), web.post("/chat/completions", chat),
        web.get("/admin/config", get_config), web.post("/admin/config", set_config),
        web.get("/admin/stats", get_stats), web.post("/admin/reset", post_reset),
    ])
    return app


def serve_forever(port: int, settings: FakeSettings, announce: bool) -> None:
    from aiohttp import web

    async def main() -> None:
        runner = web.AppRunner(make_app(settings), access_log=None)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", port, backlog=2048)
        await site.start()
        bound = site._server.sockets[0].getsockname()[1]  # port 0 -> the port the OS chose
        print(f"FAKE_LLM_PORT={bound}" if announce else f"fake LLM at http://127.0.0.1:{bound}/v1", flush=True)
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        await stop.wait()
        await runner.cleanup()

    asyncio.run(main())


# -- client side (the test process) -----------------------------------------------


class FakeLLM:
    """Starts the fake in a child process; a context manager."""

    def __init__(self, **settings: Any):
        self.settings = FakeSettings(**settings)
        self.proc: subprocess.Popen | None = None
        self.port: int | None = None

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    @property
    def pid(self) -> int:
        return self.proc.pid

    def start(self, timeout: float = 30.0) -> FakeLLM:
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
        # stderr goes to a file: an unread pipe would block the child once full.
        self._log = tempfile.NamedTemporaryFile("w+", prefix="fake-llm-", suffix=".log", delete=False)
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "tests.fake_llm", "--port", "0", "--announce",
             "--settings", json.dumps(dataclasses.asdict(self.settings))],
            cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=self._log, text=True)
        deadline = time.monotonic() + timeout
        line = self.proc.stdout.readline()
        if not line.startswith("FAKE_LLM_PORT="):
            self.close()
            raise RuntimeError(f"fake LLM failed to start: {line}{Path(self._log.name).read_text()[-2000:]}")
        self.port = int(line.strip().split("=", 1)[1])
        while time.monotonic() < deadline:
            try:
                self._request("GET", "/health")
                return self
            except OSError:
                time.sleep(0.05)
        self.close()
        raise RuntimeError("fake LLM did not answer /health")

    def _request(self, method: str, path: str, body: dict | None = None) -> dict:
        data = json.dumps(body).encode() if body is not None else None
        req = urllib.request.Request(f"http://127.0.0.1:{self.port}{path}", data=data, method=method,
                                     headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=10) as resp:
            return json.loads(resp.read())

    def configure(self, **settings: Any) -> dict:
        for key, value in settings.items():
            setattr(self.settings, key, value)
        return self._request("POST", "/admin/config", settings)

    def stats(self) -> dict:
        return self._request("GET", "/admin/stats")

    def reset_stats(self) -> dict:
        return self._request("POST", "/admin/reset", {})

    def close(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if self.proc and self.proc.stdout:
            self.proc.stdout.close()

    def __enter__(self) -> FakeLLM:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.close()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Fault-injecting fake OpenAI-compatible endpoint (127.0.0.1).")
    parser.add_argument("--port", type=int, default=8001)
    parser.add_argument("--settings", default="{}", help="FakeSettings fields as JSON")
    parser.add_argument("--announce", action="store_true", help=argparse.SUPPRESS)
    for f in dataclasses.fields(FakeSettings):
        if f.type in ("float", "int | None", "str", "int"):
            parser.add_argument(f"--{f.name.replace('_', '-')}", type=float if f.type == "float" else
                                (str if f.type == "str" else int), default=None)
    args = parser.parse_args(argv)
    values = json.loads(args.settings)
    values.update({f.name: getattr(args, f.name) for f in dataclasses.fields(FakeSettings)
                   if getattr(args, f.name, None) is not None})
    serve_forever(args.port, FakeSettings(**values), args.announce)


if __name__ == "__main__":
    main()

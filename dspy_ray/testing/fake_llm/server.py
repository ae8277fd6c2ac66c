"""A fault-injecting fake OpenAI-compatible chat-completions server for tests and benchmarks.

The server runs in its own process (so its CPU does not compete with the client
being measured) and listens on 127.0.0.1 only.  Every ``POST /v1/chat/completions``
request goes through these steps:

1. **capacity** - at most ``capacity`` requests are worked on at once; the rest
   wait in a FIFO queue.  ``capacity=None`` is unlimited.  With ``reject_over=n``
   a chat request that finds every slot busy and ``n`` requests already waiting
   is answered 429 + ``Retry-After`` at once (``reject_over=0``: no queue at all,
   like an endpoint that refuses what it cannot hold); ``None`` queues them all.
2. **fault draw** - one number from ``random.Random(seed)`` decides the outcome:
   ``p_429`` (HTTP 429 + ``Retry-After``), ``p_500`` (HTTP 500), ``p_hang``
   (sleep ``hang_seconds``; cancelled on client disconnect or shutdown) or
   ``p_malformed`` (HTTP 200 whose content is unparseable prose).  429 and 500
   answer at once; everything else first sleeps ``latency`` seconds.
3. **answer** - a deterministic, valid answer built from what DSPy sent: the JSON
   schema in ``response_format`` when there is one, otherwise the output fields
   listed in the system message (ChatAdapter ``[[ ## field ## ]]`` format or a JSON
   object).  Literal/enum values are picked with a stable hash of the field name
   and the last user message, so the same input always gets the same answer.
   In few-shot mode (``gold``) an input's correct values replace those for the
   values its prompt teaches (shown by a demo, or ``gold_keyword`` in the
   instruction), so prompt optimization measurably raises a metric.

Usage::

    from dspy_ray.testing.fake_llm import FakeLLM

    with FakeLLM(latency=0.25, capacity=128, p_429=0.05, retry_after=0.5, seed=0) as fake:
        lm = dspy.LM("openai/fake-model", api_base=fake.base_url, api_key="x", cache=False)
        ...
        fake.configure(p_429=0.0)       # change any setting while it runs
        fake.stats()["rate_limited"]    # outcome counters, peak concurrency, distinct inputs
        fake.reset_stats()
        fake.samples()                  # with sample_interval: (seconds, in flight, queued, ...) rows

Standalone (prints the base URL, serves until killed)::

    python -m dspy_ray.testing.fake_llm --port 8001 --latency 0.1 --p-429 0.05

``POST /v1/embeddings`` answers deterministic hashed bag-of-words vectors
(:func:`hashed_embedding`: each lower-cased word adds +-1 to one of ``embed_dim``
coordinates chosen by its hash, then L2 normalised), so texts sharing words are
close and retrieval over the fake is meaningful.  It goes through the same
capacity slots and fault draw as chat (429, 500, hang; ``p_malformed`` answers
200 without a ``data`` list), answers ``encoding_format`` ``float`` or ``base64``,
rejects (400) a request holding an input longer than ``embed_max_chars`` (when
set), and requires ``Authorization: Bearer <embed_api_key>`` (when set).  Its
counters are ``stats()["embeddings"]``: requests, inputs, and outcomes.

Admin endpoints: ``GET /health``, ``GET /v1/models``, ``GET|POST /admin/config``,
``GET /admin/stats``, ``POST /admin/reset``.
"""

from __future__ import annotations

import argparse
import ast
import asyncio
import base64
import contextlib
import dataclasses
import functools
import hashlib
import json
import os
import random
import re
import select
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # aiohttp is only needed in the server process
    from aiohttp import web

ROOT = Path(__file__).resolve().parents[2]  # the repository: the fake runs as `python -m dspy_ray.testing.fake_llm`
HOST = "127.0.0.1"
MALFORMED_CONTENT = "I'm sorry, I cannot help with that ###"
BANNER = re.compile(r"fake LLM serving at (http://127\.0\.0\.1:(\d+)/v1)")


# -- settings -------------------------------------------------------------------


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
    # POST /v1/embeddings (see the module docstring).
    embed_dim: int = 256
    embed_max_chars: int = 0  # 0 = no limit; longer inputs get HTTP 400, like a context-length error
    embed_api_key: str = ""  # "" = no auth; else a wrong or missing bearer token gets HTTP 401

    def __post_init__(self) -> None:
        if not self.capacity:
            self.capacity = None
        elif self.capacity < 0:
            raise ValueError(f"capacity must be positive or None, got {self.capacity}")
        probs = {name: getattr(self, name) for name in ("p_429", "p_500", "p_hang", "p_malformed")}
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


# -- deterministic answers --------------------------------------------------------


def input_key(text: str) -> str:
    """The key the fake uses for an input: sha1 hex of the last user message's text."""
    return hashlib.sha1(text.encode("utf-8")).hexdigest()


_WORD = re.compile(r"[a-z0-9]+")


@functools.lru_cache(maxsize=1 << 16)
def _word_slot(word: str, dim: int) -> tuple[int, float]:
    h = int.from_bytes(hashlib.blake2b(word.encode(), digest_size=8).digest(), "little")
    return h % dim, (1.0 if (h >> 63) & 1 else -1.0)


def hashed_embedding(text: str, dim: int = 256) -> list[float]:
    """The fake's embedding: a signed hashed bag of lower-cased words, L2 normalised (all zeros for no words)."""
    vector = [0.0] * dim
    for word in _WORD.findall(text.lower()):
        slot, sign = _word_slot(word, dim)
        vector[slot] += sign
    norm = sum(v * v for v in vector) ** 0.5
    return [v / norm for v in vector] if norm else vector


def _stable_index(key: str, n: int) -> int:
    return int(input_key(key)[:8], 16) % n


def _message_text(message: dict[str, Any]) -> str:
    """Text of one chat message; content may be a string or a list of content parts."""
    content = message.get("content")
    if isinstance(content, list):
        return "\n".join(p.get("text", "") for p in content if isinstance(p, dict))
    return content if isinstance(content, str) else ""


def _last_text(messages: list[dict[str, Any]], role: str) -> str:
    return next((_message_text(m) for m in reversed(messages) if m.get("role") == role), "")


def _snippet(user: str) -> str:
    """First 40 characters of the user text, without DSPy's markers and closing instruction."""
    text = re.sub(r"\[\[ ## \w+ ## \]\]", " ", user.split("\n\nRespond with", 1)[0])
    return " ".join(text.split())[:40]


def _string_value(name: str, user: str) -> str:
    return f"{name} for {_snippet(user)}"


def schema_value(schema: dict[str, Any], name: str, user: str, defs: dict[str, Any], depth: int = 0) -> Any:
    """A value that satisfies a (pydantic-style) JSON schema, chosen deterministically."""
    if depth > 20:  # a recursive model: stop nesting
        return None
    if "$ref" in schema:
        schema = defs.get(schema["$ref"].rsplit("/", 1)[-1], {})
    for combinator in ("anyOf", "oneOf", "allOf"):
        options = schema.get(combinator)
        if options:
            schema = next((s for s in options if s.get("type") != "null"), options[0])
            return schema_value(schema, name, user, defs, depth + 1)
    if "const" in schema:
        return schema["const"]
    if schema.get("enum"):
        return schema["enum"][_stable_index(name + user, len(schema["enum"]))]
    kind = schema.get("type", "object" if "properties" in schema else "string")
    if isinstance(kind, list):  # e.g. ["string", "null"]
        kind = next((k for k in kind if k != "null"), "null")
    if kind == "object":
        props = schema.get("properties") or {}
        return {key: schema_value(sub, key, user, defs, depth + 1) for key, sub in props.items()}
    return _scalar_value(kind, name, user)


def _scalar_value(kind: str, name: str, user: str) -> Any:
    """Deterministic value for a JSON-schema type name (``string``, ``integer``, ...)."""
    bit = _stable_index(name + user, 2)
    if kind == "array":
        return []
    if kind == "boolean":
        return bool(bit)
    if kind == "integer":
        return bit
    if kind == "number":
        return float(bit)
    if kind == "null":
        return None
    return _string_value(name, user)


_FIELD_LINE = re.compile(r"\s*(\d+)\.\s+`(\w+)`\s*\(")
_NEXT_SECTIONS = ("All interactions will be structured", "In adhering to this structure", "[[ ## ")
_PY_TO_SCHEMA = {"int": "integer", "float": "number", "bool": "boolean", "list": "array", "tuple": "array",
                 "set": "array", "dict": "object", "NoneType": "null"}


def _balanced_end(text: str, start: int, open_: str, close: str) -> int:
    """Index just past the bracket closing the one at ``text[start]`` (or len(text))."""
    depth, quote = 0, ""
    for i in range(start, len(text)):
        ch = text[i]
        if quote:
            quote = "" if ch == quote and text[i - 1] != "\\" else quote
        elif ch in "'\"":
            quote = ch
        elif ch == open_:
            depth += 1
        elif ch == close:
            depth -= 1
            if depth == 0:
                return i + 1
    return len(text)


def output_fields(system: str) -> dict[str, str]:
    """Output field name -> annotation text, from DSPy's "Your output fields are:" block.

    DSPy writes numbered lines like ``1. `priority` (Literal['a', 'b']): desc``; a
    description may continue over several lines (blank ones included), so a field
    is a line carrying the next number in sequence, and the block ends where the
    next section ("All interactions ...", a ``[[ ## x ## ]]`` marker) begins.
    """
    _, found, rest = system.partition("Your output fields are:")
    fields: dict[str, str] = {}
    for line in rest.splitlines()[1:] if found else []:
        if line.startswith(_NEXT_SECTIONS):
            break
        match = _FIELD_LINE.match(line)
        if match and int(match.group(1)) == len(fields) + 1:
            paren = match.end() - 1
            fields[match.group(2)] = line[paren + 1:_balanced_end(line, paren, "(", ")") - 1]
    return fields


_SCHEMA_NOTE = re.compile(r"\{(\w+)\}\s+# note: the value you produce must adhere to the JSON schema: (\{.*)")


def schema_notes(system: str) -> dict[str, dict[str, Any]]:
    """Field name -> JSON schema, from the notes DSPy adds for structured output types.

    ChatAdapter writes ``{field}  # note: ... adhere to the JSON schema: {...}``;
    JSONAdapter writes the same text as a JSON string value, so decode that first.
    """
    notes: dict[str, dict[str, Any]] = {}
    for line in system.splitlines():
        if "adhere to the JSON schema" not in line:
            continue
        with contextlib.suppress(ValueError):  # JSONAdapter: '"name": "{name}  # note: ... {\"type\"...}",'
            line = next(iter(json.loads("{" + line.strip().rstrip(",") + "}").values()))
        match = _SCHEMA_NOTE.search(line) if isinstance(line, str) else None
        if match:
            with contextlib.suppress(ValueError):
                notes[match.group(1)] = json.JSONDecoder().raw_decode(match.group(2))[0]
    return notes


def annotation_value(annotation: str, name: str, user: str) -> Any:
    """Deterministic value for a field whose type DSPy rendered as ``annotation``."""
    annotation = annotation.strip()
    for wrapper in ("Optional[", "Union["):
        if annotation.startswith(wrapper):
            inner = annotation[len(wrapper):-1]
            first = next((a for a in _split_top_level(inner) if a.strip() != "NoneType"), "str")
            return annotation_value(first, name, user)
    if annotation.startswith("Literal["):
        options = _literal_options(annotation)
        if options:
            return options[_stable_index(name + user, len(options))]
    base = annotation.split("[", 1)[0].strip()
    return _scalar_value(_PY_TO_SCHEMA.get(base, "string"), name, user) if base != "dict" else {}


def _split_top_level(text: str) -> list[str]:
    """Split ``a, b[c, d], e`` on the commas that are not inside brackets."""
    parts, depth, current = [], 0, ""
    for ch in text:
        if ch in "[(":
            depth += 1
        elif ch in "])":
            depth -= 1
        if ch == "," and depth == 0:
            parts.append(current)
            current = ""
        else:
            current += ch
    return [p.strip() for p in [*parts, current] if p.strip()]


def _literal_options(annotation: str) -> list[Any]:
    inner = annotation[len("Literal["):_balanced_end(annotation, len("Literal"), "[", "]") - 1]
    try:
        return list(ast.literal_eval(f"[{inner}]"))
    except (ValueError, SyntaxError):
        return [m.group(2) for m in re.finditer(r"(['\"])(.*?)\1", inner)]


def _json_schema(body: dict[str, Any]) -> dict[str, Any] | None:
    fmt = body.get("response_format")
    if not isinstance(fmt, dict) or fmt.get("type") != "json_schema":
        return None
    schema = (fmt.get("json_schema") or {}).get("schema")
    return schema if isinstance(schema, dict) else None


def demo_values(messages: list[dict[str, Any]]) -> dict[str, set[str]]:
    """Field -> values the demos show (assistant turns: JSON objects or ChatAdapter sections)."""
    shown: dict[str, set[str]] = {}
    for message in messages:
        if message.get("role") != "assistant":
            continue
        text = _message_text(message)
        try:
            values = json.loads(text)
        except ValueError:
            values = dict(re.findall(r"\[\[ ## (\w+) ## \]\]\n(.*?)\n", text))
        for name, value in (values.items() if isinstance(values, dict) else ()):
            shown.setdefault(name, set()).add(value if isinstance(value, str) else json.dumps(value))
    return shown


def taught_values(messages: list[dict[str, Any]], gold: dict[str, Any], keyword: str) -> dict[str, Any]:
    """The gold values this prompt teaches: all with ``keyword`` in the system message, else those a demo shows."""
    if keyword and keyword.lower() in _last_text(messages, "system").lower():
        return dict(gold)
    shown = demo_values(messages)
    return {k: v for k, v in gold.items() if (v if isinstance(v, str) else json.dumps(v)) in shown.get(k, ())}


_PASSAGE_ID = re.compile(r"^\[([^\]\s]+)\]", re.M)


def answer_fields(body: dict[str, Any], settings: FakeSettings) -> dict[str, Any]:
    """The field values of the answer to ``body``, overrides applied."""
    messages = body.get("messages") or []
    user = _last_text(messages, "user")
    schema = _json_schema(body)
    if schema is not None:
        values = schema_value(schema, "", user, schema.get("$defs") or schema.get("definitions") or {})
        values = values if isinstance(values, dict) else {}
    else:
        system = _last_text(messages, "system")
        notes = schema_notes(system)
        values = {name: schema_value(notes[name], name, user, notes[name].get("$defs") or {}) if name in notes
                  else annotation_value(kind, name, user) for name, kind in output_fields(system).items()}
    gold = settings.gold.get(input_key(user))
    if gold:
        values.update(taught_values(messages, gold, settings.gold_keyword))
    values.update(settings.answers.get(input_key(user), {}))
    if isinstance(values.get("citations"), list):
        # A cited-answer prompt lists passages as "[id] text": cite the first one shown, as a model would.
        values["citations"] = _PASSAGE_ID.findall(user)[:1]
    # Overrides replace the fields an answer has; with no known fields they are the answer.
    values.update({k: v for k, v in settings.field_overrides.items() if k in values or not values})
    return values


def answer_content(body: dict[str, Any], settings: FakeSettings) -> str:
    """Message content answering ``body``: ChatAdapter sections or a JSON object.

    ChatAdapter's system prompt ends its output format with ``[[ ## completed ## ]]``;
    JSONAdapter's also shows ``[[ ## input ## ]]`` markers but asks for JSON, so the
    ``completed`` marker (and no ``response_format``) is what selects the section format.
    """
    values = answer_fields(body, settings)
    system = _last_text(body.get("messages") or [], "system")
    if body.get("response_format") is None and "[[ ## completed ## ]]" in system:
        sections = [f"[[ ## {k} ## ]]\n{v if isinstance(v, str) else json.dumps(v)}\n\n" for k, v in values.items()]
        return "".join(sections) + "[[ ## completed ## ]]"
    return json.dumps(values)


# -- the server (runs in the child process) -----------------------------------------

FAULTS = (("p_429", "rate_limited"), ("p_500", "server_error"), ("p_hang", "hung"), ("p_malformed", "malformed"))


class FakeServer:
    """The aiohttp application and its state: settings, RNG, slots and counters."""

    def __init__(self, settings: FakeSettings) -> None:
        self.settings = settings
        self.rng = random.Random(settings.seed)
        self.slots = self._make_slots(settings.capacity)
        self.stats: dict[str, Any] = {}
        self.tasks: set[asyncio.Task] = set()  # chat handlers now running, cancelled on shutdown
        self.in_flight = 0
        self.queued = 0
        self.completions = 0
        self.samples: list[list[float]] = []  # [seconds since reset, in flight, queued, chat requests, 429s]
        self.started = time.monotonic()
        self.reset_stats()

    @staticmethod
    def _make_slots(capacity: int | None) -> asyncio.Semaphore | None:
        return asyncio.Semaphore(capacity) if capacity else None

    def reset_stats(self) -> None:
        """Zero the counters; ``in_flight`` stays the live gauge and seeds the new peak."""
        self.stats = {"requests": 0, "ok": 0, "rate_limited": 0, "server_error": 0, "hung": 0, "malformed": 0,
                      "over_capacity": 0, "max_in_flight": self.in_flight, "inputs": {},
                      "response_format": None}
        self.samples, self.started = [], time.monotonic()
        self.stats["embeddings"] = {"requests": 0, "inputs": 0, "ok": 0, "rate_limited": 0, "server_error": 0,
                                    "hung": 0, "malformed": 0, "rejected": 0, "unauthorized": 0}

    def snapshot(self) -> dict[str, Any]:
        return {**self.stats, "in_flight": self.in_flight, "queued": self.queued}

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
        key = input_key(_last_text(body["messages"], "user"))
        self.stats["requests"] += 1
        self.stats["inputs"][key] = self.stats["inputs"].get(key, 0) + 1
        self.stats["response_format"] = body.get("response_format")  # the last one sent, as the client sent it
        if self._over_capacity():
            return self._reject()
        task = asyncio.current_task()
        self.tasks.add(task)
        try:
            async with self._slot():
                return await self._respond(body)
        finally:
            self.tasks.discard(task)

    def _over_capacity(self) -> bool:
        """Every slot busy and ``reject_over`` requests already waiting (never with ``reject_over=None``)."""
        limit = self.settings.reject_over
        return (limit is not None and self.slots is not None and self.slots.locked()
                and self.queued >= limit)

    def _reject(self) -> web.Response:
        """429 + Retry-After for a request the endpoint cannot hold (counted as rate_limited too)."""
        self.stats["rate_limited"] += 1
        self.stats["over_capacity"] += 1
        wait = self.settings.retry_after
        return _error(429, "the server is at capacity", "rate_limit_error", "rate_limit_exceeded",
                      {"Retry-After": f"{wait:g}", "retry-after-ms": f"{wait * 1000:g}"})

    @contextlib.asynccontextmanager
    async def _slot(self) -> AsyncIterator[None]:
        """Hold one of ``capacity`` processing slots (FIFO queue while none is free)."""
        slots = self.slots  # a capacity change swaps the semaphore; release the one acquired
        if slots is not None:
            self.queued += 1
            try:
                await slots.acquire()
            finally:
                self.queued -= 1
        self.in_flight += 1
        self.stats["max_in_flight"] = max(self.stats["max_in_flight"], self.in_flight)
        try:
            yield
        finally:
            self.in_flight -= 1
            if slots is not None:
                slots.release()

    def _draw_fault(self) -> str | None:
        draw = self.rng.random()
        for setting, outcome in FAULTS:
            probability = getattr(self.settings, setting)
            if draw < probability:
                return outcome
            draw -= probability
        return None

    async def _respond(self, body: dict[str, Any]) -> web.Response:
        settings = self.settings
        fault = self._draw_fault()
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
        prompt_tokens = sum(len(_message_text(m)) for m in body["messages"] if isinstance(m, dict)) // 4
        completion_tokens = len(content) // 4
        choice_count = max(1, int(body.get("n") or 1))
        return web.json_response({
            "id": f"chatcmpl-fake-{self.completions}",
            "object": "chat.completion",
            "created": int(time.time()),
            "model": self.settings.model,
            "choices": [{"index": i, "message": {"role": "assistant", "content": content}, "finish_reason": "stop"}
                        for i in range(choice_count)],
            "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                      "total_tokens": prompt_tokens + completion_tokens},
        })

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
        task = asyncio.current_task()
        self.tasks.add(task)
        try:
            async with self._slot():
                return await self._embed_response(body, inputs)
        finally:
            self.tasks.discard(task)

    async def _embed_response(self, body: dict[str, Any], inputs: list[str]) -> web.Response:
        from aiohttp import web

        settings, counts = self.settings, self.stats["embeddings"]
        fault = self._draw_fault()
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
        data = []
        for i, text in enumerate(inputs):
            vector = hashed_embedding(text, settings.embed_dim)
            value = base64.b64encode(struct.pack(f"<{len(vector)}f", *vector)).decode() if as_base64 else vector
            data.append({"object": "embedding", "index": i, "embedding": value})
        tokens = sum(len(t) for t in inputs) // 4
        return web.json_response({"object": "list", "data": data, "model": model,
                                  "usage": {"prompt_tokens": tokens, "total_tokens": tokens}})

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
                raise ValueError("the body must be a JSON object of settings")
            settings = self.settings.updated(changes)
        except (ValueError, TypeError) as exc:
            return _error(400, str(exc), "invalid_request_error", "invalid_config")
        if settings.capacity != self.settings.capacity:
            self.slots = self._make_slots(settings.capacity)
        if "seed" in changes:
            self.rng.seed(settings.seed)
        self.settings = settings
        return web.json_response(settings.to_dict())

    async def get_stats(self, _: web.Request) -> web.Response:
        from aiohttp import web

        return web.json_response(self.snapshot())

    async def get_samples(self, _: web.Request) -> web.Response:
        from aiohttp import web

        return web.json_response({"columns": ["seconds", "in_flight", "queued", "requests", "rate_limited"],
                                  "rows": self.samples})

    async def _sample(self) -> None:
        """Every ``sample_interval`` s, one row of gauges and counters (kept to the last 200,000)."""
        while True:
            interval = self.settings.sample_interval
            if interval <= 0:
                await asyncio.sleep(0.1)
                continue
            self.samples.append([round(time.monotonic() - self.started, 4), self.in_flight, self.queued,
                                 self.stats["requests"], self.stats["rate_limited"]])
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


# -- the handle used by tests (parent process) ----------------------------------------


class FakeLLM:
    """Runs the fake server in a child process; use as a context manager.

    ``FakeLLM(**settings)`` takes any :class:`FakeSettings` field as a keyword
    (plus ``startup_timeout``); ``base_url`` is ready once ``start()`` /
    ``__enter__`` returns.
    """

    def __init__(self, *, startup_timeout: float = 30.0, **settings: Any) -> None:
        self.settings = FakeSettings(**settings)
        self.startup_timeout = startup_timeout
        self.proc: subprocess.Popen[bytes] | None = None
        self.port: int | None = None
        self._stderr_path: str | None = None

    @property
    def base_url(self) -> str:
        """``http://127.0.0.1:<port>/v1`` - what to pass as ``api_base``."""
        if self.port is None:
            raise RuntimeError("FakeLLM is not running; call start() or use it as a context manager")
        return f"http://{HOST}:{self.port}/v1"

    @staticmethod
    def input_key(text: str) -> str:
        """Key of ``stats()['inputs']`` and of the ``answers`` setting for a user message."""
        return input_key(text)

    # -- lifecycle -------------------------------------------------------------

    def start(self) -> FakeLLM:
        if self.proc is not None:
            raise RuntimeError("FakeLLM already started")
        deadline = time.monotonic() + self.startup_timeout
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
        # stderr goes to a file: a pipe nobody reads would block the child once full.
        with tempfile.NamedTemporaryFile(prefix="fake-llm-", suffix=".log", delete=False) as log:
            self._stderr_path = log.name
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "dspy_ray.testing.fake_llm", "--port", "0", "--parent-pid", str(os.getpid()),
                 "--settings", json.dumps(self.settings.to_dict())],
                cwd=ROOT, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=log)
        try:
            self.port = self._read_port(deadline)
            self._wait_healthy(deadline)
        except BaseException:
            self.close()
            raise
        return self

    def _read_port(self, deadline: float) -> int:
        """The port from the child's banner line on stdout."""
        assert self.proc is not None and self.proc.stdout is not None
        fd, data = self.proc.stdout.fileno(), b""
        while b"\n" not in data:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                self._fail("did not report its port")
            if select.select([fd], [], [], min(remaining, 0.2))[0]:
                chunk = os.read(fd, 4096)
                if not chunk:
                    self._fail("exited before reporting its port")
                data += chunk
            elif self.proc.poll() is not None:
                self._fail("exited before reporting its port")
        match = BANNER.search(data.decode(errors="replace"))
        if not match:
            self._fail(f"printed an unexpected banner {data!r}")
        return int(match.group(2))

    def _wait_healthy(self, deadline: float) -> None:
        while True:
            try:
                if self._request("GET", "/health", timeout=1.0).get("status") == "ok":
                    return
            except OSError:
                pass
            if self.proc is not None and self.proc.poll() is not None:
                self._fail("exited before /health answered")
            if time.monotonic() > deadline:
                self._fail(f"did not answer /health within {self.startup_timeout:g} s")
            time.sleep(0.05)

    def _fail(self, what: str) -> None:
        code = self.proc.poll() if self.proc else None
        stderr = Path(self._stderr_path).read_text(errors="replace")[-4000:] if self._stderr_path else ""
        raise RuntimeError(f"fake LLM server {what} (exit code {code}); its stderr:\n{stderr}")

    def close(self) -> None:
        """Stop the child: SIGTERM, then SIGKILL if it is still there after 5 s."""
        proc, self.proc, self.port = self.proc, None, None
        if proc is not None:
            if proc.poll() is None:
                proc.terminate()
                try:
                    proc.wait(timeout=5)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
            if proc.stdout is not None:
                proc.stdout.close()
        if self._stderr_path:
            Path(self._stderr_path).unlink(missing_ok=True)
            self._stderr_path = None

    def __enter__(self) -> FakeLLM:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    # -- admin -----------------------------------------------------------------

    def configure(self, **changes: Any) -> dict[str, Any]:
        """Apply settings at once (``POST /admin/config``); returns all current settings."""
        current = self._request("POST", "/admin/config", changes)
        self.settings = FakeSettings(**current)
        return current

    def config(self) -> dict[str, Any]:
        """The server's current settings (``GET /admin/config``)."""
        return self._request("GET", "/admin/config")

    def stats(self) -> dict[str, Any]:
        """Counters from ``GET /admin/stats`` (see the module docstring)."""
        return self._request("GET", "/admin/stats")

    def reset_stats(self) -> dict[str, Any]:
        """Zero the counters and samples (``POST /admin/reset``); returns the fresh stats."""
        return self._request("POST", "/admin/reset", {})

    def samples(self) -> list[dict[str, float]]:
        """In-flight samples since the last reset, oldest first (needs ``sample_interval`` > 0)."""
        data = self._request("GET", "/admin/samples")
        return [dict(zip(data["columns"], row)) for row in data["rows"]]

    def _request(self, method: str, path: str, body: dict[str, Any] | None = None,
                 timeout: float = 10.0) -> dict[str, Any]:
        data = None if body is None else json.dumps(body).encode()
        request = urllib.request.Request(f"http://{HOST}:{self.port}{path}", data=data, method=method,
                                         headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(request, timeout=timeout) as response:
                return json.loads(response.read())
        except urllib.error.HTTPError as exc:
            detail = exc.read().decode(errors="replace")
            raise ValueError(f"fake LLM {method} {path} -> HTTP {exc.code}: {detail}") from None


# -- command line ----------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> tuple[int, FakeSettings, int | None]:
    parser = argparse.ArgumentParser(
        prog="python -m dspy_ray.testing.fake_llm",
        description="Fault-injecting fake OpenAI-compatible chat-completions server on 127.0.0.1.")
    parser.add_argument("--port", type=int, default=8001, help="0 picks a free port (default 8001)")
    parser.add_argument("--settings", default="{}", help="settings as a JSON object (flags below win)")
    parser.add_argument("--parent-pid", type=int, default=None, help="exit when this parent process is gone")
    for f in dataclasses.fields(FakeSettings):
        if f.name in ("answers", "field_overrides", "gold"):
            continue  # dicts: pass them in --settings
        kind = int if f.name in ("capacity", "reject_over") else type(f.default)
        parser.add_argument(f"--{f.name.replace('_', '-')}", dest=f.name, type=kind, default=None,
                            help=f"default {f.default!r}")
    args = parser.parse_args(argv)
    values = json.loads(args.settings)
    values.update({f.name: getattr(args, f.name) for f in dataclasses.fields(FakeSettings)
                   if getattr(args, f.name, None) is not None})
    return args.port, FakeSettings(**values), args.parent_pid


def main(argv: list[str] | None = None) -> None:
    port, settings, parent_pid = parse_args(argv)

    async def run() -> None:  # the server's asyncio objects must be made inside the loop
        await FakeServer(settings).serve(port, parent_pid)

    asyncio.run(run())


if __name__ == "__main__":
    main()

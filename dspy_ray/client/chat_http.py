"""A lean client for an OpenAI-compatible ``POST /chat/completions``: the LM's hot path.

DSPy 3.4's ``LM.__call__`` builds an lm15 request, plans the route, resolves the
provider (twice), scans the environment for proxies, prices the answer and records
history on every call: about 0.7 ms of CPU, more than the rest of a row.  For a plain
chat call (text messages, one choice, no tools, no streaming, no cache)
:class:`dspy_ray.client.lm.ResilientLM` sends the request through this client instead:

* one keep-alive HTTP/1.1 connection per thread and endpoint (:class:`_Connection`, plain
  sockets), so connections are only ever as many as the requests in flight, which the
  endpoint limiter bounds (lm15's pool stops at 100 connections per LM, a limit the
  limiter may need to pass);
* the body is assembled from JSON fragments, the response format's schema serialized
  once per signature (:func:`response_format_json`);
* HTTP errors become DSPy's own exception types, as lm15 maps them (429 ->
  ``LMRateLimitError`` with ``retry_after``, 5xx -> ``LMServerError``, 401/403 ->
  ``LMAuthError``, an unknown model -> ``LMUnsupportedModelError``, a context overflow
  -> ``ContextWindowExceededError``, timeouts and broken connections -> ``LMTimeoutError``
  / ``LMTransportError``), so retries (:mod:`dspy_ray.client.retry`, which also reads
  ``Retry-After``), Refine and the fatal-error rule behave the same.

    >>> client = ChatHTTP("http://127.0.0.1:8000/v1", api_key="", timeout_s=5.0, model="m")
    >>> client.path
    '/v1/chat/completions'
    >>> error_for(429, '{"error": {"message": "slow down"}}', retry_after=2.0, model="m").retry_after
    2.0

Endpoints behind an HTTP proxy (``HTTPS_PROXY`` ... for their host) are left to DSPy's
own client (:attr:`ChatHTTP.usable` is False).
"""

from __future__ import annotations

import asyncio
import http.client
import json
import socket
import ssl
import threading
import urllib.request
import weakref
from typing import Any
from urllib.parse import urlsplit

from dspy.utils.exceptions import (
    ContextWindowExceededError,
    LMAuthError,
    LMBillingError,
    LMInvalidRequestError,
    LMProviderError,
    LMRateLimitError,
    LMServerError,
    LMTimeoutError,
    LMTransportError,
    LMUnsupportedModelError,
)

from dspy_ray.client.retry import parse_retry_after

_MODEL_ERROR_CODES = frozenset({"model_not_found", "model_not_available", "unsupported_model", "DeploymentNotFound"})
_STALE = (http.client.RemoteDisconnected, ConnectionResetError, BrokenPipeError, http.client.CannotSendRequest)


def _dumps(value: Any) -> str:
    return json.dumps(value, ensure_ascii=False, separators=(",", ":"))


_format_cache: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def response_format_json(response_format: Any) -> str:
    """The ``response_format`` body field as JSON; a pydantic model class is sent as DSPy sends it (strict schema).

    Computed once per class: the adapter hands over the same class for every call of a signature.
    """
    if isinstance(response_format, type):
        cached = _format_cache.get(response_format)
        if cached is None:
            from dspy.clients.legacy_requests import _strict_json_schema

            cached = _format_cache[response_format] = _dumps({"type": "json_schema", "json_schema": {
                "name": response_format.__name__,
                "schema": _strict_json_schema(response_format.model_json_schema()),
                "strict": True}})
        return cached
    return _dumps(response_format)


def error_for(status: int, body: str, *, retry_after: float | None, model: str,
              request_id: str | None = None) -> LMProviderError:
    """The DSPy exception lm15 would raise for this HTTP error answer."""
    message, code, kind = "", "", ""
    try:
        data = json.loads(body)
        err = data.get("error", {}) if isinstance(data, dict) else {}
        if isinstance(err, dict):
            message, code, kind = str(err.get("message") or ""), str(err.get("code") or ""), str(err.get("type") or "")
        else:
            message = str(err)
    except ValueError:
        message = " ".join(body.split())[:500]
    message = message or f"HTTP {status}"
    meta = {"model": model, "status": status, "provider_code": code or kind or None, "request_id": request_id,
            "retry_after": retry_after}
    lowered = f"{message} {code} {kind}".lower()
    if code == "context_length_exceeded":
        return ContextWindowExceededError(message=message, **meta)
    if code in _MODEL_ERROR_CODES or (status == 404 and "model" in lowered and any(
            m in lowered for m in ("not found", "does not exist", "not supported", "unsupported", "unknown"))):
        return LMUnsupportedModelError(message, **meta)
    if code == "insufficient_quota" or kind in {"insufficient_quota", "exceeded_current_quota_error"} or status == 402:
        return LMBillingError(message, **meta)
    if status in (401, 403) or code == "invalid_api_key" or kind == "authentication_error":
        return LMAuthError(message, **meta)
    if status == 429 or code == "rate_limit_exceeded" or kind == "rate_limit_error":
        return LMRateLimitError(message, **meta)
    if status in (408, 504):
        return LMTimeoutError(message, **meta)
    if status in (400, 404, 409, 413, 422):
        return LMInvalidRequestError(message, **meta)
    if 500 <= status <= 599:
        return LMServerError(message, **meta)
    return LMProviderError(message, **meta)


def parse_head(head: bytes) -> tuple[int, dict[str, str], bool]:
    """(status, headers with lower-case names, connection reusable) of an answer's status line and headers."""
    lines = head.decode("latin-1").split("\r\n")
    version, _, rest = lines[0].partition(" ")
    status = int(rest[:3])
    headers = {}
    for line in lines[1:]:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    return status, headers, headers.get("connection", "").lower() != "close" and version != "HTTP/1.0"


def dechunk(data: bytes) -> tuple[bytes, bytes] | None:
    """(body, what follows it) of a chunked body at the start of ``data``; None while it is incomplete."""
    parts, at = [], 0
    while True:
        eol = data.find(b"\r\n", at)
        if eol < 0:
            return None
        size = int(data[at:eol].split(b";", 1)[0].strip() or b"0", 16)
        at = eol + 2
        if size == 0:
            while True:  # trailers, then the blank line
                end = data.find(b"\r\n", at)
                if end < 0:
                    return None
                if end == at:
                    return b"".join(parts), data[at + 2:]
                at = end + 2
        if len(data) < at + size + 2:
            return None
        parts.append(data[at:at + size])
        at += size + 2


def runs_to_close(status: int, headers: dict[str, str]) -> bool:
    """Whether an answer's body has no length and no chunks: it runs to the end of the connection."""
    return (status not in (204, 304) and "content-length" not in headers
            and "chunked" not in headers.get("transfer-encoding", "").lower())


def split_body(status: int, headers: dict[str, str], data: bytes) -> tuple[bytes, bytes] | None:
    """(body, what follows it) of an answer whose body starts ``data``; None while it is incomplete (never
    whole for an answer that :func:`runs_to_close`)."""
    if status in (204, 304):
        return b"", data
    if "chunked" in headers.get("transfer-encoding", "").lower():
        return dechunk(data)
    if "content-length" in headers:
        size = int(headers["content-length"])
        return (data[:size], data[size:]) if len(data) >= size else None
    return None


class _Connection:
    """One keep-alive HTTP/1.1 connection: what a JSON POST and its answer need, and no more.

    ``http.client`` parses every answer's headers with the ``email`` package, a tenth of a
    row's CPU at these rates; an OpenAI-compatible server answers with a status line, a few
    headers and a body sized by ``Content-Length`` (or chunked), which is all read here.
    """

    def __init__(self, host: str, port: int, timeout: float, context: ssl.SSLContext | None):
        sock = socket.create_connection((host, port), timeout=timeout)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.sock = context.wrap_socket(sock, server_hostname=host) if context is not None else sock
        self.buffer = b""
        self.used = False  # has answered a request (a reused connection may have been closed by the server)

    def close(self) -> None:
        try:
            self.sock.close()
        except OSError:
            pass

    def _more(self) -> bytes:
        chunk = self.sock.recv(65536)
        if not chunk:
            raise http.client.RemoteDisconnected("the server closed the connection")
        return chunk

    def post(self, request: bytes) -> tuple[int, dict[str, str], bytes, bool]:
        """Send one request; (status, headers with lower-case names, body, connection still usable)."""
        self.sock.sendall(request)
        while True:
            data = self.buffer
            while (end := data.find(b"\r\n\r\n")) < 0:
                data += self._more()
            status, headers, keep = parse_head(data[:end])
            data = data[end + 4:]
            if 100 <= status < 200:  # an interim answer: the real one follows
                self.buffer = data
                continue
            break
        if runs_to_close(status, headers):
            chunks = [data]
            while chunk := self.sock.recv(65536):
                chunks.append(chunk)
            body, data, keep = b"".join(chunks), b"", False
        else:
            while (done := split_body(status, headers, data)) is None:
                data += self._more()
            body, data = done
        self.buffer = data
        self.used = True
        return status, headers, body, keep


class _AsyncConnection(asyncio.Protocol):
    """:class:`_Connection` for an event loop: the answer is parsed as its bytes arrive, and its
    future resolved from the loop's own read callback (no thread, no stream objects)."""

    def __init__(self, loop: asyncio.AbstractEventLoop):
        self.loop = loop
        self.transport: asyncio.Transport | None = None
        self.buffer = b""
        self.head: tuple[int, dict[str, str], bool] | None = None  # the answer being read: status, headers, keep
        self.waiter: asyncio.Future | None = None
        self.used = False
        self.closed = False

    def connection_made(self, transport) -> None:
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        self.buffer = self.buffer + data if self.buffer else data
        if self.waiter is not None:
            try:
                self._read_answer()
            except ValueError as exc:  # not HTTP: this connection is done for
                self._fail(exc)
                self.close()

    def eof_received(self) -> bool:
        return False  # the transport closes itself; connection_lost says the rest

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        if self.waiter is None or self.waiter.done():
            return
        if self.head is not None and runs_to_close(*self.head[:2]):
            status, headers, _ = self.head
            self._finish(status, headers, self.buffer, False, b"")
        else:
            self._fail(exc or http.client.RemoteDisconnected("the server closed the connection"))

    def _read_answer(self) -> None:
        data = self.buffer
        while self.head is None:
            end = data.find(b"\r\n\r\n")
            if end < 0:
                return
            head = parse_head(data[:end])
            self.buffer = data = data[end + 4:]
            if not 100 <= head[0] < 200:  # an interim answer: the real one follows
                self.head = head
        status, headers, keep = self.head
        done = split_body(status, headers, data)  # None: more to come (or, with no length, connection_lost ends it)
        if done is not None:
            body, rest = done
            self._finish(status, headers, body, keep, rest)

    def _finish(self, status: int, headers: dict[str, str], body: bytes, keep: bool, rest: bytes) -> None:
        self.buffer, self.head, self.used = rest, None, True
        if not self.waiter.done():
            self.waiter.set_result((status, headers, body, keep))

    def _fail(self, exc: BaseException) -> None:
        if self.waiter is not None and not self.waiter.done():
            self.waiter.set_exception(exc)

    async def post(self, request: bytes, timeout: float) -> tuple[int, dict[str, str], bytes, bool]:
        """:meth:`_Connection.post`, awaited; ``TimeoutError`` when no whole answer came within ``timeout``."""
        waiter = self.waiter = self.loop.create_future()
        self.transport.write(request)
        timer = self.loop.call_later(timeout, _time_out, waiter)
        try:
            return await waiter
        finally:
            timer.cancel()
            self.waiter = None

    def close(self) -> None:
        self.closed = True
        if self.transport is not None:
            self.transport.close()


def _time_out(waiter: asyncio.Future) -> None:
    if not waiter.done():
        waiter.set_exception(TimeoutError())


class ChatHTTP:
    """``POST {base_url}/chat/completions`` over keep-alive connections: per thread for :meth:`complete`,
    per event loop for :meth:`acomplete`."""

    def __init__(self, base_url: str, *, api_key: str, timeout_s: float, model: str):
        parts = urlsplit(base_url.rstrip("/"))
        self.https = parts.scheme == "https"
        self.host = parts.hostname or "127.0.0.1"
        self.port = parts.port or (443 if self.https else 80)
        self.path = (parts.path or "") + "/chat/completions"
        self.timeout_s = timeout_s
        self.model = model
        default_port = self.port == (443 if self.https else 80)
        host = self.host if default_port else f"{self.host}:{self.port}"
        auth = f"Authorization: Bearer {api_key}\r\n" if api_key else ""
        self._head = (f"POST {self.path} HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\n"
                      f"Accept: application/json\r\nUser-Agent: dspy-ray\r\n{auth}Content-Length: ")
        self._ssl = ssl.create_default_context() if self.https else None
        self._local = threading.local()
        self._idle: dict[asyncio.AbstractEventLoop, list[_AsyncConnection]] = {}  # per loop: connections free now
        self._idle_lock = threading.Lock()
        proxies = urllib.request.getproxies()
        proxied = bool(proxies.get(parts.scheme)) and not urllib.request.proxy_bypass(self.host)
        # A proxy, or user info in the URL, is DSPy's client's job.
        self.usable = parts.scheme in ("http", "https") and not proxied and not parts.username

    def _request(self, body: bytes) -> bytes:
        return (self._head + f"{len(body)}\r\n\r\n").encode("latin-1") + body

    def _connection(self) -> _Connection:
        conn = getattr(self._local, "conn", None)
        if conn is None:
            conn = self._local.conn = _Connection(self.host, self.port, self.timeout_s, self._ssl)
        return conn

    def _drop(self) -> None:
        conn = getattr(self._local, "conn", None)
        self._local.conn = None
        if conn is not None:
            conn.close()

    def complete(self, body: bytes) -> dict[str, Any]:
        """Send one request; the parsed JSON answer, or a DSPy ``LMError``."""
        request = self._request(body)
        for _ in range(2):  # a kept-alive connection the server has closed gets one fresh retry
            reused = False
            try:
                conn = self._connection()
                reused = conn.used
                status, headers, data, keep = conn.post(request)
            except _STALE as exc:
                self._drop()
                if reused:
                    continue
                raise self._broken(exc, stale=True) from None
            except (OSError, ValueError, http.client.HTTPException) as exc:
                self._drop()
                raise self._broken(exc) from None
            if not keep:
                self._drop()
            return self._answer(status, headers, data)
        raise LMTransportError("connection to the endpoint failed twice", model=self.model)  # pragma: no cover

    async def acomplete(self, body: bytes) -> dict[str, Any]:
        """:meth:`complete` on the running event loop: the caller's coroutine waits, no thread does."""
        request = self._request(body)
        idle = self._idle_on(asyncio.get_running_loop())
        for _ in range(2):  # a kept-alive connection the server has closed gets one fresh retry
            conn = None
            while idle and conn is None:
                conn = idle.pop()
                if conn.closed or conn.transport.is_closing():
                    conn = None
            reused = conn is not None
            try:
                if conn is None:
                    conn = await self._open()
                status, headers, data, keep = await conn.post(request, self.timeout_s)
            except _STALE as exc:
                if conn is not None:
                    conn.close()
                if reused:
                    continue
                raise self._broken(exc, stale=True) from None
            except (OSError, ValueError, http.client.HTTPException, asyncio.TimeoutError) as exc:
                if conn is not None:
                    conn.close()
                raise self._broken(exc) from None
            except BaseException:  # cancelled mid-answer: the connection's state is unknown
                if conn is not None:
                    conn.close()
                raise
            if keep and not conn.closed:
                idle.append(conn)
            else:
                conn.close()
            return self._answer(status, headers, data)
        raise LMTransportError("connection to the endpoint failed twice", model=self.model)  # pragma: no cover

    async def _open(self) -> _AsyncConnection:
        loop = asyncio.get_running_loop()
        _, conn = await asyncio.wait_for(loop.create_connection(
            lambda: _AsyncConnection(loop), self.host, self.port, ssl=self._ssl,
            server_hostname=self.host if self._ssl is not None else None), self.timeout_s)
        return conn

    def _idle_on(self, loop: asyncio.AbstractEventLoop) -> list[_AsyncConnection]:
        """The loop's free connections; a closed loop's are dropped (their sockets close when collected)."""
        idle = self._idle.get(loop)
        if idle is None:
            with self._idle_lock:
                for closed in [old for old in self._idle if old.is_closed()]:
                    del self._idle[closed]
                idle = self._idle.setdefault(loop, [])
        return idle

    def _broken(self, exc: BaseException, stale: bool = False) -> LMTransportError | LMTimeoutError:
        """The DSPy error for a request that got no answer."""
        if isinstance(exc, (TimeoutError, asyncio.TimeoutError)) and not stale:
            return LMTimeoutError(f"no answer within {self.timeout_s:g}s", model=self.model)
        detail = "" if stale else f": {' '.join(str(exc).split())[:200]}"
        return LMTransportError(f"connection to the endpoint failed: {type(exc).__name__}{detail}", model=self.model)

    def _answer(self, status: int, headers: dict[str, str], data: bytes) -> dict[str, Any]:
        """The parsed JSON answer of one HTTP answer, or the DSPy ``LMError`` it stands for."""
        if status >= 400:
            raise error_for(status, data.decode("utf-8", "replace"), retry_after=parse_retry_after(headers),
                            model=self.model, request_id=headers.get("x-request-id"))
        try:
            answer = json.loads(data)
            answer["choices"][0]["message"]  # noqa: B018 - the shape the caller reads
        except (ValueError, KeyError, IndexError, TypeError):
            raise LMServerError(f"malformed chat completion (HTTP {status})", model=self.model,
                                status=status) from None
        return answer

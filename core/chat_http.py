"""A lean client for an OpenAI-compatible ``POST /chat/completions``: the LM's hot path.

DSPy 3.4's ``LM.__call__`` builds an lm15 request, plans the route, resolves the
provider (twice), scans the environment for proxies, prices the answer and records
history on every call: about 0.7 ms of CPU, more than the rest of a row.  For a plain
chat call (text messages, one choice, no tools, no streaming, no cache)
:class:`core.lm.ResilientLM` sends the request through this client instead:

* one keep-alive connection per thread and endpoint, so connections are only ever as
  many as the requests in flight, which the endpoint limiter bounds (lm15's pool stops
  at 100 connections per LM, a limit the limiter may need to pass);
* the body is assembled from JSON fragments, the response format's schema serialized
  once per signature (:func:`response_format_json`);
* HTTP errors become DSPy's own exception types, as lm15 maps them (429 ->
  ``LMRateLimitError`` with ``retry_after``, 5xx -> ``LMServerError``, 401/403 ->
  ``LMAuthError``, an unknown model -> ``LMUnsupportedModelError``, a context overflow
  -> ``ContextWindowExceededError``, timeouts and broken connections -> ``LMTimeoutError``
  / ``LMTransportError``), so retries, Refine and the fatal-error rule behave the same.

    >>> client = ChatHTTP("http://127.0.0.1:8000/v1", api_key="", timeout_s=5.0, model="m")
    >>> client.path
    '/v1/chat/completions'
    >>> error_for(429, '{"error": {"message": "slow down"}}', retry_after=2.0, model="m").retry_after
    2.0

Endpoints behind an HTTP proxy (``HTTPS_PROXY`` ... for their host) are left to DSPy's
own client (:attr:`ChatHTTP.usable` is False).
"""

from __future__ import annotations

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


def parse_retry_after(headers: http.client.HTTPMessage) -> float | None:
    """Seconds from ``retry-after-ms`` or ``Retry-After`` (seconds or an HTTP date)."""
    from dspy.clients._http import retry_after_seconds

    millis = headers.get("retry-after-ms")
    if millis:
        try:
            return max(0.0, float(millis) / 1000.0)
        except ValueError:
            pass
    value = headers.get("retry-after")
    return retry_after_seconds(value) if value else None


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


class ChatHTTP:
    """``POST {base_url}/chat/completions`` over per-thread keep-alive connections."""

    def __init__(self, base_url: str, *, api_key: str, timeout_s: float, model: str):
        parts = urlsplit(base_url.rstrip("/"))
        self.https = parts.scheme == "https"
        self.host = parts.hostname or "127.0.0.1"
        self.port = parts.port or (443 if self.https else 80)
        self.path = (parts.path or "") + "/chat/completions"
        self.timeout_s = timeout_s
        self.model = model
        self.headers = {"Content-Type": "application/json", "Accept": "application/json"}
        if api_key:
            self.headers["Authorization"] = f"Bearer {api_key}"
        self._ssl = ssl.create_default_context() if self.https else None
        self._local = threading.local()
        proxies = urllib.request.getproxies()
        proxied = bool(proxies.get(parts.scheme)) and not urllib.request.proxy_bypass(self.host)
        # A proxy, or user info in the URL, is DSPy's client's job.
        self.usable = parts.scheme in ("http", "https") and not proxied and not parts.username

    def _connection(self) -> http.client.HTTPConnection:
        conn = getattr(self._local, "conn", None)
        if conn is None:
            if self.https:
                conn = http.client.HTTPSConnection(self.host, self.port, timeout=self.timeout_s, context=self._ssl)
            else:
                conn = http.client.HTTPConnection(self.host, self.port, timeout=self.timeout_s)
            self._local.conn = conn
            self._local.fresh = True
        return conn

    def _drop(self) -> None:
        conn = getattr(self._local, "conn", None)
        self._local.conn = None
        if conn is not None:
            conn.close()

    def complete(self, body: bytes) -> dict[str, Any]:
        """Send one request; the parsed JSON answer, or a DSPy ``LMError``."""
        for _ in range(2):  # a kept-alive connection the server has closed gets one fresh retry
            conn = self._connection()
            reused = not getattr(self._local, "fresh", True)
            self._local.fresh = False
            try:
                conn.request("POST", self.path, body=body, headers=self.headers)
                response = conn.getresponse()
                data = response.read()
            except _STALE as exc:
                self._drop()
                if reused:
                    continue
                raise LMTransportError(f"connection to the endpoint failed: {type(exc).__name__}",
                                       model=self.model) from None
            except (socket.timeout, TimeoutError):
                self._drop()
                raise LMTimeoutError(f"no answer within {self.timeout_s:g}s", model=self.model) from None
            except (OSError, http.client.HTTPException) as exc:
                self._drop()
                raise LMTransportError(f"connection to the endpoint failed: {type(exc).__name__}: "
                                       f"{' '.join(str(exc).split())[:200]}", model=self.model) from None
            if response.will_close:
                self._drop()
            if response.status >= 400:
                raise error_for(response.status, data.decode("utf-8", "replace"),
                                retry_after=parse_retry_after(response.headers), model=self.model,
                                request_id=response.headers.get("x-request-id"))
            try:
                answer = json.loads(data)
                answer["choices"][0]["message"]  # noqa: B018 - the shape the caller reads
            except (ValueError, KeyError, IndexError, TypeError):
                raise LMServerError(f"malformed chat completion (HTTP {response.status})", model=self.model,
                                    status=response.status) from None
            return answer
        raise LMTransportError("connection to the endpoint failed twice", model=self.model)  # pragma: no cover

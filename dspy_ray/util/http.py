"""Small synchronous HTTP GETs for the control plane: health checks and ``/v1/models`` listings.

Not for the data path: chat and embedding requests go through :mod:`dspy_ray.client`, with
retries and the endpoint's limit.  These are one-off probes a caller polls or falls back from,
so they do not retry; a failure is an :class:`HTTPGetError` (or False from :func:`healthy`).

    >>> healthy("http://127.0.0.1:9/health", timeout_s=0.5)     # nothing listens there
    False
    >>> get_json("http://127.0.0.1:9/v1/models", timeout_s=0.5)  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    dspy_ray.util.http.HTTPGetError: GET http://127.0.0.1:9/v1/models failed: ...
"""

from __future__ import annotations

from typing import Any

import httpx


class HTTPGetError(RuntimeError):
    """A GET did not answer 2xx (no connection, a timeout, an error status) or its body was not JSON."""


def get(url: str, *, timeout_s: float, api_key: str = "", accept: str = "application/json") -> httpx.Response:
    """``GET url``; the response, whatever its status.  Raises :class:`HTTPGetError` when none came."""
    headers = {"Accept": accept}
    if api_key:
        headers["Authorization"] = f"Bearer {api_key}"
    try:
        return httpx.get(url, headers=headers, timeout=timeout_s)
    except (httpx.HTTPError, httpx.InvalidURL) as exc:
        raise HTTPGetError(f"GET {url} failed: {type(exc).__name__}: {exc}") from None


def get_json(url: str, *, timeout_s: float, api_key: str = "") -> Any:
    """The JSON body of ``GET url``; :class:`HTTPGetError` unless it answers 2xx with JSON."""
    response = get(url, timeout_s=timeout_s, api_key=api_key)
    if not response.is_success:
        raise HTTPGetError(f"GET {url} failed: HTTP {response.status_code}")
    try:
        return response.json() if response.content else {}
    except ValueError as exc:
        raise HTTPGetError(f"GET {url} failed: the answer is not JSON ({exc})") from None


def healthy(url: str, timeout_s: float = 1.0) -> bool:
    """Whether ``GET url`` answers 200 within ``timeout_s`` (a server's health route)."""
    try:
        return get(url, timeout_s=timeout_s, accept="*/*").status_code == 200
    except HTTPGetError:
        return False

"""The cache key of an LM request, and whether its answer may come from the cache.

A request is the dict an LM call is made of: the model, the endpoint's base URL, the
messages and every call setting (``response_format``, ``temperature``, ``max_tokens``, ``stop``,
``seed``, ``n``, ``rollout_id``, ...).  Its key is the sha256 of its canonical JSON::

    >>> request = {"model": "m", "base_url": "http://127.0.0.1:8000/v1", "api_key": "sk-1",
    ...            "messages": [{"role": "user", "content": "hi"}], "temperature": 0}
    >>> key = cache_key(request)
    >>> len(key), key == cache_key({**request, "api_key": "sk-2", "temperature": 0.0})
    (64, True)
    >>> cacheable(request), cacheable({**request, "temperature": 0.7})
    (True, False)

What is left out of the key: credentials (``api_key``, headers, a password or token in the URL)
and transport settings (``timeout``, retries, streaming): none of them decides the answer.  A
setting set to ``None`` counts as unset, as it is on the wire.  Everything else is in, so
a field this module does not know about makes keys more specific, never wrong.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import weakref
from typing import Any
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

logger = logging.getLogger(__name__)

# Bumped when the canonical form changes: entries under old keys are simply never found again.
KEY_VERSION = 1

# Fields that never decide the answer: credentials, and how the request travels.
NOT_IN_KEY = frozenset({
    "api_key", "headers", "extra_headers", "organization", "project", "azure_ad_token_provider",
    "api_base", "base_url",  # replaced by "endpoint", the URL without credentials
    "timeout", "request_timeout", "num_retries", "max_retries", "cache", "stream", "stream_options",
})
# Query parameters of a base URL that carry a credential (Azure's ``api-key``, signed URLs).
_SECRET_QUERY = frozenset({"key", "api_key", "api-key", "apikey", "token", "access_token", "sig", "signature"})

_schemas: weakref.WeakKeyDictionary[type, dict] = weakref.WeakKeyDictionary()  # DSPy makes signature classes on the fly


def cache_key(request: dict[str, Any]) -> str:
    """The sha256 (hex) of the request's canonical JSON: sorted keys, no credentials.

    Raises TypeError for a value with no stable JSON form (a callable, an arbitrary object):
    such a request must not be cached; :func:`lookup_key` says so with ``None`` instead.
    """
    body: dict[str, Any] = {"_key_version": KEY_VERSION}
    for name, value in request.items():
        if value is not None and name not in NOT_IN_KEY:
            body[str(name)] = _canonical(value)
    base_url = request.get("base_url") or request.get("api_base")
    if base_url:
        body["endpoint"] = endpoint_identity(str(base_url))
    text = json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def sent_key(body: bytes, endpoint: str, rollout_id: Any = None) -> str:
    """The key of a request by the bytes an LM client sends: ``body`` (its JSON, which holds no
    credential), the endpoint's :func:`endpoint_identity` and DSPy's ``rollout_id`` (not sent).

    For a client that builds the body anyway: one sha256 over it, without walking the request again
    (a few microseconds, against tens for :func:`cache_key` with a JSON schema in the request).  The
    same call built the same way gives the same bytes; a body that differs in any byte (field order,
    ``0`` for ``0.0``) is another key, and so only a miss::

        >>> sent_key(b'{"model":"m","messages":[]}', "http://h/v1") == sent_key(b'{"model":"m","messages":[]}',
        ...                                                                    "http://h/v1", None)
        True
    """
    head = f"dspy-ray-sent-{KEY_VERSION}\n{endpoint}\n{json.dumps(rollout_id)}\n".encode("utf-8")
    return hashlib.sha256(head + body).hexdigest()


def cacheable(request: dict[str, Any], allow_sampled: bool = False) -> bool:
    """Whether the answer to ``request`` may be served from (and stored in) the cache.

    A greedy call (``temperature`` 0) is; a sampled call is not, since a re-run asks for a new
    sample, unless it names its sample with DSPy's ``rollout_id`` or ``allow_sampled`` is set.
    An unset temperature counts as sampled: the provider's default applies, and it is 1.0 at
    OpenAI and most OpenAI-compatible servers.
    """
    if allow_sampled or request.get("rollout_id") is not None:
        return True
    temperature = request.get("temperature")
    if temperature is None or isinstance(temperature, bool):
        return False
    try:
        return float(temperature) == 0.0
    except (TypeError, ValueError):
        return False


def lookup_key(request: dict[str, Any], allow_sampled: bool = False) -> str | None:
    """The key to look ``request`` up under, or None when its answer must not be cached.

    The one call an LM client needs before a request::

        key = lookup_key(request)
        response = store.get(key) if key else None
    """
    if not cacheable(request, allow_sampled):
        return None
    try:
        return cache_key(request)
    except (TypeError, ValueError) as e:
        logger.debug("LM request not cached: %s", e)
        return None


def endpoint_identity(base_url: str) -> str:
    """The base URL without credentials, case-folded where URLs are case-blind, no trailing slash.

    >>> endpoint_identity("HTTPS://user:pw@API.example.com/v1/?api-key=s3cret&api-version=2024")
    'https://api.example.com/v1?api-version=2024'
    """
    parts = urlsplit(base_url.strip())
    host = (parts.hostname or "").lower()
    if parts.port is not None:
        host = f"{host}:{parts.port}"
    query = sorted((k, v) for k, v in parse_qsl(parts.query, keep_blank_values=True)
                   if k.lower() not in _SECRET_QUERY)
    return urlunsplit((parts.scheme.lower(), host, parts.path.rstrip("/"), urlencode(query), ""))


def _canonical(value: Any) -> Any:
    """``value`` as plain JSON data that is equal exactly when the requests are: 0 == 0.0, tuples as lists."""
    if value is None or isinstance(value, (bool, str)):
        return value
    if isinstance(value, int):
        return int(value)
    if isinstance(value, float):
        if not math.isfinite(value):
            raise ValueError(f"cannot key the number {value}")
        return int(value) if value.is_integer() else value
    if isinstance(value, dict):
        return {str(k): _canonical(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_canonical(v) for v in value]
    if isinstance(value, (set, frozenset)):
        items = [_canonical(v) for v in value]
        return sorted(items, key=lambda v: json.dumps(v, sort_keys=True))
    if isinstance(value, bytes):
        return {"bytes": value.hex()}
    if isinstance(value, type) and hasattr(value, "model_json_schema"):  # a pydantic response_format
        return _schema_of(value)
    if hasattr(value, "model_dump"):  # a pydantic instance
        return _canonical(value.model_dump(mode="json"))
    raise TypeError(f"cannot key a {type(value).__name__}: it has no stable JSON form")


def _schema_of(model: type) -> dict:
    """A pydantic class as what decides the answer: its name and JSON schema (computed once per class)."""
    schema = _schemas.get(model)
    if schema is None:
        schema = _schemas[model] = {"name": model.__name__, "schema": _canonical(model.model_json_schema())}
    return schema

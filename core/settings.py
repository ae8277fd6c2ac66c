"""One typed object for every endpoint setting, and the one function that resolves it.

Every model this framework calls is an OpenAI-compatible endpoint with a role:
``LM`` (the target program's model), ``JUDGE`` (scores outputs in optimization
and drift monitoring) and ``EMBED`` (the ``/v1/embeddings`` model of retrieval).
A role's settings come from, in order of precedence:

1. command-line flags (``--lm-base-url`` ...),
2. the process environment (``LM_BASE_URL`` ...),
3. a ``.env`` file in the working directory,
4. discovery: the cluster's Serve LLM app (:mod:`core.discovery`),
5. the embedded default model (:mod:`core.embedded`).

This module does steps 1-3 (:func:`resolve_settings`); :mod:`core.endpoints`
adds 4 and 5 and is what batch, optimize and serve call.

    >>> s = resolve_settings("LM", flags={"base_url": "http://127.0.0.1:8000/v1"}, env={}, dotenv_path=None)
    >>> s.base_url, s.model
    ('http://127.0.0.1:8000/v1', 'default')

An empty ``base_url`` means "no endpoint configured".  API keys are
``SecretStr``: they are never printed, logged, or written to artifacts, and they
reach Ray actors and Serve replicas only as constructor arguments, never through
``runtime_env`` (Ray logs ``runtime_env``).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, SecretStr

ROLES = ("LM", "JUDGE", "EMBED")


class EndpointSettings(BaseModel):
    """How to reach one OpenAI-compatible endpoint and how hard to push it."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    # Environment variable suffix per field: LM_BASE_URL, JUDGE_MODEL, ...
    base_url: str = Field("", description="OpenAI-compatible base URL ending in /v1; empty = not configured",
                          json_schema_extra={"env": "BASE_URL"})
    model: str = Field("default", description="Model id the endpoint serves", json_schema_extra={"env": "MODEL"})
    api_key: SecretStr = Field(SecretStr(""), description="Bearer token; never printed or logged",
                               json_schema_extra={"env": "API_KEY"})
    temperature: float = Field(0.0, ge=0.0, le=2.0, description="Sampling temperature",
                               json_schema_extra={"env": "TEMPERATURE"})
    max_tokens: int = Field(512, gt=0, description="Completion token limit per call",
                            json_schema_extra={"env": "MAX_TOKENS"})
    timeout_s: float = Field(60.0, gt=0, description="Per-request timeout, so a hung request cannot stall a block",
                             json_schema_extra={"env": "TIMEOUT_S"})
    max_attempts: int = Field(6, ge=1, description="Attempts per call on 429/5xx/timeouts/connection errors",
                              json_schema_extra={"env": "MAX_ATTEMPTS"})
    max_in_flight: int = Field(256, ge=1, description="Ceiling on concurrent requests to this endpoint, all actors together",
                               json_schema_extra={"env": "MAX_IN_FLIGHT"})
    json_schema: bool = Field(True, description="Endpoint accepts response_format json_schema (vLLM, llama.cpp)",
                              json_schema_extra={"env": "JSON_SCHEMA"})
    price_in: float | None = Field(None, ge=0, description="USD per million prompt tokens (for cost reports)",
                                   json_schema_extra={"env": "PRICE_IN"})
    price_out: float | None = Field(None, ge=0, description="USD per million completion tokens (for cost reports)",
                                    json_schema_extra={"env": "PRICE_OUT"})
    # Embedding endpoints only (role EMBED).
    batch_size: int = Field(32, ge=1, description="Inputs per /v1/embeddings request",
                            json_schema_extra={"env": "BATCH_SIZE"})
    query_prefix: str = Field("", description="Text put before each query (e5: 'query: ')",
                              json_schema_extra={"env": "QUERY_PREFIX"})
    passage_prefix: str = Field("", description="Text put before each passage (e5: 'passage: ')",
                                json_schema_extra={"env": "PASSAGE_PREFIX"})
    origin: str = Field("", description="Where the endpoint came from: configured, discovery or embedded")

    @property
    def configured(self) -> bool:
        return bool(self.base_url)

    @property
    def embedded(self) -> bool:
        """No endpoint configured: the caller starts (or has started) the embedded model."""
        return not self.base_url or self.origin == "embedded"

    def redacted(self) -> dict[str, Any]:
        """Settings safe to print, log or store: no key, no credentials in the URL."""
        data = self.model_dump(exclude={"api_key"})
        data["base_url"] = redact_url(data["base_url"])
        return data

    def with_key(self) -> dict[str, Any]:
        """Every field including the real key: constructor arguments for an actor or replica (never logged)."""
        return {**self.model_dump(), "api_key": self.api_key.get_secret_value()}


def env_names(role: str) -> dict[str, str]:
    """Field -> environment variable for ``role`` (``LM_BASE_URL`` ...)."""
    return {name: f"{role}_{info.json_schema_extra['env']}"
            for name, info in EndpointSettings.model_fields.items()
            if isinstance(info.json_schema_extra, dict) and "env" in info.json_schema_extra}


def read_dotenv(path: str | os.PathLike | None = ".env") -> dict[str, str]:
    """``.env`` values (empty when there is no such file)."""
    if not path or not Path(path).is_file():
        return {}
    from dotenv import dotenv_values

    return {k: v for k, v in dotenv_values(path).items() if v is not None}


def resolve_settings(
    role: str,
    flags: Mapping[str, Any] | None = None,
    *,
    env: Mapping[str, str] | None = None,
    dotenv_path: str | os.PathLike | None = ".env",
    defaults: Mapping[str, Any] | None = None,
) -> EndpointSettings:
    """Merge ``defaults`` < ``.env`` < environment < ``flags`` for one role (``None`` flags are ignored)."""
    if role not in ROLES:
        raise ValueError(f"unknown endpoint role {role!r}; roles are {', '.join(ROLES)}")
    values: dict[str, Any] = dict(defaults or {})
    names = env_names(role)
    for source in (read_dotenv(dotenv_path), os.environ if env is None else env):
        for field, var in names.items():
            raw = source.get(var)
            if raw not in (None, ""):
                values[field] = raw
    values.update({k: v for k, v in (flags or {}).items() if v is not None})
    if values.get("base_url"):
        values.setdefault("origin", "configured")
    return EndpointSettings(**values)


def redact_url(url: str) -> str:
    """A URL with user info and query string removed (some providers put keys there)."""
    if not url:
        return url
    from urllib.parse import urlsplit, urlunsplit

    parts = urlsplit(url)
    host = parts.hostname or ""
    if parts.port:
        host = f"{host}:{parts.port}"
    return urlunsplit((parts.scheme, host, parts.path, "", ""))

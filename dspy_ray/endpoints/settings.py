"""One typed object for every endpoint setting, and the one function that resolves it.

Every model this framework calls is an OpenAI-compatible endpoint with a role:
``LM`` (the target program's model), ``JUDGE`` (scores outputs in optimization
and drift monitoring) and ``EMBED`` (the ``/v1/embeddings`` model of retrieval).
A role's settings come from, in order of precedence:

1. command-line flags (``--lm-base-url`` ...),
2. the process environment (``LM_BASE_URL`` ...),
3. a ``.env`` file in the working directory (or the file ``$DSPY_RAY_DOTENV`` names),
4. discovery: the cluster's Serve LLM app (:mod:`dspy_ray.endpoints.discovery`),
5. the embedded default model (:mod:`dspy_ray.endpoints.local.llm_server`).

This module does steps 1-3 (:func:`resolve_settings`); :mod:`dspy_ray.endpoints.fallback`
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
    max_in_flight: int = Field(1024, ge=1, description="Ceiling on concurrent requests to this endpoint, all actors "
                               "together; below it the limit is found at run time (dspy_ray.client.limiter)",
                               json_schema_extra={"env": "MAX_IN_FLIGHT"})
    adaptive: bool = Field(True, description="Find the endpoint's capacity at run time (AIMD on 429s and latency); "
                           "false: keep max_in_flight requests in flight", json_schema_extra={"env": "ADAPTIVE"})
    json_schema: bool = Field(True, description="Endpoint accepts response_format json_schema (vLLM, llama.cpp)",
                              json_schema_extra={"env": "JSON_SCHEMA"})
    price_in: float | None = Field(None, ge=0, description="USD per million prompt tokens (cost reports, --max-cost); "
                                   "default: the model's MODEL_PRICES entry", json_schema_extra={"env": "PRICE_IN"})
    price_out: float | None = Field(None, ge=0, description="USD per million completion tokens (cost reports, "
                                    "--max-cost); default: the model's MODEL_PRICES entry",
                                    json_schema_extra={"env": "PRICE_OUT"})
    # Embedding endpoints only (role EMBED).
    batch_size: int = Field(32, ge=1, description="Inputs per /v1/embeddings request",
                            json_schema_extra={"env": "BATCH_SIZE"})
    query_prefix: str = Field("", description="Text put before each query (e5: 'query: ')",
                              json_schema_extra={"env": "QUERY_PREFIX"})
    passage_prefix: str = Field("", description="Text put before each passage (e5: 'passage: ')",
                                json_schema_extra={"env": "PASSAGE_PREFIX"})
    # LM roles only: where answers are cached (dspy_ray.client.cache); it travels to actors inside this object.
    cache: str = Field("", description="LM answer cache: '' = $LM_CACHE, else the local default folder (~/.cache/dspy-ray/lm), "
                       "'off' = none, a folder, or a URI (s3://, gs://, file://) shared by a cluster",
                       json_schema_extra={"env": "CACHE"})
    origin: str = Field("", description="Where the endpoint came from: configured, discovery or embedded")

    @property
    def embedded(self) -> bool:
        """No endpoint configured: the caller starts (or has started) the embedded model."""
        return not self.base_url or self.origin == "embedded"

    def redacted(self) -> dict[str, Any]:
        """Settings safe to print, log or store: no key, no credentials in the URLs."""
        data = self.model_dump(exclude={"api_key"})
        data["base_url"] = redact_url(data["base_url"])
        data["cache"] = redact_location(data["cache"])
        return data

    def __repr_args__(self):
        # repr() and str() show the URLs as redacted() does (the key is a SecretStr and prints as '**********').
        for name, value in super().__repr_args__():
            if name == "base_url":
                value = redact_url(value)
            elif name == "cache":
                value = redact_location(value)
            yield name, value

    def with_key(self) -> dict[str, Any]:
        """Every field including the real key: constructor arguments for an actor or replica (never logged)."""
        return {**self.model_dump(), "api_key": self.api_key.get_secret_value()}


def env_names(role: str) -> dict[str, str]:
    """Field -> environment variable for ``role`` (``LM_BASE_URL`` ...)."""
    return {name: f"{role}_{info.json_schema_extra['env']}"
            for name, info in EndpointSettings.model_fields.items()
            if isinstance(info.json_schema_extra, dict) and "env" in info.json_schema_extra}


DOTENV_ENV = "DSPY_RAY_DOTENV"  # another file to read instead of ./.env (a secrets file on cluster nodes)


def read_dotenv(path: str | os.PathLike | None = ".env") -> dict[str, str]:
    """``.env`` values (empty when there is no such file); ``$DSPY_RAY_DOTENV`` names another file."""
    if path == ".env":
        path = os.environ.get(DOTENV_ENV) or path
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
    if values.get("price_in") is None and values.get("price_out") is None:
        prices = price_table(env=env, dotenv_path=dotenv_path).get(str(values.get("model", "default")))
        if prices:
            values["price_in"], values["price_out"] = prices
    return EndpointSettings(**values)


PRICE_TABLE_VAR = "MODEL_PRICES"


def price_table(*, env: Mapping[str, str] | None = None, dotenv_path: str | os.PathLike | None = ".env"
                ) -> dict[str, tuple[float, float]]:
    """Model id -> (USD per million prompt tokens, per million completion tokens), from ``MODEL_PRICES``.

    ``MODEL_PRICES`` (environment, else ``.env``) is a JSON object, or the path of a JSON file
    holding one: ``{"gpt-4o-mini": [0.15, 0.60], "Qwen/Qwen3-8B": {"in": 0.05, "out": 0.25}}``.
    A role's own ``*_PRICE_IN`` / ``*_PRICE_OUT`` win over the table.

        >>> price_table(env={"MODEL_PRICES": '{"m": [0.15, 0.6]}'}, dotenv_path=None)
        {'m': (0.15, 0.6)}
    """
    import json

    source = os.environ if env is None else env
    raw = source.get(PRICE_TABLE_VAR) or read_dotenv(dotenv_path).get(PRICE_TABLE_VAR)
    if not raw:
        return {}
    text = raw.strip()
    if not text.startswith("{"):
        try:
            text = Path(text).expanduser().read_text(encoding="utf-8")
        except OSError as exc:
            raise ValueError(f"{PRICE_TABLE_VAR}: cannot read {raw!r} ({exc.strerror})") from None
    try:
        data = json.loads(text)
        table = {}
        for model, price in data.items():
            pin, pout = (price["in"], price["out"]) if isinstance(price, dict) else price
            table[str(model)] = (float(pin), float(pout))
    except (ValueError, TypeError, KeyError, AttributeError) as exc:
        raise ValueError(f"{PRICE_TABLE_VAR} must map model ids to [in, out] or {{\"in\": .., \"out\": ..}} USD per "
                         f"million tokens ({type(exc).__name__}: {exc})") from None
    if any(p < 0 for pair in table.values() for p in pair):
        raise ValueError(f"{PRICE_TABLE_VAR}: prices must not be negative")
    return table


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


def redact_location(location: str) -> str:
    """A cache location as it may be printed: a URI as :func:`redact_url` shows it, a folder or ``off`` as is.

        >>> redact_location("s3://AKIA:secret@bucket/lm?token=x"), redact_location("~/lm")
        ('s3://bucket/lm', '~/lm')
    """
    return redact_url(location) if "://" in location else location

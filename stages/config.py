"""One typed object for every LM endpoint setting.

Values come from, in order of precedence: command-line flags, the process
environment, a ``.env`` file, and the defaults below.  ``LM_*`` variables
describe the target model, ``JUDGE_*`` variables the judge model used by
optimization and drift monitoring.

    >>> s = EndpointSettings.resolve("LM", flags={"base_url": "http://127.0.0.1:8000/v1"}, env={})
    >>> s.base_url, s.model
    ('http://127.0.0.1:8000/v1', 'default')

An empty ``base_url`` means "no endpoint configured": the caller starts the
embedded llama.cpp server (see :mod:`stages.embedded`).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, SecretStr

# Environment variable suffix for each settings field ("LM" + "_" + suffix).
_ENV_SUFFIXES = {
    "base_url": "BASE_URL",
    "model": "MODEL",
    "api_key": "API_KEY",
    "temperature": "TEMPERATURE",
    "max_tokens": "MAX_TOKENS",
    "timeout_s": "TIMEOUT_S",
    "max_attempts": "MAX_ATTEMPTS",
    "max_in_flight": "MAX_IN_FLIGHT",
    "json_schema": "JSON_SCHEMA",
}


class EndpointSettings(BaseModel):
    """How to reach one OpenAI-compatible endpoint and how hard to push it."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    base_url: str = Field("", description="OpenAI-compatible base URL ending in /v1; empty = embedded model")
    model: str = Field("default", description="Model id the endpoint serves")
    api_key: SecretStr = Field(SecretStr(""), description="Bearer token; never printed or logged")
    temperature: float = Field(0.0, ge=0.0, le=2.0, description="Sampling temperature")
    max_tokens: int = Field(512, gt=0, description="Completion token limit per call")
    timeout_s: float = Field(60.0, gt=0, description="Per-request timeout, so a hung request cannot stall a block")
    max_attempts: int = Field(6, ge=1, description="Attempts per LM call on 429/5xx/timeouts/connection errors")
    max_in_flight: int = Field(256, ge=1, description="Global budget of concurrent requests to this endpoint")
    json_schema: bool = Field(True, description="Endpoint accepts response_format json_schema (vLLM, llama.cpp)")

    @property
    def embedded(self) -> bool:
        return not self.base_url

    def redacted(self) -> dict[str, Any]:
        """Settings safe to print, log or store in an artifact."""
        data = self.model_dump()
        data["api_key"] = "***" if self.api_key.get_secret_value() else ""
        return data

    @classmethod
    def resolve(
        cls,
        prefix: str,
        flags: Mapping[str, Any] | None = None,
        env: Mapping[str, str] | None = None,
        dotenv_path: str | os.PathLike | None = ".env",
    ) -> EndpointSettings:
        """Merge defaults < .env < environment < flags (``None`` flags are ignored)."""
        values: dict[str, Any] = {}
        for source in (_dotenv(dotenv_path), os.environ if env is None else env):
            for field, suffix in _ENV_SUFFIXES.items():
                raw = source.get(f"{prefix}_{suffix}")
                if raw not in (None, ""):
                    values[field] = raw
        values.update({k: v for k, v in (flags or {}).items() if v is not None})
        return cls(**values)


def _dotenv(path: str | os.PathLike | None) -> dict[str, str]:
    if not path or not Path(path).is_file():
        return {}
    from dotenv import dotenv_values

    return {k: v for k, v in dotenv_values(path).items() if v is not None}


def dotenv_runtime_env(path: str | os.PathLike | None = ".env") -> dict[str, Any]:
    """``runtime_env`` that ships ``.env`` values to every Ray worker (values are not logged)."""
    env_vars = _dotenv(path)
    return {"env_vars": env_vars} if env_vars else {}

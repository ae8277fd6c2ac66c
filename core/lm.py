"""Build a ``dspy.LM`` for an OpenAI-compatible endpoint, with transient-error retries.

Every endpoint (embedded llama.cpp, vLLM, a hosted provider) is declared to
DSPy's native engine as its own provider, which does two things:

* DSPy learns that the endpoint accepts ``response_format`` with a JSON schema,
  so :class:`dspy.JSONAdapter` constrains decoding (Literal fields become enums);
* the model is not looked up in LiteLLM's price table on every call (a scan that
  costs milliseconds of CPU per call for model names it does not know).

    >>> from core.settings import EndpointSettings
    >>> lm = build_lm(EndpointSettings(base_url="http://127.0.0.1:8000/v1", model="m"))
    >>> lm.model.endswith("/m")
    True

Retries live here, at the LM call, so a two-predictor module retries only the
call that failed.  Validation failures (unparseable output) are not retried
here: that is :mod:`core.refine`'s job.
"""

from __future__ import annotations

import hashlib
import logging
import os
import random

import dspy
from dspy.utils.exceptions import (
    LMRateLimitError,
    LMServerError,
    LMTimeoutError,
    LMTransportError,
)
from tenacity import AsyncRetrying, Retrying, retry_if_exception, stop_after_attempt

from core.settings import EndpointSettings

os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")

logger = logging.getLogger(__name__)

# Failures worth another attempt: throttling, server-side errors, timeouts and
# broken connections.  Everything else (bad request, auth, context too long) is
# permanent and surfaces at once.
RETRYABLE_ERRORS = (LMRateLimitError, LMServerError, LMTimeoutError, LMTransportError)
RETRYABLE_STATUS = frozenset({408, 409, 429, 500, 502, 503, 504})
MAX_BACKOFF_S = 30.0


def is_retryable(exc: BaseException) -> bool:
    if isinstance(exc, RETRYABLE_ERRORS):
        return True
    return getattr(exc, "status", None) in RETRYABLE_STATUS


def backoff_seconds(attempt: int, retry_after: float | None, base: float = 0.5) -> float:
    """Exponential backoff with full jitter, never shorter than the server's Retry-After."""
    exp = min(MAX_BACKOFF_S, base * 2 ** (attempt - 1))
    wait = random.uniform(0, exp)
    if retry_after is not None and retry_after > 0:
        wait = max(wait, min(retry_after, MAX_BACKOFF_S * 4))
    return wait


def _wait(retry_state) -> float:
    exc = retry_state.outcome.exception() if retry_state.outcome else None
    return backoff_seconds(retry_state.attempt_number, getattr(exc, "retry_after", None))


def _log_retry(retry_state) -> None:
    exc = retry_state.outcome.exception()
    logger.debug("LM call attempt %d failed (%s); retrying", retry_state.attempt_number, type(exc).__name__)


class ResilientLM(dspy.LM):
    """``dspy.LM`` that retries transient failures with tenacity and keeps no history.

    A long-lived actor makes millions of calls; DSPy's per-LM history would grow
    with each one, so it is switched off here.
    """

    max_attempts: int = 6
    # Optional callable(usage_dict) told about every completed call (Serve exports it as metrics).
    usage_hook = None

    def _retrying(self, cls):
        return cls(
            stop=stop_after_attempt(self.max_attempts),
            wait=_wait,
            retry=retry_if_exception(is_retryable),
            before_sleep=_log_retry,
            reraise=True,
        )

    def __call__(self, *args, **kwargs):
        for attempt in self._retrying(Retrying):
            with attempt:
                return super().__call__(*args, **kwargs)

    async def acall(self, *args, **kwargs):
        async for attempt in self._retrying(AsyncRetrying):
            with attempt:
                return await super().acall(*args, **kwargs)

    def update_history(self, entry) -> None:  # noqa: D102 - see class docstring
        if self.usage_hook is not None:
            self.usage_hook(entry.get("usage") or {})


def provider_id(base_url: str) -> str:
    """A stable provider name per endpoint URL (DSPy refuses two definitions under one id)."""
    return "ep-" + hashlib.sha1(base_url.encode()).hexdigest()[:10]


def register_endpoint(settings: EndpointSettings) -> str:
    """Declare the endpoint to DSPy's native engine once per process; return the provider id."""
    from dspy.lm15 import AccessPolicy, ModelSupport, OpenAIChatCompat, ProviderDefinition, register_provider

    pid = provider_id(settings.base_url)
    compat = OpenAIChatCompat(
        instruction_role="system",
        max_tokens_field="max_tokens",
        stream_usage="include",
        tool_result_name="omit",
        strict_tools="omit",
        cache_control="none",
        json_schema="send" if settings.json_schema else "reject",
    )
    definition = ProviderDefinition.chat(
        AccessPolicy(provider=pid, base_url=settings.base_url),
        compat=compat,
        placeholder_key="unused",
        note="OpenAI-compatible endpoint declared by core.lm",
    )
    register_provider(definition, supports=ModelSupport(response_schema=settings.json_schema), replace=True)
    return pid


def build_lm(settings: EndpointSettings, **overrides) -> ResilientLM:
    """The one way this project builds an LM: batch stages, optimizers and Serve replicas call it."""
    if not settings.base_url:
        raise ValueError("no LM endpoint configured: open it with core.endpoints.open_endpoints first")
    pid = register_endpoint(settings)
    api_key = settings.api_key.get_secret_value() or "unused"
    lm = ResilientLM(
        f"{pid}/{settings.model}",
        api_base=settings.base_url,
        api_key=api_key,
        temperature=settings.temperature,
        max_tokens=settings.max_tokens,
        timeout=settings.timeout_s,
        num_retries=0,  # tenacity above owns retries; two layers would multiply attempts
        cache=False,
        **overrides,
    )
    lm.max_attempts = settings.max_attempts
    return lm

"""Build a ``dspy.LM`` for an OpenAI-compatible endpoint: retries, the endpoint's limit, usage.

Every endpoint (embedded llama.cpp, vLLM, a hosted provider) is declared to
DSPy's native engine as its own provider, which does two things:

* DSPy learns that the endpoint accepts ``response_format`` with a JSON schema,
  so :class:`dspy.JSONAdapter` constrains decoding (Literal fields become enums);
* the model is not looked up in LiteLLM's price table on every call (a scan that
  costs milliseconds of CPU per call for model names it does not know).

    >>> from dspy_ray.endpoints.settings import EndpointSettings
    >>> lm = build_lm(EndpointSettings(base_url="http://127.0.0.1:8000/v1", model="m"))
    >>> lm.model.endswith("/m")
    True

Each call of :class:`ResilientLM`:

* is sent by :mod:`dspy_ray.client.chat_http` when it is a plain chat call (text messages, one
  choice, no tools, no streaming, no DSPy cache), by DSPy's own client otherwise;
* on that lean path, is answered from the shared LM cache (:mod:`dspy_ray.client.cache`, the
  store ``settings.cache`` names) when the same greedy request was answered before, by this
  process, another actor or an earlier job: nothing is sent and the row's usage counts
  ``cached=1`` instead of a call.  Only successful answers are stored; sampled calls
  (temperature > 0 without a ``rollout_id``) are never cached.  Calls through DSPy's own
  client (tools, streaming) are not cached;
* is awaited on the caller's event loop when the program runs async (``acall``: DSPy's
  ``Predict.acall``), with the same lean path, cache, retries and limit, and no thread per call;
* holds one of the endpoint's slots per HTTP attempt (:mod:`dspy_ray.client.limiter`: the limit
  found at run time, shared by every caller of the endpoint), never during a retry's wait;
* is retried by :mod:`dspy_ray.client.retry`, the policy the embedding client uses too: 429 /
  5xx / timeouts / broken connections, exponential backoff with jitter, never sooner than
  ``Retry-After``, at most ``max_attempts`` attempts;
* adds its requests, retries, tokens and cost to the row being run and to this
  process's totals (:mod:`dspy_ray.client.usage`).

Retries live here, at the LM call, so a two-predictor module retries only the
call that failed.  Validation failures (unparseable output) are not retried
here: that is :mod:`dspy_ray.execution.refine`'s job.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
from typing import Any

import dspy
from dspy.utils.callback import with_callbacks

from dspy_ray.client.cache import CacheStore, cacheable, endpoint_identity, open_cache, sent_key
from dspy_ray.client.chat_http import ChatHTTP, response_format_json
from dspy_ray.client.limiter import EndpointLimiter, endpoint_key, endpoint_limiter
from dspy_ray.client.retry import RetryPolicy, acall_with_retries, call_with_retries, policy_for
from dspy_ray.client.retry import backoff_seconds as backoff_seconds  # re-exported: the backoff's old home
from dspy_ray.client.usage import Usage, call_cost, record
from dspy_ray.endpoints.settings import EndpointSettings


logger = logging.getLogger(__name__)
_dspy_logger = logging.getLogger("dspy.clients.lm")

# Call settings that are not request fields, and request fields the lean path leaves to DSPy.
_NOT_SENT = frozenset({"api_key", "api_base", "base_url", "timeout", "num_retries", "rollout_id", "cache"})
_DSPY_ONLY = frozenset({"n", "tools", "tool_choice", "stream", "prompt_cache", "num_generations", "extra_headers",
                        "headers", "extra_query", "organization", "project", "api_version", "custom_llm_provider",
                        "azure_ad_token_provider", "functions", "parallel_tool_calls"})
_UNOPENED = object()  # the LM cache store is opened on first use (None: caching is off)


class ResilientLM(dspy.LM):
    """``dspy.LM`` with retries, the endpoint's adaptive limit, usage accounting and a lean call path.

    A long-lived actor makes millions of calls; DSPy's per-LM history would grow
    with each one, so it is switched off here.
    """

    max_attempts: int = 6
    # Optional callable(usage_dict) told about every completed call (Serve exports it as metrics).
    usage_hook = None

    def bind(self, settings: EndpointSettings) -> ResilientLM:
        """Attach the endpoint's settings: its limiter, its price and the lean client."""
        self._settings = settings
        self.max_attempts = settings.max_attempts
        self._endpoint = endpoint_key(settings.base_url, settings.model)
        self._limiter: EndpointLimiter | None = None
        self._http: ChatHTTP | None = None
        self._cache_store = _UNOPENED
        return self

    # Locks, sockets, thread-locals and the cache's connection do not pickle; they are rebuilt on first use.
    def __getstate__(self):
        state = super().__getstate__()
        state.pop("_limiter", None)
        state.pop("_http", None)
        state.pop("_cache_store", None)
        return state

    @property
    def limiter(self) -> EndpointLimiter | None:
        settings = getattr(self, "_settings", None)
        if settings is None:
            return None
        if getattr(self, "_limiter", None) is None:
            self._limiter = endpoint_limiter(settings)
        return self._limiter

    @property
    def http(self) -> ChatHTTP | None:
        settings = getattr(self, "_settings", None)
        if settings is None:
            return None
        if getattr(self, "_http", None) is None:
            self._http = ChatHTTP(settings.base_url, api_key=settings.api_key.get_secret_value(),
                                  timeout_s=settings.timeout_s, model=self.model)
        return self._http

    @property
    def cache_store(self) -> CacheStore | None:
        """The LM cache ``settings.cache`` names, opened once per LM object and process; None when off."""
        store = getattr(self, "_cache_store", _UNOPENED)
        if store is _UNOPENED:
            settings = getattr(self, "_settings", None)
            store = self._cache_store = open_cache(settings.cache) if settings is not None else None
        return store

    # -- calls ------------------------------------------------------------------------

    @property
    def retry_policy(self) -> RetryPolicy:
        """The endpoint's :class:`~dspy_ray.client.retry.RetryPolicy` (the embedding client asks the same place)."""
        return policy_for(self)

    @with_callbacks
    def __call__(self, prompt=None, messages=None, **kwargs):
        lean = self._lean_request(prompt, messages, kwargs)
        if lean is None:
            result = self._attempts(lambda: dspy.BaseLM.__call__.__wrapped__(self, prompt, messages=messages, **kwargs))
            self._record(Usage(calls=1))  # the answered request (its tokens came through update_history)
            return result
        body, _, sent = lean
        store = self.cache_store
        key = self._cache_key(body, sent, kwargs) if store is not None else None
        if key is not None:
            outputs = self._cached_outputs(key, store.get(key), kwargs)
            if outputs is not None:
                return outputs
        answer = self._attempts(lambda: self.http.complete(body))
        return self._answered(answer, kwargs, store, key)

    @with_callbacks
    async def acall(self, prompt=None, messages=None, **kwargs):
        """:meth:`__call__` for asyncio: the same lean path, cache, retries and limit, awaited on the running
        loop (no thread per call); what the lean path does not send goes through DSPy's async client."""
        lean = self._lean_request(prompt, messages, kwargs)
        limiter = self.limiter
        slot = limiter.aslot if limiter is not None else None
        if lean is None:
            parent = dspy.BaseLM.acall.__wrapped__
            result = await acall_with_retries(lambda: parent(self, prompt, messages=messages, **kwargs),
                                              self.retry_policy, slot=slot, on_failure=self._failed)
            self._record(Usage(calls=1))
            return result
        body, _, sent = lean
        store = self.cache_store
        key = self._cache_key(body, sent, kwargs) if store is not None else None
        if key is not None:
            # A remote store's read is a round trip: off the loop.  A local one (~20 us) is read here.
            slow = getattr(store, "slow_reads", False)
            entry = await asyncio.to_thread(store.get, key) if slow else store.get(key)
            outputs = self._cached_outputs(key, entry, kwargs)
            if outputs is not None:
                return outputs
        answer = await acall_with_retries(lambda: self.http.acomplete(body), self.retry_policy, slot=slot,
                                          on_failure=self._failed)
        return self._answered(answer, kwargs, store, key)

    def _cached_outputs(self, key: str, answer: dict | None, kwargs) -> list | None:
        """DSPy's outputs of a cache entry; None on a miss (an entry that is no chat answer is one too)."""
        if answer is None:
            return None
        try:
            return self._outputs(answer, kwargs, cached=True)
        except (KeyError, TypeError, AttributeError):
            logger.debug("LM cache entry %s is not a chat answer; asking the endpoint", key)
            return None

    def _answered(self, answer: dict[str, Any], kwargs, store: CacheStore | None, key: str | None) -> list:
        """DSPy's outputs of the endpoint's answer, which is then stored in the cache (when it may be)."""
        outputs = self._outputs(answer, kwargs)
        if key is not None:  # only an answer that got this far is stored: errors raised above
            # Written by the process's cache writer thread: the row does not wait for the disk.
            store.put_later(key, answer, model=self._settings.model)
        return outputs

    def _cache_key(self, body: bytes, sent: dict[str, Any], kwargs: dict[str, Any]) -> str | None:
        """The cache key of a lean call: the body as sent (model, messages, every sent field), the endpoint
        and ``rollout_id``; None when the answer must not be cached (a sampled call)."""
        rollout_id = kwargs.get("rollout_id", self.kwargs.get("rollout_id"))
        if not cacheable({**sent, "rollout_id": rollout_id}):
            return None
        endpoint = self.__dict__.get("_endpoint_identity")
        if endpoint is None:
            endpoint = self._endpoint_identity = endpoint_identity(self._settings.base_url)
        return sent_key(body, endpoint, rollout_id)

    def _attempts(self, send):
        """``send()`` once per attempt, each holding one endpoint slot; backoff between attempts."""
        limiter = self.limiter
        return call_with_retries(send, self.retry_policy, slot=limiter.slot if limiter is not None else None,
                                 on_failure=self._failed)

    def _failed(self, attempt: int, exc: BaseException, wait: float | None) -> None:
        """Count a failed attempt (a request sent, and a retry when ``wait`` says there will be one)."""
        self._record(Usage(calls=1, retries=int(wait is not None)))
        if wait is not None:
            limiter = self.limiter
            if limiter is not None:  # the call waits holding no slot: its caller may admit another meanwhile
                limiter.rest(wait)
            logger.debug("LM call attempt %d failed (%s); retrying in %.2fs", attempt, type(exc).__name__, wait)

    def _lean_body(self, prompt, messages, kwargs) -> bytes | None:
        """The request body for the lean client, or None when the call needs DSPy's own path."""
        lean = self._lean_request(prompt, messages, kwargs)
        return lean[0] if lean is not None else None

    def _lean_request(self, prompt, messages, kwargs) -> tuple[bytes, list[dict], dict[str, Any]] | None:
        """(body, messages, the fields sent besides model and messages) for the lean client, or None when the
        call needs DSPy's own path."""
        settings = getattr(self, "_settings", None)
        if settings is None or self.model_type != "chat" or kwargs.get("cache", self.cache):
            return None
        if dspy.settings.send_stream is not None or "request" in kwargs or not self.http.usable:
            return None
        if messages is None:
            if not isinstance(prompt, str):
                return None
            messages = [{"role": "user", "content": prompt}]
        for m in messages:
            if not isinstance(m, dict) or not isinstance(m.get("content"), str) or len(m) != 2:
                return None
        merged = {**self.kwargs, **kwargs}
        if any(k in _DSPY_ONLY for k in merged if merged[k] is not None):
            return None
        parts = ['"model":' + json_dumps(settings.model), '"messages":' + json_dumps(messages)]
        sent: dict[str, Any] = {}
        try:
            for key, value in merged.items():
                if key in _NOT_SENT or value is None:
                    continue
                if key == "response_format":
                    parts.append('"response_format":' + response_format_json(value))
                else:
                    parts.append(json_dumps(key) + ":" + json_dumps(value))
                sent[key] = value
        except (TypeError, ValueError):
            return None  # something only DSPy knows how to send
        return ("{" + ",".join(parts) + "}").encode("utf-8"), messages, sent

    def _outputs(self, answer: dict[str, Any], kwargs, cached: bool = False) -> list:
        """DSPy's outputs of a chat answer; counts the call (``cached``: counts a cache hit, nothing paid)."""
        if not cached:
            usage = answer.get("usage") or {}
            self._record(Usage(calls=1, prompt_tokens=int(usage.get("prompt_tokens") or 0),
                               completion_tokens=int(usage.get("completion_tokens") or 0)), usage)
        outputs = []
        for choice in answer["choices"]:
            message = choice.get("message") or {}
            output = {"text": message.get("content")}
            if message.get("reasoning_content"):
                output["reasoning_content"] = message["reasoning_content"]
            if message.get("tool_calls"):
                output["tool_calls"] = message["tool_calls"]
            if kwargs.get("logprobs") or self.kwargs.get("logprobs"):
                output["logprobs"] = choice.get("logprobs")
            if choice.get("finish_reason") == "length":
                _dspy_logger.warning("LM response was truncated; increase max_tokens or inspect history.")
            outputs.append(output)
        if cached:  # counted once the entry proved to be an answer (else it is a miss, and the call is sent)
            self._record(Usage(cached=1))
        if all(len(o) == 1 for o in outputs):
            return [o["text"] for o in outputs]
        return outputs

    def _record(self, usage: Usage, raw: dict | None = None) -> None:
        settings = getattr(self, "_settings", None)
        if settings is not None and (usage.prompt_tokens or usage.completion_tokens):
            usage.cost_usd = call_cost(usage.prompt_tokens, usage.completion_tokens,
                                       price_in=settings.price_in, price_out=settings.price_out)
        record(usage, getattr(self, "_endpoint", self.model))
        if raw is not None:
            tracker = dspy.settings.usage_tracker
            if tracker:
                tracker.add_usage(self.model, dict(raw))
            if self.usage_hook is not None:
                self.usage_hook(dict(raw))

    def update_history(self, entry) -> None:  # noqa: D102 - see class docstring
        # Only calls that went through DSPy's own client get here (tokens; the attempt was counted already).
        usage = entry.get("usage") or {}
        self._record(Usage(prompt_tokens=int(usage.get("prompt_tokens") or 0),
                           completion_tokens=int(usage.get("completion_tokens") or 0)))
        if self.usage_hook is not None:
            self.usage_hook(usage)


# One encoder for every request body: json.dumps with these arguments builds a new one per call.
_ENCODER = json.JSONEncoder(ensure_ascii=False, separators=(",", ":"))


def json_dumps(value: Any) -> str:
    """``json.dumps(value, ensure_ascii=False, separators=(",", ":"))``, the same text."""
    return _ENCODER.encode(value)


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
        note="OpenAI-compatible endpoint declared by dspy_ray.client.lm",
    )
    register_provider(definition, supports=ModelSupport(response_schema=settings.json_schema), replace=True)
    return pid


def build_lm(settings: EndpointSettings, **overrides) -> ResilientLM:
    """The one way this project builds an LM: batch stages, optimizers and Serve replicas call it."""
    if not settings.base_url:
        raise ValueError("no LM endpoint configured: open it with dspy_ray.endpoints.fallback.open_endpoints first")
    pid = register_endpoint(settings)
    api_key = settings.api_key.get_secret_value() or "unused"
    lm = ResilientLM(
        f"{pid}/{settings.model}",
        api_base=settings.base_url,
        api_key=api_key,
        temperature=settings.temperature,
        max_tokens=settings.max_tokens,
        timeout=settings.timeout_s,
        num_retries=0,  # ResilientLM owns retries; two layers would multiply attempts
        cache=False,
        **overrides,
    )
    return lm.bind(settings)

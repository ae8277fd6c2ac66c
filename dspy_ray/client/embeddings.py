"""Embed texts through an OpenAI-compatible ``POST /v1/embeddings`` endpoint (role ``EMBED``).

    >>> client = EmbeddingClient(EndpointSettings(base_url="http://127.0.0.1:8001/v1", model="m"))  # doctest: +SKIP
    >>> result = await client.aembed(["Station 7 is in Kettle Bay", ""], kind="passage")         # doctest: +SKIP
    >>> result.vectors.shape, result.errors                                                          # doctest: +SKIP
    ((2, 256), [None, 'empty text: nothing to embed'])
    >>> client.embed_queries(["where is station 7?"]).shape                                          # doctest: +SKIP
    (1, 256)

What one call does with ``texts``:

* puts ``settings.query_prefix`` / ``settings.passage_prefix`` before each text
  (e5-style models want ``"query: "`` / ``"passage: "``);
* cuts them into requests of ``settings.batch_size`` inputs, each sent holding one of the
  endpoint's slots: the adaptive limit of :mod:`dspy_ray.client.limiter`, one per endpoint
  (base URL + model), shared by every caller of it in the process and, with Ray, in the job,
  never above ``settings.max_in_flight``; a 429 / 503 answer tells it the endpoint is full.
  ``max_in_flight`` caps one client's requests below that (per event loop: an actor's budget);
* retries each request by :mod:`dspy_ray.client.retry`, the policy LM calls use too:
  429 / 5xx / timeouts / broken connections, exponential backoff with jitter, never
  sooner than ``Retry-After``, at most ``settings.max_attempts`` attempts; a request
  waiting to retry holds no slot;
* a request rejected as bad (400/413/422) is split in halves until the input at
  fault is found, so one over-long passage fails alone;
* returns float32 vectors, L2-normalised, and one error (or None) per input.

Errors are data for batch use (:class:`EmbedResult`); only misconfiguration
(401/403 auth, 404 unknown route or model, an unreachable host at
:meth:`EmbeddingClient.probe`) raises :class:`EmbeddingConfigError`, since
every input would fail the same way.  The API key goes in the Authorization
header only; messages name the base URL without credentials.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import logging
import threading
import weakref
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass

import httpx
import numpy as np

from dspy_ray.client.limiter import EndpointLimiter, endpoint_limiter
from dspy_ray.client.retry import RetryPolicy, acall_with_retries, parse_retry_after, policy_for
from dspy_ray.endpoints.settings import EndpointSettings, redact_url
from dspy_ray.util.cli import EXIT_USAGE

logger = logging.getLogger(__name__)

KINDS = ("query", "passage")
# A request the endpoint calls bad may hold one bad input (too long, empty): split it to find that input.
SPLITTABLE_STATUS = frozenset({400, 413, 422})
FATAL_STATUS = frozenset({401, 403, 404})


class EmbeddingConfigError(RuntimeError):
    """The endpoint cannot be used as configured (auth, base URL, model): every input would fail."""
    exit_code = EXIT_USAGE  # what a command line exits with (dspy_ray.util.cli)


class EmbeddingRequestError(Exception):
    """One ``/v1/embeddings`` request failed.

    ``status`` and ``retry_after`` tell :mod:`dspy_ray.client.retry` whether and when to try again, and
    the endpoint's limiter (:func:`dspy_ray.client.limiter.is_overload`) whether it is full.
    """

    def __init__(self, message: str, status: int | None = None, retry_after: float | None = None):
        super().__init__(message)
        self.status, self.retry_after = status, retry_after


@dataclass
class EmbedResult:
    """One call's output: ``vectors[i]`` is input i's unit vector (zeros when ``errors[i]`` is set)."""

    vectors: np.ndarray
    errors: list[str | None]

    @property
    def ok(self) -> np.ndarray:
        return np.array([e is None for e in self.errors], dtype=bool)

    @property
    def failed(self) -> int:
        return sum(e is not None for e in self.errors)


def normalize(vectors: np.ndarray) -> np.ndarray:
    """Rows scaled to unit L2 norm (all-zero rows stay zero), as float32."""
    vectors = np.asarray(vectors, dtype=np.float32)
    norms = np.linalg.norm(vectors, axis=1, keepdims=True)
    return vectors / np.where(norms > 0, norms, 1.0)


class EmbeddingClient:
    """Embeds lists of texts; one per actor or retriever (it holds a connection pool).

    ``max_in_flight``: at most this many requests of this client at once (per event loop), below
    the endpoint's shared limit; None: the endpoint's limiter alone decides.  ``transport`` (an
    ``httpx.AsyncBaseTransport``) and ``sleep`` are injectable, so tests drive the client without
    a server and check backoff without waiting.
    """

    def __init__(
        self,
        settings: EndpointSettings,
        *,
        max_in_flight: int | None = None,
        transport: httpx.AsyncBaseTransport | None = None,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
    ):
        if not settings.base_url:
            raise EmbeddingConfigError("no embedding endpoint configured (EMBED_BASE_URL): open it with "
                                       "dspy_ray.endpoints.fallback.open_endpoints(embed=...) first")
        self.settings = settings
        self.max_in_flight = max(1, max_in_flight) if max_in_flight else None
        self.retry_policy: RetryPolicy = policy_for(settings)
        # The endpoint's adaptive limit, shared with every other caller of it (made here, not on the event
        # loop: with Ray it joins the job's coordinator, a blocking call).
        self.limiter: EndpointLimiter = endpoint_limiter(settings)
        self.url = settings.base_url.rstrip("/") + "/embeddings"
        self.where = redact_url(self.url)
        self.dim: int | None = None
        self.requests = 0  # requests sent, retries included
        self.retries = 0
        self._transport, self._sleep = transport, sleep
        self._format = "base64"  # 4 bytes a number instead of ~20 of JSON text; "float" if the endpoint refuses
        # An HTTP client (and the cap's semaphore) belong to one event loop: one pair per loop that uses this
        # client (a Ray actor's loop for aembed, the background loop for the synchronous calls).
        self._per_loop: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
        self._sync_loop: asyncio.AbstractEventLoop | None = None
        self._sync_lock = threading.Lock()

    # -- public ------------------------------------------------------------------

    def prefixed(self, texts: Sequence[str], kind: str) -> list[str]:
        if kind not in KINDS:
            raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
        prefix = self.settings.query_prefix if kind == "query" else self.settings.passage_prefix
        return [prefix + t for t in texts]

    async def aembed(self, texts: Sequence[str], kind: str = "passage") -> EmbedResult:
        """Embed ``texts`` (prefixed for ``kind``), many requests at once; errors per input, never raised."""
        inputs = self.prefixed(texts, kind)
        errors: list[str | None] = [None] * len(inputs)
        vectors: list[np.ndarray | None] = [None] * len(inputs)
        todo = []
        for i, (raw, text) in enumerate(zip(texts, inputs)):
            if not isinstance(raw, str) or not raw.strip():
                errors[i] = "empty text: nothing to embed"
            else:
                todo.append(i)
        size = self.settings.batch_size
        batches = [todo[j:j + size] for j in range(0, len(todo), size)]
        results = await asyncio.gather(*(self._embed_batch([inputs[i] for i in batch]) for batch in batches))
        for batch, outcome in zip(batches, results):
            for i, value in zip(batch, outcome):
                if isinstance(value, str):
                    errors[i] = value
                else:
                    vectors[i] = value
        dim = self.dim or 0
        out = np.zeros((len(inputs), dim), dtype=np.float32)
        for i, v in enumerate(vectors):
            if v is not None:
                out[i] = v
        return EmbedResult(normalize(out), errors)

    def embed(self, texts: Sequence[str], kind: str = "passage") -> EmbedResult:
        """:meth:`aembed` from synchronous code (any thread), on this client's own event loop thread."""
        return asyncio.run_coroutine_threadsafe(self.aembed(texts, kind), self._background_loop()).result()

    def embed_queries(self, texts: Sequence[str]) -> np.ndarray:
        """Query vectors for the retriever; raises :class:`EmbeddingRequestError` if any query fails."""
        result = self.embed(texts, kind="query")
        bad = [(i, e) for i, e in enumerate(result.errors) if e]
        if bad:
            i, error = bad[0]
            raise EmbeddingRequestError(f"query {i} could not be embedded: {error}")
        return result.vectors

    def probe(self) -> int:
        """Embed one text, so a bad URL, key or model fails now, with a clear message; returns the dimension."""
        try:
            vectors = asyncio.run_coroutine_threadsafe(self._post(["dimension probe"]),
                                                       self._background_loop()).result()
        except EmbeddingRequestError as exc:
            raise EmbeddingConfigError(f"embedding endpoint {self.where} (model {self.settings.model!r}) "
                                       f"does not answer: {exc}") from None
        return len(vectors[0])

    async def aclose(self) -> None:
        """Close the running loop's connections."""
        state = self._per_loop.pop(asyncio.get_running_loop(), None)
        if state is not None:
            await state[0].aclose()

    def close(self) -> None:
        """Release connections and the background loop (the client works again if used afterwards)."""
        with self._sync_lock:
            loop, self._sync_loop = self._sync_loop, None
        if loop is not None:
            asyncio.run_coroutine_threadsafe(self.aclose(), loop).result()
            loop.call_soon_threadsafe(loop.stop)

    # -- one batch ------------------------------------------------------------------

    async def _embed_batch(self, inputs: list[str]) -> list[np.ndarray | str]:
        """Vectors for one request's inputs, or an error string per input that still fails."""
        try:
            return list(await self._post(inputs))
        except EmbeddingRequestError as exc:
            if exc.status in SPLITTABLE_STATUS and len(inputs) > 1:
                half = len(inputs) // 2
                left, right = await asyncio.gather(self._embed_batch(inputs[:half]), self._embed_batch(inputs[half:]))
                return left + right
            return [f"embedding failed: {exc}"] * len(inputs)

    async def _post(self, inputs: list[str]) -> np.ndarray:
        """One request's vectors: an endpoint slot per attempt, :attr:`retry_policy` between attempts."""
        client = self._loop_state()[0]
        return await acall_with_retries(lambda: self._send(client, inputs), self.retry_policy, slot=self._slot,
                                        on_failure=self._note_failure, sleep=self._sleep)

    @contextlib.asynccontextmanager
    async def _slot(self):
        """One of the endpoint's slots, taken after this client's own cap (if any) lets the request go."""
        cap = self._loop_state()[1]
        if cap is None:
            async with self.limiter.aslot():
                yield
            return
        async with cap, self.limiter.aslot():
            yield

    def _note_failure(self, attempt: int, exc: BaseException, wait: float | None) -> None:
        """Count a retry; a final timeout or broken connection is reported as an :class:`EmbeddingRequestError`."""
        if wait is not None:
            self.retries += 1
            logger.debug("embedding request attempt %d failed (%s); retrying in %.2fs", attempt, exc, wait)
        elif isinstance(exc, httpx.TransportError):
            kind = "timed out" if isinstance(exc, httpx.TimeoutException) else "connection failed"
            raise EmbeddingRequestError(f"{kind} after {attempt} attempt(s) ({type(exc).__name__}) "
                                        f"at {self.where}") from None

    async def _send(self, client: httpx.AsyncClient, inputs: list[str]) -> np.ndarray:
        body = {"model": self.settings.model, "input": inputs, "encoding_format": self._format}
        self.requests += 1
        response = await client.post(self.url, json=body)
        if response.status_code >= 400:
            message = _error_message(response)
            if response.status_code in SPLITTABLE_STATUS and self._format == "base64" and "encoding" in message:
                self._format = "float"  # an endpoint without base64 support: ask again in JSON numbers
                return await self._send(client, inputs)
            self._raise_for(response.status_code, message, parse_retry_after(response.headers))
        return self._parse(response, len(inputs))

    def _raise_for(self, status: int, message: str, retry_after: float | None) -> None:
        if status in FATAL_STATUS:
            hint = ("check EMBED_API_KEY" if status in (401, 403)
                    else f"check EMBED_BASE_URL (ends in /v1) and EMBED_MODEL ({self.settings.model!r})")
            raise EmbeddingConfigError(f"embedding endpoint {self.where} answered HTTP {status} ({message}): {hint}")
        raise EmbeddingRequestError(f"HTTP {status}: {message}", status=status, retry_after=retry_after)

    def _parse(self, response: httpx.Response, n: int) -> np.ndarray:
        """The response's vectors in input order; a malformed answer is a 502 (retried like a bad gateway)."""
        try:
            data = response.json()["data"]
            rows = sorted(data, key=lambda d: d.get("index", 0))
            if len(rows) != n:
                raise ValueError(f"{len(rows)} embeddings for {n} inputs")
            vectors = np.stack([_vector(row["embedding"]) for row in rows])
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            raise EmbeddingRequestError(f"malformed response ({exc})", status=502) from None
        if self.dim is None:
            self.dim = vectors.shape[1]
        elif vectors.shape[1] != self.dim:
            raise EmbeddingRequestError(f"the endpoint changed dimension ({vectors.shape[1]}, was {self.dim})",
                                        status=502)
        return normalize(vectors)

    # -- event loops -----------------------------------------------------------------

    def _loop_state(self) -> tuple[httpx.AsyncClient, asyncio.Semaphore | None]:
        """The running loop's HTTP client and this client's cap (None: no cap of its own)."""
        loop = asyncio.get_running_loop()
        state = self._per_loop.get(loop)
        if state is None:
            key = self.settings.api_key.get_secret_value()
            headers = {"Authorization": f"Bearer {key}"} if key else {}
            # As many connections as requests may be in flight: one waiting for a connection while it holds
            # an endpoint slot would read to the limiter as the endpoint's own latency.
            pool = self.max_in_flight or self.settings.max_in_flight
            limits = httpx.Limits(max_connections=pool, max_keepalive_connections=pool)
            client = httpx.AsyncClient(headers=headers, timeout=self.settings.timeout_s, limits=limits,
                                       transport=self._transport)
            cap = asyncio.Semaphore(self.max_in_flight) if self.max_in_flight else None
            state = self._per_loop[loop] = (client, cap)
        return state

    def _background_loop(self) -> asyncio.AbstractEventLoop:
        with self._sync_lock:
            if self._sync_loop is None:
                loop = asyncio.new_event_loop()
                threading.Thread(target=loop.run_forever, name="embedding-client", daemon=True).start()
                self._sync_loop = loop
            return self._sync_loop


def _vector(value) -> np.ndarray:
    if isinstance(value, str):
        return np.frombuffer(base64.b64decode(value), dtype="<f4")
    return np.asarray(value, dtype=np.float32)


def _error_message(response: httpx.Response) -> str:
    try:
        error = response.json().get("error")
        message = error.get("message") if isinstance(error, dict) else error
    except ValueError:
        message = None
    return " ".join(str(message or response.text or response.reason_phrase).split())[:300]

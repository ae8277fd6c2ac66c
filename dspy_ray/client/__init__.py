"""Calling an OpenAI-compatible endpoint: one client family for chat and embeddings.

* :mod:`dspy_ray.client.lm` - ``build_lm``: a DSPy LM with retries, the lean chat path and usage;
* :mod:`dspy_ray.client.chat_http` - the lean HTTP/1.1 chat transport (per-thread keep-alive);
* :mod:`dspy_ray.client.embeddings` - the ``/v1/embeddings`` client (httpx, per event loop);
* :mod:`dspy_ray.client.retry` - the one retry policy (what is retried, backoff, ``Retry-After``)
  and its sync / async loops, used by chat and embeddings alike;
* :mod:`dspy_ray.client.limiter` - the adaptive in-flight limit per endpoint, shared across a job by
  chat and embedding requests alike;
* :mod:`dspy_ray.client.usage` - calls, retries, tokens and cost per call, row and process;
* :mod:`dspy_ray.client.json_adapter` - schema-constrained JSON derived from signatures.

May import :mod:`dspy_ray.endpoints` and :mod:`dspy_ray.util`.
"""

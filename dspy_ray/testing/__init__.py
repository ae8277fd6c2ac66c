"""Test doubles for the framework's users and its own tests and benchmarks.

* :mod:`dspy_ray.testing.fake_llm` - a fault-injecting fake OpenAI-compatible endpoint
  (chat and embeddings: latency, 429 with Retry-After, 5xx, hangs, malformed answers, a capacity).

Imports nothing else of ``dspy_ray``; runs as ``python -m dspy_ray.testing.fake_llm``.
"""

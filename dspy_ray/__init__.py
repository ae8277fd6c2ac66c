"""dspy-ray's runtime: what batch (``stages``, ``pipelines``), ``optimize`` and ``serve`` share.

Layering (``tests/test_layout.py`` checks it): ``programs`` (pure DSPy) <- ``dspy_ray`` <- ``stages``
<- ``tasks`` <- ``pipelines`` / ``optimize`` / ``serve``.  Nothing here imports upward.

The rooms, each importing only the ones listed before it:

* :mod:`dspy_ray.util` - local paths and object-store URIs, the repository root, CLI pieces, ``init_ray``;
* :mod:`dspy_ray.endpoints` - endpoint settings and their resolution, discovery on a cluster, the
  model catalog, and the local model servers (:mod:`dspy_ray.endpoints.local`);
* :mod:`dspy_ray.client` - calling an endpoint: the chat LM, the embeddings client, the adaptive
  limiter and retry policy both share, usage accounting, the JSON adapter;
* :mod:`dspy_ray.execution` - a program's life: loading, artifacts, one call with Refine, metrics;
* :mod:`dspy_ray.retrieval` - passages, FAISS and BM25 indexes, the retriever;
* :mod:`dspy_ray.testing` - a fault-injecting fake OpenAI-compatible endpoint for tests and benchmarks.

Entry points (the CLIs, benchmarks, ``tests/conftest.py``) import from this package before anything imports
litellm, so the setting below is in place for every process.
"""

import os

# Before litellm is first imported (dspy imports it): no network lookups of model prices.
os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")

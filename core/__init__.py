"""The runtime core shared by batch (``stages``, ``pipelines``), ``optimize`` and ``serve``.

Layering: ``programs`` (pure DSPy) <- ``core`` <- ``stages`` <- ``tasks`` <-
``pipelines`` / ``optimize`` / ``serve``; nothing imports upward.

* :mod:`core.settings` - endpoint settings and their resolution (flags > env > .env);
* :mod:`core.endpoints` - discovery and the embedded defaults; :mod:`core.embedded`;
* :mod:`core.lm` - ``build_lm`` with retries; :mod:`core.json_adapter` - schema-constrained JSON;
* :mod:`core.runner` - one program call with Refine and errors as data (:mod:`core.refine`);
* :mod:`core.loading` - ``load_program``; :mod:`core.artifacts` - the artifact registry;
* :mod:`core.scoring` - task metrics and judges; :mod:`core.fs` - local paths and object-store URIs.
"""

"""Small helpers with no knowledge of models or programs; any room may import them.

* :mod:`dspy_ray.util.fs` - local paths and object-store URIs read and written the same way;
* :mod:`dspy_ray.util.paths` - the repository root, for shipped data and artifacts;
* :mod:`dspy_ray.util.cli` - what every command line shares (flags, task parsing, exit codes);
* :mod:`dspy_ray.util.ray_runtime` - ``init_ray``: attach to a cluster or start a local one;
* :mod:`dspy_ray.util.http` - small GET helpers for health checks and discovery (httpx);
* :mod:`dspy_ray.util.gc_tuning` - ``settle_heap``: a long-lived worker's garbage collector, set once after its setup.

Imports nothing else of ``dspy_ray``.
"""

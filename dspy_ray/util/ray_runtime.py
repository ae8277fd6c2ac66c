"""Connect to Ray the same way from every entry point.

    >>> init_ray()        # doctest: +SKIP

Under ``ray job submit`` (``RAY_ADDRESS`` set) this attaches to that cluster;
otherwise it starts a local one.  Endpoint settings (keys included) never
travel as ``runtime_env`` ``env_vars``, which Ray writes to its logs: they go
to actors and replicas as constructor arguments (:mod:`dspy_ray.endpoints.settings`).

The one variable set there is ``PYTHONPATH`` (folder paths, no secret): your
own task and program modules (outside this package) must import on the
workers too, so the folders on this process's ``PYTHONPATH`` and the working
directory go in front of the node's own.  That is enough on a single machine
or a cluster with a shared filesystem; otherwise ship them with ``ray job
submit --working-dir`` (or ``runtime_env`` ``py_modules``).

Not the job's ``code_search_path``: a job with one does not publish the actor
classes it can import to the cluster, so a later job without one (a ``ray job
submit``, a plain script) cannot get a handle to a detached actor the first
job created (Ray Data's actor-location tracker, Serve's controller); Ray then
fails in ``get_actor`` (and ``serve.status()``) with "Expected str or bytes, got
<class 'NoneType'>".
"""

from __future__ import annotations

import os


def user_code_path() -> list[str]:
    """Folders user code may live in: ``PYTHONPATH`` entries and the working directory."""
    entries = [*os.environ.get("PYTHONPATH", "").split(os.pathsep), os.getcwd()]
    seen: list[str] = []
    for entry in entries:
        path = os.path.abspath(entry) if entry else ""
        if path and os.path.isdir(path) and path not in seen:
            seen.append(path)
    return seen


def init_ray(**kwargs) -> None:
    import ray

    if ray.is_initialized():
        return
    if not os.environ.get("RAY_JOB_ID"):  # under ray job submit, the job's runtime_env is the submitter's
        runtime_env = dict(kwargs.pop("runtime_env", None) or {})
        env_vars = dict(runtime_env.get("env_vars") or {})
        env_vars.setdefault("PYTHONPATH", os.pathsep.join([*user_code_path(), "${PYTHONPATH}"]))
        kwargs["runtime_env"] = {**runtime_env, "env_vars": env_vars}
    ray.init(log_to_driver=kwargs.pop("log_to_driver", True), **kwargs)

"""Connect to Ray the same way from every entry point.

    >>> init_ray()        # doctest: +SKIP

Under ``ray job submit`` (``RAY_ADDRESS`` set) this attaches to that cluster;
otherwise it starts a local one.  No ``runtime_env`` ``env_vars`` are set:
Ray writes those to its logs, and endpoint settings (keys included) travel
to actors and replicas as constructor arguments instead (:mod:`dspy_ray.endpoints.settings`).

Your own task and program modules (outside this package) must import on the
workers too: the folders on this process's ``PYTHONPATH`` and the working
directory are given to the job as its code search path, which is enough on a
single machine or a cluster with a shared filesystem; otherwise ship them with
``ray job submit --working-dir`` (or ``runtime_env`` ``py_modules``).
"""

from __future__ import annotations

import os


def code_search_path() -> list[str]:
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
    if "job_config" not in kwargs and not os.environ.get("RAY_JOB_ID"):
        kwargs["job_config"] = ray.job_config.JobConfig(code_search_path=code_search_path())
    ray.init(log_to_driver=kwargs.pop("log_to_driver", True), **kwargs)

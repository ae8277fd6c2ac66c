"""The task registry: every task the framework can run, by name.

Built-in tasks are the modules of this package (each holds a ``TASK``); your own
is any importable module, named by its import path::

    >>> sorted(task_names())                                  # doctest: +SKIP
    ['rag', 'triage']
    >>> get_task("triage").program.name                       # doctest: +SKIP
    'triage'
    >>> get_task("mypackage.sentiment")                       # doctest: +SKIP
    >>> get_task("mypackage.tasks:SENTIMENT")                 # doctest: +SKIP

Batch (``python -m pipelines``), optimize and serve (``--task``)
and the drift monitor all look tasks up here, so adding a task is one task
file, a program file and data: nothing else changes.
"""

from __future__ import annotations

import importlib
import pkgutil

from tasks.base import CliDefaults, Task, TaskData
from dspy_ray.util.cli import EXIT_USAGE

__all__ = ["CliDefaults", "Task", "TaskData", "TaskError", "get_task", "task_names"]

_NOT_TASKS = {"base", "examples"}  # helpers, not tasks


class TaskError(ValueError):
    """A task name that resolves to nothing (the message lists what exists)."""
    exit_code = EXIT_USAGE  # what a command line exits with (dspy_ray.util.cli)


def task_names() -> list[str]:
    """Names of the built-in tasks (modules of this package)."""
    return sorted(m.name for m in pkgutil.iter_modules(__path__) if m.name not in _NOT_TASKS and not m.ispkg)


def get_task(ref: str | Task) -> Task:
    """A task by built-in name, or an importable module (its ``TASK``), or ``module:ATTR``."""
    if isinstance(ref, Task):
        return ref
    module_name, _, attr = ref.partition(":")
    if module_name in task_names():
        module_name = f"{__name__}.{module_name}"
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        if exc.name == module_name.split(".")[0] and "." not in module_name:
            raise TaskError(f"unknown task {ref!r}; built-in tasks: {', '.join(task_names())} "
                            f"(or give your own as 'package.module[:ATTR]')") from None
        raise TaskError(f"task {ref!r}: cannot import {module_name} ({exc})") from None
    task = getattr(module, attr or "TASK", None)
    if not isinstance(task, Task):
        raise TaskError(f"task {ref!r}: {module_name} has no Task named {attr or 'TASK'}")
    return task

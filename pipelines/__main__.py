"""``python -m pipelines --task TASK --input ... --output ...``: any registered task's batch pipeline.

TASK is a built-in task name (``python -m pipelines --list``) or your own task
module (``package.module`` or ``package.module:ATTR``); ``--help`` with it shows
that task's flags.  ``python -m pipelines TASK ...`` (the task first, without
``--task``) and ``python -m pipelines.<task>`` for a built-in one are the same.
"""

from __future__ import annotations

import sys

from dspy_ray.util.cli import EXIT_OK, EXIT_USAGE, peek_task
from pipelines.cli import main as task_main
from tasks import task_names


def task_argv(argv: list[str]) -> list[str]:
    """``argv`` with the task as ``--task``: ``triage --input x`` -> ``--task triage --input x``."""
    return ["--task", *argv] if argv and not argv[0].startswith("-") else list(argv)


def main(argv: list[str] | None = None) -> int:
    argv = task_argv(sys.argv[1:] if argv is None else argv)
    if peek_task(argv) is None and (not argv or {"-h", "--help", "--list"} & set(argv)):
        print(__doc__.strip() + "\n\nbuilt-in tasks: " + ", ".join(task_names()))
        return EXIT_OK if argv else EXIT_USAGE
    return task_main(None, argv, prog="python -m pipelines")


if __name__ == "__main__":
    sys.exit(main())

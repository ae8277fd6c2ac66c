"""``python -m pipelines <task> --input ... --output ...``: any registered task's batch pipeline.

``<task>`` is a built-in task name (``python -m pipelines --list``) or your own
task module (``package.module`` or ``package.module:ATTR``); ``--help`` after it
shows that task's flags.
"""

from __future__ import annotations

import sys

from pipelines.cli import main as task_main
from tasks import task_names


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "--list"):
        print(__doc__.strip() + "\n\nbuilt-in tasks: " + ", ".join(task_names()))
        return 0 if argv else 2
    return task_main(argv[0], argv[1:], prog=f"python -m pipelines {argv[0]}")


if __name__ == "__main__":
    sys.exit(main())

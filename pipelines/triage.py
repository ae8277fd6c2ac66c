"""``python -m pipelines.triage``: the triage task's batch pipeline (the same as ``python -m pipelines --task triage``).

The task itself (programs, stages, data, metric) is declared in ``tasks/triage.py``.
"""

import sys

from pipelines.cli import main

if __name__ == "__main__":
    sys.exit(main("triage", prog="python -m pipelines.triage"))

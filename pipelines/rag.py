"""``python -m pipelines.rag --input questions.jsonl --index DIR --output OUT``: answer questions from an index.

The same as ``python -m pipelines --task rag``; the task (program, metric, data) is declared in ``tasks/rag.py``.
Output: every input column plus ``answer``, ``answerable``, ``citations`` (an Arrow ``list<string>``),
``cited`` (id, source and snippet of each cited passage), ``retrieved_ids`` and ``errors``.
"""

import sys

from pipelines.cli import main

if __name__ == "__main__":
    sys.exit(main("rag", prog="python -m pipelines.rag"))

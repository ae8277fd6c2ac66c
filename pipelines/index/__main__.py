"""``python -m pipelines.index ...``: :func:`pipelines.index.cli.main`."""

import sys

from pipelines.index.cli import main

if __name__ == "__main__":
    sys.exit(main())

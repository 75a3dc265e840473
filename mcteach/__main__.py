"""``python -m mcteach VERB ...``: the same command line as ``mcteach`` (``mcteach.cli``)."""

import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main())

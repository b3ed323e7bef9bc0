"""``python -m skpatch``: the command line (see :mod:`skpatch.cli`)."""

import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main())

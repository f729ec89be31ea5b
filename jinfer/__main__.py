"""`python -m jinfer <command> ...`: the same as the `jinfer` console script."""

import sys

from jinfer.cli import main

if __name__ == "__main__":
  sys.exit(main())

"""`python -m rtdetr.cli ...` (what torchrun runs for distributed training)."""

import sys

from . import main

if __name__ == "__main__":  # training processes started by `engine.launch` import this module again
    sys.exit(main())

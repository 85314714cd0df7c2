"""`python -m rtdetr.cli ...` (what torchrun runs for distributed training)."""

import sys

from . import main

sys.exit(main())

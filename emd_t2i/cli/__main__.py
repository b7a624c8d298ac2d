"""`python -m emd_t2i.cli`: what `accelerate launch -m emd_t2i.cli` and torchrun run."""

import sys

from emd_t2i.cli import main

sys.exit(main())

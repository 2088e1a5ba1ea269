"""`python -m ila`: the command line (also under `torchrun -m ila` and `accelerate launch -m ila`)."""

import sys

from ila.cli import main

sys.exit(main())

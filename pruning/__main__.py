"""``python -m pruning ARGS`` is ``imprune ARGS`` (what ``accelerate launch -m pruning score ...`` runs)."""

import sys

from pruning.cli import main

sys.exit(main())

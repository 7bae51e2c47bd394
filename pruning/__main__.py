"""``python -m pruning ARGS`` is ``imprune ARGS`` (what ``accelerate launch -m pruning score ...`` runs)."""

import sys

from .cli import main

sys.exit(main())

"""The command line, the thinnest layer: the registry and ``main`` (``core``) and one module per command
group. Only modules in here import ``pruning.cli``; they may import everything else.
"""

from pruning.cli.core import main

__all__ = ["main"]

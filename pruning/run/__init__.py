"""The run room: recipes (``recipes`` + the shipped ``recipes/*.yaml``), the staged before/after pipeline
(``pipeline``) and the HTML report (``report``). May import everything in ``importance`` and ``pruning``
except ``pruning.cli``.
"""

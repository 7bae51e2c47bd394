"""The methods room: the registry behind ``imprune prune --method`` (``registry``), unstructured and N:M
(``unstructured``), heads / channels / width / layers (``structured``), the shape surgery that removes them
for real (``surgery``) and per-layer ratios under a budget (``allocate``). May import: ``importance``,
``pruning.second_order``; never ``pruning.cli`` or ``pruning.run``.
"""

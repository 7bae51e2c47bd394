"""The quantization room: bit plans under a budget (``bits``) and applying them, packed with optimum-quanto
(``quantize``). May import: ``importance``, ``pruning.second_order``, ``pruning.methods.allocate``.
"""

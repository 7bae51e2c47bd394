"""The quantization room: bit plans under a budget (``bits``) and applying them, packed with optimum-quanto
(``quantize``); GPTQ over a model (``gptq_model``), the embedding / head tables (``embeddings``), the
compressed-tensors writer (``ct_format``) and the width-estimate check (``estimate_check``). May import:
``importance``, ``pruning.second_order``, ``pruning.methods.allocate``, ``pruning.methods.masks``, ``pruning.eval``.
"""

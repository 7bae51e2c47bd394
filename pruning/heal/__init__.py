"""The heal room: recovery after pruning by distillation from the original model (``train``), with LoRA
adapters or the kept weights (``adapters``), trainable capacity placed by measured damage (``placement``),
student / teacher checks and the healed record (``lineage``), the settings (``config``). May import:
``importance``, ``pruning.methods`` (flag declarations), ``pruning.eval``; never ``pruning.cli`` or
``pruning.run``.
"""

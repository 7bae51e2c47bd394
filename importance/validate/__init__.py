"""The proof room: measured removal of every group (``ablation``), how well each scorer predicts it
(``faithfulness``), the validation folder written from both (``folder``) and whether per-task head maps are
task-specific (``task_maps``). May import anything in ``importance``; never ``pruning``.
"""

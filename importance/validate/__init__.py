"""The proof room: measured removal of every group (``ablation``), how well each scorer predicts it
(``faithfulness``) and the validation folder written from both (``folder``). May import anything in
``importance``; never ``pruning``.
"""

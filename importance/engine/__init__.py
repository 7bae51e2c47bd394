"""The engine room: ONE hooked pass over the calibration batches (``collect``) into plain fp32 sums
(``stats``), the per-token loss (``objective``), the block-by-block runner (``blockwise``), offloaded weights
(``offload``) and data-parallel scoring (``distributed``). May import: ``importance.arch``, ``importance.data``,
``importance.store``, ``importance.errors``; it knows no scorer by name beyond what ``CollectConfig`` asks.
"""

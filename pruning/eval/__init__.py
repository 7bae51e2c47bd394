"""The evaluation room: token-level perplexity as ``shared/protocol.md`` defines it (``perplexity``), multiple-choice
accuracy on the probes and item lists (``tasks``), lm-evaluation-harness around the in-memory model (``harness``),
the causal check of per-task head maps (``causal``) and ``imprune probe`` as a function (``probe``). May
import: ``importance``.
"""

"""The evaluation room: token-level perplexity as ``shared/protocol.md`` defines it (``perplexity``). May
import: ``importance``.
"""

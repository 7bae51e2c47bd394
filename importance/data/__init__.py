"""The data room: ``--data`` specs -> token windows (``sources``), the built-in Austen corpus (``corpora``,
read by our own R lazy-load reader ``rdata``) and the generated task probes (``tasks``, ``task_words``).
May import: ``importance.errors``, ``importance.store``; never a model or a scorer.
"""

from importance.data.sources import Windows, load_data

__all__ = ["Windows", "load_data"]

"""The model room: a ``--model`` spec -> a loaded model and a tokenizer that fits it (``load``: built-in,
folders, GGUF, hub ids; ``tiny``: seeded random models of any architecture with a byte tokenizer), the checks
around loading (``checks``: damaged files, pickles, remote code, devices, missing or non-finite weights),
folders of structurally pruned models (``pruned``) and whether two artifacts describe one model
(``identity``). May import: ``importance.arch``, ``importance.store``, ``importance.table``, ``importance.errors``.
"""

from importance.models.load import LoadedModel, load_model, resolve_dtype

__all__ = ["LoadedModel", "load_model", "resolve_dtype"]

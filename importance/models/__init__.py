"""The model room: a ``--model`` spec -> a loaded model and a tokenizer that fits it (``load``: built-in,
random, folders, GGUF, hub ids) and folders of structurally pruned models (``pruned``). May import:
``importance.arch``, ``importance.store``, ``importance.errors``.
"""

from importance.models.load import LoadedModel, load_model, resolve_dtype

__all__ = ["LoadedModel", "load_model", "resolve_dtype"]

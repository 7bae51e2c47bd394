"""Loading folders of structurally pruned models (written by ``pruning.io.save_model``).

When the saved config cannot describe every shape (per-layer widths, or head counts that GPT-2/OPT/BERT/NeoX
configs tie to head_dim, or a block without its attention or its MLP), imprune.json holds ``layer_shapes``:
every parameter whose shape differs from what the config builds, each layer's (heads, KV heads), and the removed
sub-blocks (``skipped``: {layer: ['attn' | 'mlp']}). ``load_pruned(folder)`` rebuilds the model: the config's
model under empty weights, the removed sub-blocks replaced by their parameter-free stand-ins
(``importance.arch.branches``), the other parameters given their saved shapes, then transformers' own loading
(key conversions, tied weights) fills it.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from importance.errors import ImpruneError


def model_class(folder: Path) -> tuple[Any, type]:
    """The config of a saved model folder and the transformers class its ``architectures`` names (never remote code)."""
    import transformers

    config = transformers.AutoConfig.from_pretrained(folder)
    names = getattr(config, "architectures", None) or []
    cls = getattr(transformers, names[0], None) if names else None
    if cls is None:
        raise ImpruneError(f"'{folder}': config.json names no transformers model class ({names}); "
                           "it cannot be rebuilt without trust_remote_code, which imprune keeps off")
    return config, cls


def needs_load_pruned(folder: str | Path) -> bool:
    """True when ``folder``'s imprune.json records per-layer shapes its config cannot describe."""
    path = Path(folder) / "imprune.json"
    return path.is_file() and bool(json.loads(path.read_text()).get("layer_shapes"))


def load_pruned(folder: str | Path, dtype: torch.dtype | str = torch.float32, device: str = "cpu") -> Any:
    """Rebuild a structurally pruned model saved by ``save_model`` (any folder; plain ones load as usual).

    The model class from the config is built under empty (meta) weights, the recorded parameters get their
    saved shapes and each attention its head counts, then transformers loads the safetensors into it.
    """

    from importance.arch.branches import skip_recorded_
    from importance.arch.canonical import model_map
    from importance.arch.edit import resize_params_, set_attention_heads
    from importance.models.checks import check_loading_info
    from importance.models.load import resolve_dtype

    folder = Path(folder)
    if not (folder / "config.json").is_file():
        raise ImpruneError(f"'{folder}' has no config.json; pass a folder written by `imprune prune`")
    config, base = model_class(folder)
    torch_dtype = resolve_dtype(dtype)
    shapes = json.loads((folder / "imprune.json").read_text()).get("layer_shapes") \
        if (folder / "imprune.json").is_file() else None
    if not shapes:
        return base.from_pretrained(folder, dtype=torch_dtype).to(device).eval()

    def init(self: Any, config: Any, *args: Any, **kwargs: Any) -> None:
        base.__init__(self, config, *args, **kwargs)
        skip_recorded_(self, shapes.get("skipped") or {}, shapes.get("skipped_constants"))
        resize_params_(self, shapes["params"])
        mm = model_map(self)
        for block, (h, kv) in zip(mm.blocks, shapes["attention"], strict=True):
            if h:
                set_attention_heads(block, mm.spec, self.config, int(h), int(kv))

    pruned = type(base.__name__, (base,), {"__init__": init, "__module__": base.__module__})
    try:
        model, info = pruned.from_pretrained(folder, dtype=torch_dtype, output_loading_info=True)
    except (RuntimeError, ValueError) as err:
        raise ImpruneError(f"'{folder}': the saved weights do not fit the recorded shapes "
                           f"({str(err).splitlines()[0][:160]}); was the folder edited by hand?") from None
    check_loading_info(folder, info)  # a parameter without a saved weight would be silently random
    model.__class__ = base
    return model.to(device).eval()

"""Writing and reading pruned / quantized models as folders that plain ``transformers`` reloads.

``save_model`` writes ``save_pretrained`` weights (standard safetensors), the tokenizer, ``imprune.json``
(the recipe and what was changed) and a short model card, atomically: a folder either appears complete
or not at all.

Structurally pruned models (a record with ``shapes_changed``): when the saved config describes every shape
(uniform widths written into the config, removed layers) plain ``from_pretrained`` reloads the folder. When
it cannot (per-layer widths, or head counts that GPT-2/OPT/BERT/NeoX configs tie to head_dim), imprune.json
gets ``layer_shapes``: every parameter whose shape differs from what the config builds, plus each layer's
(heads, KV heads), and ``load_pruned(folder)`` rebuilds the model: the config's model under empty weights,
those parameters given their saved shapes, then transformers' own loading (key conversions, tied weights)
fills it.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from importance.errors import ImpruneError
from importance.meta import versions, write_json
from importance.models import LoadedModel
from importance.outputs import publish


def save_model(lm: LoadedModel, out: str | Path, record: dict[str, Any], card: str = "",
               overwrite: bool = False, files: dict[str, bytes] | None = None) -> Path:
    """Save ``lm`` with ``record`` as imprune.json and ``card`` as README.md into ``out`` (``files``: extra
    files such as figures, written inside the same atomic folder).

    A record with ``shapes_changed`` (structured pruning) gets ``layer_shapes`` where the config cannot
    describe the model's shapes, and ``reload`` says which loader rebuilds the folder. An existing ``out``
    is replaced (``overwrite``) only once the new folder is complete (``importance.outputs.publish``).
    """
    out = Path(out)
    shapes = layer_shapes(lm.model) if record.get("shapes_changed") else None
    record = {**record, "reload": "pruning.io.load_pruned" if shapes else "transformers.from_pretrained"}
    if shapes:
        record["layer_shapes"] = shapes
    with publish(out, overwrite=overwrite) as tmp:
        lm.model.save_pretrained(tmp)
        lm.tokenizer.save_pretrained(tmp)
        write_json(tmp / "imprune.json", {**record, "source_model": lm.describe(), "versions": versions()})
        (tmp / "README.md").write_text(card or _default_card(lm, record))
        for name, data in (files or {}).items():
            (tmp / name).write_bytes(data)
    return out


def _default_card(lm: LoadedModel, record: dict[str, Any]) -> str:
    lines = [f"# {lm.spec}, changed by imprune", "", f"Method: {record.get('method', '?')}.", ""]
    ppl = record.get("perplexity", {})
    if ppl.get("before") and ppl.get("after"):
        b, a = ppl["before"], ppl["after"]
        lines.append(f"Perplexity on {b.get('data')} ({b.get('windows')} x {b.get('seq_len')} tokens): "
                     f"{b['ppl']:.2f} before, {a['ppl']:.2f} after.")
    if record.get("layer_shapes"):
        lines += ["", "Layers have different widths (or head counts the config cannot hold): reload with "
                  "`pruning.io.load_pruned(folder)` or `importance.load_model(folder)`; plain `from_pretrained` "
                  "cannot rebuild these shapes. The full recipe is in `imprune.json`.", ""]
    else:
        lines += ["", "Reload with `transformers.AutoModelForCausalLM.from_pretrained(folder)`; the full recipe is "
                  "in `imprune.json`.", ""]
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------- pruned shapes

def layer_shapes(model: Any) -> dict[str, Any] | None:
    """What a folder needs beyond its config: parameters whose shape differs from what the config builds,
    and each layer's [query heads, KV heads]; None when plain ``from_pretrained`` rebuilds every shape."""
    from importance.arch import model_map

    from .surgery import config_shapes

    expected = config_shapes(model)
    differ = {n: list(p.shape) for n, p in model.named_parameters(remove_duplicate=False)
              if expected.get(n) != tuple(p.shape)}
    if not differ:
        return None
    return {"params": differ, "attention": [[b.n_heads, b.n_kv_heads] for b in model_map(model).blocks]}


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

    from importance.arch import model_map
    from importance.arch_edit import set_attention_heads
    from importance.model_checks import check_loading_info
    from importance.models import resolve_dtype

    from .surgery import resize_params_

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

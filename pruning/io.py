"""Writing and reading pruned / quantized models as folders that plain ``transformers`` reloads.

``save_model`` writes ``save_pretrained`` weights (standard safetensors), the tokenizer, ``imprune.json``
(the recipe and what was changed) and a short model card, atomically: a folder either appears complete
or not at all.

Structurally pruned models (a record with ``shapes_changed``): when the saved config describes every shape
(uniform widths written into the config, removed layers) plain ``from_pretrained`` reloads the folder. When
it cannot (per-layer widths, head counts that GPT-2/OPT/BERT/NeoX configs tie to head_dim, or blocks without
their attention or MLP), imprune.json gets ``layer_shapes``: every parameter whose shape differs from what the
config builds, each layer's (heads, KV heads) and the removed sub-blocks (``--method blocks``), and
``load_pruned(folder)`` rebuilds the model: the config's model under empty weights, the removed sub-blocks
replaced by their stand-ins, those parameters given their saved shapes, then transformers' own loading (key
conversions, tied weights) fills it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from importance.models.load import LoadedModel
from importance.store.meta import versions, write_json
from importance.store.outputs import publish


def save_model(lm: LoadedModel, out: str | Path, record: dict[str, Any], card: str = "",
               overwrite: bool = False, files: dict[str, bytes] | None = None,
               source: dict[str, Any] | None = None) -> Path:
    """Save ``lm`` with ``record`` as imprune.json and ``card`` as README.md into ``out`` (``files``: extra
    files such as figures, written inside the same atomic folder; ``source``: the lineage's dense model when
    ``lm`` was itself loaded from a pruned folder, default ``lm.describe()``).

    A record with ``shapes_changed`` (structured pruning) gets ``layer_shapes`` where the config cannot
    describe the model's shapes, and ``reload`` says which loader rebuilds the folder. An existing ``out``
    is replaced (``overwrite``) only once the new folder is complete (``importance.store.outputs.publish``).
    """
    out = Path(out)
    shapes = layer_shapes(lm.model) if record.get("shapes_changed") else None
    record = {**record, "reload": "importance.models.pruned.load_pruned" if shapes else "transformers.from_pretrained"}
    if shapes:
        record["layer_shapes"] = shapes
    with publish(out, overwrite=overwrite) as tmp:
        lm.model.save_pretrained(tmp)
        lm.tokenizer.save_pretrained(tmp)
        write_json(tmp / "imprune.json", {**record, "source_model": source or lm.describe(), "versions": versions()})
        (tmp / "README.md").write_text(card or _default_card(lm, record))
        for name, data in (files or {}).items():
            (tmp / name).write_bytes(data)
    return out


def _default_card(lm: LoadedModel, record: dict[str, Any]) -> str:
    lines = [f"# {lm.spec}, changed by imprune", "", f"Method: {record.get('method', '?')}.", ""]
    ppl = record.get("perplexity") or {}
    b, a = ppl.get("before") or ppl.get("pruned"), ppl.get("after") or ppl.get("healed")
    if b and a:
        lines.append(f"Perplexity on {b.get('data')} ({b.get('windows')} x {b.get('seq_len')} tokens): "
                     f"{b['ppl']:.2f} before, {a['ppl']:.2f} after" + (" healing." if "healed" in ppl else "."))
    heal = record.get("heal")
    if isinstance(heal, dict):
        lines.append(f"Healed after pruning ({record.get('pruned_by')}): {heal.get('kind')}, {heal.get('steps')} "
                     f"steps on {heal.get('tokens'):,} tokens, {heal.get('trainable'):,} trainable parameters.")
    if record.get("layer_shapes"):
        lines += ["", "Layers have different widths (or head counts the config cannot hold): reload with "
                  "`importance.models.pruned.load_pruned(folder)` or `importance.load_model(folder)`; plain "
                  "`from_pretrained` "
                  "cannot rebuild these shapes. The full recipe is in `imprune.json`.", ""]
    else:
        lines += ["", "Reload with `transformers.AutoModelForCausalLM.from_pretrained(folder)`; the full recipe is "
                  "in `imprune.json`.", ""]
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------- pruned shapes

def layer_shapes(model: Any) -> dict[str, Any] | None:
    """What a folder needs beyond its config: parameters whose shape differs from what the config builds,
    each layer's [query heads, KV heads], and the removed sub-blocks ``skipped`` ({layer: ['attn' | 'mlp']}: no
    config field says a block has no attention or no MLP) and ``skipped_constants`` ({layer: {kind: d}}: those that
    add a constant); None when plain ``from_pretrained`` rebuilds every shape."""
    from importance.arch.branches import compensated_record, skipped_record
    from importance.arch.canonical import model_map
    from importance.arch.edit import config_shapes

    expected = config_shapes(model)
    differ = {n: list(p.shape) for n, p in model.named_parameters(remove_duplicate=False)
              if expected.get(n) != tuple(p.shape)}
    mm = model_map(model)
    skipped, constants = skipped_record(mm), compensated_record(mm)
    if not differ and not skipped:
        return None
    return {"params": differ, "attention": [[b.n_heads, b.n_kv_heads] for b in mm.blocks],
            **({"skipped": skipped} if skipped else {}), **({"skipped_constants": constants} if constants else {})}

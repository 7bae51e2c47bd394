"""Applying a bit plan (``quant.bits``): fake quantization, real packed storage with optimum-quanto, save/reload.

Two paths from the same ``BitPlan``:
  ``fake_quantize_model_``  writes Q_b(w) (quantize-dequantize) into the float weights, in place: any device,
                            any architecture (Conv1D and fused modules too); for evaluating plans.
  ``quantize_model_``       replaces each planned ``nn.Linear`` by an optimum-quanto ``QLinear`` holding the
                            integer weights (4 and 2 bits packed into uint8, with float scales and shifts per
                            group; 8 bits int8 with a scale per output row). Outputs equal the fake path up to
                            float rounding (the integer codes are the same: ``bits.fake_quantize`` follows
                            quanto's formulas).

Why quanto (measured on this CPU, SmolLM2-135M float32): quanto stores qint4 packed two to a byte, 0.14x of
float32 with its group scales, and reloads from safetensors; torchao's int4 layouts need kernels this CPU
build lacks and its CPU int-x path stores int8, so a "4-bit" module would take as much memory as an 8-bit one.
See the README's quantization section for the numbers.

Saved folder (``save_quantized``), written atomically:
  model.safetensors    the state dict: quanto's flattened tensors (``<module>.weight._data[._data]``,
                       ``._scale``, ``._shift``) for quantized modules, plain tensors elsewhere; tied
                       duplicates stored once
  quantization.json    {"format": "imprune.quanto/1", "modules": {name: {"weights": "qint4", "group_size": g}},
                        "aliases": {dropped key: stored key}, "library": quanto version}
  config.json, tokenizer files, imprune.json (recipe, ``bits`` LayerMap, per-module map), README.md
``load_quantized(folder)`` rebuilds it: the config's model class, the recorded modules quantized with their
group sizes, then the state dict loaded into them (transformers' own quanto integration takes one width for
the whole model, so it cannot describe a mixed plan).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from importance.errors import ImpruneError
from importance.models.load import LoadedModel
from importance.models.pruned import model_class
from importance.store.meta import versions, write_json
from importance.store.outputs import publish
from pruning.quant.bits import BitPlan, fake_quantize

FORMAT = "imprune.quanto/1"
_QTYPES = {2: "qint2", 4: "qint4", 8: "qint8"}


# ----------------------------------------------------------------------------------------- applying a plan

@torch.no_grad()
def fake_quantize_model_(model: Any, plan: BitPlan) -> Any:
    """Replace every planned weight by its quantize-dequantize image (in place); returns ``model``."""
    for u in plan.units:
        w = model.get_submodule(u.name).weight
        view = w.t() if u.transposed else w  # [out, in]
        view.copy_(fake_quantize(view, plan.bits[u.name], u.group_size))
    return model


def quantize_model_(model: Any, plan: BitPlan) -> Any:
    """Store every planned module's weight in its integer width with optimum-quanto (in place, frozen)."""
    from optimum.quanto import freeze

    _check_linear(plan)
    _quantize_modules(model, {u.name: (plan.bits[u.name], u.group_size if u.group_size < u.in_features else None)
                              for u in plan.units})
    freeze(model)
    return model


def _check_linear(plan: BitPlan) -> None:
    bad = [u.name for u in plan.units if not u.linear]
    if bad:
        raise ImpruneError(f"{bad[0]} is not a torch.nn.Linear (e.g. GPT-2's Conv1D), which optimum-quanto cannot "
                           "store; use --fake to evaluate the plan, or --keep those modules")


def _quantize_modules(model: Any, modules: dict[str, tuple[int, int | None]]) -> None:
    """Swap each named module for a quanto QLinear of width ``bits`` and group size (None = one per row)."""
    from optimum.quanto import quantize

    for bits in sorted({b for b, _ in modules.values()}):
        names = [n for n, (b, _) in modules.items() if b == bits]
        quantize(model, weights=_QTYPES[bits], include=names)
    for name, (bits, group) in modules.items():
        qmodule = model.get_submodule(name)
        if bits < 8:
            qmodule.weight_group_size = group


# ----------------------------------------------------------------------------------------- storage

def _plain_tensors(t: torch.Tensor) -> list[torch.Tensor]:
    """The plain tensors behind ``t`` (quanto's QTensors and packed tensors are wrapper subclasses)."""
    if hasattr(t, "__tensor_flatten__") and type(t) not in (torch.Tensor, torch.nn.Parameter):
        names, _ = t.__tensor_flatten__()
        return [x for n in names for x in _plain_tensors(getattr(t, n))]
    return [t]


def weight_bytes(model: Any) -> int:
    """Bytes of storage behind every parameter (packed data + scales + shifts), each storage counted once."""
    seen: set[int] = set()
    total = 0
    for p in model.parameters():
        for t in _plain_tensors(p.data if type(p) is torch.nn.Parameter else p):
            storage = t.untyped_storage()
            if storage.data_ptr() not in seen:
                seen.add(storage.data_ptr())
                total += storage.nbytes()
    return total


def float32_bytes(model: Any) -> int:
    """What the same parameters take in float32 (tied parameters once)."""
    return sum(p.numel() for p in model.parameters()) * 4


# ----------------------------------------------------------------------------------------- save / reload

def save_quantized(lm: LoadedModel, out: str | Path, plan: BitPlan, record: dict[str, Any], card: str = "",
                   overwrite: bool = False, files: dict[str, bytes] | None = None) -> Path:
    """Write the quanto-quantized ``lm`` into ``out`` as described in the module docstring (``files``: extra
    files such as figures, written inside the same atomic folder)."""
    from optimum.quanto import quantization_map
    from safetensors.torch import save_file

    out = Path(out)
    if out.exists() and not overwrite:  # before the state is gathered; publish checks the rest
        raise ImpruneError(f"output '{out}' already exists; choose another path or pass --overwrite")
    state, aliases, seen = {}, {}, {}
    for key, t in lm.model.state_dict().items():
        ptr = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), t.dtype)
        if ptr in seen:
            aliases[key] = seen[ptr]
            continue
        seen[ptr] = key
        state[key] = t.detach().contiguous()
    group = {u.name: u.group_size if u.group_size < u.in_features and plan.bits[u.name] < 8 else None
             for u in plan.units}
    qmap = {n: {"weights": q["weights"], "group_size": group.get(n)} for n, q in quantization_map(lm.model).items()}
    doc = {"format": FORMAT, "modules": qmap, "aliases": aliases, "library": versions().get("optimum-quanto")}
    with publish(out, overwrite=overwrite) as tmp:  # the old folder goes only once the new one is complete
        save_file(state, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        lm.model.config.architectures = [type(lm.model).__name__]  # as save_pretrained records it
        lm.model.config.save_pretrained(tmp)
        lm.tokenizer.save_pretrained(tmp)
        write_json(tmp / "quantization.json", doc)
        write_json(tmp / "imprune.json", {**record, **plan.to_json(), "reload": "pruning.quant.quantize.load_quantized",
                                          "source_model": lm.describe(), "versions": versions()})
        (tmp / "README.md").write_text(card or _card(lm, plan, record))
        for name, data in (files or {}).items():
            (tmp / name).write_bytes(data)
    return out


def _card(lm: LoadedModel, plan: BitPlan, record: dict[str, Any]) -> str:
    mem = record.get("memory", {})
    lines = [f"# {lm.spec}, mixed-precision weights by imprune", "",
             f"Widths {', '.join(map(str, plan.choices))} at an average of {plan.average_bits():.3f} bits over "
             f"{len(plan.units)} linear modules (budget {plan.budget}); sensitivity {plan.sensitivity}; "
             f"solver {plan.solver}. Weight matrices kept in full precision: {', '.join(plan.kept[:6]) or 'none'}"
             f"{' ...' if len(plan.kept) > 6 else ''} (norm weights are never quantized).", ""]
    if mem:
        lines += [f"Weight storage {mem['bytes']:,} bytes = {mem['ratio']:.3f}x of float32.", ""]
    lines += ["Stored with optimum-quanto. Reload with `pruning.quant.quantize.load_quantized(folder)`; the bit map "
              "is in "
              "`imprune.json` (`bits`, `modules`).", ""]
    return "\n".join(lines)


def load_quantized(folder: str | Path, device: str = "cpu") -> LoadedModel:
    """Rebuild a folder written by ``save_quantized``: same logits as the model that was saved."""
    import transformers
    from safetensors.torch import load_file

    from importance.models.load import _task_from_architectures, _with_pad

    folder = Path(folder)
    qfile = folder / "quantization.json"
    if not qfile.is_file() or not (folder / "model.safetensors").is_file():
        raise ImpruneError(f"'{folder}' is not a quantized model folder (no quantization.json / model.safetensors);"
                           " write one with `imprune quantize --out DIR`")
    doc = json.loads(qfile.read_text())
    if doc.get("format") != FORMAT:
        raise ImpruneError(f"'{qfile}' has format {doc.get('format')!r}; this imprune reads {FORMAT}")
    config, cls = model_class(folder)
    from transformers.initialization import no_init_weights

    with no_init_weights():  # every weight is loaded below; skip the random init
        model = cls(config).to(torch.float32).eval()
    inv = {"qint2": 2, "qint4": 4, "qint8": 8}
    _quantize_modules(model, {n: (inv[q["weights"]], q.get("group_size")) for n, q in doc["modules"].items()})
    state = load_file(str(folder / "model.safetensors"))
    for alias, key in doc.get("aliases", {}).items():
        state[alias] = state[key]
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [k for k in missing if not k.endswith(("input_scale", "output_scale"))]
    if missing or unexpected:
        raise ImpruneError(f"'{folder}': the saved tensors do not fit the model ({len(missing)} missing, e.g. "
                           f"{missing[:1]}; {len(unexpected)} unexpected, e.g. {unexpected[:1]}); was it edited?")
    if getattr(config, "tie_word_embeddings", False) and hasattr(model, "tie_weights"):
        model.tie_weights()
    tokenizer = transformers.AutoTokenizer.from_pretrained(folder)
    record = json.loads((folder / "imprune.json").read_text()) if (folder / "imprune.json").is_file() else {}
    spec = record.get("source_model", {}).get("spec", str(folder))
    return LoadedModel(model.to(device), _with_pad(tokenizer), str(folder), _task_from_architectures(config),
                       source=f"quantized from {spec}")

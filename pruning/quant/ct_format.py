"""The compressed-tensors writer: a quantized model in the format llm-compressor writes and vLLM serves.

``save_compressed_tensors`` takes the model whose planned weights already hold their dequantized values
(``pruning.quant.gptq_model``) and the codes / scales / zero points of every unit, and writes a folder that plain
``transformers.AutoModelForCausalLM.from_pretrained(folder)`` loads (decompressing on the first forward, on
CPU or GPU) with the same logits:

  config.json          the model config with ``quantization_config``: one config group per width
                       (``pack-quantized``, int, symmetric or not, ``group`` or ``channel`` strategy), exact
                       module names as targets; ``format`` mixed-precision when several groups exist
  model.safetensors    ``<module>.weight_packed`` (int32, 32 / b codes per word), ``weight_scale`` [out, groups],
                       ``weight_zero_point`` (asymmetric), ``weight_shape``; every other tensor as is. With
                       ``--quantize-embeddings`` the vocabulary tables too (``pruning.quant.embeddings``: the
                       embedding as ``int-quantized`` int8 codes; a head tied to it shares its ``weight``, which
                       is stored once and tied again by the loader; an untied head packed)
  imprune.json, bits.png, README.md, tokenizer files

The library's own ``ModelCompressor`` packs the weights (it re-encodes the dequantized weights with our scales
and zero points; the writer checks that it recovers our codes exactly).

One workaround (compressed-tensors 0.20.1 with transformers 5): the loader builds an asymmetric module's
``weight_zero_point`` with the unpacked shape [out, groups] while the compressor writes it packed along the
rows ([ceil(out * b / 32), groups]), so the load fails on the size. The writer stores the packed rows at the
top of an int32 [out, groups] tensor padded with zeros: it fits the loader's shape and the decompressor reads
only the packed rows.
"""

from __future__ import annotations

import copy
import shutil
from pathlib import Path
from typing import Any

import torch

from importance.errors import ImpruneError
from importance.models.load import LoadedModel
from importance.store.cache import atomic_dir
from importance.store.meta import versions, write_json
from pruning.quant.bits import BitPlan
from pruning.quant.embeddings import EmbeddingTarget
from pruning.second_order.gptq import Quantized, QuantSpec

Embeddings = tuple[list[EmbeddingTarget], dict[str, Quantized]]  # pruning.quant.embeddings.quantize_embeddings_


Entry = tuple[str, Quantized, str]  # module name, its codes, its compressed-tensors format


def _entries(plan: BitPlan, quantized: dict[str, Quantized], embeddings: Embeddings | None) -> list[Entry]:
    """Every quantized module with its format: the plan's units packed, the vocabulary tables as
    ``pruning.quant.embeddings`` chose (a tied head shares the embedding's codes)."""
    out = [(u.name, quantized[u.name], "pack-quantized") for u in plan.units]
    if embeddings is not None:
        targets, qs = embeddings
        out += [(t.name, qs[t.name], t.fmt) for t in targets]
    return out


def _config(entries: list[Entry]) -> Any:
    from compressed_tensors.quantization import (
        QuantizationArgs,
        QuantizationConfig,
        QuantizationScheme,
        QuantizationStatus,
    )

    groups: dict[tuple[QuantSpec, str], list[str]] = {}
    for name, q, fmt in entries:
        groups.setdefault((q.spec, fmt), []).append(name)
    config_groups = {}
    order = sorted(groups.items(), key=lambda kv: (kv[0][0].bits, kv[0][0].group_size or 0, kv[0][1]))
    for i, ((spec, fmt), names) in enumerate(order):
        args = QuantizationArgs(num_bits=spec.bits, type="int", symmetric=spec.sym,
                                strategy="channel" if spec.group_size is None else "group",
                                group_size=spec.group_size)
        config_groups[f"group_{i}"] = QuantizationScheme(targets=names, weights=args, format=fmt)
    return QuantizationConfig(config_groups=config_groups, quantization_status=QuantizationStatus.FROZEN)


@torch.no_grad()
def compress_copy(model: Any, plan: BitPlan, quantized: dict[str, Quantized], embeddings: Embeddings | None = None
                  ) -> tuple[Any, Any]:
    """A compressed copy of ``model`` (``model`` is left as it is) and its ModelCompressor."""
    from compressed_tensors.compressors import ModelCompressor
    from compressed_tensors.compressors.pack_quantized.helpers import pack_to_int32
    from compressed_tensors.quantization import apply_quantization_config

    bad = [u.name for u in plan.units if not u.linear or u.transposed]
    if bad:
        raise ImpruneError(f"{bad[0]} is not a torch.nn.Linear, which compressed-tensors cannot store; --keep it "
                           "or use --fake")
    own = [u.name for u in plan.units if type(model.get_submodule(u.name)) is not torch.nn.Linear]
    if own:  # e.g. Falcon's FalconLinear: the loader's weight init reads .weight, which the packed layout removes
        raise ImpruneError(f"{own[0]} is a {type(model.get_submodule(own[0])).__name__}, a torch.nn.Linear subclass "
                           "that transformers cannot reload from compressed-tensors; use --fake (or --format quanto)")
    fused = next((n for n, p in model.named_parameters() if p.dim() == 3), None)
    if fused is not None:  # measured: the save writes per-expert keys that the quantized load cannot merge back
        raise ImpruneError(f"{fused} holds fused MoE experts, which transformers cannot reload from a "
                           "compressed-tensors folder; use --fake")
    missing = [u.name for u in plan.units if u.name not in quantized]
    if missing:
        raise ImpruneError(f"no quantized weights for {missing[0]}; quantize the whole plan before writing it")
    entries = _entries(plan, quantized, embeddings)
    model = copy.deepcopy(model)
    apply_quantization_config(model, _config(entries), run_compressed=False, show_progress=False)
    for name, q, _ in entries:
        mod = model.get_submodule(name)
        mod.weight_scale.data.copy_(q.scale.to(mod.weight_scale.dtype))
        if not q.spec.sym:
            mod.weight_zero_point.data.copy_(q.zero.to(mod.weight_zero_point.dtype))
    comp = ModelCompressor.from_pretrained_model(model)
    comp.compress_model(model)
    for name, q, fmt in entries:
        mod = model.get_submodule(name)
        stored, ours = (mod.weight_packed, pack_to_int32(q.codes, q.spec.bits)) if fmt == "pack-quantized" \
            else (mod.weight, q.codes)
        if not torch.equal(stored.cpu(), ours):
            raise ImpruneError(f"compressed-tensors re-encoded {name} differently from the quantizer's codes; "
                               "this is a bug, please report it")
    return model, comp


def packed_bytes(model: Any, plan: BitPlan, quantized: dict[str, Quantized], embeddings: Embeddings | None = None
                 ) -> int:
    """Bytes of the weights as stored: b / 8 per packed weight (int8 codes: 1 byte) plus float32 scales and
    zero points (packed b-bit, or int8), every other parameter as it is (tied tensors once)."""
    entries = _entries(plan, quantized, embeddings)
    planned = {f"{name}.weight" for name, _, _ in entries}
    seen, total = set(), 0
    for name, p in model.named_parameters(remove_duplicate=False):
        if p.data_ptr() not in seen:
            seen.add(p.data_ptr())
            total += 0 if name in planned else p.numel() * p.element_size()
    counted: set[int] = set()
    for _, q, fmt in entries:
        if id(q) in counted:  # a tied head: the embedding's codes
            continue
        counted.add(id(q))
        if fmt == "pack-quantized":
            total += (q.codes.numel() * q.spec.bits + 31) // 32 * 4
            total += 0 if q.spec.sym else (q.zero.numel() * q.spec.bits + 31) // 32 * 4
        else:
            total += q.codes.numel() + (0 if q.spec.sym else q.zero.numel())
        total += q.scale.numel() * 4
    return total


def _fix_state(path: Path, entries: list[Entry], tied: list[str]) -> None:
    """The loader-shaped zero points (module docstring); a tied head's weight dropped (the loader ties it)."""
    from safetensors.torch import load_file, save_file

    state = load_file(str(path))
    for name, q, fmt in entries:
        key = f"{name}.weight_zero_point"
        if fmt == "pack-quantized" and key in state:
            packed = state[key]  # [ceil(out * b / 32), groups] int32
            pad = torch.zeros(tuple(q.scale.shape), dtype=torch.int32)
            pad[: packed.shape[0]] = packed
            state[key] = pad
    for name in tied:
        state.pop(f"{name}.weight", None)
    save_file(state, str(path), metadata={"format": "pt"})


def save_compressed_tensors(lm: LoadedModel, out: str | Path, plan: BitPlan, quantized: dict[str, Quantized],
                            record: dict[str, Any], card: str = "", overwrite: bool = False,
                            files: dict[str, bytes] | None = None, embeddings: Embeddings | None = None) -> Path:
    """Write the compressed-tensors folder of ``lm`` (module docstring), atomically."""
    out = Path(out)
    if out.exists() and not overwrite:
        raise ImpruneError(f"output '{out}' already exists; choose another path or pass --overwrite")
    model, comp = compress_copy(lm.model, plan, quantized, embeddings)
    tied = [t.name for t in embeddings[0] if t.tied_to is not None] if embeddings is not None else []
    if out.exists():
        shutil.rmtree(out)
    with atomic_dir(out) as tmp:
        model.save_pretrained(tmp, max_shard_size="1000GB")
        comp.update_config(str(tmp))
        _fix_state(tmp / "model.safetensors", _entries(plan, quantized, embeddings), tied)
        lm.tokenizer.save_pretrained(tmp)
        write_json(tmp / "imprune.json", {**record, **plan.to_json(), "format": "compressed-tensors",
                                          "reload": "transformers.AutoModelForCausalLM.from_pretrained",
                                          "source_model": lm.describe(), "versions": versions()})
        (tmp / "README.md").write_text(card or _card(lm, plan, embeddings))
        for name, data in (files or {}).items():
            (tmp / name).write_bytes(data)
    return out


def _card(lm: LoadedModel, plan: BitPlan, embeddings: Embeddings | None = None) -> str:
    if embeddings is None:
        rest = "Other weights (embeddings, norms, lm_head) stay in full precision."
    else:
        targets, qs = embeddings
        rest = (f"{' and '.join(t.name for t in targets)} at {qs[targets[0].name].spec.bits} bits (round to nearest"
                f"{'; tied, stored once' if any(t.tied_to for t in targets) else ''}); norms in full precision.")
    counts = {b: sum(1 for v in plan.bits.values() if v == b) for b in plan.choices}
    return "\n".join([
        f"# {lm.spec}, quantized by imprune (compressed-tensors pack-quantized)", "",
        f"{', '.join(f'{n} modules at {b} bits' for b, n in counts.items())}: average {plan.average_bits():.3f} "
        f"bits over {len(plan.units)} block linear modules (budget {plan.budget}); widths chosen by "
        f"{plan.sensitivity}. {rest}", "",
        "Load with `transformers.AutoModelForCausalLM.from_pretrained(folder)` (compressed-tensors installed); "
        "the bit map is in `imprune.json` (`bits`, `modules`).", ""])

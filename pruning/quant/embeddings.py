"""Quantizing the input embedding and the output head (``imprune quantize --quantize-embeddings B``).

On small models these two tables are a large share of the weights (SmolLM2-135M: one tied 49152 x 576 table, a
fifth of the parameters and, after 4-bit block linears, two thirds of the bytes). They are rounded to nearest on
the grid of ``pruning.second_order.gptq`` (the embedding has no input Hessian, and a tied head shares the
embedding's codes): ``[vocab, hidden]``, one scale (and zero point) per token row, per group of ``group_size``
hidden units below 8 bits (the same automatic group size as the block linears), per row at 8 bits.

Tied weights (``tie_word_embeddings``: one Parameter behind both modules) are quantized ONCE: both module names
map to the same ``Quantized`` and the dequantized values are written into the one Parameter, so the in-memory
model stays tied. The compressed-tensors writer (``pruning.quant.ct_format``) then stores the shared codes once.

Storage formats in compressed-tensors (0.20.1, loaded by transformers 5.24):
  embedding (and a head tied to it)  ``int-quantized``: ``weight`` int8 codes [vocab, hidden], ``weight_scale``,
                                     ``weight_zero_point``. The packed format cannot hold an ``nn.Embedding``
                                     for the plain loader: its weight initialisation reads ``module.weight``,
                                     which the packed layout removes, so the embedding is int8 codes at every width.
  untied head (``nn.Linear``)         ``pack-quantized`` like the block linears (b bits per weight).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from importance.errors import ImpruneError
from pruning.quant.bits import _group_size
from pruning.second_order.gptq import GPTQ_BITS, Quantized, QuantSpec, rtn


@dataclass(frozen=True)
class EmbeddingTarget:
    """One module holding a vocabulary table: ``fmt`` is its compressed-tensors format; ``tied_to`` the module
    whose Parameter it shares (its weight is not stored again), or None."""

    name: str
    fmt: str
    tied_to: str | None = None


def embedding_targets(model: Any) -> list[EmbeddingTarget]:
    """The input embedding and the output head of ``model`` (a head tied to the embedding marked as such)."""
    names = {id(m): n for n, m in model.named_modules()}
    emb = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if not isinstance(emb, torch.nn.Embedding):
        raise ImpruneError(f"--quantize-embeddings: the input embedding of {type(model).__name__} is "
                           f"{type(emb).__name__}, not a torch.nn.Embedding; leave --quantize-embeddings out")
    out = [EmbeddingTarget(names[id(emb)], "int-quantized")]
    if head is not None:
        if not isinstance(head, torch.nn.Linear):
            raise ImpruneError(f"--quantize-embeddings: the output head {names[id(head)]} is "
                               f"{type(head).__name__}, not a torch.nn.Linear; leave --quantize-embeddings out")
        tied = head.weight is emb.weight
        out.append(EmbeddingTarget(names[id(head)], "int-quantized" if tied else "pack-quantized",
                                   out[0].name if tied else None))
    return out


def embedding_spec(weight: torch.Tensor, bits: int, sym: bool, group_size: int | None, name: str) -> QuantSpec:
    """The grid of a [vocab, hidden] table: per row at 8 bits, else groups of ``group_size`` (or automatic)."""
    if bits not in GPTQ_BITS:
        raise ImpruneError(f"--quantize-embeddings {bits}: unsupported width; use one of "
                           f"{', '.join(map(str, GPTQ_BITS))}")
    hidden = weight.shape[1]
    g = _group_size(name, hidden, group_size)
    return QuantSpec(bits, sym, g if bits < 8 and g < hidden else None)


@torch.no_grad()
def quantize_embeddings_(model: Any, bits: int, sym: bool = False, group_size: int | None = None
                         ) -> tuple[list[EmbeddingTarget], dict[str, Quantized]]:
    """Round the embedding and head to ``bits`` in place (module docstring); returns the targets and
    {module name: Quantized} (tied modules share one object; the float copy is dropped)."""
    targets = embedding_targets(model)
    out: dict[str, Quantized] = {}
    for t in targets:
        if t.tied_to is not None:
            out[t.name] = out[t.tied_to]
            continue
        w = model.get_submodule(t.name).weight  # [vocab, hidden]
        q = rtn(w, embedding_spec(w, bits, sym, group_size, t.name))
        w.copy_(q.weight.to(w.dtype))
        out[t.name] = Quantized(torch.empty(0), q.codes, q.scale, q.zero, q.spec)
    return targets, out


"""The architecture room: the canonical map (``canonical``: the ONLY code that knows module and config names),
the families with fused layouts (``families``), the row layouts of fused modules and the
token-mixer test of hybrids (``layouts``), the generic discovery for unregistered types (``discover``),
stacked MoE experts in the layouts transformers declares (``experts``), the functional check that proves a map
against the model (``check``) and the structural edits behind it (``edit``: head counts, per-layer geometry,
dropped layers, reshaped parameters). May import: torch, transformers, ``importance.errors``. Nothing else in
imprune knows a model's module names.
"""

from importance.arch.canonical import ArchSpec, Block, Component, ModelMap, model_map, register_arch

__all__ = ["ArchSpec", "Block", "Component", "ModelMap", "model_map", "register_arch"]

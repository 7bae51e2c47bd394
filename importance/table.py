"""ImportanceTable: every scorer's ranking of a model's parameter groups, by layer.

Stored tensors (values are SUMS over each group; 'mean' aggregation divides by the group's weight count):
  ``{scorer}/component``  [L, C]     layer x component (C = ``meta['components']``), NaN where absent
  ``{scorer}/layer``      [L]
  ``{scorer}/{group}``    [L, G]     group in head, kv_group, mlp_channel, expert (NaN-padded per layer)
  ``{scorer}/channel/{l}/{comp}``, ``{scorer}/channel_in/{l}/{comp}``   output rows / input columns
  ``{scorer}/element/{l}/{comp}``    per weight (only on request: the size of the model)
  ``activation/in_norm/{l}/{comp}``, ``activation/out_norm/{l}/{comp}``   raw channel norms ||x_j||, ||y_i||
  ``count/{component|layer|group}``  weights per group
Saved as ``table.safetensors`` + ``table.json`` (metadata) + ``components.csv``; ``load`` is bit-exact.
"""

from __future__ import annotations

import csv
import json
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from importance import scorers as S
from importance.arch.canonical import ModelMap
from importance.engine.stats import Statistics
from importance.errors import ImpruneError
from importance.store.outputs import publish

MATRIX_GRANULARITIES = ("component", "head", "kv_group", "mlp_channel", "expert")
AGGREGATIONS = ("sum", "mean")
NORMALIZATIONS = ("none", "layer", "component", "global")


LayerMap = dict[int, dict[str, float]]  # {layer: {component: value}}: sparsity or bits per layer x component


def layer_map(items: Iterable[tuple[tuple[int, str], float]]) -> LayerMap:
    """``((layer, component), value)`` pairs -> ``{layer: {component: value}}``."""
    out: LayerMap = {}
    for (layer, comp), v in items:
        out.setdefault(layer, {})[comp] = v
    return out


def layer_map_matrix(values: LayerMap, components: list[str], n_layers: int) -> torch.Tensor:
    """``{layer: {component: v}}`` (JSON keys may be strings) -> [L, C] with NaN where absent."""
    m = torch.full((n_layers, len(components)), float("nan"))
    for layer, row in values.items():
        for comp, v in row.items():
            if comp in components and 0 <= int(layer) < n_layers:
                m[int(layer), components.index(comp)] = float(v)
    return m


def normalize(m: torch.Tensor, how: str) -> torch.Tensor:
    """'layer': each row sums to 1; 'component': each column sums to 1; 'global': all sums to 1 (NaN kept)."""
    if how not in NORMALIZATIONS:
        raise ImpruneError(f"unknown normalization '{how}'; use one of {', '.join(NORMALIZATIONS)}")
    if how == "none":
        return m
    z = torch.nan_to_num(m, nan=0.0)
    if how == "global" or m.dim() == 1:
        total = z.sum()
    elif how == "layer":
        total = z.sum(-1, keepdim=True)
    else:
        total = z.sum(0, keepdim=True)
    return m / torch.where(total == 0, torch.ones_like(total), total)


class ImportanceTable:
    """Rankings per scorer at every granularity; see the module docstring for the layout."""

    def __init__(self, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
        self.tensors = tensors
        self.meta = meta

    # -------------------------------------------------------------------------------- access
    @property
    def scorers(self) -> list[str]:
        return list(self.meta["scorers"])

    @property
    def components(self) -> list[str]:
        return list(self.meta["components"])

    @property
    def n_layers(self) -> int:
        return int(self.meta["layers"])

    def _check(self, scorer: str, key: str) -> torch.Tensor:
        if scorer not in self.scorers:
            raise ImpruneError(f"the table has no scorer '{scorer}'; it has {', '.join(self.scorers)}")
        if key not in self.tensors:
            raise ImpruneError(f"scorer '{scorer}' has no '{key.split('/', 1)[1]}' values in this table")
        return self.tensors[key]

    def matrix(self, scorer: str, granularity: str = "component", aggregation: str = "sum",
               norm: str = "none") -> torch.Tensor:
        """[L, X] for granularity component (X = components), head, kv_group, mlp_channel or expert."""
        if granularity not in MATRIX_GRANULARITIES:
            raise ImpruneError(f"unknown granularity '{granularity}'; use one of {', '.join(MATRIX_GRANULARITIES)}")
        m = self._check(scorer, f"{scorer}/{granularity}")
        return normalize(self._aggregate(m, f"count/{granularity}", aggregation), norm)

    def layer_scores(self, scorer: str, aggregation: str = "sum", norm: str = "none") -> torch.Tensor:
        m = self._check(scorer, f"{scorer}/layer")
        if S.layer_only(scorer):
            aggregation = "sum"  # a layer-only score is per layer already (no per-weight share)
        return normalize(self._aggregate(m, "count/layer", aggregation), norm)

    def _aggregate(self, m: torch.Tensor, count_key: str, aggregation: str) -> torch.Tensor:
        if aggregation not in AGGREGATIONS:
            raise ImpruneError(f"unknown aggregation '{aggregation}'; use sum or mean")
        return m if aggregation == "sum" else m / self.tensors[count_key]

    def channels(self, scorer: str, layer: int, component: str, side: str = "out") -> torch.Tensor:
        key = "channel" if side == "out" else "channel_in"
        return self._check(scorer, f"{scorer}/{key}/{layer}/{component}")

    def element(self, scorer: str, layer: int, component: str) -> torch.Tensor:
        return self._check(scorer, f"{scorer}/element/{layer}/{component}")

    def has(self, scorer: str, granularity: str) -> bool:
        return f"{scorer}/{granularity}" in self.tensors

    # -------------------------------------------------------------------------------- summaries
    def ranking(self, scorer: str, granularity: str = "component", aggregation: str = "mean",
                k: int = 5, skip_norms: bool = False) -> tuple[list[tuple[str, float]], list[tuple[str, float]]]:
        """(top k, bottom k) as (label, value); labels like 'L3 attn.q' or 'L3 h5' (norms optional)."""
        if granularity == "layer":
            m = self.layer_scores(scorer, aggregation)[:, None]
            labels = [[f"L{i}"] for i in range(self.n_layers)]
        else:
            m = self.matrix(scorer, granularity, aggregation)
            names = self.components if granularity == "component" else \
                [f"{_SHORT[granularity]}{j}" for j in range(m.shape[1])]
            labels = [[f"L{i} {n}" for n in names] for i in range(m.shape[0])]
        flat = [(labels[i][j], float(m[i, j])) for i in range(m.shape[0]) for j in range(m.shape[1])
                if torch.isfinite(m[i, j]) and not (skip_norms and " norm." in labels[i][j])]
        flat.sort(key=lambda x: -x[1])
        return flat[:k], flat[::-1][:k]

    def to_frame(self, granularities: tuple[str, ...] = ("component", "head", "kv_group", "expert", "layer"),
                 aggregation: str = "sum") -> Any:
        """Tidy pandas frame: scorer, granularity, layer, component, head, index, value, count."""
        import pandas as pd

        rows = []
        for scorer in self.scorers:
            for gran in granularities:
                if gran == "layer":
                    if self.has(scorer, "layer"):
                        for i, v in enumerate(self.layer_scores(scorer, aggregation).tolist()):
                            rows.append((scorer, "layer", i, None, None, None, v, self._count("layer", i, None)))
                    continue
                if not self.has(scorer, gran):
                    continue
                m = self.matrix(scorer, gran, aggregation)
                for i in range(m.shape[0]):
                    for j in range(m.shape[1]):
                        v = float(m[i, j])
                        if v != v:  # NaN: absent
                            continue
                        comp = self.components[j] if gran == "component" else None
                        head = j if gran in ("head", "kv_group") else None
                        rows.append((scorer, gran, i, comp, head, j, v, self._count(gran, i, j)))
        return pd.DataFrame(rows, columns=["scorer", "granularity", "layer", "component", "head", "index", "value",
                                           "count"])

    def _count(self, gran: str, i: int, j: int | None) -> float:
        t = self.tensors.get(f"count/{gran}")
        return float(t[i] if j is None else t[i, j]) if t is not None else float("nan")

    # -------------------------------------------------------------------------------- persistence
    def save(self, folder: str | Path, overwrite: bool = False) -> Path:
        """Write ``table.safetensors``, ``table.json`` and ``components.csv`` into ``folder`` atomically (an
        existing table is replaced with ``overwrite`` only once the new one is complete: ``outputs.publish``)."""
        folder = Path(folder)
        with publish(folder, overwrite=overwrite) as tmp:
            save_file({k: v.contiguous() for k, v in self.tensors.items()}, str(tmp / "table.safetensors"))
            (tmp / "table.json").write_text(json.dumps(self.meta, indent=2) + "\n")
            self.write_csv(tmp / "components.csv")
        return folder

    def write_csv(self, path: Path) -> None:
        with open(path, "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["scorer", "layer", *self.components])
            for scorer in self.scorers:
                if not self.has(scorer, "component"):
                    continue
                m = self.matrix(scorer, "component")
                for i in range(m.shape[0]):
                    w.writerow([scorer, i, *("" if v != v else repr(v) for v in m[i].tolist())])

    @classmethod
    def load(cls, folder: str | Path) -> ImportanceTable:
        folder = Path(folder)
        if not folder.is_dir():
            what = "is a file, not" if folder.exists() else "does not exist; it should be"
            raise ImpruneError(f"'{folder}' {what} an importance table folder; create one with "
                               "`imprune score --out DIR`")
        missing = [n for n in ("table.json", "table.safetensors") if not (folder / n).is_file()]
        if len(missing) == 2:
            raise ImpruneError(f"'{folder}' is not an importance table folder (no table.json / table.safetensors);"
                               " create one with `imprune score --out DIR`")
        rescore = "rescore the model with `imprune score --out DIR --overwrite`"
        if missing:
            raise ImpruneError(f"importance table '{folder}' is incomplete: {missing[0]} is missing; {rescore}")
        meta = read_table_meta(folder / "table.json", rescore)
        try:
            tensors = load_file(str(folder / "table.safetensors"))
        except Exception as err:  # noqa: BLE001 - safetensors raises its own error types for damaged files
            first = (str(err).strip().splitlines() or [type(err).__name__])[0][:120]
            raise ImpruneError(f"'{folder / 'table.safetensors'}' is damaged ({first}); {rescore}") from None
        return cls(tensors, meta)


def read_table_meta(path: Path, fix: str = "rescore the model with `imprune score --out DIR --overwrite`"
                    ) -> dict[str, Any]:
    """``table.json`` as a dict with the keys every reader needs (scorers, components: lists of names; layers:
    a positive count); anything else is one ``ImpruneError`` naming the file and ``fix``."""
    try:
        meta = json.loads(Path(path).read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        why = f"{err.msg}, line {err.lineno}" if isinstance(err, json.JSONDecodeError) else "not UTF-8 text"
        raise ImpruneError(f"'{path}' is not valid JSON ({why}); the table is damaged: {fix}") from None
    except OSError as err:
        raise ImpruneError(f"'{path}' cannot be read ({err.strerror}); {fix}") from None
    if not isinstance(meta, dict):
        raise ImpruneError(f"'{path}' should hold a JSON object; the table is damaged: {fix}")
    names = lambda v: isinstance(v, list) and all(isinstance(x, str) for x in v)  # noqa: E731
    bad = next((k for k, ok in (("scorers", names(meta.get("scorers"))), ("components", names(meta.get("components"))),
                                ("layers", isinstance(meta.get("layers"), int) and not isinstance(meta["layers"], bool)
                                 and meta["layers"] > 0)) if not ok), None)
    if bad is not None:
        raise ImpruneError(f"'{path}' has no usable '{bad}' entry; the table is damaged: {fix}")
    return meta


_SHORT = {"head": "h", "kv_group": "kv", "mlp_channel": "c", "expert": "e"}


# ----------------------------------------------------------------------------------------- building

def _padded(rows: list[torch.Tensor | None], width: int) -> torch.Tensor:
    out = torch.full((len(rows), width), float("nan"))
    for i, r in enumerate(rows):
        if r is not None:
            out[i, : r.numel()] = r.flatten().float()
    return out


def build_table(stats: Statistics, mm: ModelMap, scorers: list[str], elements: bool = False, obd: bool = False,
                meta: dict[str, Any] | None = None) -> ImportanceTable:
    """Assemble an ``ImportanceTable`` from one pass's statistics (pure: no model forward)."""
    ctx = S.Context(stats, mm, obd)
    names = mm.component_names()
    tensors: dict[str, torch.Tensor] = {}
    L = mm.n_layers
    # weight counts, shared by all scorers
    counts = torch.full((L, len(names)), float("nan"))
    group_counts = [S.group_counts(b) for b in mm.blocks]
    for b in mm.blocks:
        for j, n in enumerate(names):
            if n in b.components:
                counts[b.index, j] = b.components[n].numel
    tensors["count/component"] = counts
    tensors["count/layer"] = torch.tensor([float(sum(c.numel for c in b.components.values())) for b in mm.blocks])
    for g in S.GROUPS:
        if any(g in gc for gc in group_counts):
            tensors[f"count/{g}"] = _padded([gc.get(g) for gc in group_counts], max(gc[g].numel()
                                                                                    for gc in group_counts if g in gc))
    for scorer in scorers:
        spec = S.SCORERS[scorer]
        if spec.kind == "group":  # group values only (heads, KV groups, MLP channels)
            found = {g: [S.groups(scorer, ctx, b).get(g) for b in mm.blocks] for g in S.GROUPS}
            for g, vals in found.items():
                if any(v is not None for v in vals):
                    tensors[f"{scorer}/{g}"] = _padded(vals, max(v.numel() for v in vals if v is not None))
            continue
        tensors[f"{scorer}/layer"] = torch.tensor([S.layer(scorer, ctx, b) for b in mm.blocks])
        if spec.kind == "layer":
            continue
        comp_m = torch.full((L, len(names)), float("nan"))
        per_group: dict[str, list[torch.Tensor | None]] = {g: [None] * L for g in S.GROUPS}
        for b in mm.blocks:
            for j, n in enumerate(names):
                comp = b.components.get(n)
                if comp is None:
                    continue
                comp_m[b.index, j] = S.component(scorer, ctx, comp)
                tensors[f"{scorer}/channel/{b.index}/{n}"] = S.rows(scorer, ctx, comp).contiguous()
                if comp.in_group:
                    tensors[f"{scorer}/channel_in/{b.index}/{n}"] = S.cols(scorer, ctx, comp).contiguous()
                if elements and (spec.kind == "additive" or stats.get(b.index, n, "grad") is not None):
                    tensors[f"{scorer}/element/{b.index}/{n}"] = S.element_scores(scorer, ctx, comp).contiguous()
                if scorer == "activation":
                    if (v := stats.get(b.index, n, "in_sq")) is not None and comp.kind != "norm":
                        tensors[f"activation/in_norm/{b.index}/{n}"] = v.sqrt()
                    if (v := stats.get(b.index, n, "out_sq")) is not None:
                        tensors[f"activation/out_norm/{b.index}/{n}"] = v.sqrt()
            for g, v in S.groups(scorer, ctx, b).items():
                per_group[g][b.index] = v
        tensors[f"{scorer}/component"] = comp_m
        for g, vals in per_group.items():
            if any(v is not None for v in vals):
                tensors[f"{scorer}/{g}"] = _padded(vals, max(v.numel() for v in vals if v is not None))
    b0 = mm.blocks[0]
    full_meta = {
        **(meta or {}), "scorers": list(scorers), "components": names, "layers": L,
        "heads": b0.n_heads, "kv_heads": b0.n_kv_heads, "head_dim": b0.head_dim, "experts": b0.n_experts,
        "model_type": mm.model_type, "shapes": {f"{c.layer}|{c.name}": list(c.shape) for c in mm.components()},
        "estimators": {s: S.SCORERS[s].estimator + (" [OBD: w^2 F / 2]" if s == "fisher" and obd else "")
                       for s in scorers},
        "counts": {k.split("|")[-1]: float(v) for k, v in stats.sums.items() if k.startswith("-|run|")},
        "fisher_unit": stats.meta.get("collect", {}).get("fisher_unit", "sequence"),
        "elements": elements, "values": "sums over each group; mean aggregation divides by count/*",
    }
    return ImportanceTable({k: v.detach().float().cpu() for k, v in tensors.items()}, full_meta)

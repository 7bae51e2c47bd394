"""The report's validation section: what ``imprune validate`` wrote beside a table (validation.json, its
figures), checked, and drawn as "Does the importance predict removal?" (one row per scorer, the facts behind it,
the validation's own PNGs embedded as written)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from importance.errors import ImpruneError
from pruning.run.page import esc, figure_html, fmt, kv_table, read_json

_STATS = ("spearman", "kendall", "bottom_overlap")
_PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@dataclass(frozen=True)
class Validation:
    """An ``imprune validate`` folder as the page shows it: validation.json (checked) and its figures."""

    folder: Path
    doc: dict[str, Any]
    granularity: str  # the validated one ("layer" only when that was the one asked for)
    figures: dict[str, tuple[str, str, bytes | None]]  # stem: (caption, file name, PNG or None when unreadable)


def _number(value: Any) -> bool:
    return value is None or (isinstance(value, (int, float)) and not isinstance(value, bool))


def load_validation(table_dir: Path) -> Validation | None:
    """TABLE_DIR/validation/validation.json (where ``imprune validate`` writes by default) and the PNGs it
    names, or None without one; a malformed file is an ImpruneError."""
    from importance.validate.folder import SCHEMA, VALIDATION_DIR

    folder = table_dir / VALIDATION_DIR
    path = folder / "validation.json"
    doc = read_json(path, "rerun `imprune validate` with --overwrite, or remove the folder")
    if doc is None:
        return None

    def bad(what: str) -> ImpruneError:
        return ImpruneError(f"'{path}' is not a usable validation file ({what}); rerun `imprune validate` with "
                            "--overwrite, or remove the folder")

    if doc.get("schema") != SCHEMA:
        raise bad(f"schema {doc.get('schema')!r}, expected {SCHEMA!r}")
    grans = doc.get("granularities")
    if not isinstance(grans, dict) or not grans:
        raise bad("no 'granularities'")
    for gran, res in grans.items():
        stats = res.get("scorers") if isinstance(res, dict) else None
        if not isinstance(stats, dict) or not stats or not all(
                isinstance(st, dict) and all(_number(st.get(k)) for k in _STATS) for st in stats.values()):
            raise bad(f"granularities.{gran} needs 'scorers' with numbers {', '.join(_STATS)} for each")
    for key in ("model", "scores", "ground_truth", "figures"):
        if not isinstance(doc.get(key, {}), dict):
            raise bad(f"'{key}' is not an object")
    figures = {}
    for stem, name in doc.get("figures", {}).items():
        if not isinstance(name, str) or Path(name).name != name or not name.endswith(".png"):
            raise bad(f"figure '{stem}' is not the name of a .png file in the folder")
        png = (folder / name).read_bytes() if (folder / name).is_file() else b""
        figures[str(stem)] = (_validation_caption(str(stem)), name, png if png.startswith(_PNG_MAGIC) else None)
    return Validation(folder, doc, next((g for g in grans if g != "layer"), "layer"), figures)


def _validation_caption(stem: str) -> str:
    if stem.startswith("scatter_"):
        return (f"{stem[len('scatter_'):]} ablation: each scorer's prediction (sum over the group) against the "
                "measured loss increase, log scales")
    if stem == "ablation_heatmap":
        return "The measured ablation beside every scorer, same layout, as rank percentiles (1 = most important)"
    return stem


def _stat(value: Any) -> str:
    """A correlation or overlap as three decimals ('nan' when undefined, '–' when absent)."""
    if value is None:
        return "–"
    return fmt(value) if not _number(value) or math.isnan(value) else f"{value:.3f}"


def _obj(doc: dict[str, Any], key: str) -> dict[str, Any]:
    value = doc.get(key)
    return value if isinstance(value, dict) else {}


def _ceiling(rel: Any) -> float | None:
    value = rel.get("ceiling") if isinstance(rel, dict) else None
    return value if _number(value) and value is not None and not math.isnan(value) else None


def _noise(rel: Any) -> str:
    if not isinstance(rel, dict):
        return "not measured (fewer than two held-out windows)"
    text = f"split-half Spearman {_stat(rel.get('split_half'))} over {fmt(rel.get('windows'))} windows"
    if _ceiling(rel) is None:
        return text + "; too noisy for a ceiling"
    return text + f"; a perfect scorer would reach about {_stat(rel['ceiling'])}"


def _validation_facts(v: Validation) -> list[tuple[str, Any]]:
    truth, grans = _obj(v.doc, "ground_truth"), v.doc["granularities"]
    ev, groups, rel = _obj(truth, "eval"), _obj(truth, "groups"), _obj(truth, "reliability")
    rows: list[tuple[str, Any]] = [
        ("granularity", v.granularity + "".join(f"; {fmt(groups.get(g, grans[g].get('n')))} {g} groups"
                                               for g in grans)),
        ("held-out data", ev.get("data")),
        ("held-out tokens", None if ev.get("tokens") is None else
         f"{fmt(ev.get('tokens'))} ({fmt(ev.get('windows'))} windows of {fmt(ev.get('seq_len'))}), "
         f"{fmt(truth.get('predicted_tokens'))} predicted"),
        ("base loss (mean token NLL)", truth.get("base_nll"))]
    rows += [(f"measurement noise ({g})", _noise(rel.get(g))) for g in grans if g in rel]
    if truth.get("shortcut") is False:
        rows.append(("measured with", f"full forwards ({fmt(truth.get('shortcut_reason'))})"))
    rows += [("ground truth", truth.get("definition")), ("validated model", _obj(v.doc, "model").get("spec")),
             ("score table", _obj(v.doc, "scores").get("path"))]
    return [(k, val) for k, val in rows if val is not None]


def _validation_section(v: Validation) -> str:
    """Agreement of each scorer with the measured loss increase, the facts behind it, and the figures."""
    grans, gran = v.doc["granularities"], v.granularity
    res = grans[gran]
    layer = grans.get("layer") if gran != "layer" else None
    frac = res.get("bottom_fraction")
    cols = ["Spearman", "Kendall", f"bottom {frac:.0%} overlap" if _number(frac) and frac else "bottom overlap"]
    cols += ["layer Spearman"] if layer else []
    names = list(dict.fromkeys([*res["scorers"], *(layer["scorers"] if layer else [])]))
    rows = []
    for name in names:
        s, ls = res["scorers"].get(name, {}), (layer or {}).get("scorers", {}).get(name, {})
        cells = [f"<td class='num'>{_stat(s.get(k))}</td>" for k in _STATS]
        if layer:
            lead = " lead" if name == layer.get("best") else ""
            cells.append(f"<td class='num{lead}'>{_stat(ls.get('spearman'))}</td>")
        best = name == res.get("best")
        rows.append(("<tr class='best'>" if best else "<tr>") + f"<th>{esc(name)}{' (best)' if best else ''}</th>"
                    + "".join(cells) + "</tr>")
    rel = _obj(_obj(v.doc, "ground_truth"), "reliability")
    ceilings = [_ceiling(rel.get(gran)), None, None] + ([_ceiling(rel.get("layer"))] if layer else [])
    if any(c is not None for c in ceilings):
        rows.append("<tr class='muted'><th>noise ceiling</th>" + "".join(
            f"<td class='num'>{_stat(c)}</td>" for c in ceilings) + "</tr>")
    head = "<tr><th>scorer</th>" + "".join(f"<th>{esc(c)}</th>" for c in cols) + "</tr>"
    frac_words = f"{frac:.0%} of" if _number(frac) and frac else "bottom fraction of"
    word = gran.replace("_", " ")
    out = ["<h2 id='validation'>Does the importance predict removal?</h2>",
           f"<p>Each {esc(word)} was removed alone and the increase of the mean token loss on held-out text "
           f"measured (the ground truth). Spearman and Kendall: rank agreement of each scorer's {esc(word)} values "
           f"(summed over the {esc(word)}) with it, 1 = the same order; bottom overlap: the share of the "
           f"{esc(frac_words)} {esc(word)}s the scorer ranks least important that are also among the least harmful "
           "to remove"
           + ("; layer Spearman: the same for whole layers" if layer else "")
           + ". Best scorer (highest Spearman) highlighted; the noise ceiling is about the best Spearman any scorer "
           "can reach against a measurement this noisy.</p>",
           f"<table>{head}{''.join(rows)}</table>", kv_table(_validation_facts(v))]
    for stem, (caption, name, png) in v.figures.items():
        out.append(figure_html(f"validation-{stem}", caption, png) if png is not None else
                   f"<p class='muted'>{esc(name)} is missing or not a PNG in <code>{esc(v.folder)}</code></p>")
    out.append(f"<p class='muted'>from <code>{esc(v.folder / 'validation.json')}</code></p>")
    return "".join(out)

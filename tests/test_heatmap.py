"""Heatmaps checked through their data: the matrix behind each Axes, labels, colour limits, shared scales.

Most tests build ``ImportanceTable`` objects by hand, so every expected number is computed here from the
tensors put in, independently of the drawing code.
"""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from conftest import random_windows, tiny
from matplotlib import colors

from importance.errors import ImpruneError
from importance.scorers import HEAD_SCORER
from importance.scoring import score
from importance.table import ImportanceTable
from importance.viz import heatmap as H
from pruning.cli.core import main

# table component order deliberately differs from the display order
COMPS = ["norm.attn_in", "attn.q", "attn.k", "attn.v", "attn.o", "norm.mlp_in", "mlp.gate", "mlp.up", "mlp.down"]
SHOWN = ["attn.q", "attn.k", "attn.v", "attn.o", "mlp.up", "mlp.down", "mlp.gate"]


def make_table(values: torch.Tensor, heads: torch.Tensor | None = None, counts: torch.Tensor | None = None,
               data: str = "austen:train", model: str = "test-model") -> ImportanceTable:
    """A table with taylor values [L, C] over COMPS (and optional head values [L, H])."""
    n_layers = values.shape[0]
    counts = counts if counts is not None else torch.full(values.shape, 4.0)
    tensors = {"taylor/component": values.float(), "count/component": counts.float(),
               "taylor/layer": values.nan_to_num().sum(1), "count/layer": counts.sum(1)}
    if heads is not None:
        tensors["taylor/head"] = heads.float()
        tensors["count/head"] = torch.full(heads.shape, 2.0)
    meta = {"scorers": ["taylor"], "components": COMPS, "layers": n_layers, "model": {"spec": model},
            "data": {"data": data}}
    return ImportanceTable(tensors, meta)


def rand_table(n_layers: int = 6, seed: int = 0, scale: float = 1.0, **kw) -> ImportanceTable:
    g = torch.Generator().manual_seed(seed)
    values = torch.rand(n_layers, len(COMPS), generator=g) * scale + 0.01
    heads = torch.rand(n_layers, 4, generator=g) * scale + 0.01
    return make_table(values, heads, **kw)


def panels(fig) -> list:
    return [ax for ax in fig.axes if hasattr(ax, "imprune")]


def column(name: str) -> int:
    return COMPS.index(name)


# ------------------------------------------------------------------------------------------------ component


def test_component_figure_shows_the_table_in_display_order() -> None:
    t = rand_table()
    fig = H.component_figure(t, "taylor", aggregation="sum", norm="none")
    (ax,) = panels(fig)
    assert ax.imprune.xlabels == tuple(SHOWN)
    expected = t.tensors["taylor/component"][:, [column(c) for c in SHOWN]].numpy()
    np.testing.assert_allclose(ax.imprune.matrix, expected, rtol=1e-6)
    assert [tick.get_text() for tick in ax.get_xticklabels()] == SHOWN
    mesh = ax.collections[0]
    np.testing.assert_allclose(np.asarray(mesh.get_array()).reshape(expected.shape), expected, rtol=1e-6)
    assert mesh.norm.vmin == pytest.approx(expected.min()) and mesh.norm.vmax == pytest.approx(expected.max())


def test_mean_aggregation_and_layer_norm_over_the_columns_shown() -> None:
    t = rand_table()
    counts = torch.arange(1, 1 + 6 * len(COMPS), dtype=torch.float32).view(6, len(COMPS))
    t = make_table(t.tensors["taylor/component"], counts=counts)
    (ax,) = panels(H.component_figure(t, "taylor", aggregation="mean", norm="layer"))
    idx = [column(c) for c in SHOWN]
    mean = (t.tensors["taylor/component"] / counts)[:, idx].numpy()
    np.testing.assert_allclose(ax.imprune.matrix, mean / mean.sum(1, keepdims=True), rtol=1e-5)
    np.testing.assert_allclose(ax.imprune.matrix.sum(1), 1.0, rtol=1e-5)
    (ax,) = panels(H.component_figure(t, "taylor", aggregation="mean", norm="component"))
    np.testing.assert_allclose(ax.imprune.matrix, mean / mean.sum(0, keepdims=True), rtol=1e-5)
    (ax,) = panels(H.component_figure(t, "taylor", aggregation="mean", norm="global"))
    assert ax.imprune.matrix.sum() == pytest.approx(1.0, rel=1e-5)


def test_norm_columns_only_when_asked() -> None:
    t = rand_table()
    (ax,) = panels(H.component_figure(t, norms=True))
    assert ax.imprune.xlabels == (*SHOWN, "norm.attn_in", "norm.mlp_in")
    assert ax.imprune.matrix.shape == (6, 9)


def test_titles_and_colorbar_label_name_model_scorer_data_and_normalization() -> None:
    t = rand_table(data="austen:emma", model="tiny-llama")
    fig = H.component_figure(t, "taylor", "mean", "layer")
    title = fig.get_suptitle()
    for word in ("tiny-llama", "taylor", "austen:emma", "layer"):
        assert word in title
    bars = [ax for ax in fig.axes if not hasattr(ax, "imprune")]
    assert len(bars) == 1
    label = bars[0].get_ylabel()
    assert "taylor" in label and "mean" in label and "layer" in label


def test_nan_cells_are_blank() -> None:
    values = torch.rand(4, len(COMPS)) + 0.1
    values[:, column("mlp.gate")] = float("nan")  # a model without a gate (GPT-2)
    values[2, column("attn.q")] = float("nan")
    (ax,) = panels(H.component_figure(make_table(values), norm="none"))
    m = ax.imprune.matrix
    assert np.isnan(m[:, SHOWN.index("mlp.gate")]).all() and np.isnan(m[2, 0])
    assert np.isfinite(m).sum() == 4 * 6 - 1
    mask = np.ma.getmaskarray(ax.collections[0].get_array()).reshape(m.shape)
    np.testing.assert_array_equal(mask, np.isnan(m))


def test_log_scale_over_the_positive_values() -> None:
    values = torch.full((3, len(COMPS)), 1.0)
    values[0, column("attn.q")] = 0.02
    values[1, column("attn.k")] = 0.0  # cannot sit on a log scale: left blank
    values[2, column("attn.v")] = 5.0
    (ax,) = panels(H.component_figure(make_table(values), aggregation="sum", norm="none", log=True))
    norm = ax.collections[0].norm
    assert isinstance(norm, colors.LogNorm)
    assert norm.vmin == pytest.approx(0.02) and norm.vmax == pytest.approx(5.0)
    assert np.isnan(ax.imprune.matrix[1, 1]) and not ax.imprune.scale.clipped
    assert "log" in ax.imprune.scale.label
    values[0, column("attn.q")] = 1e-7  # an outlier far below: the scale stops LOG_DECADES under the maximum
    (ax,) = panels(H.component_figure(make_table(values), aggregation="sum", norm="none", log=True))
    norm = ax.collections[0].norm
    assert norm.vmin == pytest.approx(5.0 * 10 ** -H.LOG_DECADES) and ax.imprune.scale.clipped
    assert ax.imprune.matrix[0, 0] == pytest.approx(1e-7)  # the data itself is kept
    assert ax.collections[0].cmap(norm(1e-7)) == ax.collections[0].cmap(0.0)  # drawn in the darkest colour


def test_signed_scores_on_a_log_scale_are_drawn_on_a_signed_log_scale_not_blanked() -> None:
    values = torch.full((3, len(COMPS)), 1.0)
    values[0, column("attn.q")] = -0.5  # a second-order estimate says removing it helps
    values[2, column("attn.v")] = 4.0
    (ax,) = panels(H.component_figure(make_table(values), aggregation="sum", norm="none", log=True))
    norm = ax.collections[0].norm
    assert isinstance(norm, colors.SymLogNorm)
    assert (norm.vmin, norm.vmax) == (pytest.approx(-4.0), pytest.approx(4.0))
    assert norm.linthresh == pytest.approx(4.0 * 10 ** -H.LOG_DECADES)
    assert ax.imprune.matrix[0, 0] == pytest.approx(-0.5) and norm(-0.5) < norm(0.0) < norm(1.0)
    assert "removing it helps" in ax.imprune.scale.label


@pytest.mark.parametrize("lim", [4.0, 3.5e-2, 7e-6])
def test_a_signed_log_colour_bar_labels_zero_and_whole_decades_clear_of_the_linear_band(lim: float) -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    values = torch.full((3, len(COMPS)), lim / 4)
    values[0, column("attn.q")] = -lim / 8
    values[2, column("attn.v")] = lim
    fig = H.component_figure(make_table(values), aggregation="sum", norm="none", log=True)
    FigureCanvasAgg(fig).draw()
    (bar,) = [a for a in fig.axes if a.get_label() == "<colorbar>"]
    ticks = list(bar.get_yticks())
    thresh = lim * 10 ** -H.LOG_DECADES
    assert 0.0 in ticks and ticks == sorted(ticks) and ticks == [-t for t in reversed(ticks)]
    nonzero = [abs(t) for t in ticks if t]
    assert nonzero and all(2 * thresh < t <= lim for t in nonzero) and len(ticks) <= 7
    assert all(math.log10(t) == pytest.approx(round(math.log10(t))) for t in nonzero)  # whole decades
    labels = [t.get_text() for t in bar.get_yticklabels()]
    assert labels[len(labels) // 2] == "0" and len(set(labels)) == len(labels)


@pytest.mark.parametrize("n_layers", [6, 24, 30, 48, 80])
def test_layer_labels_are_thinned(n_layers: int) -> None:
    (ax,) = panels(H.component_figure(rand_table(n_layers)))
    labels = [int(tick.get_text()) for tick in ax.get_yticklabels()]
    step = math.ceil(n_layers / 24)
    assert labels == list(range(0, n_layers, step))
    assert len(labels) <= 24


def test_unknown_options_are_user_errors() -> None:
    t = rand_table()
    with pytest.raises(ImpruneError, match="normalization"):
        H.component_figure(t, norm="rows")
    with pytest.raises(ImpruneError, match="aggregation"):
        H.component_figure(t, aggregation="max")
    with pytest.raises(ImpruneError, match="no scorer 'fisher'"):
        H.component_figure(t, scorer="fisher")
    no_heads = make_table(torch.rand(2, len(COMPS)))
    with pytest.raises(ImpruneError, match="no head"):
        H.heads_figure([no_heads])


# ------------------------------------------------------------------------------------------------ grids


def test_grid_shares_one_scale_and_titles_panels_by_task() -> None:
    names = ["knowledge", "retrieval", "logic", "decision", "semantic", "syntax", "inference", "math"]
    tables = [rand_table(5, seed=i, scale=10.0 ** i, data=f"tasks:{n}") for i, n in enumerate(names)]
    fig = H.heads_figure(tables)
    axs = panels(fig)
    assert [ax.get_title() for ax in axs] == names
    all_heads = np.concatenate([(t.tensors["taylor/head"] / 2).numpy().ravel() for t in tables])
    for ax, t in zip(axs, tables):
        np.testing.assert_allclose(ax.imprune.matrix, (t.tensors["taylor/head"] / 2).numpy(), rtol=1e-6)
        assert ax.imprune.xlabels == ("h0", "h1", "h2", "h3")
        norm = ax.collections[0].norm
        assert (norm.vmin, norm.vmax) == pytest.approx((all_heads.min(), all_heads.max()))
    assert len({id(ax.imprune.scale) for ax in axs}) == 1
    assert len(fig.axes) == len(axs) + 1  # one shared colour bar
    rows = {round(ax.get_position().y0, 3) for ax in axs}
    cols = {round(ax.get_position().x0, 3) for ax in axs}
    assert (len(rows), len(cols)) == (2, 4)


def test_grid_with_explicit_titles_and_a_log_scale() -> None:
    tables = [rand_table(4, seed=1), rand_table(4, seed=2, scale=100.0)]
    axs = panels(H.heads_figure(tables, ["a", "b"], log=True, cols=2))
    assert [ax.get_title() for ax in axs] == ["a", "b"]
    assert all(isinstance(ax.collections[0].norm, colors.LogNorm) for ax in axs)
    with pytest.raises(ImpruneError, match="titles"):
        H.heads_figure(tables, ["only one"])


# ------------------------------------------------------------------------------------------------ delta


def test_delta_is_zero_for_identical_tables() -> None:
    t = rand_table()
    for log in (False, True):
        fig = H.delta_figure(t, t, log=log)
        before, after, diff = panels(fig)
        np.testing.assert_array_equal(before.imprune.matrix, after.imprune.matrix)
        assert np.all(diff.imprune.matrix[np.isfinite(diff.imprune.matrix)] == 0)
        assert before.imprune.scale is after.imprune.scale


def test_delta_values_and_diverging_scale_centred_at_zero() -> None:
    b, a = rand_table(seed=1), rand_table(seed=2, scale=3.0)
    fig = H.delta_figure(b, a, aggregation="sum")
    before, after, diff = panels(fig)
    idx = [column(c) for c in SHOWN]
    tb, ta = b.tensors["taylor/component"][:, idx].numpy(), a.tensors["taylor/component"][:, idx].numpy()
    np.testing.assert_allclose(diff.imprune.matrix, ta - tb, rtol=1e-5, atol=1e-7)
    lo, hi = min(tb.min(), ta.min()), max(tb.max(), ta.max())
    for ax in (before, after):
        assert (ax.collections[0].norm.vmin, ax.collections[0].norm.vmax) == pytest.approx((lo, hi))
    dn = diff.collections[0].norm
    assert dn.vmin == pytest.approx(-dn.vmax) and dn.vmax == pytest.approx(np.abs(ta - tb).max())
    assert diff.imprune.scale.kind == "diverging"
    (ax_log,) = panels(H.delta_figure(b, a, aggregation="sum", log=True))[2:]
    np.testing.assert_allclose(ax_log.imprune.matrix, np.log10(ta / tb), rtol=1e-5, atol=1e-6)


def test_delta_lines_up_removed_layers() -> None:
    b = rand_table(5, seed=3)
    kept = [0, 1, 3, 4]  # layer 2 removed
    a = make_table(b.tensors["taylor/component"][kept] * 2)
    with pytest.raises(ImpruneError, match="layers_kept"):
        H.delta_figure(b, a)
    _, after, diff = panels(H.delta_figure(b, a, aggregation="sum", layers_kept=kept))
    assert np.isnan(after.imprune.matrix[2]).all() and np.isnan(diff.imprune.matrix[2]).all()
    idx = [column(c) for c in SHOWN]
    np.testing.assert_allclose(diff.imprune.matrix[kept], b.tensors["taylor/component"][kept][:, idx].numpy(),
                               rtol=1e-5)


# ------------------------------------------------------------------------------------------------ plans


def test_sparsity_map_has_a_fixed_scale_and_sits_beside_the_importance() -> None:
    t = rand_table(4)
    sparsity = {str(layer): {c: layer / 8 for c in SHOWN} for layer in range(4)}  # JSON keys are strings
    fig = H.plan_figure({"method": "x", "sparsity": sparsity}, t)
    imp, sp = panels(fig)
    assert sp.imprune.xlabels == imp.imprune.xlabels == tuple(SHOWN)
    np.testing.assert_allclose(sp.imprune.matrix, np.repeat(np.arange(4)[:, None] / 8, 7, 1))
    assert (sp.collections[0].norm.vmin, sp.collections[0].norm.vmax) == (0.0, 1.0)
    m = (t.tensors["taylor/component"] / 4)[:, [column(c) for c in SHOWN]].numpy()
    np.testing.assert_allclose(imp.imprune.matrix, m / m.sum(1, keepdims=True), rtol=1e-5)


def test_bits_map_is_discrete() -> None:
    bits = {layer: {"attn.q": 4, "attn.k": 8, "mlp.down": 2 if layer else 16} for layer in range(3)}
    fig = H.layer_map_figure(bits, "bits")
    (ax,) = panels(fig)
    assert ax.imprune.xlabels == ("attn.q", "attn.k", "mlp.down")
    np.testing.assert_array_equal(ax.imprune.matrix, [[4, 8, 16], [4, 8, 2], [4, 8, 2]])
    assert ax.imprune.scale.levels == (2, 4, 8, 16)
    norm = ax.collections[0].norm
    assert isinstance(norm, colors.BoundaryNorm) and norm.Ncmap == 4
    assert len({tuple(ax.collections[0].cmap(norm(v))) for v in (2, 4, 8, 16)}) == 4  # one colour per width
    bar = [a for a in fig.axes if a is not ax][0]
    assert [float(v) for v in bar.get_yticks()] == [2, 4, 8, 16]
    with pytest.raises(ImpruneError, match="neither"):
        H.plan_figure({"method": "x"})


# ------------------------------------------------------------------------------------------------ files, real tables


@pytest.mark.parametrize("suffix", [".png", ".svg", ".pdf"])
def test_save_figure_formats(tmp_path, suffix: str) -> None:
    path = H.save_figure(H.component_figure(rand_table(3)), tmp_path / f"f{suffix}")
    head = path.read_bytes()[:8]
    assert {".png": b"\x89PNG", ".svg": b"<?xml", ".pdf": b"%PDF"}[suffix] in head
    with pytest.raises(ImpruneError, match="png"):
        H.save_figure(H.component_figure(rand_table(3)), tmp_path / "f.jpg")
    assert sorted(p.name for p in tmp_path.iterdir()) == [f"f{suffix}"]


@pytest.fixture(scope="module")
def scored() -> ImportanceTable:
    return score(tiny("llama"), random_windows(4, 16), ["taylor", "fisher", "magnitude"], progress=False)


def test_figures_of_a_scored_model(scored: ImportanceTable) -> None:
    for scorer in ("taylor", "fisher", "magnitude"):
        (ax,) = panels(H.component_figure(scored, scorer, "mean", "none"))
        labels = list(ax.imprune.xlabels)
        expected = scored.matrix(scorer, "component", "mean")[:, [scored.components.index(c) for c in labels]]
        np.testing.assert_allclose(ax.imprune.matrix, expected.numpy(), rtol=1e-6)
        assert not any(c.startswith("norm.") for c in labels)
        (ax,) = panels(H.heads_figure([scored], scorer=scorer, granularity="kv_group"))
        assert ax.imprune.matrix.shape == (2, 2)
        (ax,) = panels(H.heads_figure([scored], scorer=scorer))
        np.testing.assert_allclose(ax.imprune.matrix, scored.matrix(scorer, "head", "mean").numpy(), rtol=1e-6)


def test_heatmap_command(tmp_path, scored: ImportanceTable, capsys) -> None:
    a, b = scored.save(tmp_path / "a"), scored.save(tmp_path / "b")
    plan = tmp_path / "imprune.json"
    plan.write_text(json.dumps({"sparsity": {"0": {"attn.q": 0.5}, "1": {"attn.q": 0.25}}}))
    cases = [([str(a)], "component"), ([str(a), str(b)], "head"), ([str(a)], "kv_group"),
             ([str(a), str(b)], "delta"), ([str(a)], "sparsity")]
    for i, (tables, kind) in enumerate(cases):
        out = tmp_path / f"{kind}{i}.svg"
        extra = ["--plan", str(plan)] if kind == "sparsity" else []
        assert main(["heatmap", *tables, "--kind", kind, "--log", "--out", str(out), *extra]) == 0
        assert out.read_bytes().startswith(b"<?xml")
    assert main(["heatmap", str(a), "--out", str(tmp_path / "component0.svg")]) == 2  # exists
    assert main(["heatmap", str(a), "--kind", "delta", "--out", str(tmp_path / "d.png")]) == 2
    assert main(["heatmap", str(a), "--kind", "bits", "--plan", str(plan), "--out", str(tmp_path / "x.png")]) == 2
    assert main(["heatmap", str(a), "--scorer", "activation", "--out", str(tmp_path / "y.png")]) == 2
    assert main(["heatmap", str(a), "--out", str(tmp_path / "z.gif")]) == 2
    err = capsys.readouterr().err
    assert "exactly two tables" in err and "not bits" in err and "no scorer 'activation'" in err
    assert not any(p.name.startswith(("d.", "x.", "y.", "z.")) for p in tmp_path.iterdir())


def test_probe_command_scores_each_task(tmp_path) -> None:
    from importance.data.sources import load_data
    from importance.models.load import load_model

    out = tmp_path / "probe"
    argv = ["probe", "--model", "random:llama", "--tasks", "math,logic", "--samples", "4", "--scorers", "taylor",
            "--out", str(out), "--quiet"]
    assert main(argv) == 0
    assert sorted(p.name for p in out.iterdir()) == ["heads.png", "logic", "math", "probe.json", "report.md"]
    assert json.loads((out / "probe.json").read_text())["tasks"] == ["math", "logic"]  # marks it as imprune's
    assert (out / "heads.png").read_bytes().startswith(b"\x89PNG")
    lm = load_model("random:llama")
    for task in ("math", "logic"):
        got = ImportanceTable.load(out / task)
        assert got.meta["data"]["data"] == f"tasks:{task}" and got.meta["data"]["windows"] == 4
        windows = load_data(f"tasks:{task}", lm.tokenizer, seq_len=128, samples=4, seed=0)
        want = score(lm, windows, ["taylor"], progress=False)
        assert got.meta["counts"]["targets"] == int(windows.loss_mask.sum())  # answer tokens only
        torch.testing.assert_close(got.tensors["taylor/head"], want.tensors["taylor/head"], equal_nan=True)
    assert main(argv) == 2  # exists
    assert main([*argv[:4], "math,nope", *argv[5:], "--overwrite"]) == 2
    assert sorted(p.name for p in out.iterdir()) == ["heads.png", "logic", "math", "probe.json", "report.md"]


def test_a_font_cache_without_matplotlibs_own_fonts_gets_them_and_log_axes_draw_silently(caplog, tmp_path) -> None:
    """A font cache built by another matplotlib (system fonts only) made every log-axis tick label log
    'findfont: Font family ... not found'; the heatmap module registers the bundled fonts instead."""
    import logging

    from matplotlib import font_manager
    from matplotlib.figure import Figure

    from importance.viz import heatmap

    fm = font_manager.fontManager
    saved = list(fm.ttflist)
    try:
        fm.ttflist = [f for f in fm.ttflist if "mpl-data" not in f.fname]  # what such a cache holds
        assert "STIXGeneral" not in {f.name for f in fm.ttflist}
        heatmap._bundled_fonts()
        assert {"STIXGeneral", "cmr10", "DejaVu Sans Display"} <= {f.name for f in fm.ttflist}
        with caplog.at_level(logging.WARNING, logger="matplotlib.font_manager"):
            fig = Figure()
            ax = fig.subplots()
            ax.set_yscale("log")
            ax.plot([1, 2], [0.01, 10])
            fig.savefig(tmp_path / "log.png")
        assert not [r for r in caplog.records if "findfont" in r.getMessage()]
    finally:
        fm.ttflist = saved


def test_heatmap_command_draws_the_scorer_that_made_the_plan(tmp_path, scored: ImportanceTable, monkeypatch) -> None:
    a = scored.save(tmp_path / "a")
    other = next(s for s in scored.scorers if s != "taylor" and scored.has(s, "component"))
    plan = tmp_path / "imprune.json"
    plan.write_text(json.dumps({"sparsity": {"0": {"attn.q": 0.5}}, "allocation": {"signal": other}}))
    seen = []
    real = H.layer_map_figure
    monkeypatch.setattr(H, "layer_map_figure", lambda values, kind, table, scorer, *rest: seen.append(scorer)
                        or real(values, kind, table, scorer, *rest))
    for i, flag in enumerate(([], ["--scorer", "taylor"])):
        assert main(["heatmap", str(a), "--kind", "sparsity", "--plan", str(plan), *flag,
                     "--out", str(tmp_path / f"s{i}.png")]) == 0
    assert seen == [other, "taylor"]


def test_head_maps_draw_the_trusted_head_scorer_the_table_has(scored: ImportanceTable) -> None:
    with_gate = score(tiny("llama"), random_windows(4, 16), ["taylor", "fisher", "token_fisher", "token_second_order"],
                      progress=False)
    assert H.pick_scorer(with_gate, None, "head") == "token_second_order" == HEAD_SCORER
    only_fisher_gate = score(tiny("llama"), random_windows(4, 16), ["fisher", "token_fisher"], progress=False)
    assert H.pick_scorer(only_fisher_gate, None, "head") == "token_fisher"  # the next trusted one the table has
    assert H.pick_scorer(scored, None, "head") == "fisher"  # default tables have no per-token gate: next trusted one
    assert H.pick_scorer(scored, None, "component") == "taylor"  # not a head map: taylor as before
    (ax,) = panels(H.heads_figure([with_gate]))
    np.testing.assert_allclose(ax.imprune.matrix, with_gate.matrix("token_second_order", "head", "mean").numpy(),
                               rtol=1e-6)

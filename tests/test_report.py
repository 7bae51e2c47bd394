"""The HTML report: self-contained (every image a data: URI, nothing external), escaped, complete for a run
folder, a single table and --compare, with the validation section when ``imprune validate`` wrote one; rendered
in headless Chromium when it is installed."""

from __future__ import annotations

import base64
import json
import math
import shutil
import subprocess
from html.parser import HTMLParser
from pathlib import Path

import pytest
import torch
from conftest import random_windows, tiny
from matplotlib.figure import Figure

from importance.errors import ImpruneError
from importance.scoring import score
from importance.table import ImportanceTable
from importance.viz import heatmap as H
from pruning.cli.core import main
from pruning.run.report import build_report, load_run, write_run_outputs

EVIL = "<script>alert('x')</script>"


class Page(HTMLParser):
    """Collects every tag with its attributes, the visible text, and every table row as (its class, cell texts)."""

    def __init__(self, text: str) -> None:
        super().__init__()
        self.tags: list[tuple[str, dict[str, str | None]]] = []
        self.text: list[str] = []
        self.rows: list[tuple[str | None, list[str]]] = []
        self._cell: list[str] | None = None
        self.feed(text)

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.tags.append((tag, dict(attrs)))
        if tag == "tr":
            self.rows.append((dict(attrs).get("class"), []))
        elif tag in ("td", "th"):
            self._cell = []

    def handle_endtag(self, tag: str) -> None:
        if tag in ("td", "th") and self._cell is not None:
            self.rows[-1][1].append("".join(self._cell))
            self._cell = None

    def handle_data(self, data: str) -> None:
        self.text.append(data)
        if self._cell is not None:
            self._cell.append(data)

    def row(self, first: str) -> tuple[str | None, list[str]]:
        """The one table row whose first cell is ``first``."""
        found = [r for r in self.rows if r[1] and r[1][0] == first]
        assert len(found) == 1, (first, found)
        return found[0]

    def all(self, tag: str) -> list[dict[str, str | None]]:
        return [a for t, a in self.tags if t == tag]


@pytest.fixture(scope="module")
def tables() -> tuple[ImportanceTable, ImportanceTable]:
    lm = tiny("llama")
    names = ["taylor", "fisher", "magnitude"]
    return (score(lm, random_windows(4, 16, seed=1), names, progress=False),
            score(lm, random_windows(4, 16, seed=2), names, progress=False))


@pytest.fixture()
def run_dir(tmp_path: Path, tables) -> Path:
    run = tmp_path / "run"
    tables[0].save(run / "scores_before")
    tables[1].save(run / "scores_after")
    (run / "model").mkdir()
    (run / "model" / "imprune.json").write_text(json.dumps(
        {"method": "recipe", "sparsity": {"0": {"attn.q": 0.5, "mlp.up": 0.25}, "1": {"attn.q": 0.75}}}))
    metrics = {"perplexity": {"before": {"ppl": 43.2187, "nll": 3.766, "predicted": 16320, "windows": 64,
                                         "seq_len": 256, "data": "austen:eval"},
                              "after": {"ppl": 51.9034, "nll": 3.949, "predicted": 16320, "windows": 64,
                                        "seq_len": 256, "data": "austen:eval"}},
               "params": {"before": 1000, "after": 750}, "memory": {"weight_bytes_before": 4000},
               "timings": {"prune": 1.5}, "settings": {"model": "random:llama", "note": EVIL},
               "accuracy": {"before": {"logic": {"acc": 0.8125, "acc_norm": 0.75, "chance": 0.5, "n": 16}},
                            "after": {"logic": {"acc": 0.6875, "acc_norm": 0.625, "chance": 0.5, "n": 16}},
                            "items_per_task": 16, "metric": "acc"}}
    (run / "metrics.json").write_text(json.dumps(metrics))
    return run


def check_self_contained(page: str) -> Page:
    parsed = Page(page)
    for tag, attrs in parsed.tags:
        for key in ("src", "href", "srcset", "action", "data"):
            if attrs.get(key) is not None:
                assert attrs[key].startswith("data:"), f"<{tag} {key}> points outside the page"
    assert not parsed.all("link") and not parsed.all("iframe")
    assert all(s.get("src") is None for s in parsed.all("script"))
    assert "@import" not in page and "url(" not in page
    return parsed


def test_run_report_has_everything(run_dir: Path, tables) -> None:
    page = build_report(run_dir)
    parsed = check_self_contained(page)
    figures = [a["id"] for a in parsed.all("figure")]
    assert figures == ["plan", "components", "heads", "layers", "delta"]  # the plan's map leads
    # the headline first (ppl, mean accuracy, parameters before -> after with the ratio), the settings last
    h2 = [i for i, t in enumerate(parsed.text) if t in ("Headline", "Metrics", "Figures", "Settings")]
    assert [parsed.text[i] for i in h2] == ["Headline", "Metrics", "Figures", "Settings"]
    head = " ".join(parsed.text[h2[0]:h2[1]])
    assert "43.22" in head and "51.9" in head and "0.8125" in head and "0.6875" in head and "0.75" in head
    assert "1.201" in head  # 51.9034 / 43.2187: the perplexity ratio, computed
    imgs = parsed.all("img")
    assert len(imgs) == 5 and all(a["src"].startswith("data:image/png;base64,") and a["alt"] for a in imgs)
    text = " ".join(parsed.text)
    assert "43.22" in text and "51.9" in text and "0.75" in text  # perplexities and params after / before
    assert "Probe accuracy" in text and "0.8125" in text and "0.6875" in text
    assert EVIL in text  # shown as text ...
    assert EVIL not in page and "&lt;script&gt;" in page  # ... because it was escaped
    # the most and least important component by mean taylor, computed here from the table's tensors
    t = tables[0]
    m = t.tensors["taylor/component"] / t.tensors["count/component"]
    keep = [j for j, c in enumerate(t.components) if not c.startswith("norm.")]
    flat = [(float(m[i, j]), f"L{i} {t.components[j]}") for i in range(t.n_layers) for j in keep]
    assert max(flat)[1] in text and min(flat)[1] in text


def test_single_table_and_compare(tmp_path: Path, tables) -> None:
    a, b = tables[0].save(tmp_path / "a"), tables[1].save(tmp_path / "b")
    parsed = check_self_contained(build_report(a))
    assert [f["id"] for f in parsed.all("figure")] == ["components", "heads", "layers"]
    parsed = check_self_contained(build_report(a, compare=b))
    assert [f["id"] for f in parsed.all("figure")] == ["delta", "components", "heads", "layers"]  # before / after leads
    assert load_run(a, compare=b).after_label == "b"


def test_report_errors_and_cli(tmp_path: Path, run_dir: Path, capsys) -> None:
    with pytest.raises(ImpruneError, match="neither a table"):
        load_run(tmp_path)
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "scores_before").mkdir()
    shutil.copytree(run_dir / "scores_before", tmp_path / "bad" / "scores_before", dirs_exist_ok=True)
    (tmp_path / "bad" / "metrics.json").write_text("{not json")
    with pytest.raises(ImpruneError, match="not valid JSON"):
        load_run(tmp_path / "bad")
    out = tmp_path / "r.html"
    assert main(["report", str(run_dir), "--out", str(out)]) == 0
    assert out.read_text().startswith("<!DOCTYPE html>")
    assert main(["report", str(run_dir), "--out", str(out)]) == 2  # exists
    assert main(["report", str(tmp_path / "missing"), "--out", str(tmp_path / "m.html")]) == 2
    assert main(["report", str(run_dir), "--scorer", "activation", "--out", str(tmp_path / "s.html")]) == 2
    assert "no scorer 'activation'" in capsys.readouterr().err
    assert not (tmp_path / "m.html").exists() and not (tmp_path / "s.html").exists()


def test_write_run_outputs(run_dir: Path) -> None:
    page = write_run_outputs(run_dir)
    assert page == run_dir / "report.html"
    assert sorted(p.name for p in (run_dir / "figures").iterdir()) == \
        ["components.png", "delta.png", "heads.png", "layers.png", "plan.png"]
    assert all(p.read_bytes().startswith(b"\x89PNG") for p in (run_dir / "figures").iterdir())
    write_run_outputs(run_dir)  # rerunning replaces them


def test_delta_after_layer_removal_uses_layers_kept(run_dir: Path, tables) -> None:
    t = tables[1]
    keep = {k: v for k, v in t.tensors.items()}
    for k, v in t.tensors.items():
        if v.dim() >= 1 and v.shape[0] == t.n_layers and not k.startswith(("taylor/channel", "fisher/channel")):
            keep[k] = v[1:]  # the after model lost layer 0
    after = ImportanceTable(keep, {**t.meta, "layers": t.n_layers - 1})
    shutil.rmtree(run_dir / "scores_after")
    after.save(run_dir / "scores_after")
    record = json.loads((run_dir / "model" / "imprune.json").read_text())
    (run_dir / "model" / "imprune.json").write_text(json.dumps({**record, "layers_kept": [1]}))
    parsed = check_self_contained(build_report(run_dir))
    assert "delta" in [f["id"] for f in parsed.all("figure")]


# ------------------------------------------------------------------------------------------------ validation

SECTION = "Does the importance predict removal?"


@pytest.fixture(scope="module")
def validated(tmp_path_factory, tables) -> Path:
    """A table folder with the validation folder the real `imprune validate` writes for it (heads)."""
    root = tmp_path_factory.mktemp("validated")
    folder = tables[0].save(root / "table")
    text = root / "text.txt"
    text.write_text(" ".join(f"word{i % 37} and more{i % 11}." for i in range(800)))
    assert main(["validate", "--model", "random:llama", "--scores", str(folder), "--eval-data", f"file:{text}",
                 "--eval-tokens", "96", "--eval-seq-len", "32", "--granularity", "head", "--quiet"]) == 0
    return folder


def _img_bytes(parsed: Page, figure_id: str) -> bytes:
    index = [i for i, (t, a) in enumerate(parsed.tags) if t == "figure" and a.get("id") == figure_id]
    assert len(index) == 1, figure_id
    tag, attrs = parsed.tags[index[0] + 1]
    assert tag == "img" and attrs["src"].startswith("data:image/png;base64,")
    return base64.b64decode(attrs["src"].split(",", 1)[1])


def test_run_report_shows_the_validation(run_dir: Path, validated: Path) -> None:
    shutil.copytree(validated / "validation", run_dir / "scores_before" / "validation")
    doc = json.loads((validated / "validation" / "validation.json").read_text())
    parsed = check_self_contained(build_report(run_dir))
    assert SECTION in parsed.text
    ids = [a["id"] for a in parsed.all("figure")]
    assert ids == ["plan", "components", "heads", "layers", "delta", "validation-scatter_head",
                   "validation-scatter_layer", "validation-ablation_heatmap"]
    for stem, name in doc["figures"].items():  # embedded exactly as validate wrote them
        assert _img_bytes(parsed, f"validation-{stem}") == (validated / "validation" / name).read_bytes()
    head, layer = doc["granularities"]["head"], doc["granularities"]["layer"]
    assert parsed.row("scorer")[1] == ["scorer", "Spearman", "Kendall", "bottom 25% overlap", "layer Spearman"]
    for name in dict.fromkeys([*head["scorers"], *layer["scorers"]]):
        cls, cells = parsed.row(name + (" (best)" if name == head["best"] else ""))
        assert cls == ("best" if name == head["best"] else None)
        s = head["scorers"].get(name)
        expect = [f"{s[k]:.3f}" for k in ("spearman", "kendall", "bottom_overlap")] if s else ["–"] * 3
        assert cells[1:] == [*expect, f"{layer['scorers'][name]['spearman']:.3f}"]
    truth = doc["ground_truth"]
    ev = truth["eval"]
    assert parsed.row("held-out tokens")[1][1] == \
        f"{ev['tokens']} ({ev['windows']} windows of {ev['seq_len']}), {truth['predicted_tokens']} predicted"
    assert parsed.row("held-out data")[1][1] == ev["data"]
    assert parsed.row("granularity")[1][1].startswith("head; 8 head groups; 2 layer groups")
    ceiling = truth["reliability"]["head"]["ceiling"]
    if not math.isnan(ceiling):
        assert parsed.row("noise ceiling")[1][1] == f"{ceiling:.3f}"


def _write_validation(folder: Path, **changes) -> dict:
    """A validation.json written by hand from the schema: components, a 10% bottom fraction, an undefined
    Spearman, a layer-only scorer, no layer ceiling, full forwards, and scatter_layer.png missing."""
    stats = lambda sp, kt, bo: {"spearman": sp, "kendall": kt, "bottom_overlap": bo, "n": 14}  # noqa: E731
    doc = {"schema": "imprune.validation/1", "model": {"spec": "random:llama"},
           "scores": {"path": str(folder), "scorers": ["taylor", "fisher", "magnitude", "block_influence"]},
           "ground_truth": {"definition": "mean token NLL increase", "base_nll": 5.25,
                            "eval": {"data": "austen:eval", "seq_len": 256, "windows": 4, "tokens": 1024},
                            "predicted_tokens": 1020, "shortcut": False, "shortcut_reason": EVIL,
                            "groups": {"component": 14, "layer": 2},
                            "reliability": {"component": {"split_half": 0.6, "full_set": 0.75, "ceiling": 0.8660254,
                                                          "windows": 4}, "layer": None}},
           "granularities": {
               "component": {"n": 14, "best": "fisher", "bottom_fraction": 0.1,
                             "scorers": {"taylor": stats(0.71234, 0.5, 0.5), "fisher": stats(0.8125, 0.625, 1.0),
                                         "magnitude": stats(float("nan"), float("nan"), 0.0)}},
               "layer": {"n": 2, "best": "block_influence", "bottom_fraction": 0.1,
                         "scorers": {"taylor": stats(-1.0, -1.0, 0.0), "fisher": stats(-1.0, -1.0, 0.0),
                                     "magnitude": stats(1.0, 1.0, 1.0), "block_influence": stats(1.0, 1.0, 1.0)}}},
           "aggregation": "sum",
           "figures": {"scatter_component": "scatter_component.png", "scatter_layer": "scatter_layer.png",
                       "ablation_heatmap": "ablation_heatmap.png"},
           "ablation_table": "ablation", "versions": {}}
    doc.update(changes)
    out = folder / "validation"
    out.mkdir(exist_ok=True)
    png = H.figure_bytes(Figure(figsize=(1, 1)), "png", 20)
    for name in ("scatter_component.png", "ablation_heatmap.png"):
        (out / name).write_bytes(png)
    (out / "validation.json").write_text(json.dumps(doc))
    return doc


def test_table_report_shows_a_handwritten_validation_and_nothing_without_one(tmp_path: Path, tables) -> None:
    folder = tables[0].save(tmp_path / "t")
    page = build_report(folder)
    assert SECTION not in page and "validation-" not in page
    _write_validation(folder)
    page = build_report(folder)
    parsed = check_self_contained(page)
    assert SECTION in parsed.text
    assert [a["id"] for a in parsed.all("figure")][-2:] == ["validation-scatter_component",
                                                            "validation-ablation_heatmap"]
    assert "scatter_layer.png is missing or not a PNG" in " ".join(parsed.text)
    assert parsed.row("scorer")[1][1:] == ["Spearman", "Kendall", "bottom 10% overlap", "layer Spearman"]
    assert parsed.row("fisher (best)") == ("best", ["fisher (best)", "0.812", "0.625", "1.000", "-1.000"])
    assert parsed.row("taylor")[1] == ["taylor", "0.712", "0.500", "0.500", "-1.000"]
    assert parsed.row("magnitude")[1] == ["magnitude", "nan", "nan", "0.000", "1.000"]
    assert parsed.row("block_influence")[1] == ["block_influence", "–", "–", "–", "1.000"]
    assert parsed.row("noise ceiling")[1] == ["noise ceiling", "0.866", "–", "–", "–"]
    assert parsed.row("held-out tokens")[1][1] == "1,024 (4 windows of 256), 1,020 predicted"
    assert parsed.row("measurement noise (layer)")[1][1].startswith("not measured")
    assert parsed.row("measured with")[1][1] == f"full forwards ({EVIL})" and EVIL not in page
    assert "<td class='num lead'>1.000</td>" in page  # the best layer-level scorer (block_influence) in bold


@pytest.mark.parametrize(("changes", "match"), [
    ({"schema": "imprune.other/1"}, "schema 'imprune.other/1'"),
    ({"granularities": {"head": {"best": "x", "scorers": {"x": {"spearman": "high"}}}}}, "granularities.head"),
    ({"granularities": []}, "no 'granularities'"),
    ({"ground_truth": "measured"}, "'ground_truth' is not an object"),
    ({"figures": {"scatter_head": "../../secret.png"}}, "figure 'scatter_head'"),
])
def test_malformed_validation_is_a_one_line_error(tmp_path: Path, tables, changes, match, capsys) -> None:
    folder = tables[0].save(tmp_path / "t")
    _write_validation(folder, **changes)
    with pytest.raises(ImpruneError, match=match):
        load_run(folder)
    assert main(["report", str(folder), "--out", str(tmp_path / "r.html")]) == 2
    err = capsys.readouterr().err.strip()
    assert "validation.json" in err and len(err.splitlines()) == 1 and not (tmp_path / "r.html").exists()


def test_validation_that_is_not_json_is_a_user_error(tmp_path: Path, tables) -> None:
    folder = tables[0].save(tmp_path / "t")
    (folder / "validation").mkdir()
    (folder / "validation" / "validation.json").write_text("{not json")
    with pytest.raises(ImpruneError, match="not valid JSON"):
        load_run(folder)


# ------------------------------------------------------------------------------------------------ browser


def render_in_chromium(path: Path, tmp_path: Path) -> dict[str, str | None]:
    """Open ``path`` in headless Chromium and return <body>'s attributes after the page's scripts ran."""
    exe = shutil.which("chromium") or shutil.which("chromium-browser")
    if exe is None:
        pytest.skip("chromium is not on PATH (Debian: apt-get install chromium; `make setup` tries it)")
    cmd = [exe, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
           "--disable-component-update", "--disable-sync", "--no-first-run", f"--user-data-dir={tmp_path / 'prof'}",
           "--virtual-time-budget=5000", "--dump-dom", path.resolve().as_uri()]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    bodies = Page(done.stdout).all("body")
    assert bodies, done.stdout[:500]
    return bodies[0]


def test_report_renders_in_headless_chromium(run_dir: Path, tmp_path: Path) -> None:
    page = write_run_outputs(run_dir)
    body = render_in_chromium(page, tmp_path)
    assert body.get("data-errors") == "0"
    assert body.get("data-images") == "5" and body.get("data-decoded") == "5"


def test_report_with_validation_renders_in_headless_chromium(run_dir: Path, validated: Path, tmp_path: Path) -> None:
    shutil.copytree(validated / "validation", run_dir / "scores_before" / "validation")
    body = render_in_chromium(write_run_outputs(run_dir), tmp_path)
    assert body.get("data-errors") == "0"
    assert body.get("data-images") == "8" and body.get("data-decoded") == "8"


def test_browser_check_catches_a_broken_image_and_a_script_error(run_dir: Path, tmp_path: Path) -> None:
    page = write_run_outputs(run_dir)
    text = page.read_text().replace("data:image/png;base64,", "data:image/png;base64,AAAA", 1)
    text = text.replace("</body>", "<script>undefinedFunction();</script></body>")
    broken = tmp_path / "broken.html"
    broken.write_text(text)
    body = render_in_chromium(broken, tmp_path)
    assert body.get("data-images") == "5" and body.get("data-decoded") == "4"
    assert body.get("data-errors") == "1"


# ------------------------------------------------------------------------------------------------ SmolLM2


@pytest.mark.integration
def test_smollm2_heatmaps_and_report(tmp_path: Path) -> None:
    from importance.data.sources import load_data
    from importance.models.load import load_model
    from importance.viz import heatmap as H

    lm = load_model("builtin:smollm2-135m")
    tables = [score(lm, load_data(f"tasks:{t}", lm.tokenizer, seq_len=64, samples=4), ["taylor"], progress=False)
              for t in ("math", "knowledge")]
    axs = [ax for ax in H.heads_figure(tables).axes if hasattr(ax, "imprune")]
    assert [ax.get_title() for ax in axs] == ["math", "knowledge"]
    assert all(ax.imprune.matrix.shape == (30, 9) for ax in axs)
    assert torch.isfinite(torch.as_tensor(axs[0].imprune.matrix)).all()
    folder = tables[0].save(tmp_path / "math")
    out = tmp_path / "r.html"
    assert main(["report", str(folder), "--compare", str(tables[1].save(tmp_path / "kn")), "--out", str(out)]) == 0
    body = render_in_chromium(out, tmp_path)
    assert body.get("data-errors") == "0" and body.get("data-decoded") == body.get("data-images") == "4"


def test_plan_is_drawn_beside_the_scorer_that_allocated_it(run_dir: Path, tables) -> None:
    from pruning.run.report import run_figures

    record = {"method": "recipe", "sparsity": {"0": {"attn.q": 0.5}, "1": {"attn.q": 0.75}},
              "steps": [{"method": "layers"}, {"method": "unstructured",
                                                "allocation": {"method": "importance", "signal": "fisher"}}]}
    (run_dir / "model" / "imprune.json").write_text(json.dumps(record))
    caption, fig = run_figures(load_run(run_dir))["plan"]
    assert caption.endswith("(fisher)")
    left = fig.axes[0].imprune  # the importance panel carries the matrix it draws
    raw = tables[0].matrix("fisher", "component", aggregation="mean")  # [L, C], all components
    raw = raw[:, [tables[0].components.index(c) for c in left.xlabels]].double()
    expected = raw / raw.sum(1, keepdim=True)  # share of its layer over the columns shown
    assert "fisher" in left.title
    assert torch.allclose(torch.as_tensor(left.matrix).double(), expected, atol=1e-6, equal_nan=True)
    record["steps"][1]["allocation"]["signal"] = "owl"  # not a table scorer: the default scorer (taylor)
    (run_dir / "model" / "imprune.json").write_text(json.dumps(record))
    assert run_figures(load_run(run_dir))["plan"][0].endswith("(taylor)")
    bits = {"method": "quantize", "bits": {"0": {"attn.q": 4}, "1": {"attn.q": 8}},
            "sensitivity": "fisher: sum_c S_c ||W_c - Q(W)_c||^2 / ||W_c||^2"}  # as a quantization plan says it
    (run_dir / "model" / "imprune.json").write_text(json.dumps(bits))
    assert run_figures(load_run(run_dir))["plan"][0] == "The bits map beside the importance it came from (fisher)"

"""Pruning a model accelerate offloaded (``load_model(..., max_memory=...)``) gives the in-memory result.

The models are saved to a folder and reloaded under a cap of about a quarter of their size, so most blocks
live on disk. Sequential Wanda / SparseGPT must produce the same masks (and SparseGPT the same updated
weights), write them where accelerate reads them back (the next forward, ``save_pretrained``) and leave the
model folder and later loads of it untouched.
"""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path

import pytest
import torch
from conftest import fresh

from importance.arch.canonical import model_map
from importance.data.sources import Windows
from importance.errors import ImpruneError
from importance.models.load import LoadedModel, load_model
from pruning.methods.unstructured import UnstructuredConfig, prune_unstructured, select_components

SPECS = ["random:llama:layers=6,hidden=256,intermediate=512", "random:gpt2:layers=6,hidden=256"]


def _windows(n: int = 5, t: int = 16, seed: int = 0) -> Windows:
    ids = torch.randint(5, 250, (n, t), generator=torch.Generator().manual_seed(seed))
    att = torch.ones_like(ids)
    att[-1, -5:] = 0  # padding must be honoured the same way
    return Windows(ids, att, att.bool(), {"source": "test"})


def _saved(tmp_path: Path, spec: str) -> tuple[LoadedModel, Path, int]:
    lm = load_model(spec)
    folder = tmp_path / "m"
    lm.model.save_pretrained(folder)
    lm.tokenizer.save_pretrained(folder)
    return lm, folder, sum(p.numel() * p.element_size() for p in lm.model.parameters())


def _offloaded(folder: Path, size: int) -> LoadedModel:
    off = load_model(str(folder), max_memory=f"{size // 4}B")  # a quarter of the model
    assert "disk" in set(off.model.hf_device_map.values())
    return off


def _digest(folder: Path) -> str:
    return hashlib.sha1(b"".join(p.read_bytes() for p in sorted(folder.glob("*.safetensors")))).hexdigest()


def _logits(lm: LoadedModel, w: Windows) -> torch.Tensor:
    with torch.no_grad():
        return lm.model(input_ids=w.input_ids, attention_mask=w.attention_mask).logits


@pytest.fixture(autouse=True)
def _cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("IMPRUNE_CACHE", str(tmp_path / "cache"))


@pytest.mark.parametrize("criterion", ["wanda", "sparsegpt"])
@pytest.mark.parametrize("spec", SPECS)
def test_sequential_pruning_offloaded_equals_in_memory(tmp_path: Path, spec: str, criterion: str) -> None:
    lm, folder, size = _saved(tmp_path, spec)
    dense = {(c.layer, c.name): c.weight.clone() for c in select_components(model_map(lm.model))}
    source = _digest(folder)
    off = _offloaded(folder, size)
    w = _windows()
    cfg = UnstructuredConfig(0.5, criterion, sequential=True)
    ra = prune_unstructured(lm, cfg, windows=w, batch_size=2)
    rb = prune_unstructured(off, cfg, windows=w, batch_size=2)
    assert rb.record["achieved"] == ra.record["achieved"]
    pairs = list(zip(select_components(model_map(lm.model)), select_components(model_map(off.model)), strict=True))
    for a, b in pairs:
        assert torch.equal(b.weight == 0, a.weight == 0), (a.layer, a.name)  # the same masks
        torch.testing.assert_close(b.weight, a.weight, rtol=1e-5, atol=1e-6, msg=f"{a.layer}|{a.name}")
        assert float((b.weight == 0).double().mean()) == pytest.approx(0.5, abs=0.02)
    torch.testing.assert_close(_logits(off, w), _logits(lm, w), rtol=1e-5, atol=1e-5)
    # the model folder was never written, and a new load of it (own offload folder) is the dense model
    assert _digest(folder) == source
    again = _offloaded(folder, size)
    for c in select_components(model_map(again.model)):
        assert torch.equal(c.weight, dense[c.layer, c.name]), (c.layer, c.name)


def test_the_sequential_pass_reads_one_block_at_a_time(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from accelerate.utils import OffloadedWeightsLoader

    import pruning.methods.unstructured as U

    _, folder, size = _saved(tmp_path, SPECS[0])
    off = _offloaded(folder, size)
    log: list[str] = []
    read = OffloadedWeightsLoader.__getitem__
    run = U.run_sequential

    def logged_read(self: OffloadedWeightsLoader, key: str) -> torch.Tensor:
        log.append(key)
        return read(self, key)

    def marked_run(*args, **kwargs) -> None:
        log.append("<start>")
        run(*args, **kwargs)
        log.append("<end>")

    monkeypatch.setattr(OffloadedWeightsLoader, "__getitem__", logged_read)
    monkeypatch.setattr(U, "run_sequential", marked_run)
    prune_unstructured(off, UnstructuredConfig(0.5, "sparsegpt"), windows=_windows(), batch_size=2)
    assert log[0] == "<start>", log[:3]  # planning reads shapes only, no weights
    during = log[1:log.index("<end>")]
    layers = [int(m.group(1)) for k in during if (m := re.match(r"model\.layers\.(\d+)\.", k))]
    assert layers == sorted(layers) and set(layers) == set(range(6))  # block l, then l + 1, never back


@pytest.mark.parametrize("criterion", ["magnitude", "taylor", "wanda"])
def test_dense_statistics_paths_work_offloaded(tmp_path: Path, criterion: str) -> None:
    lm, folder, size = _saved(tmp_path, SPECS[0])
    off = _offloaded(folder, size)
    cfg = UnstructuredConfig(0.4, criterion, sequential=False)
    ra = prune_unstructured(lm, cfg, windows=_windows(), batch_size=2)
    rb = prune_unstructured(off, cfg, windows=_windows(), batch_size=2)
    assert rb.record["achieved"] == ra.record["achieved"]
    for a, b in zip(select_components(model_map(lm.model)), select_components(model_map(off.model)), strict=True):
        assert torch.equal(b.weight, a.weight), (a.layer, a.name)


@pytest.mark.parametrize("how", ["cpu", "disk"])
@pytest.mark.parametrize("model_type", ["llama", "gpt2", "phi3"])
def test_update_weight_writes_accelerates_own_offload(tmp_path: Path, model_type: str, how: str) -> None:
    """Models offloaded by accelerate directly: a CPU copy (a plain tensor map) and its own disk folder."""
    from accelerate import cpu_offload, disk_offload

    a, b = fresh(model_type, scale=0.1), fresh(model_type, scale=0.1)
    if how == "cpu":
        cpu_offload(b.model, execution_device="cpu")
    else:
        disk_offload(b.model, str(tmp_path / "offload"), execution_device="cpu")
    assert all(p.device.type == "meta" for p in b.model.parameters())

    def prune(w: torch.Tensor) -> torch.Tensor:
        return w.masked_fill(w.abs() < w.abs().median(), 0)

    for ca, cb in zip(select_components(model_map(a.model)), select_components(model_map(b.model)), strict=True):
        ca.update_weight_(prune)
        cb.update_weight_(prune)
        assert torch.equal(cb.weight, ca.weight), (ca.layer, ca.name)
    torch.testing.assert_close(_logits(b, _windows()), _logits(a, _windows()), rtol=1e-5, atol=1e-6)


# ----------------------------------------------------------------------------------------- caps

def test_a_cap_below_one_block_says_how_much_is_needed(tmp_path: Path) -> None:
    _, folder, _ = _saved(tmp_path, SPECS[0])
    with pytest.raises(ImpruneError, match=r"below the largest module .*model\.layers\.0.*pass at least") as err:
        load_model(str(folder), max_memory="1000B")
    assert len(str(err.value).splitlines()) == 1
    assert not any((tmp_path / "cache" / "offload").rglob("*.dat"))
    need = re.search(r"pass at least (\S+)", str(err.value)).group(1)
    off = load_model(str(folder), max_memory=need)  # the suggested cap loads; everything streams from disk
    assert set(off.model.hf_device_map.values()) == {"disk"}
    rec = prune_unstructured(off, UnstructuredConfig(0.5, "magnitude")).record
    assert rec["achieved"]["overall"] == pytest.approx(0.5)


def test_each_load_has_its_own_offload_folder_removed_with_the_model(tmp_path: Path) -> None:
    import gc

    _, folder, size = _saved(tmp_path, SPECS[0])
    a, b = _offloaded(folder, size), _offloaded(folder, size)
    fa, fb = Path(_folder_of(a)), Path(_folder_of(b))
    assert fa != fb and fa.is_dir() and fb.is_dir()
    prune_unstructured(a, UnstructuredConfig(0.5, "magnitude"))
    assert any(fa.glob("*.dat")) and not any(fb.glob("*.dat"))
    del a
    gc.collect()
    assert not fa.exists() and fb.is_dir()


def _folder_of(lm: LoadedModel) -> str:
    from accelerate.utils import OffloadedWeightsLoader, PrefixedDataset

    for m in lm.model.modules():
        wm = getattr(getattr(m, "_hf_hook", None), "weights_map", None)
        while isinstance(wm, PrefixedDataset):
            wm = wm.dataset
        if isinstance(wm, OffloadedWeightsLoader) and wm.save_folder:
            return wm.save_folder
    raise AssertionError("no offload folder")


def test_structured_pruning_refuses_an_offloaded_model(tmp_path: Path) -> None:
    from pruning.methods.depth import prune_layers

    _, folder, size = _saved(tmp_path, SPECS[0])
    with pytest.raises(ImpruneError, match="needs the whole model in memory"):
        prune_layers(_offloaded(folder, size), 0.3, windows=_windows())


# ----------------------------------------------------------------------------------------- CLI

def _prune_cli(*argv: str) -> int:
    from pruning.cli.core import main

    return main(["prune", "--no-eval", "--quiet", "--tokens", "256", "--seq-len", "32", "--method", "unstructured",
                 "--sparsity", "0.5", *argv])


@pytest.mark.parametrize("spec", SPECS)
def test_cli_prunes_an_offloaded_model_into_a_reloadable_folder(tmp_path: Path, spec: str, text_file: Path) -> None:
    from transformers import AutoModelForCausalLM

    _, folder, size = _saved(tmp_path, spec)
    common = ["--model", str(folder), "--data", f"file:{text_file}", "--criterion", "sparsegpt"]
    assert _prune_cli(*common, "--out", str(tmp_path / "mem")) == 0
    assert _prune_cli(*common, "--max-memory", f"{size // 4}B", "--out", str(tmp_path / "off")) == 0
    rec_mem = json.loads((tmp_path / "mem" / "imprune.json").read_text())
    rec_off = json.loads((tmp_path / "off" / "imprune.json").read_text())
    assert rec_off["achieved"] == rec_mem["achieved"]
    mem, off = (AutoModelForCausalLM.from_pretrained(tmp_path / d) for d in ("mem", "off"))
    for a, b in zip(select_components(model_map(mem)), select_components(model_map(off)), strict=True):
        assert torch.equal(b.weight == 0, a.weight == 0), (a.layer, a.name)
        torch.testing.assert_close(b.weight, a.weight, rtol=1e-5, atol=1e-6)
    sa, sb = mem.state_dict(), off.state_dict()
    assert sa.keys() == sb.keys() and all(torch.allclose(sa[k], sb[k], atol=1e-6) for k in sa)


def test_cli_refuses_max_memory_for_structured_methods(tmp_path: Path, text_file: Path,
                                                       capsys: pytest.CaptureFixture[str]) -> None:
    from pruning.cli.core import main

    _, folder, size = _saved(tmp_path, SPECS[0])
    capsys.readouterr()
    assert main(["prune", "--model", str(folder), "--max-memory", f"{size // 4}B", "--method", "heads",
                 "--sparsity", "0.25", "--data", f"file:{text_file}", "--out", str(tmp_path / "o"), "--quiet"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "--max-memory works with --method unstructured, nm" in err
    assert not (tmp_path / "o").exists()

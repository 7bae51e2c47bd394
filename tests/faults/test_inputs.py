"""Bad input to the loading paths (issue 15): broken model folders and files, data files, devices, flag values.

Every case runs the CLI in-process with file-descriptor capture (so a log line a library prints on its own
stream counts too) and asserts the contract: exit 2, one stderr line ``imprune CMD: error: ...`` without a
traceback that names the file or flag, the model folder and the output's folder (a sentinel of user files)
exactly as they were, and no model code or pickle payload run. The broken inputs are made in tmp_path from
one saved tiny model (``random:llama:layers=2``).
"""

from __future__ import annotations

import json
import os
import pickle
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from conftest import sample_words
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from importance.errors import ImpruneError
from importance.models.checks import check_device, nonfinite_advice
from importance.models.load import load_model

from .conftest import assert_one_line_error, snapshot

TINY = ["--seq-len", "32", "--tokens", "64", "--quiet"]
MARKER = "ran.txt"  # what model code or a pickle payload would write, if it ever ran


@pytest.fixture(autouse=True)
def _own_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("IMPRUNE_CACHE", str(tmp_path / "cache"))


@pytest.fixture(scope="module")
def saved(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("saved") / "model"
    lm = load_model("random:llama:layers=2")
    lm.model.save_pretrained(folder)
    lm.tokenizer.save_pretrained(folder)
    return folder


# ----------------------------------------------------------------------------------------- broken models

def _weights(d: Path) -> dict[str, torch.Tensor]:
    """Private copies: the loaded tensors may map the file, which ``_set_weights`` then replaces."""
    return {k: v.clone() for k, v in load_file(d / "model.safetensors").items()}


def _set_weights(d: Path, sd: dict[str, torch.Tensor]) -> None:
    save_file(sd, d / "new.safetensors", metadata={"format": "pt"})
    os.replace(d / "new.safetensors", d / "model.safetensors")


def _poison(value: float) -> Callable[[Path], None]:
    def make(d: Path) -> None:
        sd = _weights(d)
        sd["model.layers.1.self_attn.k_proj.weight"][3, 5] = value
        _set_weights(d, sd)

    return make


def _pickle_only(d: Path) -> None:
    torch.save(_weights(d), d / "pytorch_model.bin")
    (d / "model.safetensors").unlink()


class _Payload:
    def __init__(self, target: Path) -> None:
        self.target = target

    def __reduce__(self):  # unpickling this would run code
        return (os.system, (f"touch '{self.target}'",))


def _evil_pickle(d: Path) -> None:
    (d / "model.safetensors").unlink()
    torch.save({"model.embed_tokens.weight": _Payload(d.parent / MARKER)}, d / "pytorch_model.bin")


def _remote_code(model_type: str) -> Callable[[Path], None]:
    def make(d: Path) -> None:
        config = json.loads((d / "config.json").read_text())
        config.update(model_type=model_type, auto_map={"AutoConfig": "configuration_x.XConfig",
                                                       "AutoModelForCausalLM": "modeling_x.XForCausalLM"})
        (d / "config.json").write_text(json.dumps(config))
        for name in ("configuration_x.py", "modeling_x.py"):
            (d / name).write_text(f"open({str(d.parent / MARKER)!r}, 'w').write('model code ran')\n")

    return make


def _truncate(d: Path) -> None:
    f = d / "model.safetensors"
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])


def _drop_tensor(d: Path) -> None:
    sd = _weights(d)
    del sd["model.layers.0.mlp.up_proj.weight"]
    _set_weights(d, sd)


def _missing_shard(d: Path) -> None:
    (d / "model.safetensors").rename(d / "model-00001-of-00002.safetensors")
    names = {k: f"model-0000{1 + i % 2}-of-00002.safetensors" for i, k in enumerate(sorted(_weights_of(d)))}
    (d / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": names}))


def _weights_of(d: Path) -> dict[str, torch.Tensor]:
    with safe_open(d / "model-00001-of-00002.safetensors", "pt") as f:
        return dict.fromkeys(f.keys())


FOLDER_CASES = {  # name -> (how to break a copy of the saved folder, extra flags, what the line must say)
    "garbage config.json": (lambda d: (d / "config.json").write_text("{not json"), [],
                            "config.json' is not valid JSON"),
    "config.json not an object": (lambda d: (d / "config.json").write_text("[1, 2]"), [], "is not a JSON object"),
    "binary config.json": (lambda d: (d / "config.json").write_bytes(os.urandom(256) + b"\xff"), [], "config.json"),
    "unknown model_type": (lambda d: (d / "config.json").write_text('{"model_type": "nosuch"}'), [],
                           "model_type 'nosuch'"),
    "truncated model.safetensors": (_truncate, [], "model.safetensors' is truncated or damaged"),
    "random bytes as model.safetensors": (lambda d: (d / "model.safetensors").write_bytes(os.urandom(4096)), [],
                                          "model.safetensors' is"),
    "config without weights": (lambda d: (d / "model.safetensors").unlink(), [], "has a config.json but no weights"),
    "index naming a missing shard": (_missing_shard, [], "lacks the weight file model-00002-of-00002.safetensors"),
    "a tensor missing from the weights": (_drop_tensor, [], "no weights for 1 parameter(s)"),
    "no tokenizer": (lambda d: [f.unlink() for f in d.glob("tokenizer*")], [], "has no tokenizer"),
    "pickle only, no flag": (_pickle_only, [], "--allow-pickle"),
    "pickle payload under weights_only": (_evil_pickle, ["--allow-pickle"], "is a pickle with more than tensors"),
    "custom code, known model type": (_remote_code("llama"), [], "--trust-remote-code"),
    "custom code, unknown model type": (_remote_code("xmodel"), [], "--trust-remote-code"),
    "NaN weights": (_poison(float("nan")), [], "model.layers.1.self_attn.k_proj.weight holds NaN or inf"),
    "inf weights": (_poison(float("inf")), [], "model.layers.1.self_attn.k_proj.weight holds NaN or inf"),
    "NaN weights, offloaded to disk": (_poison(float("nan")), ["--max-memory", "200kB"],
                                       "k_proj.weight holds NaN or inf"),
}


@pytest.mark.parametrize("case", list(FOLDER_CASES))
def test_broken_model_folder_is_one_line_and_touches_nothing(case: str, saved: Path, tmp_path: Path,
                                                             sentinel: Path, text_file: Path, run) -> None:
    breaker, extra, expect = FOLDER_CASES[case]
    folder = tmp_path / "model"
    shutil.copytree(saved, folder)
    breaker(folder)
    before_model, before_user = snapshot(folder), snapshot(sentinel)
    res = run(["eval", "--model", folder, "--data", f"file:{text_file}", *TINY, "--out", sentinel / "m.json",
               *extra])
    line = assert_one_line_error(res, "eval", expect)
    assert "score in float32" not in line
    assert snapshot(folder) == before_model and snapshot(sentinel) == before_user
    assert not (tmp_path / MARKER).exists(), "code from the model folder or the pickle ran"


def test_nan_model_is_not_pruned(saved: Path, tmp_path: Path, sentinel: Path, text_file: Path, run) -> None:
    folder = tmp_path / "model"
    shutil.copytree(saved, folder)
    _poison(float("nan"))(folder)
    before = snapshot(sentinel)
    res = run(["prune", "--model", folder, "--method", "unstructured", "--sparsity", "0.5", "--data",
               f"file:{text_file}", "--eval-data", f"file:{text_file}", "--eval-tokens", "64", *TINY,
               "--out", sentinel / "pruned"])
    line = assert_one_line_error(res, "prune", "weights of")
    assert "use another checkpoint" in line and "--dtype float32" not in line  # it is float32 already
    assert snapshot(sentinel) == before
    res = run(["eval", "--model", folder, "--dtype", "bfloat16", "--data", f"file:{text_file}", *TINY])
    assert "--dtype float32" in assert_one_line_error(res, "eval", "holds NaN or inf")  # float32 might help here


def test_pickle_only_folder_loads_with_the_flag(saved: Path, tmp_path: Path, text_file: Path, run) -> None:
    folder = tmp_path / "model"
    shutil.copytree(saved, folder)
    _pickle_only(folder)
    res = run(["eval", "--model", folder, "--allow-pickle", "--data", f"file:{text_file}", *TINY])
    assert res.rc == 0 and "perplexity" in res.out, res.err


def test_custom_code_runs_only_with_trust_remote_code_flag(saved: Path, tmp_path: Path) -> None:
    folder = tmp_path / "model"
    shutil.copytree(saved, folder)
    _remote_code("llama")(folder)
    with pytest.raises(ImpruneError, match="--trust-remote-code"):
        load_model(str(folder))
    assert not (tmp_path / MARKER).exists()


@pytest.mark.parametrize(("content", "expect"), [
    (os.urandom(4096), "is not a GGUF file"),
    (b"GGUF" + os.urandom(2048), "cannot load the model in"),
    (b"", "is not a GGUF file"),
])
def test_broken_gguf_is_one_line(content: bytes, expect: str, tmp_path: Path, sentinel: Path, text_file: Path,
                                 run) -> None:
    gguf = tmp_path / "model.gguf"
    gguf.write_bytes(content)
    before = snapshot(sentinel)
    res = run(["eval", "--model", gguf, "--data", f"file:{text_file}", *TINY, "--out", sentinel / "m.json"])
    assert "model.gguf" in assert_one_line_error(res, "eval", expect)
    assert snapshot(sentinel) == before
    models = tmp_path / "cache" / "models"
    assert not models.exists() or not any(models.iterdir()), "a broken conversion was cached"


# ----------------------------------------------------------------------------------------- devices

@pytest.mark.parametrize(("device", "cuda", "count", "expect"), [
    ("cuda", False, 0, "--device cuda: "),
    ("cuda:0", False, 0, "--device cuda:0: "),
    ("cuda:1", True, 1, "--device cuda:1 does not exist: 1 CUDA device(s) visible; use cuda:0"),
    ("mps", False, 0, "--device mps: MPS is not available"),
    ("gpu", False, 0, "--device 'gpu' is not a device"),
    ("cuda:x", False, 0, "--device 'cuda:x' is not a device"),
])
def test_missing_device_is_one_line(device: str, cuda: bool, count: int, expect: str, sentinel: Path,
                                    text_file: Path, run, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: count)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
    before = snapshot(sentinel)
    for argv in (["eval", "--model", "random:llama", "--data", f"file:{text_file}", *TINY,
                  "--out", sentinel / "m.json"],
                 ["prune", "--model", "random:llama", "--method", "unstructured", "--sparsity", "0.5",
                  "--no-eval", *TINY, "--data", f"file:{text_file}", "--out", sentinel / "pruned"]):
        assert_one_line_error(run([*argv, "--device", device]), argv[0], expect)
    assert snapshot(sentinel) == before


def test_cpu_is_always_a_device() -> None:
    check_device("cpu")


# ----------------------------------------------------------------------------------------- data files

def _utf16(p: Path) -> None:
    p.write_bytes(sample_words(300).encode("utf-16"))


DATA_CASES = {  # file name -> (how to write it, what the line must say)
    "ids.jsonl": (lambda p: p.write_text("".join(json.dumps({"id": f"a{i}", "body": sample_words(30, i)}) + "\n"
                                                 for i in range(20))), "has no text field: line 1 has id, body"),
    "ids.csv": (lambda p: p.write_text("id,body\n" + "".join(f"a{i},some words {i}\n" for i in range(50))),
                "no text column (columns: id, body)"),
    "ints.jsonl": (lambda p: p.write_text('{"text": 5}\n'), "line 1: 'text' is int, not a string"),
    "lists.jsonl": (lambda p: p.write_text('{"text": "fine"}\n[1, 2]\n'), "line 2: not a JSON object"),
    "broken.jsonl": (lambda p: p.write_text('{"text": "fine"}\n{"text": broken\n'), "line 2: not valid JSON"),
    "broken.json": (lambda p: p.write_text('[{"text": "fine"},\n {"text": ]'), "line 2: not valid JSON"),
    "broken.parquet": (lambda p: p.write_bytes(os.urandom(3000)), "cannot read"),
    "binary.csv": (lambda p: p.write_bytes(os.urandom(3000)), "cannot read"),
    "binary.txt": (lambda p: p.write_bytes(os.urandom(20000)), "is not UTF-8 text"),
    "zeros.txt": (lambda p: p.write_bytes(bytes(20000)), "is not UTF-8 text"),
    "utf16.txt": (_utf16, "is not UTF-8 text"),
}


@pytest.mark.parametrize("name", list(DATA_CASES))
def test_bad_data_file_is_one_line(name: str, tmp_path: Path, sentinel: Path, run) -> None:
    write, expect = DATA_CASES[name]
    data = tmp_path / name
    write(data)
    before = snapshot(sentinel)
    res = run(["eval", "--model", "random:llama", "--data", f"file:{data}", *TINY, "--out", sentinel / "m.json"])
    line = assert_one_line_error(res, "eval", expect)
    assert name in line
    assert snapshot(sentinel) == before


def test_a_few_undecodable_bytes_are_read(tmp_path: Path, run) -> None:
    text = sample_words(600).encode()
    data = tmp_path / "mostly.txt"
    data.write_bytes(text[:1000] + b"\xff\xfe" + text[1000:])  # well under 1% of the bytes
    res = run(["eval", "--model", "random:llama", "--data", f"file:{data}", *TINY])
    assert res.rc == 0 and "perplexity" in res.out, res.err


def test_json_columns_and_arrays_are_read(tmp_path: Path, run) -> None:
    words = sample_words(200).split("\n")
    columns, array = tmp_path / "columns.json", tmp_path / "array.json"
    columns.write_text(json.dumps({"text": words, "id": list(range(len(words)))}, indent=1))
    array.write_text(json.dumps([{"text": w} for w in words], indent=1))
    results = [run(["eval", "--model", "random:llama", "--data", f"file:{f}", *TINY]) for f in (columns, array)]
    assert [r.rc for r in results] == [0, 0], [r.err for r in results]
    assert results[0].out.split("(")[0] == results[1].out.split("(")[0]  # the same perplexity


# ----------------------------------------------------------------------------------------- flag values

def _prune(text: Path, out: Path, *flags: str) -> list:
    return ["prune", "--model", "random:llama", "--method", "nm", "--sparsity", "0.5", "--data", f"file:{text}",
            "--eval-data", f"file:{text}", "--eval-tokens", "64", *TINY, "--out", out, *flags]


@pytest.mark.parametrize(("flags", "expect"), [  # every part of ``expect`` must be in the line
    (["--nm", "-2:4"], ("--nm -2:4 is no N:M pattern: it needs 0 < N < M, e.g. 2:4",)),
    (["--nm=-2:4"], ("--nm -2:4 is no N:M pattern",)),
    (["--nm", "4:2"], ("--nm 4:2 is no N:M pattern",)),
    (["--sparsity", "-0.5"], ("--sparsity -0.5 is outside [0, 1)",)),
    (["--sparsity", "-1e-3"], ("--sparsity -0.001 is outside [0, 1)",)),
    (["--tokens", "-5"], ("--tokens", "-5", "at least")),
    (["--tokens", "10"], ("--tokens 10 is fewer than one window of 32 tokens; pass --tokens 32 or more",)),
    (["--seq-len", "-3"], ("--seq-len", "-3")),
    (["--eval-tokens", "0"], ("--eval-tokens", " 0", "at least")),
    (["--eval-tokens", "-1"], ("--eval-tokens", "-1")),
    (["--eval-tokens", "10"], ("--eval-tokens 10 is fewer than one window of 32 tokens; pass --eval-tokens 32",)),
    (["--tokens", "abc"], ("argument --tokens: invalid int value: 'abc'; see imprune prune --help",)),
    (["--method", "nosuch"], ("unknown method 'nosuch'",)),
])
def test_bad_flag_value_names_the_flag(flags: list[str], expect: tuple[str, ...], text_file: Path, sentinel: Path,
                                       run) -> None:
    before = snapshot(sentinel)
    line = assert_one_line_error(run(_prune(text_file, sentinel / "pruned", *flags)), "prune")
    assert all(part in line for part in expect), line
    if flags[0] == "--eval-tokens":
        assert "--tokens" not in line.replace("--eval-tokens", ""), line  # the right flag is blamed
    assert snapshot(sentinel) == before


def test_eval_tokens_are_named_in_quantize_and_run(text_file: Path, sentinel: Path, run) -> None:
    common = ["--model", "random:llama", "--eval-data", f"file:{text_file}", "--seq-len", "32", "--quiet"]
    res = run(["quantize", *common, "--budget", "6", "--eval-tokens", "0", "--out", sentinel / "q"])
    assert_one_line_error(res, "quantize", "--eval-tokens")
    res = run(["run", *common, "--data", f"file:{text_file}", "--tokens", "64", "--eval-tokens", "0",
               "--out", sentinel / "run"])
    assert_one_line_error(res, "run", "--eval-tokens")


# ----------------------------------------------------------------------------------------- advice

def test_float32_advice_only_where_it_can_help() -> None:
    lm = load_model("random:llama")
    assert "score in float32" not in nonfinite_advice(lm.model)  # already float32, finite weights
    assert "score in float32" in nonfinite_advice(lm.model.to(torch.bfloat16))
    with torch.no_grad():
        lm.model.model.layers[0].mlp.up_proj.weight[0, 0] = float("nan")
    advice = nonfinite_advice(lm.model)
    assert "model.layers.0.mlp.up_proj.weight" in advice and "score in float32" not in advice


def test_pickle_refusal_needs_no_import_of_the_payload(tmp_path: Path) -> None:
    """The refusal happens before torch.load: the file is not even opened as a pickle without the flag."""
    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"model_type": "llama"}))
    (folder / "tokenizer.json").write_text("{}")
    (folder / "pytorch_model.bin").write_bytes(pickle.dumps(_Payload(tmp_path / MARKER)))
    with pytest.raises(ImpruneError, match="--allow-pickle"):
        load_model(str(folder))
    assert not (tmp_path / MARKER).exists()

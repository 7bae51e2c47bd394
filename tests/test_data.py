"""Data specs -> windows (importance.data.sources), checked against the token stream computed from the UTF-8 bytes."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import SAMPLE_TEXT, byte_ids

from importance.data.sources import load_data
from importance.data.tasks import generate, task_names
from importance.errors import ImpruneError
from importance.models.tiny import byte_tokenizer

EOS = 2
PAD = 0


@pytest.fixture(scope="module")
def tok():
    return byte_tokenizer()


def _stream(texts: list[str]) -> list[int]:
    """Documents joined by EOS, as load_data promises (independent of the tokenizer: UTF-8 bytes)."""
    out: list[int] = []
    for i, t in enumerate(texts):
        out += ([EOS] if i else []) + byte_ids(t)
    return out


def _window_starts(windows, stream: list[int]) -> list[int]:
    """Start offset in ``stream`` of each window (asserting each is a contiguous slice at a window boundary)."""
    t = windows.seq_len
    starts = []
    for row in windows.input_ids.tolist():
        hits = [j * t for j in range(len(stream) // t) if stream[j * t:(j + 1) * t] == row]
        assert len(hits) >= 1, "a window is not a contiguous slice of the token stream"
        starts.append(hits[0])
    return starts


# ----------------------------------------------------------------------------------------- text windows

def test_sequential_windows_are_the_stream_cut_in_order(tok, text_file: Path) -> None:
    stream = byte_ids(text_file.read_text(encoding="utf-8"))
    w = load_data(f"file:{text_file}", tok, seq_len=64, sampling="sequential")
    n = len(stream) // 64
    assert w.input_ids.shape == (n, 64) and w.input_ids.dtype == torch.long
    assert w.input_ids.flatten().tolist() == stream[: n * 64]
    assert bool(w.attention_mask.all()) and bool(w.loss_mask.all()) and w.loss_mask.dtype == torch.bool
    assert w.n_tokens == n * 64
    assert (w.meta["windows"], w.meta["seq_len"], w.meta["tokens"], w.meta["sampling"]) == (n, 64, n * 64,
                                                                                             "sequential")


@pytest.mark.parametrize(("tokens", "samples", "expected"), [(300, None, 4), (64, None, 1), (None, 3, 3),
                                                            (640, 2, 2), (10**9, None, None), (None, 10**6, None)])
def test_token_and_sample_caps(tok, text_file: Path, tokens, samples, expected) -> None:
    full = len(byte_ids(text_file.read_text(encoding="utf-8"))) // 64
    expected = full if expected is None else expected
    for sampling in ("sequential", "random"):
        w = load_data(str(text_file), tok, seq_len=64, tokens=tokens, samples=samples, sampling=sampling)
        assert len(w) == expected and w.input_ids.shape == (expected, 64) and w.n_tokens == expected * 64


def test_sequential_takes_the_first_windows(tok, text_file: Path) -> None:
    full = load_data(f"file:{text_file}", tok, seq_len=50, sampling="sequential")
    first = load_data(f"file:{text_file}", tok, seq_len=50, samples=5, sampling="sequential", seed=3)
    assert torch.equal(first.input_ids, full.input_ids[:5])


def test_random_sampling_is_seeded(tok, text_file: Path) -> None:
    stream = byte_ids(text_file.read_text(encoding="utf-8"))
    spec = f"file:{text_file}"
    a = load_data(spec, tok, seq_len=32, samples=8, seed=0)
    b = load_data(spec, tok, seq_len=32, samples=8, seed=0)
    c = load_data(spec, tok, seq_len=32, samples=8, seed=1)
    assert torch.equal(a.input_ids, b.input_ids)
    assert not torch.equal(a.input_ids, c.input_ids)
    for w in (a, c):
        starts = _window_starts(w, stream)
        assert starts == sorted(set(starts)) and len(starts) == 8  # distinct windows, in stream order
    assert _window_starts(a, stream) != list(range(0, 8 * 32, 32))  # not simply the first ones


def test_documents_are_joined_with_eos(tok, tmp_path: Path) -> None:
    docs = ["First document, ümlaut.", "Second one 漢字.", "", "Third and last document here!"]
    path = tmp_path / "docs.jsonl"
    path.write_text("".join(json.dumps({"text": d, "id": i}) + "\n" for i, d in enumerate(docs)), encoding="utf-8")
    stream = _stream([d for d in docs if d])  # empty documents are dropped
    w = load_data(f"file:{path}", tok, seq_len=8, sampling="sequential")
    assert w.input_ids.flatten().tolist() == stream[: len(stream) // 8 * 8]
    assert w.meta["source_tokens"] == len(stream)


# ----------------------------------------------------------------------------------------- task items

ITEMS = [("What is 2+2? Answer:", " 4"), ("Capital of France:", " Paris"), ("Ça va? ", "très bien 🙂"),
         ("x", " a much longer answer than the prompt")]


def _check_items(w, items: list[tuple[str, str]]) -> None:
    width = max(len(byte_ids(p + a)) for p, a in items)
    assert w.input_ids.shape == (len(items), width)
    for row, (p, a) in enumerate(items):
        pi, ai = byte_ids(p), byte_ids(a)
        n = len(pi) + len(ai)
        assert w.input_ids[row, :n].tolist() == pi + ai
        assert w.input_ids[row, n:].eq(PAD).all()
        assert w.attention_mask[row].tolist() == [1] * n + [0] * (width - n)  # padding has attention 0
        assert w.loss_mask[row].tolist() == [False] * len(pi) + [True] * len(ai) + [False] * (width - n)


def test_jsonl_prompt_answer_items(tok, tmp_path: Path) -> None:
    path = tmp_path / "items.jsonl"
    path.write_text("\n".join(json.dumps({"prompt": p, "answer": a, "extra": 1}) for p, a in ITEMS) + "\n",
                    encoding="utf-8")
    w = load_data(f"file:{path}", tok, seq_len=128, sampling="sequential")
    _check_items(w, ITEMS)


def test_long_items_keep_the_answer_and_the_end_of_the_prompt(tok, tmp_path: Path) -> None:
    path = tmp_path / "long.jsonl"
    prompt, answer = "abcdefghijklmnopqrstuvwxyz" * 3, " ANSWER"
    path.write_text(json.dumps({"prompt": prompt, "answer": answer}) + "\n", encoding="utf-8")
    w = load_data(f"file:{path}", tok, seq_len=20, sampling="sequential")
    kept = byte_ids(prompt)[-(20 - len(answer)):] + byte_ids(answer)
    assert w.input_ids.tolist() == [kept]
    assert w.loss_mask[0].tolist() == [False] * (20 - len(answer)) + [True] * len(answer)


@pytest.mark.parametrize("name", task_names()[:3])
def test_builtin_task_items_mask_exactly_the_answers(tok, name: str) -> None:
    w = load_data(f"tasks:{name}", tok, seq_len=256, sampling="sequential")
    items = [(it.prompt, it.answer) for it in generate(name)]
    assert len(w) == len(items)
    for row in range(0, len(items), max(1, len(items) // 16)):
        p, a = items[row]
        ids, loss, att = w.input_ids[row], w.loss_mask[row], w.attention_mask[row]
        assert ids[loss].tolist() == byte_ids(a)
        assert ids[att.bool()].tolist() == byte_ids(p) + byte_ids(a)
        assert not bool((loss & ~att.bool()).any())


# ----------------------------------------------------------------------------------------- file formats

ROWS = [{"text": SAMPLE_TEXT[:150], "n": 1}, {"text": SAMPLE_TEXT[150:], "n": 2}]


def _expected_text(tok, seq_len: int = 16) -> list[int]:
    stream = _stream([r["text"] for r in ROWS])
    return stream[: len(stream) // seq_len * seq_len]


def test_txt_file_given_as_plain_path(tok, tmp_path: Path) -> None:
    path = tmp_path / "plain.txt"
    path.write_text(SAMPLE_TEXT, encoding="utf-8")
    w = load_data(str(path), tok, seq_len=16, sampling="sequential")
    stream = byte_ids(SAMPLE_TEXT)
    assert w.input_ids.flatten().tolist() == stream[: len(stream) // 16 * 16]


def test_csv_text_column(tok, tmp_path: Path) -> None:
    import pandas as pd

    path = tmp_path / "rows.csv"
    pd.DataFrame(ROWS).to_csv(path, index=False)
    w = load_data(f"file:{path}", tok, seq_len=16, sampling="sequential")
    assert w.input_ids.flatten().tolist() == _expected_text(tok)


def test_csv_prompt_answer_items(tok, tmp_path: Path) -> None:
    import pandas as pd

    path = tmp_path / "items.csv"
    pd.DataFrame([{"prompt": p, "answer": a} for p, a in ITEMS]).to_csv(path, index=False)
    _check_items(load_data(f"file:{path}", tok, seq_len=128, sampling="sequential"), ITEMS)


def test_parquet_text_column(tok, tmp_path: Path) -> None:
    pd = pytest.importorskip("pandas")
    pytest.importorskip("pyarrow")
    path = tmp_path / "rows.parquet"
    pd.DataFrame(ROWS).to_parquet(path)
    w = load_data(f"file:{path}", tok, seq_len=16, sampling="sequential")
    assert w.input_ids.flatten().tolist() == _expected_text(tok)


def test_save_to_disk_folders(tok, tmp_path: Path) -> None:
    import datasets

    ds = datasets.Dataset.from_list(ROWS)
    ds.save_to_disk(str(tmp_path / "one"))
    datasets.DatasetDict({"validation": ds.select([0]), "train": ds}).save_to_disk(str(tmp_path / "dict"))
    for folder in ("one", "dict"):  # a DatasetDict gives its train split
        w = load_data(str(tmp_path / folder), tok, seq_len=16, sampling="sequential")
        assert w.input_ids.flatten().tolist() == _expected_text(tok), folder


# ----------------------------------------------------------------------------------------- errors

def _error(tok, spec: str, **kw) -> str:
    with pytest.raises(ImpruneError) as err:
        load_data(spec, tok, **kw)
    msg = str(err.value)
    assert "\n" not in msg and len(msg) < 400
    return msg


def test_errors_are_one_line(tok, tmp_path: Path, text_file: Path) -> None:
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    blank = tmp_path / "blank.txt"
    blank.write_text("  \n\t\n")
    short = tmp_path / "short.txt"
    short.write_text("only a few words")
    no_text = tmp_path / "numbers.csv"
    no_text.write_text("a,b\n1,2\n3,4\n")
    weird = tmp_path / "data.xyz"
    weird.write_text("text")
    assert "unknown data source" in _error(tok, "nosuch:thing")
    assert "unknown data source" in _error(tok, str(tmp_path / "missing.txt"))
    assert "does not exist" in _error(tok, f"file:{tmp_path / 'missing.txt'}")
    assert "empty" in _error(tok, f"file:{empty}")
    assert "empty" in _error(tok, f"file:{blank}")
    assert "fewer than one window" in _error(tok, f"file:{short}", seq_len=64)
    assert "--seq-len 1024" in _error(tok, f"file:{text_file}", seq_len=1024, max_positions=512)
    assert "--tokens 10" in _error(tok, f"file:{text_file}", seq_len=64, tokens=10)
    assert "--seq-len 1" in _error(tok, f"file:{text_file}", seq_len=1)
    assert "sampling" in _error(tok, f"file:{text_file}", sampling="shuffled")
    assert "--samples" in _error(tok, f"file:{text_file}", seq_len=64, samples=0)
    assert "no text column" in _error(tok, f"file:{no_text}")
    assert ".xyz" in _error(tok, f"file:{weird}")
    assert "novel" in _error(tok, "austen:no_such_novel")
    assert "save_to_disk" in _error(tok, str(tmp_path))  # a folder that is not a saved data set


# ----------------------------------------------------------------------------------------- edge cases

def test_item_windows_never_exceed_seq_len(tok, tmp_path: Path) -> None:
    path = tmp_path / "long_answer.jsonl"
    path.write_text(json.dumps({"prompt": "Q:", "answer": " " + "x" * 30}) + "\n", encoding="utf-8")
    w = load_data(f"file:{path}", tok, seq_len=8, sampling="sequential")
    assert w.seq_len <= 8


def test_missing_answer_cells_are_not_the_text_none(tok, tmp_path: Path) -> None:
    import pandas as pd

    path = tmp_path / "gaps.csv"
    pd.DataFrame([{"prompt": "Q1:", "answer": " yes"}, {"prompt": "Q2:", "answer": None}]).to_csv(path, index=False)
    try:
        w = load_data(f"file:{path}", tok, seq_len=16, sampling="sequential")
    except ImpruneError:
        return  # refusing the file is fine too
    answers = [row[mask].tolist() for row, mask in zip(w.input_ids, w.loss_mask)]
    assert byte_ids("None") not in answers


def test_windows_start_with_bos_where_the_tokenizer_adds_one(text_file) -> None:
    """A tokenizer that adds BOS gets [BOS, t_1 .. t_T] windows with exactly the targets of the plain windows;
    one that does not (the byte tokenizer, SmolLM2's) gets the plain windows, and meta says which."""
    from importance.data.sources import bos_token_id

    plain_tok, bos_tok = byte_tokenizer(), byte_tokenizer()
    bos_tok.add_bos_token = True
    assert bos_token_id(plain_tok) is None and bos_token_id(bos_tok) == bos_tok.bos_token_id == 1
    plain = load_data(f"file:{text_file}", plain_tok, seq_len=32, tokens=96, sampling="sequential")
    with_bos = load_data(f"file:{text_file}", bos_tok, seq_len=32, tokens=96, sampling="sequential")
    assert (plain.meta["bos"], with_bos.meta["bos"]) == (False, True)
    assert len(with_bos) == len(plain) == 3 and with_bos.meta["seq_len"] == plain.meta["seq_len"] == 32
    assert torch.equal(with_bos.input_ids[:, 0], torch.ones(3, dtype=torch.long))
    assert torch.equal(with_bos.input_ids[:, 1:], plain.input_ids)
    # token_nll never counts position 0; the targets are the same tokens t_2 .. t_T in both
    assert not with_bos.loss_mask[:, :2].any() and with_bos.loss_mask[:, 2:].all()
    assert int(with_bos.loss_mask.sum()) == int(plain.loss_mask[:, 1:].sum())
    with pytest.raises(ImpruneError, match="longer than the model's 32 positions"):
        load_data(f"file:{text_file}", bos_tok, seq_len=32, max_positions=32)

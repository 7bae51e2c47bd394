"""Calibration and evaluation data: a ``--data`` spec -> ``Windows`` of token ids with masks.

Specs:
  ``austen`` (six novels), ``austen:train`` (all but Persuasion), ``austen:eval`` / ``austen:<novel>``
  ``tasks:<name>`` / ``tasks:all``          built-in task probes; only answer tokens count in the loss
  ``file:PATH``                               .txt, .jsonl/.json, .csv, .parquet (via ``datasets``); rows with
                                              ``prompt`` + ``answer`` are task items, else a text column
  ``hub:NAME[:CONFIG][:SPLIT]``              ``datasets.load_dataset`` (needs network or a local HF cache)
  a ``save_to_disk`` folder, or an existing file path (as ``file:``)

Text is tokenized without special tokens, documents are joined with the EOS token into one stream and cut
into non-overlapping windows of ``seq_len`` tokens; where the tokenizer itself adds a BOS token (its
``add_bos_token``, which transformers sets from a GGUF file's ``tokenizer.ggml.add_bos_token``: Gemma, Llama)
every window and item starts with it, and neither BOS nor the token right after it is a target, so the
targets are those of the same windows without BOS (``meta['bos']`` says which; SmolLM2 asks for none);
``sampling='random'`` draws windows with a seeded generator, ``'sequential'`` takes the first ones in order.
Task items are one row each, right-padded to the longest item (at most ``seq_len``, plus the BOS).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from importance.data.files import quiet_datasets, read_error, read_json_rows, utf8_text
from importance.errors import ImpruneError

DATA_FORMS = ("austen", "austen:train", "austen:eval", "austen:<novel>", "tasks:<name>", "tasks:all",
              "file:PATH", "hub:NAME[:CONFIG][:SPLIT]", "a save_to_disk folder")


@dataclass
class Batch:
    """``input_ids`` / ``attention_mask`` / ``loss_mask``: [B, T]; ``loss_mask`` marks target tokens."""

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    loss_mask: torch.Tensor

    def to(self, device: torch.device | str) -> Batch:
        return Batch(self.input_ids.to(device), self.attention_mask.to(device), self.loss_mask.to(device))

    @property
    def n_tokens(self) -> int:
        return int(self.attention_mask.sum())


@dataclass
class Windows:
    """N windows of T tokens: ``input_ids`` [N, T] long, ``attention_mask`` [N, T] long, ``loss_mask`` [N, T]
    bool (True = the token is a prediction target; the first token of a window never is, for a causal LM)."""

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    loss_mask: torch.Tensor
    meta: dict[str, Any] = field(default_factory=dict)

    def __len__(self) -> int:
        return int(self.input_ids.shape[0])

    @property
    def seq_len(self) -> int:
        return int(self.input_ids.shape[1])

    @property
    def n_tokens(self) -> int:
        return int(self.attention_mask.sum())

    def batches(self, batch_size: int) -> Iterator[Batch]:
        for i in range(0, len(self), batch_size):
            yield Batch(self.input_ids[i:i + batch_size], self.attention_mask[i:i + batch_size],
                        self.loss_mask[i:i + batch_size])

    def subset(self, index: Sequence[int] | slice) -> Windows:
        idx = index if isinstance(index, slice) else torch.as_tensor(list(index), dtype=torch.long)
        return Windows(self.input_ids[idx], self.attention_mask[idx], self.loss_mask[idx], dict(self.meta))


# ----------------------------------------------------------------------------------------- sources

@dataclass(frozen=True)
class Source:
    """Raw data before tokenization: either documents (plain text) or task items (prompt, answer)."""

    name: str
    texts: tuple[str, ...] = ()
    items: tuple[tuple[str, str], ...] = ()


def read_source(spec: str) -> Source:
    """Parse a ``--data`` spec into raw texts or task items (no tokenizer needed)."""
    kind, _, rest = spec.partition(":")
    if kind == "austen":
        from importance.data.corpora import AUSTEN_EVAL, AUSTEN_NOVELS, AUSTEN_TRAIN, austen_texts

        which = rest or "all"
        if which == "all":
            names: Sequence[str] = [*AUSTEN_TRAIN, AUSTEN_EVAL]
        elif which == "train":
            names = AUSTEN_TRAIN
        elif which in ("eval", "test"):
            names = [AUSTEN_EVAL]
        else:
            if which not in AUSTEN_NOVELS:
                raise ImpruneError(f"unknown Austen novel '{which}'; use one of train, eval, "
                                   f"{', '.join(AUSTEN_NOVELS)}")
            names = [which]
        return Source(spec, texts=tuple(austen_texts(names).values()))
    if kind == "tasks":
        from importance.data.tasks import TASKS, generate

        names = list(TASKS) if rest == "all" else [rest]
        items = [(it.prompt, it.answer) for n in names for it in generate(n)]
        return Source(spec, items=tuple(items))
    if kind == "hub":
        return _from_dataset(spec, _load_hub_dataset(rest))
    path = Path(rest if kind == "file" else spec).expanduser()
    if kind == "file" or path.exists():
        return _read_path(spec, path)
    raise ImpruneError(f"unknown data source '{spec}'; use one of: {', '.join(DATA_FORMS)}")


def _read_path(spec: str, path: Path) -> Source:
    if not path.exists():
        raise ImpruneError(f"data file '{path}' does not exist; check the path given to --data")
    if path.is_dir():
        import datasets

        try:
            with quiet_datasets():
                ds = datasets.load_from_disk(str(path))
        except Exception:
            raise ImpruneError(f"'{path}' is not a datasets.save_to_disk folder; pass a file instead") from None
        if isinstance(ds, datasets.DatasetDict):
            ds = ds["train"] if "train" in ds else next(iter(ds.values()))
        return _from_dataset(spec, ds)
    suffix = path.suffix.lower()
    if suffix in (".txt", ".md", ""):
        return Source(spec, texts=(utf8_text(path),))
    builder = {".jsonl": "json", ".json": "json", ".csv": "csv", ".parquet": "parquet"}.get(suffix)
    if builder is None:
        raise ImpruneError(f"unsupported data file type '{suffix}'; use .txt, .jsonl, .json, .csv or .parquet")
    if builder == "json":
        return read_json_rows(spec, path)
    import datasets

    try:
        with quiet_datasets():
            ds = datasets.load_dataset(builder, data_files=str(path), split="train")
    except Exception as err:
        raise ImpruneError(f"cannot read '{path}' as {builder} ({read_error(err)}); fix the file or pass "
                           "another --data") from None
    return _from_dataset(spec, ds)


def _load_hub_dataset(rest: str) -> Any:
    import datasets

    from importance.models.load import _hub_reachable

    parts = rest.split(":")
    name = parts[0]
    config = parts[1] if len(parts) > 1 and parts[1] else None
    split = parts[2] if len(parts) > 2 and parts[2] else "train"
    if not name:
        raise ImpruneError("hub data needs a name: --data hub:NAME[:CONFIG][:SPLIT]")
    try:
        with quiet_datasets():
            return datasets.load_dataset(name, config, split=split, download_mode="reuse_cache_if_exists")
    except Exception as err:
        if not _hub_reachable():
            raise ImpruneError(f"cannot fetch data set '{name}': the hub is unreachable from here; save it where "
                               "there is network (save_to_disk or a .jsonl) and pass --data file:PATH") from None
        raise ImpruneError(f"cannot load data set '{rest}' ({type(err).__name__}: {str(err)[:120]})") from None


def _from_dataset(spec: str, ds: Any) -> Source:
    cols = list(ds.column_names)
    if "prompt" in cols and "answer" in cols:
        return Source(spec, items=tuple((str(p), str(a)) for p, a in zip(ds["prompt"], ds["answer"])
                                        if p is not None and a is not None))  # an empty cell is no item
    if "text" not in cols:  # never another column: an id or a label read as text would pass unnoticed
        raise ImpruneError(f"data '{spec}' has no text column (columns: {', '.join(cols) or 'none'}); "
                           "give it a 'text' column, or 'prompt' and 'answer' columns")
    kind = getattr(getattr(ds, "features", {}).get("text"), "dtype", "string")
    if kind not in ("string", "large_string"):
        raise ImpruneError(f"the 'text' column of data '{spec}' holds {kind}, not strings; give it text")
    return Source(spec, texts=tuple(t for t in ds["text"] if t))


# ----------------------------------------------------------------------------------------- windows

def load_data(spec: str, tokenizer: Any, seq_len: int = 256, tokens: int | None = None,
              samples: int | None = None, seed: int = 0, sampling: str = "random",
              max_positions: int | None = None, flags: tuple[str, str] = ("--tokens", "--seq-len")) -> Windows:
    """Read ``spec`` and cut it into windows of ``seq_len`` tokens.

    ``tokens`` caps the total tokens (whole windows: ``tokens // seq_len``), ``samples`` the number of
    windows; ``sampling`` is 'random' (seeded draw without replacement) or 'sequential' (first ones).
    ``flags`` are the command-line names of ``tokens`` and ``seq_len`` in error messages (``--eval-tokens``).
    """
    tok_flag, len_flag = flags
    if seq_len < 2:
        raise ImpruneError(f"{len_flag} {seq_len} is too short; use at least 2 tokens")
    bos = bos_token_id(tokenizer)
    if max_positions is not None and seq_len + (bos is not None) > max_positions:
        raise ImpruneError(f"{len_flag} {seq_len} is longer than the model's {max_positions} positions; "
                           f"use {len_flag} {max_positions - (bos is not None)} or less")
    if tokens is not None and tokens < seq_len:
        raise ImpruneError(f"{tok_flag} {tokens} is fewer than one window of {seq_len} tokens; pass {tok_flag} "
                           f"{seq_len} or more, or lower {len_flag}")
    if sampling not in ("random", "sequential"):
        raise ImpruneError(f"unknown sampling '{sampling}'; use random or sequential")
    source = read_source(spec)
    if source.items:
        windows = _item_windows(source, tokenizer, seq_len, bos)
    elif any(t.strip() for t in source.texts):
        windows = _text_windows(source, tokenizer, seq_len, bos, len_flag)
    else:
        raise ImpruneError(f"data '{spec}' is empty; give it some text")
    n = len(windows)
    if tokens is not None:
        n = min(n, max(1, tokens // (windows.seq_len - (bos is not None))))  # text tokens, BOS apart
    if samples is not None:
        if samples < 1:
            raise ImpruneError(f"--samples {samples} must be at least 1")
        n = min(n, samples)
    if sampling == "random" and n < len(windows):
        gen = torch.Generator().manual_seed(seed)
        pick = torch.randperm(len(windows), generator=gen)[:n].sort().values
        windows = windows.subset(pick.tolist())
    else:
        windows = windows.subset(slice(0, n))
    windows.meta.update(data=spec, seq_len=windows.seq_len - (bos is not None), windows=len(windows),
                        tokens=windows.n_tokens, seed=seed, sampling=sampling, bos=bos is not None)
    return windows


def bos_token_id(tokenizer: Any) -> int | None:
    """The BOS id windows start with: the tokenizer's own, where it puts one before what it encodes (its
    post-processor: Gemma's says so while its ``add_bos_token`` attribute reads False) or says it does."""
    bos = getattr(tokenizer, "bos_token_id", None)
    if bos is None:
        return None
    adds = tokenizer("a", add_special_tokens=True)["input_ids"][:1] == [bos]
    return int(bos) if adds or getattr(tokenizer, "add_bos_token", False) is True else None


def _text_windows(source: Source, tokenizer: Any, seq_len: int, bos: int | None = None,
                  len_flag: str = "--seq-len") -> Windows:
    eos = tokenizer.eos_token_id
    stream: list[int] = []
    for text in source.texts:
        if stream and eos is not None:
            stream.append(eos)
        stream.extend(tokenizer(text, add_special_tokens=False)["input_ids"])
    n = len(stream) // seq_len
    if n == 0:
        raise ImpruneError(f"data '{source.name}' has {len(stream)} tokens, fewer than one window of {seq_len}; "
                           f"lower {len_flag} or give more text")
    ids = torch.tensor(stream[: n * seq_len], dtype=torch.long).view(n, seq_len)
    ones = torch.ones_like(ids)
    targets = ones.bool()
    if bos is not None:  # [BOS, t_1 .. t_T]: t_1 is no target either (the same targets as without BOS)
        ids = torch.cat([torch.full((n, 1), bos, dtype=torch.long), ids], 1)
        ones = torch.ones_like(ids)
        targets = ones.bool()
        targets[:, :2] = False
    return Windows(ids, ones, targets, {"source_tokens": len(stream)})


def _item_windows(source: Source, tokenizer: Any, seq_len: int, bos: int | None = None) -> Windows:
    rows = []
    for prompt, answer in source.items:
        p = tokenizer(prompt, add_special_tokens=False)["input_ids"]
        a = tokenizer(answer, add_special_tokens=False)["input_ids"]
        if not a:
            continue
        if len(a) >= seq_len:  # an answer alone fills the window: the last prompt token predicts its start
            p, a = p[-1:], a[:seq_len - min(1, len(p))]
        elif len(p) + len(a) > seq_len:  # keep the answer and the end of the prompt
            p = p[max(0, len(p) + len(a) - seq_len):]
        rows.append(([bos, *p] if bos is not None else p, a))  # BOS on top of the seq_len budget
    if not rows:
        raise ImpruneError(f"data '{source.name}' has no usable prompt/answer items")
    width = max(len(p) + len(a) for p, a in rows)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    ids = torch.full((len(rows), width), pad, dtype=torch.long)
    attn = torch.zeros_like(ids)
    loss = torch.zeros(ids.shape, dtype=torch.bool)
    for i, (p, a) in enumerate(rows):
        n = len(p) + len(a)
        ids[i, :n] = torch.tensor(p + a)
        attn[i, :n] = 1
        loss[i, len(p):n] = True
    return Windows(ids, attn, loss, {"items": len(rows)})

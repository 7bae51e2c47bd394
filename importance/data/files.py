"""Reading ``--data file:PATH`` files strictly, so a wrong file is one line naming it and the fix.

Text files must be UTF-8: more than ``MAX_UNDECODABLE`` of their bytes failing to decode (or NUL bytes, which
no text has) means a binary file or another encoding, and is refused; fewer are read with replacement
characters. JSON (``.jsonl`` / ``.json``: JSON lines, one array of rows, or one object of column lists) is
read here, not by ``datasets``, so that a broken line is named: every row is an object with a ``text`` field
(null or empty rows are skipped), or with ``prompt`` and ``answer`` (task items); any other field set is
refused, never guessed.
``load_jsonl`` reads user task files (prompt, answer, optional distractors) with the same per-line errors.
``quiet_datasets`` silences the log lines ``datasets`` / pyarrow print on a broken csv or parquet file before
the exception that imprune turns into its own line.
"""

from __future__ import annotations

import contextlib
import json
import logging
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from importance.data.tasks import TaskItem
from importance.errors import ImpruneError

MAX_UNDECODABLE = 0.01  # share of a text file's bytes that may fail to decode as UTF-8
_NEEDS = "each row needs a 'text' field, or 'prompt' and 'answer'"


def utf8_text(path: Path) -> str:
    """The file as UTF-8 text; refused when more than ``MAX_UNDECODABLE`` of its bytes are not text."""
    raw = path.read_bytes()
    text = raw.decode("utf-8", errors="replace")
    bad = text.count("\ufffd") - raw.count("\ufffd".encode()) + raw.count(b"\x00")
    if raw and bad > MAX_UNDECODABLE * len(raw):
        raise ImpruneError(f"'{path}' is not UTF-8 text: {bad / len(raw):.1%} of its {len(raw):,} bytes do not "
                           "decode (a binary file, or another encoding); pass UTF-8 text, e.g. convert it with "
                           "iconv -t UTF-8")
    return text


@contextlib.contextmanager
def quiet_datasets() -> Iterator[None]:
    """No log lines or warnings from ``datasets`` / pyarrow while a file is read (errors still raise)."""
    logger = logging.getLogger("datasets")
    level = logger.level
    logger.setLevel(logging.CRITICAL + 1)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        logger.setLevel(level)


def read_error(err: BaseException) -> str:
    """The innermost cause of a reader's exception, as a short phrase (pyarrow's message says what is wrong)."""
    while (err.__cause__ or err.__context__) is not None:
        err = err.__cause__ or err.__context__  # type: ignore[assignment]
    first = (str(err).strip().splitlines() or [""])[0][:160]
    return f"{type(err).__name__}: {first}" if first else type(err).__name__


def read_json_rows(spec: str, path: Path) -> Any:
    """A ``.jsonl`` / ``.json`` file -> ``Source`` of texts or task items (see the module docstring)."""
    from importance.data.sources import Source

    text = utf8_text(path).lstrip("\ufeff")
    whole = text.lstrip().startswith("[") or _one_document(text)
    lines = [(f"line {n}", line) for n, line in enumerate(text.splitlines(), 1) if line.strip()]
    rows: list[tuple[str, Any]] = []
    columns = False
    for where, line in [("line 1", text)] if whole else lines:
        try:
            rows.append((where, json.loads(line)))
        except json.JSONDecodeError as err:
            at = f"line {err.lineno}" if whole else where
            raise ImpruneError(f"{path}: {at}: not valid JSON ({err.msg}); one JSON object per line, and "
                               f"{_NEEDS}") from None
    if whole:
        doc = rows[0][1]
        columns = isinstance(doc, dict) and bool(doc) and all(isinstance(v, list) for v in doc.values())
        if columns:
            doc = [dict(zip(doc, values)) for values in zip(*doc.values())]
        rows = [(f"item {i}", obj) for i, obj in enumerate(doc if isinstance(doc, list) else [doc], 1)]
    for where, obj in rows:
        if not isinstance(obj, dict):
            raise ImpruneError(f"{path}: {where}: not a JSON object but {type(obj).__name__}; {_NEEDS}")
    if rows and "prompt" in rows[0][1] and "answer" in rows[0][1]:  # user task items
        if not columns:
            return Source(spec, items=tuple((it.prompt, it.answer) for it in load_jsonl(path)))
        bad = next((w for w, o in rows if not all(isinstance(o.get(k), str) and o[k] for k in ("prompt", "answer"))),
                   None)
        if bad:
            raise ImpruneError(f"{path}: {bad}: 'prompt' and 'answer' must be non-empty strings")
        return Source(spec, items=tuple((o["prompt"], o["answer"]) for _, o in rows))
    texts = []
    for where, obj in rows:
        if "text" not in obj:
            found = ", ".join(map(str, obj)) or "none"
            raise ImpruneError(f"data '{spec}' has no text field: {where} has {found}; {_NEEDS}")
        if obj["text"] is not None and not isinstance(obj["text"], str):
            raise ImpruneError(f"{path}: {where}: 'text' is {type(obj['text']).__name__}, not a string; {_NEEDS}")
        if obj["text"]:
            texts.append(obj["text"])
    return Source(spec, texts=tuple(texts))


def _one_document(text: str) -> bool:
    """True for a file that is one JSON value spread over lines (not JSON lines)."""
    first = next((line for line in text.splitlines() if line.strip()), "")
    try:
        json.loads(first)
        return False
    except json.JSONDecodeError:
        try:
            json.loads(text)
            return True
        except json.JSONDecodeError:
            return False


def load_jsonl(path: str | Path) -> list[TaskItem]:
    """User task items from JSON lines, each an object with non-empty string ``prompt`` and ``answer`` (and
    optionally ``distractors``, a list of wrong answers, which makes the item a multiple-choice one).

    Blank lines are skipped and extra fields ignored; a file holding one JSON array of such objects is read
    too. Any bad line (or an empty file) raises ``ImpruneError`` naming the file and the line.
    """
    p = Path(path).expanduser()
    try:
        text = p.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as err:
        why = err.strerror if isinstance(err, OSError) and err.strerror else type(err).__name__
        raise ImpruneError(f"cannot read task file '{p}' ({why}); check the path") from None
    fix = "each line must be a JSON object with string fields 'prompt' and 'answer'"
    rows: list[tuple[str, object]] = []
    if text.lstrip().startswith("["):
        try:
            array = json.loads(text)
        except json.JSONDecodeError as err:
            raise ImpruneError(f"{p}: line {err.lineno}: not valid JSON ({err.msg}); {fix}") from None
        rows = [(f"item {i}", obj) for i, obj in enumerate(array, 1)] if isinstance(array, list) else []
    else:
        for lineno, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                rows.append((f"line {lineno}", json.loads(line)))
            except json.JSONDecodeError as err:
                raise ImpruneError(f"{p}: line {lineno}: not valid JSON ({err.msg}); {fix}") from None
    items = []
    for where, obj in rows:
        if not isinstance(obj, dict):
            raise ImpruneError(f"{p}: {where}: expected a JSON object, got {type(obj).__name__}; {fix}")
        for key in ("prompt", "answer"):
            value = obj.get(key)
            if not isinstance(value, str) or not value:
                got = "missing" if value is None else f"not a non-empty string ({value!r})"
                raise ImpruneError(f"{p}: {where}: '{key}' is {got}; {fix}")
        wrong = obj.get("distractors", [])
        if not isinstance(wrong, list) or not all(isinstance(w, str) and w for w in wrong):
            raise ImpruneError(f"{p}: {where}: 'distractors' must be a list of non-empty strings; {fix}")
        items.append(TaskItem(obj["prompt"], obj["answer"], tuple(wrong)))
    if not items:
        raise ImpruneError(f"task file '{p}' holds no items; {fix}")
    return items

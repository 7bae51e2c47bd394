"""HTML building blocks of the report page: escaping, number formatting, key-value tables, embedded figures,
and reading the JSON files a run folder holds (one-line errors for damaged ones)."""

from __future__ import annotations

import base64
import html
import json
import math
from pathlib import Path
from typing import Any


def read_json(path: Path, fix: str = "rewrite or remove it") -> dict[str, Any] | None:
    from importance.models.identity import read_json_object

    return read_json_object(path, fix) if path.is_file() else None


def esc(value: Any) -> str:
    return html.escape(str(value), quote=True)


def fmt(value: Any) -> str:
    if isinstance(value, bool) or value is None:
        return str(value)
    if isinstance(value, int):
        return f"{value:,}"
    if isinstance(value, float):
        return "nan" if math.isnan(value) else f"{value:.4g}"
    if isinstance(value, (list, dict)):
        return json.dumps(value, default=str)
    return str(value)


def kv_table(rows: list[tuple[str, Any]]) -> str:
    body = "".join(f"<tr><th>{esc(k)}</th><td>{esc(fmt(v))}</td></tr>" for k, v in rows)
    return f"<table>{body}</table>"


def figure_html(stem: str, caption: str, png: bytes) -> str:
    src = "data:image/png;base64," + base64.b64encode(png).decode("ascii")
    return (f"<figure id='{esc(stem)}'><img src='{src}' alt='{esc(caption)}'>"
            f"<figcaption>{esc(caption)}</figcaption></figure>")

"""Writing and reading pruned / quantized models as folders that plain ``transformers`` reloads.

``save_model`` writes ``save_pretrained`` weights (standard safetensors), the tokenizer, ``imprune.json``
(the recipe and what was changed) and a short model card, atomically: a folder either appears complete
or not at all.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from importance.cache import atomic_dir
from importance.errors import ImpruneError
from importance.meta import versions, write_json
from importance.models import LoadedModel


def save_model(lm: LoadedModel, out: str | Path, record: dict[str, Any], card: str = "",
               overwrite: bool = False) -> Path:
    """Save ``lm`` with ``record`` as imprune.json and ``card`` as README.md into ``out``."""
    out = Path(out)
    if out.exists() and not overwrite:
        raise ImpruneError(f"output '{out}' already exists; choose another path or pass --overwrite")
    if out.exists():
        import shutil

        shutil.rmtree(out)
    with atomic_dir(out) as tmp:
        lm.model.save_pretrained(tmp)
        lm.tokenizer.save_pretrained(tmp)
        write_json(tmp / "imprune.json", {**record, "source_model": lm.describe(), "versions": versions()})
        (tmp / "README.md").write_text(card or _default_card(lm, record))
    return out


def _default_card(lm: LoadedModel, record: dict[str, Any]) -> str:
    lines = [f"# {lm.spec}, changed by imprune", "", f"Method: {record.get('method', '?')}.", ""]
    ppl = record.get("perplexity", {})
    if ppl.get("before") and ppl.get("after"):
        b, a = ppl["before"], ppl["after"]
        lines.append(f"Perplexity on {b.get('data')} ({b.get('windows')} x {b.get('seq_len')} tokens): "
                     f"{b['ppl']:.2f} before, {a['ppl']:.2f} after.")
    lines += ["", "Reload with `transformers.AutoModelForCausalLM.from_pretrained(folder)`; the full recipe is in "
              "`imprune.json`.", ""]
    return "\n".join(lines)

"""Checks around loading a model, so that a broken input is one line naming the file and the fix.

Before loading (no weights read, no model code run): the ``--device`` exists on this machine; a folder's
``config.json`` parses and names a model type; no code from the folder runs without ``--trust-remote-code``
(``auto_map`` in config.json or tokenizer_config.json); its weights are safetensors whose headers match the
file sizes (a truncated copy is caught here), or a pickle (``pytorch_model.bin``) only with ``--allow-pickle``;
a ``.gguf`` starts with the GGUF magic bytes.

After loading: transformers found a weight for every parameter (a missing one would be silently random), and
every parameter is finite, in one pass of ``torch.isfinite`` per tensor. Weights accelerate offloaded are
checked through its weights map, one tensor at a time (for weights on disk that is one read of them, about
what one forward pass of the offloaded model reads).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from importance.errors import ImpruneError

PICKLE_WEIGHTS = ("pytorch_model.bin", "pytorch_model.bin.index.json")
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.txt", "vocab.json",
                    "spiece.model", "sentencepiece.bpe.model")
_REFETCH = "copy the folder again from where the model came from"


def check_device(device: str) -> None:
    """Refuse a ``--device`` that does not parse or does not exist here (CUDA on a CPU-only torch, cuda:1 on
    a one-GPU machine, mps off a Mac)."""
    try:
        dev = torch.device(device)
    except (RuntimeError, ValueError):
        raise ImpruneError(f"--device '{device}' is not a device; use cpu, cuda, cuda:1 or mps") from None
    if dev.type == "cpu" or dev.type == "meta":
        return
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            why = "this torch is built without CUDA" if torch.version.cuda is None else "no CUDA GPU is visible"
            raise ImpruneError(f"--device {device}: {why}; use --device cpu (or install a CUDA build of torch)")
        count = torch.cuda.device_count()
        if dev.index is not None and dev.index >= count:
            raise ImpruneError(f"--device {device} does not exist: {count} CUDA device(s) visible; use "
                               f"{', '.join(f'cuda:{i}' for i in range(count))}")
        return
    if dev.type == "mps":
        if not torch.backends.mps.is_available():
            raise ImpruneError(f"--device {device}: MPS is not available on this machine; use --device cpu")
        return
    backend = getattr(torch, dev.type, None)
    if backend is None or not hasattr(backend, "is_available") or not backend.is_available():
        raise ImpruneError(f"--device {device}: no {dev.type} device is available here; use --device cpu")


def check_gguf(path: Path) -> None:
    """A ``.gguf`` must start with the GGUF magic bytes."""
    with open(path, "rb") as fh:
        magic = fh.read(4)
    if magic != b"GGUF":
        raise ImpruneError(f"'{path}' is not a GGUF file (it does not start with the GGUF magic bytes); pass a "
                           "complete .gguf from llama.cpp or the hub, or a model folder")


def _json_file(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError:
        raise ImpruneError(f"'{path}' is not a JSON text file; {_REFETCH}") from None
    except json.JSONDecodeError as err:
        raise ImpruneError(f"'{path}' is not valid JSON ({err.msg} at line {err.lineno}); {_REFETCH}") from None


def check_folder(folder: Path, trust_remote_code: bool = False, allow_pickle: bool = False) -> None:
    """Everything about a model folder that can be checked without reading its weights (see the module doc)."""
    from transformers import CONFIG_MAPPING

    config = _json_file(folder / "config.json")
    if not isinstance(config, dict):
        raise ImpruneError(f"'{folder / 'config.json'}' is not a JSON object; {_REFETCH}")
    tok_config = folder / "tokenizer_config.json"
    tok = _json_file(tok_config) if tok_config.is_file() else {}
    remote = [f for f in ("config.json", "tokenizer_config.json")
              if (config if f == "config.json" else tok if isinstance(tok, dict) else {}).get("auto_map")]
    if remote and not trust_remote_code:
        code = sorted(p.name for p in folder.glob("*.py")) or ["code named in auto_map"]
        raise ImpruneError(f"'{folder}' brings its own model code ({', '.join(code)}; auto_map in {remote[0]}); "
                           "imprune runs no code from a model folder unless you pass --trust-remote-code (read that "
                           "code first)")
    model_type = config.get("model_type")
    if not remote and model_type not in CONFIG_MAPPING:
        import transformers

        what = f"model_type '{model_type}', which" if model_type else "no model_type, so"
        raise ImpruneError(f"'{folder / 'config.json'}' names {what} transformers {transformers.__version__} "
                           "cannot build; pass a folder written by save_pretrained(), or upgrade transformers")
    for f in weight_files(folder, allow_pickle):
        if f.suffix == ".safetensors":
            check_safetensors(f)
    if not any((folder / n).is_file() for n in _TOKENIZER_FILES):
        raise ImpruneError(f"'{folder}' has no tokenizer ({', '.join(_TOKENIZER_FILES[:3])}, ...); save it into the "
                           "folder too: tokenizer.save_pretrained(folder)")


def weight_files(folder: Path, allow_pickle: bool = False) -> list[Path]:
    """The weight files transformers would read from ``folder``: safetensors first, then (only with
    ``allow_pickle``) a ``pytorch_model.bin``; a one-line error when there are none or a shard is missing."""
    single, index = folder / "model.safetensors", folder / "model.safetensors.index.json"
    if single.is_file():
        return [single]
    if index.is_file():
        table = _json_file(index)
        names = sorted(set((table.get("weight_map") or {}).values())) if isinstance(table, dict) else []
        if not names:
            raise ImpruneError(f"'{index}' lists no weight files; {_REFETCH}")
        missing = [n for n in names if not (folder / n).is_file()]
        if missing:
            raise ImpruneError(f"'{folder}' lacks the weight file {missing[0]} that {index.name} lists "
                               f"({len(missing)} of {len(names)} missing); {_REFETCH}")
        return [folder / n for n in names]
    pickles = [folder / n for n in PICKLE_WEIGHTS if (folder / n).is_file()]
    if pickles:
        if not allow_pickle:
            raise ImpruneError(f"'{pickles[0]}' is a pickle and the folder has no safetensors; imprune loads no "
                               "pickle unless you pass --allow-pickle (then torch.load with weights_only=True, "
                               "which refuses anything but tensors), or convert it to safetensors")
        return pickles
    raise ImpruneError(f"'{folder}' has a config.json but no weights (model.safetensors); pass the complete folder "
                       "that save_pretrained() wrote")


def check_safetensors(path: Path) -> None:
    """The header of a safetensors file parses and describes exactly the bytes the file holds."""
    size = path.stat().st_size
    with open(path, "rb") as fh:
        head = fh.read(8)
        n = int.from_bytes(head, "little") if len(head) == 8 else -1
        raw = fh.read(n) if 0 < n <= min(size - 8, 100 * 2**20) else b""
    try:
        header = json.loads(raw)
        end = max((int(v["data_offsets"][1]) for k, v in header.items() if k != "__metadata__"), default=0)
    except (ValueError, TypeError, KeyError, IndexError, AttributeError):
        raise ImpruneError(f"'{path}' is not a safetensors file (its header does not parse: truncated or "
                           f"damaged); {_REFETCH}") from None
    if 8 + n + end != size:
        raise ImpruneError(f"'{path}' is truncated or damaged: its header describes {8 + n + end:,} bytes, the file "
                           f"has {size:,}; {_REFETCH}")


def check_loading_info(folder: Path, info: dict[str, Any]) -> None:
    """Refuse a load where transformers left parameters without a weight (it would initialise them randomly)."""
    for key, what in (("missing_keys", "has no weights for"), ("mismatched_keys", "has weights of another shape "
                                                                                  "for")):
        names = sorted(str(n if isinstance(n, str) else n[0]) for n in info.get(key) or ())
        if names:
            raise ImpruneError(f"'{folder}' {what} {len(names)} parameter(s) of its config (first: {names[0]}); the "
                               f"weights do not belong to this config.json or are incomplete; {_REFETCH}")


def load_error(path: Path, err: BaseException) -> ImpruneError:
    """One line for an error transformers (or the GGUF reader) raised on a damaged file under ``path``."""
    import pickle
    import re

    first = (str(err).strip().splitlines() or [""])[0][:200]
    if isinstance(err, pickle.UnpicklingError):
        found = re.search(r"(?:unsupported|Unsupported global:) GLOBAL ([\w.]+)", str(err))
        what = f"it calls {found.group(1)}" if found else "torch.load(weights_only=True) refused it"
        file = next((path / n for n in PICKLE_WEIGHTS if (path / n).is_file()), path)
        return ImpruneError(f"'{file}' is a pickle with more than tensors in it ({what}), so it may run code; "
                            "imprune did not load it: get the model as safetensors")
    return ImpruneError(f"cannot load the model in '{path}' ({type(err).__name__}: {first}); check that it is "
                        "complete and unedited, or copy it again from where the model came from")


def _offloaded_copy(module: torch.nn.Module, name: str) -> torch.Tensor | None:
    """accelerate's copy of an offloaded parameter (CPU memory, or read from disk now), or None."""
    from importance.engine.offload import offloaded_weight

    try:
        return offloaded_weight(module, name, name)
    except ImpruneError:
        return None


def first_nonfinite(model: torch.nn.Module) -> str | None:
    """The name of the first parameter holding NaN or inf, or None (offloaded ones are read one at a time)."""
    seen: set[int] = set()
    for mod_name, module in model.named_modules():
        for name, p in module.named_parameters(recurse=False):
            if id(p) in seen:  # a tied parameter (the Parameter itself lives on, so its id stays unique)
                continue
            seen.add(id(p))
            t = _offloaded_copy(module, name) if p.device.type == "meta" else p  # a copy is read afresh
            if t is None or not t.is_floating_point():
                continue
            if not bool(torch.isfinite(t).all()):
                return f"{mod_name}.{name}" if mod_name else name
    return None


def check_finite(model: torch.nn.Module, spec: str, dtype: torch.dtype) -> None:
    """Stop with one line naming the first parameter that holds NaN or inf right after loading."""
    bad = first_nonfinite(model)
    if bad is not None:
        hint = "" if dtype == torch.float32 else \
            f" (or load it in float32, --dtype float32: the values may not fit {str(dtype).split('.')[-1]})"
        raise ImpruneError(f"the weights of '{spec}' are broken: {bad} holds NaN or inf as loaded, before imprune "
                           f"changed anything; use another checkpoint{hint}")


def nonfinite_advice(model: torch.nn.Module) -> str:
    """What to do about a non-finite loss or gradient: float32 helps only when the model is not float32 already
    and its weights are finite."""
    bad = first_nonfinite(model)
    if bad is not None:
        return f"the model's weights are broken ({bad} holds NaN or inf); use another checkpoint"
    dtype = next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)
    if dtype != torch.float32:
        return f"score in float32 (--dtype float32; the model runs in {str(dtype).split('.')[-1]})"
    return ("the weights are finite and already float32, so the values overflow in the forward or backward pass; "
            "try shorter windows (--seq-len) or another checkpoint")

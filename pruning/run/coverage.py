"""Architecture coverage: run imprune's main stages on a tiny random model of one model type, stage by stage.

``run_stages('llama')`` builds ``random:llama`` and runs, in order: the canonical map (registered /
discovered), one scoring pass (taylor, fisher, activation, magnitude), 50% unstructured Wanda pruning, head
pruning (half of the KV groups with their query heads; with one KV group, half of its query heads) and
evaluation (perplexity of the dense and of both pruned models). Each stage ends as ``ok``, ``refused``
(an ``ImpruneError``: one line meant for the user) or ``crash`` (anything else: a bug); a stage whose input
failed is ``skipped``. ``scripts/bench_archs.py`` runs this for every causal-LM type transformers ships, one
type per worker process; a test runs it on a few.

"ok" asks for more than "no exception": pruned models must run a finite forward, the unstructured stage must
reach its target sparsity on the selected weights, and head pruning must really remove heads.
"""

from __future__ import annotations

import copy
import math
import re
import time
import traceback
import warnings
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from importance.errors import ImpruneError

STAGES = ("build", "map", "score", "prune", "heads", "eval")
SCORERS = ("taylor", "fisher", "activation", "magnitude")
UNSTRUCTURED_SPARSITY = 0.5
HEAD_SPARSITY = 0.5
# module class names of layers that mix tokens without attention (state-space, recurrent, convolutional)
_ATTENTION_CLASS = re.compile(r"attention|attn", re.IGNORECASE)
_NOT_ATTENTION = re.compile(r"rwkv", re.IGNORECASE)  # RWKV calls its linear recurrence 'attention'


@dataclass
class StageResult:
    """``status``: ok | refused | crash | skipped | timeout; ``detail``: one line (the refusal or the error)."""

    status: str
    detail: str = ""
    seconds: float = 0.0


@dataclass
class Coverage:
    """What one model type got through."""

    model_type: str
    stages: dict[str, StageResult] = field(default_factory=dict)
    map_kind: str = ""  # registered | discovered | refused | '' (not built)
    has_attention: bool | None = None
    info: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["stages"] = {k: asdict(v) for k, v in self.stages.items()}
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Coverage:
        stages = {k: StageResult(**v) for k, v in d.get("stages", {}).items()}
        return cls(d["model_type"], stages, d.get("map_kind", ""), d.get("has_attention"), d.get("info", {}))


def one_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    msg = text[0] if text else ""
    return msg[:300] if isinstance(err, ImpruneError) else f"{type(err).__name__}: {msg[:300]}"


def _where(err: BaseException) -> str:
    """The innermost frame of a crash inside imprune (else the innermost frame), as 'file:line'."""
    frames = traceback.extract_tb(err.__traceback__)
    ours = [f for f in frames if "/importance/" in f.filename or "/pruning/" in f.filename]
    f = (ours or frames or [None])[-1]
    return "" if f is None else f"{f.filename.rsplit('/', 2)[-2]}/{f.filename.rsplit('/', 1)[-1]}:{f.lineno}"


def _stage(cov: Coverage, name: str, fn: Callable[[], Any]) -> Any:
    t0 = time.perf_counter()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            out = fn()
    except ImpruneError as err:
        cov.stages[name] = StageResult("refused", one_line(err), round(time.perf_counter() - t0, 3))
        return None
    except Exception as err:  # a crash is the finding: record it with where it happened
        detail = f"{one_line(err)} [{_where(err)}]"
        cov.stages[name] = StageResult("crash", detail, round(time.perf_counter() - t0, 3))
        return None
    cov.stages[name] = StageResult("ok", "", round(time.perf_counter() - t0, 3))
    return out


def has_attention(model: torch.nn.Module) -> bool:
    """Whether any submodule is an attention layer by its class name (RWKV's recurrence excluded)."""
    names = {type(m).__name__ for m in model.modules()}
    return any(_ATTENTION_CLASS.search(n) and not _NOT_ATTENTION.search(n) for n in names)


def declares_attention(model_type: str) -> bool | None:
    """For a type whose tiny model could not be built: whether its modeling module defines an attention class
    (None where even that cannot be imported)."""
    import importlib

    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    try:
        import transformers

        cls = getattr(transformers, MODEL_FOR_CAUSAL_LM_MAPPING_NAMES[model_type])
        module = importlib.import_module(cls.__module__)
    except Exception:  # noqa: BLE001 - an optional dependency missing: unknown
        return None
    return any(isinstance(v, type) and issubclass(v, torch.nn.Module) and _ATTENTION_CLASS.search(n)
               and not _NOT_ATTENTION.search(n) for n, v in vars(module).items())


def coverage_windows(vocab: int, n: int = 4, t: int = 24, seed: int = 0) -> Any:
    """``n`` windows of ``t`` random byte-token ids (below ``vocab``), every token a target."""
    from importance.data.sources import Windows

    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, max(6, min(vocab, 261)), (n, t), generator=gen)
    ones = torch.ones_like(ids)
    return Windows(ids, ones, ones.bool(), {"data": "random", "seq_len": t, "windows": n})


def _finite_forward(model: torch.nn.Module, windows: Any) -> None:
    with torch.no_grad():
        out = model(input_ids=windows.input_ids[:1], attention_mask=windows.attention_mask[:1], use_cache=False)
    logits = out.logits if hasattr(out, "logits") else out[0]
    if not torch.isfinite(logits).all():
        raise RuntimeError("the pruned model's logits are not finite")


def preload() -> None:
    """Import everything ``run_stages`` uses (a parent process then forks workers that share it)."""
    import importance.arch.canonical  # noqa: F401
    import importance.arch.check  # noqa: F401
    import importance.arch.discover  # noqa: F401
    import importance.models.load  # noqa: F401
    import importance.models.tiny  # noqa: F401
    import importance.scoring  # noqa: F401
    import pruning.eval.perplexity  # noqa: F401
    import pruning.methods.structured  # noqa: F401
    import pruning.methods.surgery  # noqa: F401
    import pruning.methods.unstructured  # noqa: F401
    from importance.models.load import load_model

    load_model("random:llama")  # transformers' modeling stack (tens of seconds of imports on a busy machine)


def run_stages(model_type: str, progress: Callable[[str], None] | None = None) -> Coverage:
    """Build ``random:<model_type>`` and run every stage on it (see the module docstring)."""
    from importance.arch.canonical import model_map
    from importance.models.load import load_model
    from importance.scoring import score
    from pruning.eval.perplexity import perplexity
    from pruning.methods.structured import StructuredConfig, prune_structured
    from pruning.methods.unstructured import UnstructuredConfig, prune_unstructured, select_components

    cov = Coverage(model_type)
    say = progress or (lambda _s: None)
    for s in STAGES:
        cov.stages[s] = StageResult("skipped")
    say("build")
    lm = _stage(cov, "build", lambda: load_model(f"random:{model_type}"))
    if lm is None:
        cov.has_attention = declares_attention(model_type)  # counted among the types with attention all the same
        return cov
    cov.has_attention = has_attention(lm.model)
    cov.info["task"] = lm.task
    cov.info["class"] = type(lm.model).__name__
    say("map")
    mm = _stage(cov, "map", lambda: model_map(lm.model))
    if mm is None:
        cov.map_kind = "refused"
        return cov
    cov.map_kind = "discovered" if mm.discovered else "registered"
    b0 = mm.blocks[0]
    cov.info.update(components=mm.component_names(), heads=b0.n_heads, kv_heads=b0.n_kv_heads,
                    experts=b0.n_experts)
    vocab = int(lm.model.get_input_embeddings().weight.shape[0])
    windows = coverage_windows(vocab)
    say("score")
    table = _stage(cov, "score", lambda: score(lm, windows, list(SCORERS), batch_size=2, progress=False))

    def unstructured() -> Any:
        pruned = copy.deepcopy(lm)
        prune_unstructured(pruned, UnstructuredConfig(UNSTRUCTURED_SPARSITY, "wanda"), table, windows, batch_size=2)
        comps = select_components(model_map(pruned.model))
        zeros = sum(int((c.weight == 0).sum()) for c in comps)
        total = sum(c.numel for c in comps)
        if abs(zeros / total - UNSTRUCTURED_SPARSITY) > 0.01:
            raise RuntimeError(f"unstructured pruning reached {zeros / total:.3f}, not {UNSTRUCTURED_SPARSITY}")
        _finite_forward(pruned.model, windows)
        return pruned

    def heads() -> Any:
        if table is None:
            raise ImpruneError("no importance table (the scoring stage failed)")
        pruned = copy.deepcopy(lm)
        before = sum(b.n_heads for b in model_map(pruned.model).blocks)
        single = min(b.n_kv_heads for b in model_map(pruned.model).blocks) == 1  # one KV group: heads within it
        cfg = StructuredConfig(HEAD_SPARSITY, part="heads", gqa="per-group" if single else "groups")
        prune_structured(pruned, cfg, table, windows, batch_size=2)
        after = sum(b.n_heads for b in model_map(pruned.model).blocks)
        if not after < before:
            raise RuntimeError(f"head pruning removed no heads ({before} -> {after})")
        _finite_forward(pruned.model, windows)
        cov.info["heads_after"] = after
        return pruned

    say("prune")
    sparse = _stage(cov, "prune", unstructured)
    say("heads")
    narrow = _stage(cov, "heads", heads) if table is not None else None

    def evaluate() -> dict[str, float]:
        out = {}
        for name, m in (("dense", lm), ("unstructured", sparse), ("heads", narrow)):
            if m is not None:
                ppl = perplexity(m.model, windows, m.task, batch_size=2, progress=False).ppl
                if not math.isfinite(ppl):
                    raise RuntimeError(f"perplexity of the {name} model is {ppl}")
                out[name] = round(ppl, 3)
        return out

    say("eval")
    ppl = _stage(cov, "eval", evaluate)
    if ppl is not None:
        cov.info["perplexity"] = ppl
    return cov

"""lm-evaluation-harness on the model in memory: ``ImpruneLM`` (an lm-eval ``TemplateLM``) and ``harness``.

The wrapper serves lm-eval's three request kinds from the loaded model object itself, so a pruned, healed,
quantized or offloaded model is evaluated as it is, with no save/reload by name:

- ``loglikelihood``: lm-eval's own encoding (``TemplateLM._encode_pair``: trailing context spaces move to the
  continuation, the pair is encoded whole and split), then ``pruning.eval.tasks.token_logliks``, the same
  batched loop the probes use;
- ``loglikelihood_rolling``: lm-eval's disjoint rolling windows of the model's context length;
- ``generate_until``: greedy decoding (``model.generate(do_sample=False)``), cut at the first stop string.

``harness(lm, tasks, ...)`` calls ``lm_eval.simple_evaluate`` with this wrapper and returns one
``TaskAccuracy`` per task that reports ``acc`` (with ``acc_norm`` where the task has it; lm-eval's own
standard errors) plus lm-eval's raw results. ``include_path`` adds a folder of task YAMLs (lm-eval's custom
task path). lm-eval is an optional extra (``pip install 'imprune[eval]'``); without it this says so in one line.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch

from importance.errors import ImpruneError
from pruning.eval.tasks import TaskAccuracy, _start_token, max_length, token_logliks

MISSING = "lm-evaluation-harness is not installed; install the extra: pip install 'imprune[eval]' (or lm-eval>=0.4)"


def require_lm_eval() -> Any:
    """The ``lm_eval`` module, or one line saying which extra to install."""
    try:
        import lm_eval
        from lm_eval.api.model import TemplateLM  # noqa: F401
    except ImportError:
        raise ImpruneError(MISSING) from None
    return lm_eval


def wrapper_class() -> type:
    """``ImpruneLM``, built on first use so that importing this module never needs lm-eval."""
    global _WRAPPER
    if _WRAPPER is None:
        require_lm_eval()
        from lm_eval.api.model import TemplateLM
        from lm_eval.utils import get_rolling_token_windows, make_disjoint_window

        class ImpruneLM(TemplateLM):
            """An lm-eval model around ``LoadedModel`` ``lm`` (its ``model`` and ``tokenizer`` as they are)."""

            def __init__(self, lm: Any, batch_size: int = 8, max_gen_toks: int = 256) -> None:
                super().__init__()
                self.lm, self.model, self.tokenizer = lm, lm.model, lm.tokenizer
                self.batch_size, self.max_gen_toks = batch_size, max_gen_toks

            @property
            def eot_token_id(self) -> int:
                eos = self.tokenizer.eos_token_id
                return int(eos) if eos is not None else _start_token(self.tokenizer)

            @property
            def prefix_token_id(self) -> int:
                return _start_token(self.tokenizer)

            @property
            def max_length(self) -> int:
                return max_length(self.model)

            def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs: Any) -> list[int]:
                return list(self.tokenizer(string, add_special_tokens=bool(add_special_tokens))["input_ids"])

            def tok_decode(self, tokens: Sequence[int], **kwargs: Any) -> str:
                return self.tokenizer.decode(list(tokens), skip_special_tokens=True)

            def _loglikelihood_tokens(self, requests: list, disable_tqdm: bool = False, **kwargs: Any) -> list:
                out = token_logliks(self.model, [(ctx, cont) for _, ctx, cont in requests], self.batch_size,
                                    self.prefix_token_id, progress=not disable_tqdm)
                for (key, _, _), res in zip(requests, out):
                    self.cache_hook.add_partial("loglikelihood", key, res)
                return out

            def loglikelihood_rolling(self, requests: list, disable_tqdm: bool = False) -> list[float]:
                results = []
                for (string,) in (r.args for r in requests):
                    windows = [make_disjoint_window(w) for w in get_rolling_token_windows(
                        self.tok_encode(string), self.prefix_token_id, self.max_length, 1)]
                    lls = token_logliks(self.model, windows, self.batch_size, self.prefix_token_id)
                    results.append(sum(ll for ll, _ in lls))
                    self.cache_hook.add_partial("loglikelihood_rolling", (string,), results[-1])
                return results

            @torch.no_grad()
            def generate_until(self, requests: list, disable_tqdm: bool = False) -> list[str]:
                from importance.models.load import input_device

                out = []
                for context, kw in (r.args for r in requests):
                    kw = dict(kw or {})
                    until = kw.get("until") or [self.tok_decode([self.eot_token_id])]
                    until = [until] if isinstance(until, str) else list(until)
                    new = int(kw.get("max_gen_toks", self.max_gen_toks))
                    ids = self.tok_encode(context)[-(self.max_length - new):] or [self.prefix_token_id]
                    x = torch.tensor([ids], device=input_device(self.model))
                    gen = self.model.generate(input_ids=x, attention_mask=torch.ones_like(x), max_new_tokens=new,
                                              do_sample=False, pad_token_id=self.eot_token_id)
                    text = self.tok_decode(gen[0, len(ids):].tolist())
                    for stop in until:
                        if stop and stop in text:
                            text = text[:text.index(stop)]
                    out.append(text)
                    self.cache_hook.add_partial("generate_until", (context, kw), text)
                return out

        _WRAPPER = ImpruneLM
    return _WRAPPER


_WRAPPER: type | None = None


def task_manager(tasks: Sequence[str], include_path: str | Path | None = None) -> Any:
    """An lm-eval ``TaskManager`` that knows every name in ``tasks`` (``include_path``: a folder of task YAMLs),
    or one line naming the unknown ones."""
    require_lm_eval()
    from lm_eval.tasks import TaskManager

    logging.getLogger("lm_eval").setLevel(logging.ERROR)
    if include_path is not None and not Path(include_path).expanduser().is_dir():
        raise ImpruneError(f"--include-path '{include_path}' is not a folder of lm-eval task YAMLs")
    path = str(Path(include_path).expanduser()) if include_path is not None else None
    manager = None
    if path is not None:  # indexing lm-eval's ~200 shipped task folders takes seconds: skip when unneeded
        manager = TaskManager(include_path=path, include_defaults=False)
        manager = manager if all(t in manager.all_tasks for t in tasks) else None
    manager = manager or TaskManager(include_path=path)
    unknown = [t for t in tasks if t not in manager.all_tasks]
    if unknown:
        raise ImpruneError(f"unknown task(s) {', '.join(unknown)}: neither a built-in probe nor an lm-eval task "
                           "(`python -m lm_eval ls tasks` lists lm-eval's; --include-path adds your YAMLs)")
    for name in tasks:  # a multiple-choice YAML without choices fails deep inside lm-eval with an empty TypeError
        entry = manager.task_index.get(name)
        cfg = getattr(entry, "cfg", None) or {}
        if cfg.get("output_type") == "multiple_choice" and "doc_to_choice" not in cfg and "include" not in cfg:
            where = getattr(entry, "yaml_path", None) or name
            raise ImpruneError(f"lm-eval task '{name}' ({where}) is multiple_choice but has no doc_to_choice; add "
                               "`doc_to_choice:` (the list of choices, e.g. \"{{choices}}\")")
    return manager


def harness(lm: Any, tasks: Sequence[str], limit: int | None = None, num_fewshot: int | None = None,
            batch_size: int = 8, include_path: str | Path | None = None, seed: int = 0,
            manager: Any = None, progress: bool = True) -> tuple[list[TaskAccuracy], dict[str, Any]]:
    """lm-eval's ``simple_evaluate`` on ``lm`` through ``ImpruneLM``: (one row per task, lm-eval's results);
    ``progress=False`` silences lm-eval's own progress bars."""
    lm_eval = require_lm_eval()
    if lm.task != "causal-lm":
        raise ImpruneError("lm-eval tasks need a causal language model (log-likelihoods of continuations)")
    manager = manager or task_manager(tasks, include_path)
    try:
        with _offline_when_unreachable(), _progress(progress):
                res = lm_eval.simple_evaluate(model=wrapper_class()(lm, batch_size=batch_size), tasks=list(tasks),
                                          num_fewshot=num_fewshot, limit=limit, task_manager=manager,
                                          log_samples=True, random_seed=seed, numpy_random_seed=seed,
                                          torch_random_seed=seed, fewshot_random_seed=seed, bootstrap_iters=0)
    except ImpruneError:
        raise
    except Exception as err:  # a task's data that cannot be fetched offline, a broken YAML, ...
        why = f"{type(err).__name__}: {str(err).splitlines()[0][:160] if str(err) else ''}"
        raise ImpruneError(f"lm-eval could not run {', '.join(tasks)} ({why}); offline, lm-eval's hub data is "
                           "unreachable: use a local task (--include-path) or run where the hub is reachable") \
            from None
    return [_row(name, metrics, res.get("samples", {}).get(name, []))
            for name, metrics in res["results"].items() if "acc,none" in metrics], res


@contextlib.contextmanager
def _progress(show: bool) -> Iterator[None]:
    """lm-eval draws tqdm bars on stderr; tqdm reads TQDM_DISABLE at each bar's creation."""
    old = os.environ.get("TQDM_DISABLE")
    if not show:
        os.environ["TQDM_DISABLE"] = "1"
    try:
        yield
    finally:
        if old is None:
            os.environ.pop("TQDM_DISABLE", None)
        else:
            os.environ["TQDM_DISABLE"] = old


@contextlib.contextmanager
def _offline_when_unreachable() -> Iterator[None]:
    """Where the hub cannot be reached, put huggingface_hub and datasets in offline mode for the call: a data set
    not in the local cache then fails at once, instead of after minutes of retries printed to stderr."""
    from importance.models.load import _hub_reachable

    if _hub_reachable():
        yield
        return
    import datasets.config as dc
    import huggingface_hub.constants as hc

    old = hc.HF_HUB_OFFLINE, dc.HF_HUB_OFFLINE, dc.HF_DATASETS_OFFLINE
    hc.HF_HUB_OFFLINE = dc.HF_HUB_OFFLINE = dc.HF_DATASETS_OFFLINE = True
    try:
        yield
    finally:
        hc.HF_HUB_OFFLINE, dc.HF_HUB_OFFLINE, dc.HF_DATASETS_OFFLINE = old


def _row(name: str, m: dict[str, Any], samples: list[dict[str, Any]]) -> TaskAccuracy:
    """A ``TaskAccuracy`` from lm-eval's metrics of one task; chance = mean 1 / choices over its samples."""
    n = len(samples) or int(m.get("samples", 0) or 0)
    chance = sum(1.0 / max(len(s.get("arguments", [])), 1) for s in samples) / len(samples) if samples else \
        float("nan")
    num = lambda k: float(m[k]) if isinstance(m.get(k), (int, float)) else float("nan")  # noqa: E731
    acc = num("acc,none")
    norm = num("acc_norm,none")
    from pruning.eval.tasks import stderr

    return TaskAccuracy(name, acc, norm, chance, n, stderr(acc, n), stderr(norm, n) if norm == norm else norm, 0,
                        "lm-eval")

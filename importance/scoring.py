"""``importance.scoring``: model + data -> ImportanceTable, all requested scorers from ONE pass.

The exceptions are the measured scorers (not defaults): ``removal`` bypasses each block in turn on the first
``removal_tokens`` calibration tokens after the pass (L partial forwards with the cached-input replay),
``head_removal`` zeroes each head in turn there (one partial forward from its layer per head).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from importance.arch.canonical import model_map
from importance.data.sources import Windows, load_data
from importance.engine.blockwise import collect_blockwise
from importance.engine.collect import CollectConfig, collect
from importance.engine.distributed import all_reduce_statistics, process_state, shard_windows
from importance.engine.offload import is_offloaded
from importance.engine.stats import Statistics
from importance.errors import ImpruneError
from importance.models.load import LoadedModel
from importance.scorers import MEASURED, SCORERS, TOKEN_GATE_SCORERS
from importance.store.meta import versions
from importance.table import ImportanceTable, build_table
from importance.validate.ablation import removal_statistics

DEFAULT_SCORERS = ("taylor", "fisher", "activation", "magnitude", "block_influence", "residual_fisher")
REMOVAL_TOKENS = 2048  # default calibration tokens the measured removal scorers run on


def parse_scorers(names: str | Sequence[str]) -> list[str]:
    """'taylor,fisher' or a list -> validated list (registry order kept as given, duplicates dropped)."""
    items = [n.strip() for n in (names.split(",") if isinstance(names, str) else names) if n.strip()]
    unknown = [n for n in items if n not in SCORERS]
    if unknown or not items:
        raise ImpruneError(f"unknown scorer '{','.join(unknown) or names}'; use any of {', '.join(SCORERS)}")
    return list(dict.fromkeys(items))


def score(model: LoadedModel | Any, data: Windows | str, scorers: str | Sequence[str] = DEFAULT_SCORERS, *,
          tokenizer: Any = None, task: str | None = None, seq_len: int = 256, tokens: int | None = None,
          samples: int | None = None, seed: int = 0, batch_size: int = 4, elements: bool = False,
          fisher_unit: str = "sequence", obd: bool = False, blockwise: bool = False,
          removal_tokens: int | None = REMOVAL_TOKENS, progress: bool = True) -> ImportanceTable:
    """Score ``model`` on ``data`` with every scorer in ``scorers`` from one hooked pass.

    ``model`` is a ``LoadedModel`` (from ``importance.load_model``) or a Hugging Face model plus
    ``tokenizer``/``task``; ``data`` is ``Windows`` or a ``--data`` spec string. ``blockwise`` runs the
    forward-only scorers block by block over kept hidden states (``importance.engine.blockwise``): with an
    offloaded model, peak memory is about one block plus the hidden states. ``removal_tokens`` caps the
    windows the ``removal`` scorer measures on (whole windows, at least one; None: all of them).
    """
    return _score(model, data, scorers, tokenizer, task, seq_len, tokens, samples, seed, batch_size, elements,
                  fisher_unit, obd, blockwise, removal_tokens, progress)[0]


def score_parts(model: LoadedModel | Any, data: Windows | str, scorers: str | Sequence[str] = DEFAULT_SCORERS,
                parts: int = 2, *, tokenizer: Any = None, task: str | None = None, seq_len: int = 256,
                samples: int | None = None, seed: int = 0, batch_size: int = 4, fisher_unit: str = "sequence",
                progress: bool = True) -> list[ImportanceTable]:
    """``[whole, part 1, ..., part n]``: ``parts`` interleaved parts of the windows (window i in part i % parts),
    each collected alone, and the whole table from the parts' summed statistics: exactly the table of one pass
    over every window (each statistic is a sum), so a split-half reliability costs no second pass. Arguments as
    ``score``; not with the ``removal`` scorer or several processes."""
    if parts < 2:
        raise ImpruneError(f"score_parts needs at least 2 parts, got {parts}; use score for one table")
    return _score(model, data, scorers, tokenizer, task, seq_len, None, samples, seed, batch_size, False,
                  fisher_unit, False, False, REMOVAL_TOKENS, progress, split=parts)


def _score(model: LoadedModel | Any, data: Windows | str, scorers: str | Sequence[str], tokenizer: Any,
           task: str | None, seq_len: int, tokens: int | None, samples: int | None, seed: int, batch_size: int,
           elements: bool, fisher_unit: str, obd: bool, blockwise: bool, removal_tokens: int | None, progress: bool,
           split: int = 1) -> list[ImportanceTable]:
    names = parse_scorers(scorers)
    if isinstance(model, LoadedModel):
        hf, tokenizer, task, ident = model.model, tokenizer or model.tokenizer, task or model.task, model.describe()
    else:
        hf, task = model, task or "causal-lm"
        ident = {"spec": getattr(hf, "name_or_path", type(hf).__name__), "model_type": hf.config.model_type,
                 "task": task}
    if isinstance(data, str):
        if tokenizer is None:
            raise ImpruneError("a data spec needs a tokenizer: pass tokenizer=... or a LoadedModel")
        limit = getattr(hf.config, "max_position_embeddings", None) or getattr(hf.config, "n_positions", None)
        data = load_data(data, tokenizer, seq_len=seq_len, tokens=tokens, samples=samples, seed=seed,
                         max_positions=limit)
    need_grad = any(SCORERS[n].needs_grad for n in names)
    cfg = CollectConfig(grad=need_grad, elements=elements and need_grad,
                        activation=any(SCORERS[n].needs_activation for n in names),
                        block_influence="block_influence" in names, fisher_unit=fisher_unit,
                        residual_fisher="residual_fisher" in names,
                        token_fisher=any(n in TOKEN_GATE_SCORERS for n in names))
    mm = model_map(hf)
    measured = tuple(dict.fromkeys(MEASURED[n] for n in names if n in MEASURED))  # granularities to ablate
    if measured and (blockwise or is_offloaded(hf)):
        raise ImpruneError("the removal scorers replay whole-model forwards and need the model in memory; drop "
                           "--max-memory / --blockwise or use --scorers block_influence")
    if split > 1 and (blockwise or measured or process_state() is not None):
        raise ImpruneError("split scoring (per-part tables) runs one in-memory process without the removal scorer")
    if split > 1 and len(data) < split:
        raise ImpruneError(f"{len(data)} window(s) cannot be split into {split} parts; give at least {split}")
    removal = removal_windows(data, removal_tokens) if measured else None
    removal_meta = {"windows": len(removal), "tokens": removal.n_tokens} if removal is not None else None
    state = process_state()  # a multi-process launch: score a shard, then add the sums of every process
    if state is not None:
        data = shard_windows(data, batch_size, state.process_index, state.num_processes)
        if removal is not None:
            removal = shard_windows(removal, batch_size, state.process_index, state.num_processes)
        progress = progress and state.is_main_process
    parts = None
    if blockwise:
        stats = collect_blockwise(hf, data, cfg, batch_size=batch_size, progress=progress, mm=mm)
    elif split > 1:  # interleaved parts (window i goes to part i % split), each collected alone
        parts = [collect(hf, data.subset(slice(i, None, split)), task, cfg, batch_size=batch_size,
                         progress=progress, mm=mm) for i in range(split)]
        stats = Statistics(meta={**parts[0].meta, "seconds": sum(p.meta.get("seconds", 0.0) for p in parts)})
        for part in parts:
            stats.merge(part)
    else:
        stats = collect(hf, data, task, cfg, batch_size=batch_size, progress=progress, mm=mm)
    if removal is not None:
        stats.merge(removal_statistics(hf, removal, task, batch_size=batch_size, progress=progress, mm=mm,
                                       granularities=measured))
    if state is not None:
        all_reduce_statistics(stats, state)
    meta = {"model": ident, "data": dict(data.meta), "seed": seed, "batch_size": batch_size, "blockwise": blockwise,
            "seconds": round(stats.meta.get("seconds", 0.0), 3), "processes": stats.meta.get("processes", 1),
            "versions": versions()}
    if removal_meta is not None:
        meta["removal"] = removal_meta
    if parts is not None:  # the sums of disjoint parts add up to the whole: one table per part, then the whole
        tables = []
        for i, part in enumerate(parts):
            data_meta = {**meta["data"], "windows": int(part.count("sequences")), "part": f"{i + 1}/{len(parts)}"}
            part_meta = {**meta, "data": data_meta}
            tables.append(build_table(part, mm, names, elements=elements, obd=obd, meta=part_meta))
        return [build_table(stats, mm, names, elements=elements, obd=obd, meta=meta), *tables]
    return [build_table(stats, mm, names, elements=elements, obd=obd, meta=meta)]


def removal_windows(data: Windows, removal_tokens: int | None = REMOVAL_TOKENS) -> Windows:
    """The calibration windows the measured removal scorer runs on: the first ``removal_tokens`` worth (whole
    windows, at least one; None: all)."""
    if removal_tokens is None:
        return data
    if removal_tokens < 1:
        raise ImpruneError(f"--removal-tokens {removal_tokens} must be at least 1 (it is rounded to whole windows)")
    return data.subset(slice(0, max(1, removal_tokens // data.seq_len)))

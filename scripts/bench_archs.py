"""Architecture coverage: every causal-LM model type transformers ships, through imprune's main stages.

For each type in ``transformers``' causal-LM registry (``MODEL_FOR_CAUSAL_LM_MAPPING_NAMES``) a tiny random
model (``random:<type>``) goes through the canonical map, one scoring pass, 50% unstructured Wanda, head
pruning and evaluation (``pruning.run.coverage.run_stages``). Each type runs in its own worker process, forked
from this one after the imports, ONE at a time, with a time limit (``--timeout``); a worker that runs past it
is killed and its current stage is recorded as ``timeout``; a worker's address space is capped at 8 GiB.

Prints the table (type, map kind, each stage ok / one-line refusal / crash) and the counts, and writes
``scripts/results/bench_archs.json``. ``--types a,b`` reruns only those types and merges them into the
existing JSON; ``--readme`` rewrites the README's generated coverage block from the JSON.

    PYTHONPATH=$PWD python scripts/bench_archs.py                     # all types (~20-40 min on 2 cores)
    PYTHONPATH=$PWD python scripts/bench_archs.py --types olmo,cohere # rerun two types
    PYTHONPATH=$PWD python scripts/bench_archs.py --readme            # README block from the JSON
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402

from pruning.run.coverage import STAGES, Coverage, StageResult, preload, run_stages  # noqa: E402
from pruning.run.coverage_report import counts, readme_block, replace_readme_block, table_lines  # noqa: E402

RESULTS = ROOT / "scripts" / "results" / "bench_archs.json"
README = ROOT / "README.md"


def all_types() -> list[str]:
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    return sorted(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES)


MEMORY_LIMIT = 8 * 2**30  # address space of one worker: a default config too large for a tiny model fails alone


def _worker(model_type: str, conn: Any) -> None:
    import resource

    resource.setrlimit(resource.RLIMIT_AS, (MEMORY_LIMIT, MEMORY_LIMIT))
    torch.set_num_threads(1)
    cov = run_stages(model_type, progress=lambda stage: conn.send(("stage", stage)))
    conn.send(("done", cov.to_dict()))
    conn.close()


def run_one(model_type: str, timeout: float) -> Coverage:
    """Run ``run_stages(model_type)`` in a forked worker with a wall-clock limit."""
    ctx = mp.get_context("fork")
    parent, child = ctx.Pipe(duplex=False)
    proc = ctx.Process(target=_worker, args=(model_type, child), daemon=True)
    t0 = time.perf_counter()
    proc.start()
    child.close()
    stage, result = "build", None
    while result is None:
        left = timeout - (time.perf_counter() - t0)
        if left <= 0 or not parent.poll(left):
            break
        try:
            kind, value = parent.recv()
        except EOFError:  # the worker died without a result
            break
        if kind == "stage":
            stage = value
        else:
            result = value
    if result is None and proc.is_alive():
        proc.kill()
    proc.join(5)
    if result is not None:
        return Coverage.from_dict(result)
    cov = Coverage(model_type, {s: StageResult("skipped") for s in STAGES})
    elapsed = round(time.perf_counter() - t0, 1)
    if proc.exitcode not in (None, 0) and elapsed < timeout:
        cov.stages[stage] = StageResult("crash", f"worker died with exit code {proc.exitcode}", elapsed)
    else:
        cov.stages[stage] = StageResult("timeout", f"over {timeout:g} s", elapsed)
    return cov


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--types", help="comma-separated model types (default: the whole causal-LM registry); "
                    "merged into the existing JSON")
    ap.add_argument("--timeout", type=float, default=120.0, help="seconds per type (default 120)")
    ap.add_argument("--out", type=Path, default=RESULTS)
    ap.add_argument("--readme", action="store_true", help="only rewrite the README's coverage block from --out")
    a = ap.parse_args(argv)
    if a.readme:
        doc = json.loads(a.out.read_text())
        README.write_text(replace_readme_block(README.read_text(), readme_block(doc)))
        print(f"README coverage block written from {a.out}")
        return 0
    types = [t.strip() for t in a.types.split(",") if t.strip()] if a.types else all_types()
    import transformers

    preload()  # every worker forks from these modules as they are now (edits during a run do not leak in)
    print(f"bench_archs: {len(types)} model types, transformers {transformers.__version__}, torch "
          f"{torch.__version__}, {a.timeout:g} s per type, one worker at a time", flush=True)
    done: dict[str, Any] = {}
    if a.types and a.out.is_file():
        done = {r["model_type"]: r for r in json.loads(a.out.read_text())["types"]}
    t_all = time.perf_counter()
    a.out.parent.mkdir(parents=True, exist_ok=True)
    for i, t in enumerate(types):
        cov = run_one(t, a.timeout)
        done[t] = cov.to_dict()
        print(f"[{i + 1}/{len(types)}] " + table_lines([done[t]], header=False)[0], flush=True)
        rows = [done[t] for t in sorted(done)]
        doc = {"transformers": transformers.__version__, "torch": torch.__version__, "timeout_s": a.timeout,
               "registry_size": len(all_types()), "stages": list(STAGES), "counts": counts(rows), "types": rows,
               "seconds": round(time.perf_counter() - t_all, 1) if not a.types else None}
        tmp = a.out.with_suffix(".tmp")  # written after every type: an interrupted run keeps what it measured
        tmp.write_text(json.dumps(doc, indent=1))
        tmp.replace(a.out)
    print()
    print("\n".join(table_lines(rows)))
    print()
    print(json.dumps(doc["counts"], indent=1))
    print(f"wrote {a.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""Which quantization library stores what it claims on this machine: serialized bytes of one linear layer.

Quantizes the same float32 linear (SmolLM2's mlp.down shape, [576, 1536]) with optimum-quanto (qint4 with
groups of 128, qint8) and, when installed, torchao (Int4WeightOnlyConfig, IntxWeightOnlyConfig int4 per group
of 128, Int8WeightOnlyConfig), and prints for each: bytes of its state dict as saved, the ratio to float32,
the largest output error on random inputs, and the tensor class that holds the weight. This measurement is why
``pruning.quant.quantize`` stores weights with quanto (see the README). A configuration that fails to run here is
printed with its error, not skipped silently.

    python scripts/compare_quant_libraries.py [--out scripts/results/quant_libraries.json]
"""

from __future__ import annotations

import argparse
import io
import sys
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from benchlib import write_results  # noqa: E402

SHAPE = (576, 1536)  # [out, in]


def saved_bytes(module: torch.nn.Module) -> int:
    buf = io.BytesIO()
    torch.save(module.state_dict(), buf)
    return buf.getbuffer().nbytes


def quanto_configs() -> dict[str, Callable[[torch.nn.Module], None]]:
    from optimum.quanto import freeze, qint4, qint8, quantize

    def make(q: Any) -> Callable[[torch.nn.Module], None]:
        def apply(m: torch.nn.Module) -> None:
            quantize(m, weights=q)
            freeze(m)

        return apply

    return {"quanto qint4 (group 128)": make(qint4), "quanto qint8": make(qint8)}


def torchao_configs() -> dict[str, Callable[[torch.nn.Module], None]]:
    try:
        import torchao.quantization as tq
    except ImportError:
        return {}

    def make(cfg: Callable[[], Any]) -> Callable[[torch.nn.Module], None]:
        return lambda m: tq.quantize_(m, cfg())

    return {"torchao Int4WeightOnly (group 128)": make(lambda: tq.Int4WeightOnlyConfig(group_size=128)),
            "torchao IntxWeightOnly int4 (group 128)": make(lambda: tq.IntxWeightOnlyConfig(
                weight_dtype=torch.int4, granularity=tq.granularity.PerGroup(128))),
            "torchao Int8WeightOnly": make(lambda: tq.Int8WeightOnlyConfig())}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", default="scripts/results/quant_libraries.json")
    args = p.parse_args()
    warnings.simplefilter("ignore")
    torch.manual_seed(0)
    base = torch.nn.Sequential(torch.nn.Linear(SHAPE[1], SHAPE[0], bias=False))
    x = torch.randn(8, SHAPE[1])
    ref = base(x).detach()
    fp32 = saved_bytes(base)
    rows: list[dict[str, Any]] = []
    configs = {**quanto_configs(), **torchao_configs()}
    if not any(k.startswith("torchao") for k in configs):
        print("torchao is not installed: only quanto measured (pip install torchao to compare)")
    for name, apply in configs.items():
        m = torch.nn.Sequential(torch.nn.Linear(SHAPE[1], SHAPE[0], bias=False))
        m.load_state_dict(base.state_dict())
        try:
            apply(m)
            with torch.no_grad():
                err = float((m(x) - ref).abs().max())
            n = saved_bytes(m)
            rows.append({"config": name, "bytes": n, "x_fp32": round(n / fp32, 3), "max_abs_error": round(err, 4),
                         "weight_class": type(m[0].weight).__name__})
        except Exception as e:  # noqa: BLE001 - the failure is the measurement
            rows.append({"config": name, "error": f"{type(e).__name__}: {str(e).splitlines()[0][:160]}"})
    versions = {}
    for lib in ("optimum.quanto", "torchao"):
        try:
            versions[lib] = __import__(lib, fromlist=["__version__"]).__version__
        except (ImportError, AttributeError):
            versions[lib] = None
    lines = [f"One float32 linear {SHAPE[0]} x {SHAPE[1]} ({fp32:,} bytes saved), torch {torch.__version__}, "
             + ", ".join(f"{k} {v or 'not installed'}" for k, v in versions.items()) + ":", "",
             "| configuration | saved bytes | x float32 | max abs error | weight held as |", "|---|---|---|---|---|"]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['config']} | fails here: {r['error']} | | | |")
        else:
            lines.append(f"| {r['config']} | {r['bytes']:,} | {r['x_fp32']:.3f} | {r['max_abs_error']:.4f} "
                         f"| {r['weight_class']} |")
    table = "\n".join(lines)
    print(table)
    out = Path(args.out)
    write_results(out, {"shape": SHAPE, "fp32_bytes": fp32, "versions": versions, "results": rows})
    out.with_suffix(".md").write_text(table + "\n")


if __name__ == "__main__":
    main()

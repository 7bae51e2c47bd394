"""Data-parallel scoring: sharding, and 2 CPU processes (gloo, accelerate launch) == 1 process."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from importance.data.sources import Windows
from importance.engine.distributed import launch_command, shard_windows
from importance.errors import ImpruneError
from importance.table import ImportanceTable
from pruning.cli.core import main


def _windows(n: int, t: int = 8) -> Windows:
    ids = torch.arange(n * t).reshape(n, t)
    return Windows(ids, torch.ones_like(ids), torch.ones_like(ids, dtype=torch.bool), {"source": "test"})


@pytest.mark.parametrize("n,bs,world", [(10, 3, 2), (8, 2, 4), (5, 5, 1), (7, 1, 3)])
def test_shards_cover_every_window_once_in_whole_batches(n: int, bs: int, world: int) -> None:
    w = _windows(n)
    shards = [shard_windows(w, bs, r, world) for r in range(world)]
    rows = sorted(int(s.input_ids[i, 0]) // 8 for s in shards for i in range(len(s.input_ids)))
    assert rows == list(range(n))
    for r, s in enumerate(shards):  # process r holds batches r, r + world, ... of the 1-process run
        starts = [int(x) // 8 for x in s.input_ids[::bs, 0]]
        assert starts == [b * bs for b in range(r, -(-n // bs), world)]


def test_more_processes_than_batches_is_refused() -> None:
    with pytest.raises(ImpruneError, match="--processes 2 or fewer"):
        shard_windows(_windows(4), 2, 0, 3)


def test_launch_line_drops_nothing_and_uses_the_module_entry_point() -> None:
    cmd = launch_command(["score", "--model", "random:llama", "--out", "x"], 2)
    assert cmd[:3] == [sys.executable, "-m", "accelerate.commands.launch"]
    assert cmd[cmd.index("--num_processes") + 1] == "2"
    assert cmd[-7:] == ["-m", "pruning", "score", "--model", "random:llama", "--out", "x"]


def _matrices(table: ImportanceTable) -> dict[str, torch.Tensor]:
    out = {}
    for s in table.scorers:
        for g in ("component", "head", "kv_group", "mlp_channel", "expert"):
            if table.has(s, g):
                out[f"{s}/{g}"] = table.matrix(s, g)
    return out


@pytest.mark.parametrize("model_type", ["llama", "qwen2_moe"])
def test_two_processes_give_the_one_process_table(tmp_path: Path, model_type: str) -> None:
    text = tmp_path / "t.txt"
    g = torch.Generator().manual_seed(0)
    words = ["the", "cat", "sat", "on", "a", "mat", "while", "dogs", "ran", "far", "away", "and", "birds", "sang"]
    text.write_text(" ".join(words[int(i)] for i in torch.randint(len(words), (2500,), generator=g)))
    common = ["score", "--model", f"random:{model_type}", "--data", f"file:{text}", "--tokens", "768",
              "--seq-len", "64", "--batch-size", "2", "--quiet", "--removal-tokens", "512",
              "--scorers", "taylor,fisher,activation,magnitude,block_influence,residual_fisher,removal"]
    assert main([*common, "--out", str(tmp_path / "one")]) == 0
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, "-m", "pruning", *common, "--processes", "2", "--out",
                           str(tmp_path / "two")], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    one, two = ImportanceTable.load(tmp_path / "one"), ImportanceTable.load(tmp_path / "two")
    assert two.meta["processes"] == 2 and one.meta["processes"] == 1
    assert one.meta["counts"]["targets"] == two.meta["counts"]["targets"]
    a, b = _matrices(one), _matrices(two)
    assert a.keys() == b.keys() and len(a) > 10
    for key in a:
        torch.testing.assert_close(b[key], a[key], rtol=1e-4, atol=1e-9, equal_nan=True, msg=key)
    assert one.meta["removal"] == two.meta["removal"] == {"windows": 8, "tokens": 512}
    for s in one.scorers:  # layer-only scorers too (removal: each process bypasses blocks on its own shard)
        torch.testing.assert_close(two.layer_scores(s), one.layer_scores(s), rtol=1e-4, atol=1e-7, msg=s)

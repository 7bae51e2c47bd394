"""Figures, and the HTML report, of an ``imprune run`` folder (heatmaps before / after / delta, sparsity)."""

from __future__ import annotations

from pathlib import Path
from typing import Any


def write_figures_and_report(out: Path, metrics: dict[str, Any]) -> None:
    """Placeholder until the heatmap module lands."""

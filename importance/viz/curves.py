"""Line figures beside the heatmaps: the training loss of a heal (``imprune heal``, the run report)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from matplotlib.figure import Figure


def loss_curve_figure(curve: Sequence[float], title: str = "healing loss", smooth: int = 8) -> Figure:
    """Loss per optimizer step (thin) and its running mean over ``smooth`` steps (thick)."""
    y = np.asarray(list(curve), dtype=float)
    fig = Figure(figsize=(6.4, 3.2), layout="constrained")
    ax = fig.add_subplot()
    steps = np.arange(1, len(y) + 1)
    ax.plot(steps, y, lw=0.8, alpha=0.45, color="tab:blue", label="per step")
    if len(y) >= smooth > 1:
        mean = np.convolve(y, np.ones(smooth) / smooth, mode="valid")
        ax.plot(steps[smooth - 1:], mean, lw=2.0, color="tab:blue", label=f"mean of {smooth}")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(frameon=False)
    return fig

"""PNG plots of result tables."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from loopfm.core.config import VARIANTS  # noqa: E402


def plot_quality(rows: dict[str, dict], path: Path, title: str = "Held-out window, target vertical") -> None:
    """AUC and NE of every model side by side: VM variants green, references (Bayes = the
    synthetic world's ceiling, the FM, the baselines) grey."""
    names = list(rows)
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
    for ax, metric, label in ((axes[0], "auc", "AUC (higher is better)"), (axes[1], "ne", "NE (lower is better)")):
        values = [rows[n][metric] for n in names]
        bars = ax.bar(names, values, color=["#3a7" if n in VARIANTS else "#888" for n in names])
        ax.bar_label(bars, fmt="%.4f", fontsize=8)
        ax.set_title(label)
        ax.set_ylim(min(values) * 0.97, max(values) * 1.02)
        ax.tick_params(axis="x", rotation=30)
    fig.suptitle(title)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)

"""Figures of an evaluation, drawn from the ``metrics.json`` summary (matplotlib, imported lazily).

Figures are built on :class:`matplotlib.figure.Figure` with the Agg canvas directly, never through
``pyplot``, so drawing them neither needs a display nor changes the caller's matplotlib backend.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from ..errors import MissingExtraError

_COLORS = {"detector": "#8c8c8c", "agent": "#1f77b4"}
_NAMES = {"detector": "detector-only", "agent": "agent"}


def _figure(width: float, height: float) -> Any:
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError as exc:
        raise MissingExtraError("matplotlib", "eval", "the evaluation plots") from exc
    fig = Figure(figsize=(width, height), dpi=120, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def plot_confusion_matrices(systems: Mapping[str, Mapping[str, Any]], path: Path, title: str = "") -> Path:
    """Confusion matrices of each system side by side (counts, rows normalised for the colour)."""
    import numpy as np

    names = [s for s in ("detector", "agent") if s in systems]
    fig = _figure(4.2 * len(names), 3.8)
    axes = fig.subplots(1, len(names), squeeze=False)[0]
    for ax, s in zip(axes, names, strict=True):
        cm = systems[s]["classification"]["confusion"]
        labels = cm["labels"]
        mat = np.asarray(cm["matrix"], dtype=float).reshape(len(labels), len(labels))
        rows = mat.sum(axis=1, keepdims=True)
        frac = np.divide(mat, rows, out=np.zeros_like(mat), where=rows > 0)
        ax.imshow(frac, cmap="Blues", vmin=0, vmax=1)
        for i in range(len(labels)):
            for j in range(len(labels)):
                ax.text(j, i, f"{int(mat[i, j])}", ha="center", va="center",
                        color="white" if frac[i, j] > 0.6 else "black", fontsize=10)
        ax.set_xticks(range(len(labels)), labels, rotation=30, ha="right")
        ax.set_yticks(range(len(labels)), labels)
        ax.set_xlabel("predicted")
        ax.set_ylabel("true")
        ax.set_title(_NAMES[s])
    if title:
        fig.suptitle(title)
    fig.savefig(path)
    return path


def plot_per_class_accuracy(systems: Mapping[str, Mapping[str, Any]], path: Path, title: str = "") -> Path:
    """Per-class accuracy (recall) bars, detector-only and agent side by side for each true label."""
    import numpy as np

    names = [s for s in ("detector", "agent") if s in systems]
    labels = [c["label"] for c in systems[names[0]]["classification"]["per_class"]]
    fig = _figure(max(4.5, 1.6 * len(labels) + 1.5), 3.6)
    ax = fig.subplots()
    x = np.arange(len(labels))
    width = 0.8 / len(names)
    for k, s in enumerate(names):
        per = {c["label"]: c for c in systems[s]["classification"]["per_class"]}
        vals = [per[lbl]["recall"] for lbl in labels]
        bars = ax.bar(x + (k - (len(names) - 1) / 2) * width, [v or 0.0 for v in vals], width,
                      label=_NAMES[s], color=_COLORS[s])
        for b, v in zip(bars, vals, strict=True):
            ax.annotate("n/a" if v is None else f"{v:.2f}", (b.get_x() + b.get_width() / 2, b.get_height()),
                        ha="center", va="bottom", fontsize=8, xytext=(0, 2), textcoords="offset points")
    support = {c["label"]: c["support"] for c in systems[names[0]]["classification"]["per_class"]}
    ax.set_xticks(x, [f"{lbl}\n(n={support[lbl]})" for lbl in labels])
    ax.set_ylim(0, 1.25)
    ax.set_ylabel("accuracy (recall)")
    ax.legend(loc="upper center", ncol=len(names), fontsize=8, frameon=False)
    if title:
        ax.set_title(title)
    fig.savefig(path)
    return path


def plot_reliability(calibration: Mapping[str, Any], path: Path, title: str = "") -> Path:
    """Reliability diagram: accuracy per confidence bin against the diagonal, with bin counts."""
    bins = calibration["bins"]
    fig = _figure(4.2, 4.4)
    ax, ax_n = fig.subplots(2, 1, sharex=True, height_ratios=[3, 1])
    width = bins[0]["upper"] - bins[0]["lower"]
    filled = [b for b in bins if b["count"]]
    ax.bar([b["lower"] for b in filled], [b["accuracy"] for b in filled], width, align="edge",
           color=_COLORS["agent"], edgecolor="white", label="accuracy")
    ax.bar([b["lower"] for b in filled], [b["mean_confidence"] - b["accuracy"] for b in filled], width,
           bottom=[b["accuracy"] for b in filled], align="edge", color="none", edgecolor="#d62728",
           hatch="//", label="gap to confidence")
    ax.plot([0, 1], [0, 1], "k--", linewidth=1)
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.set_ylabel("accuracy")
    ax.legend(loc="upper left", fontsize=8)
    ax.set_title(title or f"ECE {calibration['ece']:.3f}, Brier {calibration['brier']:.3f}")
    ax_n.bar([b["lower"] for b in bins], [b["count"] for b in bins], width, align="edge", color="#7f7f7f")
    ax_n.set_xlabel("confidence of the predicted label")
    ax_n.set_ylabel("images")
    fig.savefig(path)
    return path


def write_plots(summary: Mapping[str, Any], out_dir: Path) -> list[Path]:
    """Draw every figure of an evaluation summary into ``out_dir``; returns the files written."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    written: list[Path] = []
    for organ, om in summary.get("organs", {}).items():
        overall = om["overall"]
        if not any(m["n_images"] for m in overall.values()):
            continue
        written.append(plot_confusion_matrices(overall, out_dir / f"confusion_{organ}.png", title=organ))
        written.append(plot_per_class_accuracy(overall, out_dir / f"per_class_{organ}.png", title=organ))
        cal = overall.get("agent", {}).get("calibration")
        if cal and cal["n_images"]:
            written.append(plot_reliability(cal, out_dir / f"reliability_{organ}.png",
                                            title=f"{organ} agent: ECE {cal['ece']:.3f}"))
    return written


__all__ = ["plot_confusion_matrices", "plot_per_class_accuracy", "plot_reliability", "write_plots"]

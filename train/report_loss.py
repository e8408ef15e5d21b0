"""The report's training-loss curves: one ``loss-<stage>.png`` per run, read from its ``metrics.jsonl``,
drawn with matplotlib on an Agg canvas (no pyplot state), and the HTML that embeds them."""

from __future__ import annotations

import io
import math
import os
from collections.abc import Mapping
from pathlib import Path

from mm_llama.atomic_file import atomic_write
from mm_llama.train.metrics import METRICS_FILE, read_metrics_file
from mm_llama.train.report_html import data_uri, esc

__all__ = ["LOSS_PLOT_GLOB", "curves_html", "loss_points", "plot_loss", "write_loss_plots"]

LOSS_PLOT_GLOB = "loss-*.png"


def loss_points(metrics_jsonl: str | os.PathLike[str]) -> list[tuple[int, float]]:
    """``(step, loss)`` of every line of a run's metrics.jsonl that has a finite training ``loss``."""
    points = []
    for record in read_metrics_file(metrics_jsonl):
        loss, step = record.get("loss"), record.get("step")
        if isinstance(loss, (int, float)) and isinstance(step, int) and math.isfinite(loss):
            points.append((step, float(loss)))
    return points


def plot_loss(points: list[tuple[int, float]], target: str | os.PathLike[str], title: str) -> Path:
    """Write a PNG of the loss curve (``points`` from `loss_points`) to ``target``; returns it."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(5.0, 3.0), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    if points:
        steps, losses = zip(*points)
        ax.plot(steps, losses, marker="." if len(points) < 30 else None, linewidth=1.5)
    else:
        ax.text(0.5, 0.5, "no loss logged", ha="center", va="center", transform=ax.transAxes)
    ax.set_title(title)
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    png = io.BytesIO()
    fig.savefig(png, format="png")
    return atomic_write(target, png.getvalue())


def _run_title(stage: str, run: Path) -> str:
    """``"lm (tiny_lm_pretrain): training loss"``: the stage and the recipe its run's config.yaml names."""
    import yaml

    from mm_llama.train.recipe import CONFIG_FILE

    try:
        recipe = yaml.safe_load((run / CONFIG_FILE).read_text()).get("name")
    except (OSError, yaml.YAMLError, AttributeError):
        recipe = None
    return f"{stage} ({recipe}): training loss" if recipe else f"{stage}: training loss"


def write_loss_plots(out: Path, runs: Mapping[str, Path]) -> dict[str, Path]:
    """``out/loss-<stage>.png`` for every ``stage → run folder``; returns stage → PNG path, in ``runs``' order.
    A run without a metrics.jsonl gets a plot that says no loss was logged."""
    return {name: plot_loss(loss_points(Path(run) / METRICS_FILE), out / f"loss-{name}.png",
                            _run_title(name, Path(run))) for name, run in runs.items()}


def curves_html(curves: Mapping[str, Path]) -> str:
    """The loss-curve section: every PNG embedded as a data URI with its stage as caption."""
    figures = "".join(
        f'<figure><img class="curve" src="{data_uri(path.read_bytes(), "image/png")}" alt="loss {esc(name)}">'
        f"<figcaption>{esc(name)} ({esc(path.name)})</figcaption></figure>" for name, path in curves.items())
    if not figures:
        figures = '<p class="muted">(no training runs)</p>'
    return f'<h2>Training loss</h2><div class="curves">{figures}</div>'

"""Loss curves of the demo report: points from metrics.jsonl, the PNG, the embedded section."""

from __future__ import annotations

from pathlib import Path

from mm_llama.train.report_loss import curves_html, loss_points, write_loss_plots
from tests.train.report_helpers import loss_run, png_size

PNG = b"\x89PNG\r\n\x1a\n"


def test_loss_points_keep_finite_training_losses(tmp_path: Path) -> None:
    run = loss_run(tmp_path)
    assert loss_points(run / "metrics.jsonl") == [(10, 3.0), (30, 1.5)]  # no eval line, NaN or torn line
    assert loss_points(tmp_path / "missing.jsonl") == []


def test_every_run_gets_a_png_embedded_with_its_stage(tmp_path: Path) -> None:
    runs = {"lm": loss_run(tmp_path), "vision <&>": tmp_path / "no-run"}  # a run that logged nothing
    curves = write_loss_plots(tmp_path, runs)
    assert list(curves) == ["lm", "vision <&>"]
    assert curves["lm"] == tmp_path / "loss-lm.png" and curves["lm"].read_bytes()[:8] == PNG
    assert png_size(curves["vision <&>"].read_bytes()) == (500, 300)
    page = curves_html(curves)
    assert page.count('<img class="curve" src="data:image/png;base64,') == 2
    assert "vision &lt;&amp;&gt;" in page and "<&>" not in page
    assert "(no training runs)" in curves_html({})

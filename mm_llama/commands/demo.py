"""`mm-llama demo`: the built-in default — synthetic data, a tokenizer, a tiny LM, a contrastive ViT and an
image adapter trained from scratch, evaluated on held-out shapes (thin wrapper over `mm_llama.train.demo`)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from mm_llama.commands.arg_types import positive_int
from mm_llama.commands.help_format import HelpFormatter

DEFAULT_OUT = Path("runs/demo")


EPILOG = """\
Examples (what `make demo` runs, about 6 minutes on 2 CPU cores; then a smoke run of a few seconds):
  mm-llama demo --out runs/demo --overwrite
  mm-llama demo --out /tmp/demo-smoke --quick --device cpu --threads 1
"""


def add_parser(sub: argparse._SubParsersAction) -> None:
    """Register `demo` on the `mm-llama` subparsers."""
    p = sub.add_parser(
        "demo",
        help="the built-in default: train a tiny image model from scratch on synthetic shapes and evaluate it",
        description=(
            "Run the whole pipeline on synthetic data, from nothing: write shapes images (train + held-out "
            "test) and chat-formatted text (mm-llama synth), train a BPE tokenizer, pretrain a tiny Llama 3 LM "
            "(tiny_lm_pretrain), pretrain a tiny ViT contrastively against it (tiny_image_encoder_pretrain), "
            "train the image adapter with the LM frozen (tiny_vision_pretrain, VQA), then evaluate on the "
            "test split (VQA accuracy, majority-answer baseline, caption CIDEr, and both with blank images). "
            "Prints a metrics table and writes OUT/metrics.json, OUT/report.html (test images with the model's "
            "captions and answers, loss curves) and OUT/loss-STAGE.png. Each stage prints a line when it starts "
            "and its wall time when it ends. Settings live in mm_llama.train.demo.DemoSettings. Exit status 0: "
            "done; 1: a training stage stopped (signal, non-finite losses, bad data); 2: error."
        ),
        epilog=EPILOG, formatter_class=HelpFormatter,
    )
    p.add_argument("--out", type=Path, default=DEFAULT_OUT,
                   help=f"output folder for the data, runs, evaluation results and report (default {DEFAULT_OUT})")
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--resume", action="store_true",
                      help="continue a demo in --out: skip stages whose outputs are complete, continue an interrupted "
                           "training stage from its newest checkpoint, rewrite the report")
    mode.add_argument("--overwrite", action="store_true",
                      help="delete the demo's earlier outputs in --out first (only what the demo writes there)")
    p.add_argument("--quick", action="store_true",
                   help="smoke run, meaningless numbers: a few images and a handful of steps per stage "
                        "(DemoSettings.quick())")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto",
                   help="where training and evaluation run (default auto: CUDA when available)")
    p.add_argument("--threads", type=positive_int, default=None,
                   help="torch CPU threads (default: all cores available to this process)")
    p.add_argument("--no-progress", action="store_true", help="hide the progress bars (stage lines still print)")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    """Run the demo; 0 when it finished, 1 when a training stage stopped (errors in settings or --out: 2)."""
    import torch

    from mm_llama.data.loader_stats import TooManySkippedError
    from mm_llama.train.demo import DemoSettings, DemoStopped, available_cores, run_demo
    from mm_llama.train.nonfinite import NonFiniteLossError

    torch.set_num_threads(args.threads if args.threads is not None else available_cores())
    settings = DemoSettings.quick() if args.quick else DemoSettings()
    try:
        run_demo(settings, args.out, resume=args.resume, overwrite=args.overwrite, device=args.device,
                 progress=not args.no_progress)
    except DemoStopped as err:
        print(f"mm-llama demo: {err}", file=sys.stderr)
        return 1
    except (NonFiniteLossError, TooManySkippedError) as err:
        print(f"mm-llama demo: stopped: {err}; fix the settings (mm_llama.train.demo.DemoSettings) and rerun with "
              "--overwrite", file=sys.stderr)
        return 1
    return 0

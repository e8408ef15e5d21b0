"""`mm-llama demo`: the built-in default — synthetic data, a tokenizer, one tiny frozen LM, and image, video
and speech adapters trained from scratch on it, each evaluated held out with its control (thin wrapper over
`mm_llama.train.demo`)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from mm_llama.commands.arg_types import positive_int
from mm_llama.commands.help_format import HelpFormatter

DEFAULT_OUT = Path("runs/demo")
MODALITIES = ("image", "video", "speech")  # mm_llama.train.demo_settings.MODALITIES, without importing torch


def modality_list(text: str) -> tuple[str, ...]:
    """``"image,speech"`` → ``("image", "speech")``; argparse error for an unknown name."""
    names = [part.strip() for part in text.split(",") if part.strip()]
    unknown = [n for n in names if n not in MODALITIES]
    if unknown or not names:
        raise argparse.ArgumentTypeError(f"expected a comma-separated list of {', '.join(MODALITIES)}, got {text!r}")
    return tuple(dict.fromkeys(names))


EPILOG = """\
Examples (what `make demo` runs on 2 CPU cores; the image path alone; then a smoke run of a few seconds):
  mm-llama demo --out runs/demo --overwrite
  mm-llama demo --out runs/demo-image --modality image --overwrite
  mm-llama demo --out /tmp/demo-smoke --quick --device cpu --threads 1
"""


def add_parser(sub: argparse._SubParsersAction) -> None:
    """Register `demo` on the `mm-llama` subparsers."""
    p = sub.add_parser(
        "demo",
        help="the built-in default: train tiny image, video and speech models from scratch on synthetic data "
             "and evaluate them",
        description=(
            "Run the whole pipeline on synthetic data, from nothing: write chat-formatted text (mm-llama synth) "
            "and the speech transcripts as ASR exchanges, train a BPE tokenizer, pretrain a tiny Llama 3 LM "
            "(tiny_lm_pretrain), then with that LM frozen, per modality: images: shapes and objects images, a tiny "
            "conv-stem ViT pretrained contrastively on the objects captions (tiny_image_encoder_pretrain), the "
            "image adapter on shape and colour questions, then on conversations, the ViT frozen "
            "(tiny_vision_pretrain); "
            "video: moving-shapes clips, the video adapter on the image run (tiny_video_pretrain); speech: "
            "espeak-ng utterances, optionally BEST-RQ (tiny_speech_bestrq), the Conformer and speech adapter "
            "(tiny_speech_sft). Each is evaluated on its held-out test split with its control: VQA accuracy and "
            "caption CIDEr with blank images, clip QA with frozen frames, ASR WER with silence (test voices "
            "never occur in training). Prints a metrics table and writes OUT/metrics.json, OUT/report.html "
            "(test images, clips and audio with the model's answers and transcripts, loss curves) and "
            "OUT/loss-STAGE.png. Each stage prints a line when it starts and its wall time when it ends. "
            "Settings live in mm_llama.train.demo_settings.DemoSettings. Exit status 0: done; 1: a training "
            "stage stopped (signal, non-finite losses, bad data); 2: error."
        ),
        epilog=EPILOG, formatter_class=HelpFormatter,
    )
    p.add_argument("--out", type=Path, default=DEFAULT_OUT,
                   help=f"output folder for the data, runs, evaluation results and report (default {DEFAULT_OUT})")
    p.add_argument("--modality", type=modality_list, default=MODALITIES, metavar="LIST",
                   help=f"comma-separated modalities to train and evaluate, of {','.join(MODALITIES)} (default: all); "
                        "video also runs the image training stages, whose encoder it reads; the text, tokenizer "
                        "and LM stages are shared")
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
        run_demo(settings, args.out, modalities=args.modality, resume=args.resume, overwrite=args.overwrite,
                 device=args.device, progress=not args.no_progress)
    except DemoStopped as err:
        print(f"mm-llama demo: {err}", file=sys.stderr)
        return 1
    except (NonFiniteLossError, TooManySkippedError) as err:
        print(f"mm-llama demo: stopped: {err}; fix the settings (mm_llama.train.demo_settings.DemoSettings) and rerun with "
              "--overwrite", file=sys.stderr)
        return 1
    return 0

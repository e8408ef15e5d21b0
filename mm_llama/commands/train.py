"""`mm-llama train`: run a training recipe (one process, or each rank under torchrun).

    mm-llama train RECIPE [key.sub=value ...] [--out RUN_DIR] [--resume]
    torchrun --nproc_per_node N -m mm_llama.cli train RECIPE ...

Also runnable as `python -m mm_llama.commands.train …` (same arguments).
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Sequence

from mm_llama.commands.help_format import HelpFormatter

DEFAULT_RUNS = Path("runs")


def _configure(p: argparse.ArgumentParser) -> None:
    p.add_argument("recipe", metavar="RECIPE",
                   help="a recipe YAML file, or the name of a built-in recipe in mm_llama/train/recipes/ "
                        "(e.g. vision_pretrain, tiny_vision_pretrain)")
    p.add_argument("overrides", metavar="key.sub=value", nargs=argparse.REMAINDER,
                   help="recipe overrides, applied after the file (e.g. train.steps=100 optim.lr.fusion=3e-4 "
                        "data.shards=[a.tar,b.tar]); values are read as YAML; unknown keys are an error. "
                        "--out and --resume may also follow the overrides")
    p.add_argument("--out", type=Path, default=None,
                   help="run directory for config.yaml, checkpoints, metrics.jsonl, TensorBoard events and the "
                        "exported weights (default: runs/<recipe name>)")
    p.add_argument("--resume", action="store_true",
                   help="continue the run in --out from its newest intact checkpoint (weights, optimizer, schedule, "
                        "RNG and data position); without a checkpoint it starts from step 0. The recipe must be the "
                        "one the run was trained with: only train.steps, logging, checkpoint, evaluation and device "
                        "settings may change (they are logged). Without --resume an existing run with checkpoints "
                        "is an error")
    p.set_defaults(run=run)


EPILOG = """\
Exit status: 0 when the run finished, or stopped on SIGTERM/SIGINT after writing a checkpoint (it says so);
1 when it stopped on bad data or non-finite losses or weights; 2 on bad input (an unknown recipe or key, a bad
value, an existing run without --resume, a recipe changed on --resume), named in one line on stderr.

Example (the demo's adapter stage on its LM and data; quote an override that holds a glob or a space):
  mm-llama train tiny_vision_pretrain model.base_lm=runs/demo/lm "data.shards=[runs/demo/data/image-chat/train-*.tar]" data.task=vqa --out runs/vision
"""


def add_parser(sub: argparse._SubParsersAction) -> None:
    """Register `train` on the `mm-llama` subparsers."""
    p = sub.add_parser(
        "train",
        help="run a training recipe (LM pretraining, image-encoder pretraining, image adapter stages)",
        description=(
            "Train what a recipe describes: a tiny Llama LM (lm_pretrain), a ViT by contrastive image-text "
            "pretraining against the frozen LM (image_encoder_pretrain), or the image adapter with the LM frozen "
            "(vision_pretrain, vision_anneal, vision_sft). Built-in recipes live in mm_llama/train/recipes/; "
            "tiny_* versions run on a CPU. The merged recipe is written to RUN_DIR/config.yaml; the run writes "
            "metrics.jsonl, TensorBoard events and checkpoints, and at the end the exported model "
            "(RUN_DIR/model/, RUN_DIR/adapter.safetensors or RUN_DIR/encoder.safetensors). SIGTERM/SIGINT "
            "write a checkpoint and stop; continue with --resume. Under `torchrun --nproc_per_node N` each "
            "rank runs this same command (DDP; distributed.fsdp_frozen_lm=true shards a large frozen LM)."
        ),
        epilog=EPILOG, formatter_class=HelpFormatter,
    )
    _configure(p)


def default_run_dir(recipe: str, name: str) -> Path:
    return DEFAULT_RUNS / (name or Path(recipe).stem)


def split_options(args: argparse.Namespace) -> None:
    """Move `--out DIR` / `--out=DIR` / `--resume` that follow the overrides (argparse leaves them in the
    remainder) onto `args`; anything else starting with `-` is an error."""
    rest: list[str] = []
    items = list(args.overrides or [])
    i = 0
    while i < len(items):
        item = items[i]
        if item == "--resume":
            args.resume = True
        elif item == "--out":
            if i + 1 >= len(items):
                raise ValueError("--out needs a run directory")
            args.out = Path(items[i + 1])
            i += 1
        elif item.startswith("--out="):
            args.out = Path(item.split("=", 1)[1])
        elif item.startswith("-"):
            raise ValueError(f"unknown option {item!r}; options are --out RUN_DIR and --resume, overrides are key.sub=value")
        else:
            rest.append(item)
        i += 1
    args.overrides = rest


def run(args: argparse.Namespace) -> int:
    """Load the recipe (+ overrides), train, print where the result is; 0 on success, 1 when the run
    stopped on bad data, non-finite losses or non-finite weights (RecipeError and other ValueErrors — a
    bad --out, a changed recipe on --resume, no readable checkpoint — reach the CLI: 2)."""
    from mm_llama.data.loader_stats import TooManySkippedError
    from mm_llama.train.nonfinite import NonFiniteLossError
    from mm_llama.train.recipe import load_recipe
    from mm_llama.train.trainer import run_training

    split_options(args)

    cfg = load_recipe(args.recipe, args.overrides)
    out = args.out if args.out is not None else default_run_dir(args.recipe, cfg.name)
    try:
        result = run_training(cfg, out, resume=args.resume)
    except (NonFiniteLossError, TooManySkippedError) as err:
        print(f"mm-llama train: stopped: {err}", file=sys.stderr)
        return 1

    if int(os.environ.get("RANK", "0")) == 0:  # the process group is gone by now: ask torchrun's environment
        loss = f"{result.final_loss:.4f}" if result.final_loss is not None else "n/a"
        if result.stopped:
            print(f"stopped at step {result.steps} (loss {loss}); checkpoint in {result.run_dir}; "
                  f"continue with: mm-llama train {args.recipe} ... --out {result.run_dir} --resume")
        else:
            print(f"trained {result.steps} steps (final loss {loss}); wrote {result.export}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Stand-alone entry point (`python -m mm_llama.commands.train`), with the CLI's error handling."""
    parser = argparse.ArgumentParser(prog="mm-llama train", description=__doc__.splitlines()[0])
    _configure(parser)
    args = parser.parse_args(argv)
    try:
        return args.run(args)
    except (ValueError, FileNotFoundError, KeyError) as e:
        message = e.args[0] if isinstance(e, KeyError) and e.args else e
        print(f"mm-llama train: error: {message}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())

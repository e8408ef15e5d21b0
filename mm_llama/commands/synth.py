"""`mm-llama synth`: write synthetic shards (shapes, glyphs, objects, moving-shapes, speech, text) for the built-in
default."""

from __future__ import annotations

import argparse
from pathlib import Path

from mm_llama.commands.arg_types import positive_float, positive_int, probability
from mm_llama.commands.help_format import HelpFormatter

KIND_CHOICES = ("shapes", "glyphs", "objects", "moving-shapes", "speech", "text")


EPILOG = """\
Exit status: 0 when written; 2 on bad input (a split already written without --overwrite, a flag for another
kind), named in one line on stderr; 1 on an unexpected error.

Examples, one per kind:
  mm-llama synth shapes data/ --n 2000 --seed 0 --split train --square
  mm-llama synth glyphs probe/ --n 300 --split test
  mm-llama synth objects data/ --n 4000
  mm-llama synth moving-shapes data/ --n 200 --split test
  mm-llama synth speech data/ --n 100 --noise-prob 0.5
  mm-llama synth text data/ --n 5000 --chat
"""


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "synth",
        help="write synthetic shards (shapes, glyphs, objects, moving-shapes, speech, text) for the built-in default",
        description=(
            "Generate synthetic data from one small grammar and write it as webdataset shards. shapes: PNG images "
            "of 1-3 coloured shapes -> OUTDIR/image-caption (KEY.png/txt/json) and OUTDIR/image-qa (KEY.png + "
            "KEY.json with question/answer). glyphs: 128x128 PNG images of one digit or uppercase letter inside "
            "one cell of a 3x3 grid (a spatial probe) -> the same two folders as shapes (shards named "
            "glyphs-SPLIT-NNNNNN.tar), with the questions 'What character is shown?' and 'Where is the "
            "character?' (answers such as 7 and top left), and OUTDIR/text (KEY.txt: the caption, then both "
            "questions answered as Llama 3 chat turns, for training the frozen LM first). objects: PNG images of "
            "one coloured shape whose caption names its size, shape and position but not its colour -> "
            "OUTDIR/image-caption (objects-SPLIT-NNNNNN.tar; contrastive encoder pretraining that must tell shapes "
            "apart). moving-shapes: 16-frame mp4 clips of a shape that moves or changes colour -> "
            "OUTDIR/video-caption and OUTDIR/video-qa. "
            "speech: espeak-ng speech of grammar sentences and digit strings, 16 kHz FLAC -> OUTDIR/speech "
            "(KEY.flac + KEY.json with text/language/duration/sample_rate/voice); the test split's voices never "
            "occur in train. text: documents covering the grammar -> OUTDIR/text shards (KEY.txt) and "
            "OUTDIR/text/SPLIT-corpus.txt (with --chat the shards hold the documents with their question/answer "
            "lines as Llama 3 chat turns, the corpus file their plain form). Shards are named SPLIT-NNNNNN.tar "
            "(glyphs, objects: prefixed by the kind), so all splits and kinds can share one OUTDIR. The same --seed "
            "and --split always give byte-identical files; train, val and test never share content."
        ),
        epilog=EPILOG, formatter_class=HelpFormatter,
    )
    p.add_argument("kind", metavar="KIND", choices=KIND_CHOICES, help="what to generate: " + ", ".join(KIND_CHOICES))
    p.add_argument("out_dir", metavar="OUTDIR", type=Path, help="output folder (created if missing)")
    p.add_argument("--n", type=positive_int, default=1000,
                   help="number of samples: images, clips, utterances or documents (default 1000); QA layouts "
                        "hold one record per selected question, so more than N")
    p.add_argument("--seed", type=int, default=0, help="random seed; with --split it fixes every byte (default 0)")
    p.add_argument("--split", choices=("train", "val", "test"), default="train",
                   help="which split to write; splits never share content (default train)")
    p.add_argument("--samples-per-shard", type=positive_int, default=1000,
                   help="at most this many records per shard (default 1000)")
    p.add_argument("--max-shard-mb", type=positive_float, default=None,
                   help="at most this many MB (10^6 bytes) per shard file (default: no limit)")
    p.add_argument("--noise-prob", type=probability, default=0.0,
                   help="speech only: probability of adding white noise at 10-30 dB SNR to an utterance (default 0)")
    p.add_argument("--square", action="store_true",
                   help="shapes only: render every image at 224x224 instead of mixed aspect ratios (same scenes, "
                        "captions and questions; a one-tile model then sees no letterbox padding)")
    p.add_argument("--chat", action="store_true",
                   help="text only: write each question/answer line of the shard documents as a Llama 3 chat turn "
                        "(<|start_header_id|>user<|end_header_id|>... <|eot_id|>, for LM pretraining with "
                        "data.options.allow_special=true); OUTDIR/text/SPLIT-corpus.txt keeps the plain documents "
                        "for tokenizer training")
    p.add_argument("--workers", type=positive_int, default=1,
                   help="generator processes; the output does not depend on it (default 1)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace this split's shards from an earlier run instead of stopping with an error")
    p.add_argument("--no-progress", action="store_true", help="do not show a progress bar")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from mm_llama.data.synth import write_synth

    if args.noise_prob and args.kind != "speech":
        raise ValueError(f"--noise-prob applies to the speech kind only, not {args.kind!r}")
    if args.chat and args.kind != "text":
        raise ValueError(f"--chat applies to the text kind only, not {args.kind!r}")
    if args.square and args.kind != "shapes":
        raise ValueError(f"--square applies to the shapes kind only, not {args.kind!r}")
    options: dict[str, object] = {}
    if args.kind == "speech":
        options["noise_prob"] = args.noise_prob
    if args.chat:
        options["chat"] = True
    if args.square:
        options["square"] = True
    max_bytes = None if args.max_shard_mb is None else max(1, int(args.max_shard_mb * 1_000_000))
    with tqdm(total=args.n, desc=f"synth {args.kind} {args.split}", unit="sample", disable=args.no_progress) as bar:
        def progress(done: int) -> None:
            bar.update(done - bar.n)

        summary = write_synth(
            args.kind, args.out_dir, n=args.n, seed=args.seed, split=args.split,
            samples_per_shard=args.samples_per_shard, max_shard_bytes=max_bytes, overwrite=args.overwrite,
            workers=args.workers, progress=progress, **options,
        )
    rate = summary.n / summary.seconds if summary.seconds > 0 else float("inf")
    print(f"wrote {summary.n} {args.kind} samples (seed {summary.seed}, split {summary.split}) in "
          f"{summary.seconds:.1f} s ({rate:.1f} samples/s):")
    for layout in summary.layouts.values():
        folder = args.out_dir / layout.directory
        print(f"  {folder}: {layout.samples} records in {len(layout.shards)} shard(s), "
              f"{layout.bytes / 1e6:.2f} MB ({', '.join(layout.shards[:3])}{', ...' if len(layout.shards) > 3 else ''})")
    for name in summary.files:
        print(f"  {args.out_dir / name}")
    return 0

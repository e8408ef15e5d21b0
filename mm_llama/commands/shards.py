"""`mm-llama shards`: write webdataset shards from a JSONL manifest of local media files and texts."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from mm_llama.commands.arg_types import positive_float, positive_int
from mm_llama.commands.help_format import HelpFormatter
from mm_llama.data.manifest import ManifestError, write_shards

SHOW_SKIPPED = 10


EPILOG = """\
Example (manifest.jsonl lines such as {"image": "cat.jpg", "caption": "A cat on a mat."}):
  mm-llama shards manifest.jsonl shards/ --samples-per-shard 1000
"""


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "shards",
        help="write webdataset shards from a JSONL manifest of local files",
        description=(
            "Write webdataset shards (OUTDIR/shard-NNNNNN.tar) and OUTDIR/stats.json from a JSONL manifest. "
            'Each line is one of {"image": PATH, "caption": TEXT}, {"image": PATH, "question": TEXT, '
            '"answer": TEXT} (or a conversation instead of question/answer: "turns", LLaVA "conversations" or '
            'chat "messages"), {"audio": PATH, "text": TEXT, "language": LANG[, "translation": TEXT]}, '
            '{"video": PATH, "caption": TEXT}, with an optional "key". Relative paths resolve against the '
            "manifest's folder. Every media file is decoded to validate it; bad lines are skipped and listed "
            "in stats.json with their line numbers (a line nested deeper than 64 levels, with a 5,000-digit number "
            "or a lone surrogate is such a line). Exit status: 0 all lines written, 1 some lines skipped, 2 "
            "nothing could be done (unusable manifest or output folder; with --overwrite the earlier shards are "
            "kept). Layouts: data/LAYOUTS.md."
        ),
        epilog=EPILOG, formatter_class=HelpFormatter,
    )
    p.add_argument("manifest", type=Path, metavar="MANIFEST.jsonl", help="JSONL manifest, one sample per line")
    p.add_argument("outdir", type=Path, metavar="OUTDIR",
                   help="output folder for the shards and stats.json (created if missing)")
    p.add_argument("--samples-per-shard", type=positive_int, default=1000, metavar="N",
                   help="at most N samples per shard (default: 1000)")
    p.add_argument("--max-shard-mb", type=positive_float, default=None, metavar="M",
                   help="also start a new shard before a shard file would exceed M megabytes (10^6 bytes); "
                   "a single larger sample gets a shard of its own (default: no size limit)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace shards that an earlier run left in OUTDIR, once this run has succeeded (a failed "
                   "run, or one that writes no sample, leaves them and their stats.json as they were; default: "
                   "refuse to mix runs)")
    p.add_argument("--no-progress", action="store_true", help="do not show the progress bar")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    """Write the shards; print a summary. Returns 0 (all written), 1 (lines skipped) or 2 (unusable input)."""
    try:
        stats = write_shards(
            args.manifest, args.outdir, samples_per_shard=args.samples_per_shard, max_shard_mb=args.max_shard_mb,
            progress=not args.no_progress, overwrite=args.overwrite,
        )
    except (ManifestError, ValueError, OSError) as e:
        print(f"mm-llama shards: error: {e}", file=sys.stderr)
        return 2

    print(
        f"wrote {stats['samples']} samples in {len(stats['shards'])} shard(s), {stats['bytes'] / 1e6:.2f} MB, "
        f"to {args.outdir}"
    )
    counts = ", ".join(f"{name} {n}" for name, n in stats["layouts"].items() if n)
    if counts:
        print(f"  {counts}")
    if stats["skipped"]:
        print(f"skipped {stats['skipped']} line(s) (all listed in {args.outdir / 'stats.json'}):")
        for s in stats["skipped_samples"][:SHOW_SKIPPED]:
            where = f" {s['file']}:" if s["file"] else ""
            print(f"  line {s['line']}:{where} {s['reason']}")
        if stats["skipped"] > SHOW_SKIPPED:
            print(f"  ... and {stats['skipped'] - SHOW_SKIPPED} more")
        return 1
    return 0

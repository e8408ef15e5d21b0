"""The `mm-llama` console script: one subcommand per job, each a thin wrapper over the library."""

from __future__ import annotations

import argparse
import sys
from typing import Sequence

from mm_llama.commands import PARSERS


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="mm-llama",
        description="A frozen Llama 3 language model with image, video and speech encoders fused in.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for add_parser in PARSERS:
        add_parser(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.run(args)
    except (ValueError, FileNotFoundError, KeyError) as e:
        message = e.args[0] if isinstance(e, KeyError) and e.args else e
        print(f"mm-llama {args.command}: error: {message}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())

"""The `mm-llama` console script: one subcommand per job, each a thin wrapper over the library."""

from __future__ import annotations

import argparse
import os
import sys
from typing import Sequence

from mm_llama.checkpoints.files import one_line
from mm_llama.commands import PARSERS

# Set to 1 to see the Python traceback of an unexpected error instead of its one-line summary.
TRACEBACK_ENV = "MM_LLAMA_TRACEBACK"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="mm-llama",
        description="A frozen Llama 3 language model with image, video and speech encoders fused in.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for add_parser in PARSERS:
        add_parser(sub)
    return parser


def _one_line(e: BaseException) -> str:
    if isinstance(e, KeyError) and e.args:  # KeyError's str() quotes its message
        e = ValueError(e.args[0])
    return one_line(e, limit=10_000)


def main(argv: Sequence[str] | None = None) -> int:
    """Run one subcommand. Every error ends as one line on stderr: bad input (ValueError, missing or
    unreadable files) exits 2; anything unexpected exits 1 and says how to see its traceback."""
    args = build_parser().parse_args(argv)
    prefix = f"mm-llama {args.command}"
    try:
        return args.run(args)
    except (ValueError, KeyError, OSError) as e:
        print(f"{prefix}: error: {_one_line(e)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"{prefix}: interrupted", file=sys.stderr)
        return 130
    except Exception as e:
        if os.environ.get(TRACEBACK_ENV) == "1":
            raise
        print(f"{prefix}: internal error: {type(e).__name__}: {_one_line(e)} (a bug: please report it with the "
              f"traceback that {TRACEBACK_ENV}=1 prints)", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())

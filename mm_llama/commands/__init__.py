"""Subcommands of `mm-llama`; each module has `add_parser(subparsers)` that sets `run`."""

from mm_llama.commands import generate

COMMANDS = [generate]

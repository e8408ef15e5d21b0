"""Every `mm-llama` command's `--help` states its exit status and shows an example, and every example it shows
is a command line the parser accepts (train's examples also a recipe that loads), so a new command or a renamed
flag cannot leave the help behind."""

from __future__ import annotations

import argparse
import re
import shlex

import pytest

from mm_llama.cli import build_parser


def _parsers() -> dict[str, argparse.ArgumentParser]:
    """`{"generate": parser, ..., "bench": parser, "bench data": parser, ...}`: every command and subcommand."""
    found: dict[str, argparse.ArgumentParser] = {}

    def walk(parser: argparse.ArgumentParser, path: tuple[str, ...]) -> None:
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                for name, child in action.choices.items():
                    found[" ".join((*path, name))] = child
                    walk(child, (*path, name))

    walk(build_parser(), ())
    return found


PARSERS = _parsers()


def _examples(help_text: str) -> list[str]:
    return [line.strip() for line in help_text.splitlines() if line.startswith("  mm-llama ")]


def test_every_command_of_the_package_is_checked() -> None:
    from mm_llama.commands import PARSERS as REGISTERED

    top = {name for name in PARSERS if " " not in name}
    assert len(top) == len(REGISTERED)
    assert {"bench data", "bench generate", "bench train", "export", "synth", "eval"} <= set(PARSERS)


@pytest.mark.parametrize("name", sorted(PARSERS))
def test_help_states_exit_status_and_an_example(name: str) -> None:
    text = PARSERS[name].format_help()
    assert re.search(r"exit status", text, re.I), f"mm-llama {name} --help does not state its exit status"
    assert re.search(r"\b0\b", text[text.lower().index("exit status"):]), f"mm-llama {name}: exit status without codes"
    assert re.search(r"^examples?\b", text, re.I | re.M), f"mm-llama {name} --help has no 'Example' line"
    examples = _examples(text)
    assert examples, f"mm-llama {name} --help shows no indented `mm-llama ...` example line"
    assert any(e.startswith(f"mm-llama {name} ") for e in examples), (name, examples)


@pytest.mark.parametrize("name", sorted(PARSERS))
def test_every_help_example_parses(name: str) -> None:
    for example in _examples(PARSERS[name].format_help()):
        argv = shlex.split(example)[1:]
        try:
            args = build_parser().parse_args(argv)
        except SystemExit as e:  # argparse's exit on an unknown flag or a bad value
            raise AssertionError(f"mm-llama {name} --help shows an example the parser refuses: {example}") from e
        if args.command == "train":
            from mm_llama.commands.train import split_options
            from mm_llama.train.recipe import load_recipe

            split_options(args)
            load_recipe(args.recipe, args.overrides)  # unknown keys or bad values raise


def test_synth_shows_every_kind() -> None:
    from mm_llama.commands.synth import KIND_CHOICES

    examples = _examples(PARSERS["synth"].format_help())
    for kind in KIND_CHOICES:
        assert any(e.startswith(f"mm-llama synth {kind} ") for e in examples), f"no synth {kind} example"


def test_examples_print_as_written() -> None:
    """Indented example lines are not re-wrapped, whatever the terminal width."""
    text = PARSERS["train"].format_help()
    assert any(len(line) > 100 for line in _examples(text))

"""`--device` / `--dtype` options shared by the commands that run a model."""

from __future__ import annotations

import argparse

import torch

from mm_llama.checkpoints.loading import DTYPES
from mm_llama.devices import pick_device


def add_device_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--device", default=None, help="cpu, cuda or cuda:N (default: cuda when available)")
    parser.add_argument("--dtype", default=None, choices=sorted(DTYPES),
                        help="weights dtype (default: bfloat16 on CUDA, float32 on CPU)")


def add_compile_option(parser: argparse.ArgumentParser) -> None:
    """`--compile` / `--no-compile` → `args.compile` (None: automatic), for `GenerationConfig(compile=...)`."""
    parser.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                        help="decode with the compiled static-cache step (torch.compile, CUDA graphs on GPU); "
                        "default: on for CUDA, off on CPU, where the first compile takes a minute")


def resolve_device(args: argparse.Namespace) -> tuple[torch.device, torch.dtype]:
    """The ``--device`` / ``--dtype`` options as ``(torch.device, torch.dtype)`` (see `pick_device`)."""
    return pick_device(args.device, args.dtype)

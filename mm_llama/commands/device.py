"""`--device` / `--dtype` options shared by the commands that run a model."""

from __future__ import annotations

import argparse

import torch

from mm_llama.checkpoints.loading import DTYPES


def add_device_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--device", default=None, help="cpu, cuda or cuda:N (default: cuda when available)")
    parser.add_argument("--dtype", default=None, choices=sorted(DTYPES),
                        help="weights dtype (default: bfloat16 on CUDA, float32 on CPU)")


def resolve_device(args: argparse.Namespace) -> tuple[torch.device, torch.dtype]:
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {args.device} asked for CUDA but no CUDA device is available; use --device cpu")
    if args.dtype is not None:
        return device, DTYPES[args.dtype]
    return device, torch.bfloat16 if device.type == "cuda" else torch.float32

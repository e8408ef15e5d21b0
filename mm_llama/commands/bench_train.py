"""`mm-llama bench train`: the image-adapter training step, ours against transformers' Mllama."""

from __future__ import annotations

import argparse
import json
import sys

from mm_llama.benchmarks.train_step import TRAIN_SHAPES, TrainReport, bench_train
from mm_llama.commands.bench_generate import add_run_options
from mm_llama.commands.help_format import HelpFormatter
from mm_llama.devices import pick_device

EPILOG = """\
Exit status: 0 when measured; 2 on a bad argument; 1 when transformers (the baseline) is missing.

Example (CPU, about 10 seconds):
  mm-llama bench train --shape tiny --batch 4 --text-len 128 --steps 10
With every block compiled on both sides as two more rows (CPU: about a minute more):
  mm-llama bench train --shape tiny --batch 4 --text-len 128 --steps 10 --compile
On a GPU (bf16 autocast over fp32 weights; two 11B models run one after the other):
  mm-llama bench train --shape 11b-vision --batch 4 --text-len 1024 --steps 5
"""


def add_train_parser(sub: argparse._SubParsersAction) -> None:
    t = sub.add_parser(
        "train",
        help="image adapter step time, tok/s, MFU and peak memory, ours vs transformers' Mllama",
        description="Train the image adapter (vision encoder, projector and cross-attention; LM frozen) for a "
        "few steps on one batch of 4-tile images with random weights at a real shape, with ours and with "
        "transformers' MllamaForConditionalGeneration holding the same tensors; prints the median step time, "
        "tokens/s, MFU (formula printed), peak memory and the ratios.",
        epilog=EPILOG, formatter_class=HelpFormatter,
    )
    t.add_argument("--shape", choices=list(TRAIN_SHAPES), default="tiny",
                   help="11b-vision = Llama 3.2 11B Vision, tiny = a test-sized Mllama (default)")
    t.add_argument("--batch", type=int, default=4, help="samples per step, one 4-tile image each (default 4)")
    t.add_argument("--text-len", type=int, default=128, help="text tokens per sample (default 128)")
    t.add_argument("--steps", type=int, default=5, help="timed steps per model; the median counts (default 5)")
    t.add_argument("--warmup", type=int, default=1, help="untimed steps first (default 1)")
    t.add_argument("--compile", action="store_true",
                   help="also time ours with train.compile (each block torch.compiled) and transformers' layers "
                        "compiled the same way (CPU: about a minute more, the compile)")
    add_run_options(t)
    t.set_defaults(run=run_train)


def run_train(args: argparse.Namespace) -> int:
    device, _ = pick_device(args.device, None)
    report = bench_train(args.shape, batch=args.batch, text_len=args.text_len, steps=args.steps, warmup=args.warmup,
                         device=device, seed=args.seed, compile=args.compile)
    print_report(report)
    if args.json:
        print(json.dumps(report.as_dict()))
    return 0


def print_report(r: TrainReport) -> None:
    out = sys.stdout
    print(f"bench train: shape {r.shape} on {r.device}; batch {r.batch} × {r.text_len} tokens, one 4-tile image "
          f"each, median of {r.steps} steps", file=out)
    print(f"  parameters: frozen LM {r.params_frozen_lm / 1e6:,.1f}M, fusion {r.params_fusion / 1e6:,.1f}M, "
          f"encoder {r.params_encoder / 1e6:,.1f}M; model FLOPs {r.flops_per_token / 1e9:,.3f} GFLOP per text token "
          f"({r.flops_formula})", file=out)
    for c in r.candidates:
        mfu = f"MFU {100 * c.mfu:5.1f}%" if c.mfu is not None else "MFU n/a (no peak known for this device)"
        mem = f"peak {c.peak_memory_gb:,.1f} GB" if c.peak_memory_gb is not None else "peak memory n/a on CPU"
        print(f"  {c.name:<20} {1000 * c.step_s:9.1f} ms/step {c.tokens_per_s:12,.0f} tok/s  {mfu}  {mem}  "
              f"spread {100 * c.spread:3.0f}%  first loss {c.loss:.4f}", file=out)
    line = f"  ours/transformers: tok/s {r.ratios['transformers']:.2f}x"
    if r.memory_ratio is not None:
        line += f", peak memory {r.memory_ratio:.2f}x"
    print(line, file=out)
    for pair, ratio in r.ratios.items():
        if "/" in pair:
            print(f"  {pair}: tok/s {ratio:.2f}x", file=out)

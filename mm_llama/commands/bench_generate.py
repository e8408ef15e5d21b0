"""`mm-llama bench generate`: greedy decode, ours against transformers on the same weights, in one run."""

from __future__ import annotations

import argparse
import json
import sys

from mm_llama.benchmarks.generate import SHAPES, GenerateReport, bench_generate
from mm_llama.commands.help_format import HelpFormatter
from mm_llama.devices import pick_device

EPILOG = """\
Exit status: 0 when measured; 2 on a bad argument; 1 when transformers (the baseline) is missing.

Example (CPU, a few seconds):
  mm-llama bench generate --shape tiny --new 64 --repeats 5
With our compiled static-cache decode step as a third row (CPU: about a minute more, the compile):
  mm-llama bench generate --shape tiny --compile
On a GPU (bf16; adds ours compiled and transformers' static cache + torch.compile path):
  mm-llama bench generate --shape 8b --batch 1 --new 256
"""


def add_generate_parser(sub: argparse._SubParsersAction) -> None:
    g = sub.add_parser(
        "generate",
        help="greedy decode tok/s, weight bytes/s and %% of the memory roofline, ours vs transformers",
        description="Decode random prompts greedily with random weights at a real Llama 3 shape, with our "
        "generate and with transformers' LlamaForCausalLM holding the same tensors, timed alternately "
        "(median of --repeats). Prints decode tok/s (prefill separated out), the weight bytes read per "
        "second, the fraction of the device's memory-bandwidth roofline, the ratio ours/baseline and "
        "whether both chose the same greedy tokens.",
        epilog=EPILOG, formatter_class=HelpFormatter,
    )
    g.add_argument("--shape", choices=list(SHAPES), default="tiny",
                   help="8b = Llama 3.1 8B, 3b / 1b = Llama 3.2 3B / 1B, tiny = the test preset (default)")
    g.add_argument("--batch", type=int, default=1, help="prompts decoded together (default 1)")
    g.add_argument("--prompt-len", type=int, default=64, help="prompt tokens per row (default 64)")
    g.add_argument("--new", type=int, default=64, help="tokens generated per row, no early stop (default 64)")
    g.add_argument("--repeats", type=int, default=5, help="timed runs per candidate; the median counts (default 5)")
    g.add_argument("--dtype", default=None,
                   help="weights dtype (default bfloat16 on CUDA, float32 on CPU)")
    g.add_argument("--no-static", action="store_true",
                   help="skip transformers' static cache + compile baseline (run by default on CUDA only)")
    g.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                   help="add the row 'ours compiled' (our static-cache step through torch.compile; default: on "
                   "CUDA only, as the first CPU compile takes a minute)")
    add_run_options(g)
    g.set_defaults(run=run_generate)


def add_run_options(p: argparse.ArgumentParser) -> None:
    """--device, --seed and --json, which every model benchmark takes."""
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:N (default: CUDA when available)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", action="store_true", help="also print the figures as one JSON object")


def run_generate(args: argparse.Namespace) -> int:
    device, dtype = pick_device(args.device, args.dtype)
    report = bench_generate(
        args.shape, batch=args.batch, prompt_len=args.prompt_len, new=args.new, repeats=args.repeats,
        device=device, dtype=dtype, seed=args.seed, static_baseline=False if args.no_static else None,
        compiled=args.compile,
    )
    print_report(report)
    if args.json:
        print(json.dumps(report.as_dict()))
    return 0


def print_report(r: GenerateReport) -> None:
    out = sys.stdout
    print(f"bench generate: shape {r.shape}, {r.dtype} on {r.device}; batch {r.batch}, prompt {r.prompt_len}, "
          f"{r.new_tokens} new tokens, median of {r.repeats}", file=out)
    print(f"  weights read per decode step {r.weight_gb:.3f} GB; roofline {r.roofline_gb_per_s:.1f} GB/s "
          f"({r.roofline_source}) = {r.roofline_tok_per_s:.1f} tok/s at batch {r.batch}", file=out)
    for c in r.candidates:
        ratio = f"ours/this {r.ratios[c.name]:.2f}x" if c.name in r.ratios else ""
        if c.name in r.compiled_ratios:
            ratio += f", compiled/this {r.compiled_ratios[c.name]:.2f}x"
        same = (f"same greedy tokens {100 * r.same_greedy_tokens[c.name]:.0f}% of rows"
                if c.name in r.same_greedy_tokens else "")
        print(f"  {c.name:<30} {c.decode_tok_per_s:10.1f} tok/s {c.weight_gb_per_s:9.2f} GB/s "
              f"{100 * c.roofline_fraction:6.2f}% of roofline  prefill+1 {1000 * c.prefill_plus_first_s:8.1f} ms "
              f"spread {100 * c.spread:4.0f}%  {ratio}  {same}".rstrip(), file=out)

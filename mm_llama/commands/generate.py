"""`mm-llama generate`: text generation from a Llama 3 checkpoint directory."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from mm_llama.checkpoints import load_llama
from mm_llama.checkpoints.loading import lm_checkpoint_dir
from mm_llama.commands.device import add_compile_option, add_device_options, resolve_device
from mm_llama.commands.help_format import HelpFormatter
from mm_llama.generation import GenerationConfig, generate
from mm_llama.tokenizer import Tokenizer


EPILOG = """\
Exit status: 0 when every prompt was answered; 2 on bad input (a missing or damaged checkpoint, a bad flag),
named in one line on stderr; 1 on an unexpected error.

Examples (greedy answer in the chat format; then two prompts sampled in one batch, reproducibly):
  mm-llama generate --model /path/to/Meta-Llama-3.1-8B-Instruct --prompt "Why is the sky blue?" --chat
  mm-llama generate --model runs/demo/lm --prompt "Once upon" --prompt "A list:" --temperature 0.7 --top-p 0.9 --seed 1
"""


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "generate",
        help="generate text from a Llama 3 checkpoint",
        description="Generate text from an HF (config.json + safetensors) or Meta (params.json + "
        "consolidated.*.pth) Llama 3 checkpoint directory that also holds tokenizer.json or tokenizer.model.",
        epilog=EPILOG, formatter_class=HelpFormatter,
    )
    p.add_argument("--model", "--checkpoint", dest="model", required=True, type=Path,
                   help="a Llama 3 checkpoint directory (HF or Meta layout) or an lm_pretrain run directory "
                   "(its model/ folder); --checkpoint is the same flag")
    p.add_argument("--prompt", required=True, action="append",
                   help="prompt text; repeat the flag to generate for several prompts in one batch")
    p.add_argument("--chat", action="store_true", help="wrap each prompt as a user turn of the Llama 3 chat format")
    p.add_argument("--system", default=None, help="system message for --chat")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=None, help="seed for sampling")
    p.add_argument("--json", action="store_true", help="print one JSON object per prompt")
    add_device_options(p)
    add_compile_option(p)
    p.set_defaults(run=run)


def encode_prompt(tokenizer: Tokenizer, text: str, *, chat: bool, system: str | None) -> list[int]:
    if not chat:
        if system is not None:
            raise ValueError("--system only applies with --chat")
        return tokenizer.encode(text, bos=True)
    messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": text}]
    return tokenizer.encode_chat(messages, add_generation_prompt=True)


def run(args: argparse.Namespace) -> int:
    device, dtype = resolve_device(args)
    directory = lm_checkpoint_dir(args.model)
    tokenizer = Tokenizer.from_dir(directory)
    model = load_llama(directory, dtype=dtype, device=device)
    if tokenizer.vocab_size > model.cfg.vocab_size:
        raise ValueError(
            f"tokenizer in {directory} has {tokenizer.vocab_size} tokens but the model's vocabulary "
            f"has {model.cfg.vocab_size}; they do not belong together"
        )
    if args.chat:
        from mm_llama.checkpoints.chat_template import check_chat_template

        check_chat_template(directory)  # warns when the checkpoint's own template is not the Llama 3 format
    prompts = [encode_prompt(tokenizer, p, chat=args.chat, system=args.system) for p in args.prompt]
    gen = GenerationConfig.for_tokenizer(
        tokenizer, max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_p=args.top_p, seed=args.seed,
        compile=args.compile,
    )
    results = generate(model, prompts, gen)
    for prompt, result in zip(args.prompt, results):
        text = tokenizer.decode(result.tokens)
        if args.json:
            print(json.dumps({"prompt": prompt, "text": text, "tokens": result.tokens,
                              "stop_reason": result.stop_reason}))
        else:
            print(text if len(args.prompt) == 1 else f"[{prompt}] {text}")
    return 0

"""`mm-llama caption` and `mm-llama vqa`: thin wrappers over `mm_llama.image_chat`."""

from __future__ import annotations

import argparse
from pathlib import Path

from mm_llama.commands.device import add_compile_option, add_device_options, resolve_device
from mm_llama.commands.help_format import HelpFormatter
from mm_llama.commands.results import print_results
from mm_llama.generation import GenerationConfig
from mm_llama.image_chat import DEFAULT_CAPTION_PROMPT, ImageAnswer, answer_images, load_image_model


EXIT_STATUS = """\
Exit status: 0 when every image was answered; 1 when some could not be read (each named on stderr; the
others are still answered) or on an unexpected error; 2 on bad input (the model directory, a flag), named in
one line on stderr."""

CAPTION_EPILOG = f"""\
{EXIT_STATUS}

Example (two images, one JSON line each; the model may also be a run of ours, e.g. runs/demo/vision):
  mm-llama caption --model /path/to/Llama-3.2-11B-Vision-Instruct photo1.jpg photo2.png --json
"""

VQA_EPILOG = f"""\
{EXIT_STATUS}

Example:
  mm-llama vqa --model runs/demo/vision --image shape.png --question "What colour is the circle?"
"""


def _add_common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", "--checkpoint", dest="model", required=True, type=Path,
                   help="HF Mllama or Meta Llama 3.2 Vision directory, or an mm-llama run/export directory")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--plain", action="store_true",
                   help="base-model prompt (<|image|><|begin_of_text|>text) instead of the chat template")
    p.add_argument("--json", action="store_true", help="print one JSON object per image")
    add_device_options(p)
    add_compile_option(p)


def add_caption_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("caption", help="describe images", description="Generate a caption for each image.",
                       epilog=CAPTION_EPILOG, formatter_class=HelpFormatter)
    p.add_argument("images", nargs="+", metavar="IMAGE", help="image files (jpg, png, webp, ...)")
    p.add_argument("--prompt", default=DEFAULT_CAPTION_PROMPT, help=f"instruction (default: {DEFAULT_CAPTION_PROMPT!r})")
    p.add_argument("--batch-size", type=int, default=8)
    _add_common(p)
    p.set_defaults(run=run_caption)


def add_vqa_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("vqa", help="answer a question about an image",
                       description="Answer a question about one image.", epilog=VQA_EPILOG,
                       formatter_class=HelpFormatter)
    p.add_argument("--image", required=True, help="image file")
    p.add_argument("--question", required=True)
    _add_common(p)
    p.set_defaults(run=run_vqa)


def _generation(args: argparse.Namespace, tokenizer) -> GenerationConfig:
    return GenerationConfig.for_tokenizer(tokenizer, max_new_tokens=args.max_new_tokens,
                                          temperature=args.temperature, top_p=args.top_p, seed=args.seed,
                                          compile=args.compile)


def _report(results: list[ImageAnswer], args: argparse.Namespace, field: str, extra: dict | None = None) -> int:
    return print_results(args.command, results, as_json=args.json, source_key="image", noun="image",
                         fields=lambda r: {field: r.text}, extra=extra)


def run_caption(args: argparse.Namespace) -> int:
    device, dtype = resolve_device(args)
    model, tokenizer = load_image_model(args.model, dtype=dtype, device=device)
    results = answer_images(model, tokenizer, args.images, args.prompt, _generation(args, tokenizer),
                            chat=not args.plain, batch_size=args.batch_size, names=args.images)
    return _report(results, args, "caption")


def run_vqa(args: argparse.Namespace) -> int:
    device, dtype = resolve_device(args)
    model, tokenizer = load_image_model(args.model, dtype=dtype, device=device)
    results = answer_images(model, tokenizer, [args.image], args.question, _generation(args, tokenizer),
                            chat=not args.plain, names=[args.image], progress=False)
    return _report(results, args, "answer", {"question": args.question})

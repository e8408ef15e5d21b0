"""`mm-llama ask`: one prompt holding an image, speech or both (a spoken question about an image), over
`mm_llama.media_chat`."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from mm_llama.commands.device import add_device_options, resolve_device
from mm_llama.generation import GenerationConfig
from mm_llama.image_chat import load_image_model
from mm_llama.media_chat import answer_media


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "ask", help="answer a prompt holding an image, speech or both",
        description="Answer one prompt: an image (--image), speech (--audio: a spoken question or instruction) "
                    "and typed text (--question), any of them together. A model with an image and a speech "
                    "adapter comes from a run with model.init_from: [image_run, speech_run].")
    p.add_argument("--model", required=True, type=Path, help="an mm-llama run/export directory")
    p.add_argument("--image", help="image file")
    p.add_argument("--audio", help="audio file soundfile reads (any rate; stereo is mixed down)")
    p.add_argument("--question", help="typed text after the media (optional when the audio holds the question)")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    add_device_options(p)
    p.set_defaults(run=run_ask)


def run_ask(args: argparse.Namespace) -> int:
    device, dtype = resolve_device(args)
    model, tokenizer = load_image_model(args.model, dtype=dtype, device=device)
    gen = GenerationConfig.for_tokenizer(tokenizer, max_new_tokens=args.max_new_tokens, temperature=args.temperature)
    answer = answer_media(model, tokenizer, gen, image=args.image, audio=args.audio, text=args.question)
    if args.json:
        print(json.dumps({"image": args.image, "audio": args.audio, "question": args.question, "answer": answer}))
    else:
        print(answer)
    return 0

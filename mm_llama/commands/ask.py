"""`mm-llama ask`: one prompt holding an image, a video clip, speech or several of them (a spoken question
about an image; an image and a clip together), over `mm_llama.media_chat`."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from mm_llama.commands.arg_types import positive_int
from mm_llama.commands.device import add_device_options, resolve_device
from mm_llama.commands.help_format import HelpFormatter
from mm_llama.generation import GenerationConfig
from mm_llama.image_chat import load_image_model
from mm_llama.media_chat import answer_media
from mm_llama.video_chat import DEFAULT_NUM_FRAMES, run_video_settings


EPILOG = """\
Exit status: 0 when answered; 2 on bad input (an unreadable file, a modality the model lacks, a bad flag),
named in one line on stderr; 1 on an unexpected error.

Examples (a spoken question about an image; an image and a clip with a typed question):
  mm-llama ask --model runs/both --image photo.png --audio question.wav --json
  mm-llama ask --model runs/video --image photo.png --video clip.mp4 --question "Is this the object that moves?"
"""


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "ask", help="answer a prompt holding an image, a video, speech or several of them",
        description="Answer one prompt: an image (--image), a video clip (--video), speech (--audio: a spoken "
                    "question or instruction) and typed text (--question), any of them together, in that order. "
                    "A model with several adapters comes from a run with model.init_from: [image_run, speech_run] "
                    "(a video run holds the image adapter it reads frames with).",
        epilog=EPILOG, formatter_class=HelpFormatter)
    p.add_argument("--model", "--checkpoint", dest="model", required=True, type=Path, help="an mm-llama run/export directory")
    p.add_argument("--image", help="image file")
    p.add_argument("--video", help="video file (mp4, webm, mkv, ...); --num-frames sampled uniformly")
    p.add_argument("--audio", help="audio file soundfile reads (any rate; stereo is mixed down)")
    p.add_argument("--question", help="typed text after the media (optional when the audio holds the question)")
    p.add_argument("--num-frames", type=positive_int, default=None,
                   help=f"frames sampled from the --video clip (default: the run's data.num_frames, else "
                        f"{DEFAULT_NUM_FRAMES})")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    add_device_options(p)
    p.set_defaults(run=run_ask)


def run_ask(args: argparse.Namespace) -> int:
    device, dtype = resolve_device(args)
    model, tokenizer = load_image_model(args.model, dtype=dtype, device=device)
    gen = GenerationConfig.for_tokenizer(tokenizer, max_new_tokens=args.max_new_tokens, temperature=args.temperature)
    answer = answer_media(model, tokenizer, gen, image=args.image, video=args.video, audio=args.audio,
                          text=args.question,
                          num_frames=args.num_frames or run_video_settings(args.model)[0] or DEFAULT_NUM_FRAMES)
    if args.json:
        print(json.dumps({"image": args.image, "video": args.video, "audio": args.audio, "question": args.question,
                          "answer": answer}))
    else:
        print(answer)
    return 0

"""`mm-llama video-qa`: caption clips or answer a question about them (a thin wrapper over `mm_llama.video_chat`)."""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path

from mm_llama.commands.arg_types import positive_int
from mm_llama.commands.device import add_device_options, resolve_device
from mm_llama.commands.help_format import HelpFormatter
from mm_llama.commands.results import print_results
from mm_llama.image_chat import load_image_model
from mm_llama.video_chat import (
    DEFAULT_NUM_FRAMES, DEFAULT_VIDEO_PROMPT, QUESTION_STYLES, answer_video, check_video_model, read_video,
    run_video_settings, styled_question,
)


@dataclass
class VideoAnswer:
    """One clip's result: the answer, or the reason the clip could not be used."""

    source: str
    text: str | None = None
    error: str | None = None


EPILOG = """\
Exit status: 0 when every clip was answered; 1 when some could not be read (each named on stderr; the others
are still answered) or on an unexpected error; 2 on bad input (a model without a video modality, a bad flag),
named in one line on stderr.

Examples (a caption of each clip; then a question in the paper's short-answer wording):
  mm-llama video-qa --model runs/video --video clip.mp4 --video more.mp4 --json
  mm-llama video-qa --model runs/video --video clip.mp4 --question "Which way does the circle move?" --style short
"""


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "video-qa", help="caption video clips or answer a question about them",
        description="Answer --question about each --video clip, or caption each clip when no question is given. "
                    "Frames are sampled uniformly over the clip as training samples them. Unreadable files are "
                    "named on stderr and skipped; the exit status is 1 then.",
        epilog=EPILOG, formatter_class=HelpFormatter)
    p.add_argument("--model", "--checkpoint", dest="model", required=True, type=Path, help="an mm-llama run/export directory with a video modality")
    p.add_argument("--video", required=True, action="append", metavar="CLIP",
                   help="video file (mp4, webm, mkv, ...); repeat for more clips")
    p.add_argument("--question", default=None, help="the question (default: none, caption each clip)")
    p.add_argument("--style", choices=QUESTION_STYLES, default="short",
                   help="short: 'Answer the question using a single word or phrase. Q' (default); choice: 'Select "
                        "the correct answer from the following options: Q. Answer with the correct option letter "
                        "and nothing else' (Q holds the options); plain: Q as written")
    p.add_argument("--num-frames", type=positive_int, default=None,
                   help=f"frames sampled from each clip (default: the run's data.num_frames, else {DEFAULT_NUM_FRAMES})")
    p.add_argument("--max-new-tokens", type=positive_int, default=64)
    p.add_argument("--json", action="store_true", help="print one JSON object per clip (video, question, answer)")
    add_device_options(p)
    p.set_defaults(run=run_video_qa)


def run_video_qa(args: argparse.Namespace) -> int:
    device, dtype = resolve_device(args)
    model, tokenizer = load_image_model(args.model, dtype=dtype, device=device)
    check_video_model(model)
    sent = DEFAULT_VIDEO_PROMPT if args.question is None else styled_question(args.question, args.style)
    num_frames = args.num_frames or run_video_settings(args.model)[0] or DEFAULT_NUM_FRAMES
    results = []
    for path in args.video:
        try:
            frames = read_video(path, num_frames)
        except ValueError as err:
            results.append(VideoAnswer(path, error=str(err)))
            continue
        answer = answer_video(model, tokenizer, frames, args.question, args.style, args.max_new_tokens)
        results.append(VideoAnswer(path, text=answer))
    return print_results(args.command, results, as_json=args.json, source_key="video", noun="clip",
                         fields=lambda r: {"question": sent, "answer": r.text})

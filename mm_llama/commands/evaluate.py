"""`mm-llama eval`: score an image, video or speech model on evaluation shards (thin wrapper over
`mm_llama.train.evaluation`, `mm_llama.train.video_evaluation` and `mm_llama.train.speech_evaluation`)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from mm_llama.commands.arg_types import positive_int
from mm_llama.commands.device import add_device_options, resolve_device
from mm_llama.commands.help_format import HelpFormatter
from mm_llama.train.evaluation import (
    DEFAULT_MAX_NEW_TOKENS, EVAL_TASKS, check_result_path, evaluate, format_metrics, write_result,
)
from mm_llama.train.video_evaluation import VIDEO_EVAL_TASKS
from mm_llama.video_chat import DEFAULT_NUM_FRAMES, QUESTION_STYLES


SPEECH_EVAL_TASKS = ("asr", "ast")


def default_output(model: Path, task: str, blank: bool) -> Path:
    """``MODEL/eval-TASK.json``, or ``MODEL/eval-TASK-blank.json`` for the blank-image / frozen-frame / silence
    control (so the control never overwrites the real result)."""
    return model / f"eval-{task}{'-blank' if blank else ''}.json"


EPILOG = """\
Examples (the demo's image run on its held-out questions, then the blank-image control; a video run):
  mm-llama eval --model runs/demo/vision --shards "runs/demo/data/image-qa/test-*.tar" --task vqa
  mm-llama eval --model runs/demo/vision --shards "runs/demo/data/image-qa/test-*.tar" --task vqa --blank-images
  mm-llama eval --model runs/video --task video_qa --shards "data/video-qa/test-*.tar" --num-frames 16
"""


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "eval",
        help="evaluate an image, video or speech model on shards (CIDEr / VQA accuracy / WER / BLEU)",
        description=(
            "Generate greedily for every sample of evaluation shards, in order, with the prompt templates "
            "training uses, and score the outputs: captions by CIDEr (pycocoevalcap's scorer on our own "
            "tokenisation) and exact match, VQA by VQA accuracy on normalised answers, exact match and the "
            "majority-answer baseline. Prints a metrics table and writes a JSON file with the metrics, "
            "settings and every sample's prediction. Undecodable samples are skipped and counted. "
            "Records whose reference answer or caption is empty are skipped and counted as well, as training "
            "skips them. Exit status 0: every sample evaluated; 1: some skipped (results still written); 2: error."
        ),
        epilog=EPILOG, formatter_class=HelpFormatter,
    )
    p.add_argument("--model", "--checkpoint", dest="model", required=True, type=Path,
                   help="run/export directory of ours, an HF Mllama or a Meta Llama 3.2 Vision directory")
    p.add_argument("--shards", required=True, nargs="+", metavar="SHARDS",
                   help="eval shards, any spec training takes: .tar files, directories of them, globs, brace "
                        "patterns (dir/shard-{000000..000009}.tar), pipe: commands or http(s)/s3 URLs (read in order)")
    p.add_argument("--task", required=True, choices=EVAL_TASKS + VIDEO_EVAL_TASKS + SPEECH_EVAL_TASKS,
                   help="caption (image-caption shards), vqa (image-qa shards), video_caption (video-caption shards), "
                        "video_qa (video-qa shards), asr or ast (speech shards: WER after Whisper's English "
                        "normalisation, sacreBLEU)")
    p.add_argument("--batch-size", type=positive_int, default=8, help="samples per generation batch (default 8)")
    p.add_argument("--max-samples", type=positive_int, default=None, help="evaluate at most this many samples")
    p.add_argument("--blank-images", action="store_true",
                   help="control run: replace every image by a mid-grey image of the same size")
    p.add_argument("--blank-video", action="store_true",
                   help="control run (video_caption / video_qa): replace every frame by the clip's first (motion "
                        "gone, content kept)")
    p.add_argument("--blank-audio", action="store_true",
                   help="control run (asr / ast): replace every utterance by silence of the same length")
    p.add_argument("--language", default=None,
                   help="asr: the language of records without one; ast: the target language of records without one")
    p.add_argument("--prompt", default=None,
                   help="caption instruction (default: the training default); caption and video_caption only")
    p.add_argument("--question-style", choices=QUESTION_STYLES, default=None,
                   help="video_qa: plain sends the question as written in the shard; short / choice the paper's "
                        "short-answer / multiple-choice wordings (default: the wording the run trained with, "
                        "its data.prompt)")
    p.add_argument("--num-frames", type=positive_int, default=None,
                   help="video tasks: frames sampled uniformly from each clip (default: the run's data.num_frames, "
                        f"else {DEFAULT_NUM_FRAMES})")
    budgets = ", ".join(f"{task} {n}" for task, n in DEFAULT_MAX_NEW_TOKENS.items())
    p.add_argument("--max-new-tokens", type=positive_int, default=None,
                   help=f"generation budget (default: {budgets})")
    p.add_argument("--out", type=Path, default=None,
                   help="result JSON (default: MODEL/eval-TASK.json, MODEL/eval-TASK-blank.json with a --blank-* "
                        "control)")
    p.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    add_device_options(p)
    p.set_defaults(run=run)


def _control(args: argparse.Namespace) -> bool:
    """Whether this is a control run; ValueError for a control or option of another kind of task."""
    kind = "speech" if args.task in SPEECH_EVAL_TASKS else "video" if args.task in VIDEO_EVAL_TASKS else "image"
    controls = {"image": args.blank_images, "video": args.blank_video, "speech": args.blank_audio}
    if any(on for name, on in controls.items() if name != kind):
        raise ValueError("--blank-images is the control of caption / vqa, --blank-audio that of asr / ast, "
                         "--blank-video that of video_caption / video_qa")
    if args.question_style is not None and args.task != "video_qa":
        raise ValueError(f"--question-style applies to --task video_qa only, not {args.task}")
    if args.num_frames is not None and kind != "video":
        raise ValueError(f"--num-frames applies to the video tasks only, not {args.task}")
    return controls[kind]


def _evaluate(args: argparse.Namespace, model, tokenizer):
    """Run the evaluation of the task's kind (`evaluate_task`, which periodic evaluation in training runs too)."""
    from mm_llama.train.task_evaluation import evaluate_task

    blank = args.blank_images or args.blank_video or args.blank_audio
    return evaluate_task(
        model, tokenizer, args.shards, args.task, model_dir=args.model, batch_size=args.batch_size,
        max_samples=args.max_samples, blank=blank, max_new_tokens=args.max_new_tokens, prompt=args.prompt,
        language=args.language, question_style=args.question_style, num_frames=args.num_frames,
        progress=not args.no_progress,
    )


def run(args: argparse.Namespace) -> int:
    """Load the model, evaluate, print the table, write the JSON. Returns 0, or 1 when samples were skipped."""
    from mm_llama.image_chat import load_image_model

    if not args.model.is_dir():
        raise ValueError(f"--model {str(args.model)!r} is not a directory; give a run, HF or Meta model directory")
    blank = _control(args)
    out = args.out if args.out is not None else default_output(args.model, args.task, blank)
    try:
        check_result_path(out)  # a bad --out fails now, not after the evaluation
    except ValueError as err:
        raise ValueError(f"--out: {err}") from err
    device, dtype = resolve_device(args)
    model, tokenizer = load_image_model(args.model, dtype=dtype, device=device)
    result = _evaluate(args, model, tokenizer)
    write_result(result, out, settings={"model": str(args.model), "device": str(device), "dtype": dtype})
    print(format_metrics(result))
    if args.blank_video:
        print("control: every frame was the clip's first (--blank-video)")
    print(f"results: {out}")
    skipped = result.counts["skipped_samples"] + result.counts["damaged_shards"]
    if skipped:  # each one was already reported as a CorruptSampleWarning while reading
        empty = result.counts.get("empty_references", 0)
        why = f" ({empty} with an empty reference answer, which training skips too)" if empty else ""
        print(f"mm-llama eval: {result.counts['skipped_samples']} sample(s) skipped{why}, "
              f"{result.counts['damaged_shards']} damaged shard(s); reasons listed under 'skipped' in {out}",
              file=sys.stderr)
        return 1
    return 0

"""`mm-llama transcribe` and `mm-llama translate`: thin wrappers over `mm_llama.speech_chat`."""

from __future__ import annotations

import argparse
from pathlib import Path

from mm_llama.commands.device import add_device_options, resolve_device
from mm_llama.commands.help_format import HelpFormatter
from mm_llama.commands.results import print_results
from mm_llama.data.prompts import language_name
from mm_llama.generation import GenerationConfig
from mm_llama.image_chat import load_image_model
from mm_llama.speech_chat import SpeechAnswer, answer_speech


EXIT_STATUS = """\
Exit status: 0 when every file was answered; 1 when some could not be read (each named on stderr; the others
are still answered) or on an unexpected error; 2 on bad input (a model without a speech modality, a bad flag),
named in one line on stderr."""

TRANSCRIBE_EPILOG = f"""\
{EXIT_STATUS}

Example (a speech run of tiny_speech_sft; any sample rate, stereo is mixed down):
  mm-llama transcribe --model runs/speech a.wav b.flac --language en --json
"""

TRANSLATE_EPILOG = f"""\
{EXIT_STATUS}

Example:
  mm-llama translate --model runs/speech talk.wav --to fr
"""


def _add_common(p: argparse.ArgumentParser) -> None:
    p.add_argument("files", nargs="+", metavar="FILE", help="audio files soundfile reads (wav, flac, ogg, mp3, ...)")
    p.add_argument("--model", "--checkpoint", dest="model", required=True, type=Path, help="an mm-llama run/export directory with a speech modality")
    p.add_argument("--max-new-tokens", type=int, default=128, help="per window of audio (default 128)")
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    p.add_argument("--batch-size", type=int, default=8, help="windows decoded together (default 8)")
    p.add_argument("--json", action="store_true", help="print one JSON object per file")
    add_device_options(p)


def add_transcribe_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("transcribe", help="speech to text (ASR)",
                       description="Transcribe audio files with a speech model (prompt: 'Repeat after me in "
                                   "{language}:'). Long files are cut into windows the model holds; their texts "
                                   "are joined. Unreadable files are named on stderr; the exit status is 1 then.",
                       epilog=TRANSCRIBE_EPILOG, formatter_class=HelpFormatter)
    p.add_argument("--language", default="en", help="the language spoken (a name or ISO code; default en)")
    _add_common(p)
    p.set_defaults(run=run_transcribe, task="asr")


def add_translate_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("translate", help="speech to text in another language (AST)",
                       description="Translate speech into the --to language (prompt: 'Translate the following "
                                   "sentence into {language}:'). Windows and errors as for transcribe.",
                       epilog=TRANSLATE_EPILOG, formatter_class=HelpFormatter)
    p.add_argument("--to", required=True, dest="language", help="target language (a name or ISO code)")
    _add_common(p)
    p.set_defaults(run=run_transcribe, task="ast")


def run_transcribe(args: argparse.Namespace) -> int:
    device, dtype = resolve_device(args)
    model, tokenizer = load_image_model(args.model, dtype=dtype, device=device)
    if "speech" not in model.modality_names:
        raise ValueError(f"{args.model} has no speech modality (it has {list(model.modality_names)}); train one with "
                         "the tiny_speech_sft or speech_sft recipe")
    gen = GenerationConfig.for_tokenizer(tokenizer, max_new_tokens=args.max_new_tokens, temperature=args.temperature)
    results = answer_speech(model, tokenizer, args.files, gen, task=args.task, language=language_name(args.language),
                            batch_size=args.batch_size)
    return _report(results, args)


def _report(results: list[SpeechAnswer], args: argparse.Namespace) -> int:
    return print_results(args.command, results, as_json=args.json, source_key="file", noun="file",
                         fields=lambda r: {"text": r.text, "windows": r.windows})

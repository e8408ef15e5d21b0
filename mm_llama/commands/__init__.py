"""Subcommands of `mm-llama`; each entry adds its parser (which sets `run`) to the subparsers."""

from mm_llama.commands import (
    ask, bench, demo, evaluate, export, generate, image_commands, shards, speech_commands, synth, train, video_commands,
)

PARSERS = [
    generate.add_parser,
    image_commands.add_caption_parser,
    image_commands.add_vqa_parser,
    speech_commands.add_transcribe_parser,
    speech_commands.add_translate_parser,
    video_commands.add_parser,
    ask.add_parser,
    shards.add_parser,
    train.add_parser,
    synth.add_parser,
    evaluate.add_parser,
    demo.add_parser,
    bench.add_parser,
    export.add_parser,
]

"""The demo's data stages: synthetic shards per modality, the ASR exchanges the LM reads, and the
documents its tokenizer learns from (`mm_llama.train.demo`).

Folder layout under ``OUT/data`` is `write_synth`'s (one folder per layout, ``synth-KIND-SPLIT.json`` per
kind and split), plus ``asr-text/train-*.tar``: each speech training transcript as the ASR exchange in
special-token text (system "Repeat after me in English:", an empty user turn, the transcript), so the
frozen LM has produced those answers after that prompt before the speech adapter asks it to.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any

__all__ = ["ASR_TEXT_LAYOUT", "DEMO_KINDS", "SILENCE_LAYOUT", "SILENCE_SECONDS", "SILENCE_TRANSCRIPT", "SPECIAL_TOKEN_TEXT",
           "available_cores", "synth_shards", "tokenizer_documents", "train_shards", "write_asr_text", "write_kind",
           "write_silence"]

DEMO_KINDS: tuple[str, ...] = ("shapes", "objects", "text", "moving-shapes", "speech")
"""The synthetic kinds the demo writes (the layouts of each are `write_synth`'s); a layout two kinds write
(``image-caption``: shapes and objects) is the first's unless `synth_shards` is told the kind."""
ASR_TEXT_LAYOUT = "asr-text"
SILENCE_LAYOUT = "speech-silence"
SILENCE_TRANSCRIPT = "."
"""What a silent training clip is labelled: no word after Whisper's normalisation (an empty transcript has no
label to train, `EmptyReferenceError`), so the model learns to say nothing to silence."""
SILENCE_SECONDS = (1.0, 10.0)
"""How long the silent clips of the LM's ASR exchanges are (`write_asr_text`): `write_silence`'s training clips
last 1-6 s, the silence control takes each test utterance's length (up to about 10 s)."""
SPECIAL_TOKEN_TEXT = re.compile(r"<\|[a-z0-9_]+\|>")
"""Special-token text (``<|eot_id|>``) in the chat-formatted text shards."""


def available_cores() -> int:
    """CPU cores this process may run on (its affinity mask where the OS has one)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def write_kind(data: Path, kind: str, split: str, n: int, *, seed: int, samples_per_shard: int, progress: bool,
               **options: Any) -> str:
    """`write_synth` one kind and split into ``data`` (with a progress bar); a one-line count of what it wrote."""
    from tqdm import tqdm

    from mm_llama.data.synth import write_synth

    with tqdm(total=n, desc=f"synth {kind} {split}", unit="sample", disable=not progress, dynamic_ncols=True) as bar:
        summary = write_synth(kind, data, n=n, seed=seed, split=split, samples_per_shard=samples_per_shard,
                              overwrite=True, workers=min(4, available_cores()) if n >= 64 else 1,  # no pool for a few
                              progress=lambda done: bar.update(done - bar.n), **options)
    return ", ".join(f"{layout.samples} {name} {split}" for name, layout in summary.layouts.items())


def synth_shards(data: Path, layout: str, split: str, kind: str | None = None) -> list[str]:
    """The shard files `write_synth` wrote for ``layout`` / ``split`` (from its manifest) of ``kind``
    (default: the first of `DEMO_KINDS` that writes ``layout``); FileNotFoundError when the data stage that
    writes them has not finished."""
    from mm_llama.data.synth import summary_path
    from mm_llama.data.synth.write import KINDS

    kind = kind or next(k for k in DEMO_KINDS if layout in KINDS[k].layouts)
    manifest = summary_path(data, kind, split)
    if not manifest.is_file():
        raise FileNotFoundError(f"{manifest} is missing: the data stage of {kind} did not finish")
    names = json.loads(manifest.read_text())["layouts"][layout]["shards"]
    return [str(data / layout / name) for name in names]


def train_shards(data: Path, layout: str) -> list[str]:
    """The shards ``data/LAYOUT/train-*.tar`` (sorted): what `write_asr_text` (`ASR_TEXT_LAYOUT`) and
    `write_silence` (`SILENCE_LAYOUT`) wrote."""
    return sorted(str(p) for p in (data / layout).glob("train-*.tar"))


def write_asr_text(data: Path, n: int, *, seed: int, samples_per_shard: int, copies: int = 1, silent: int = 0) -> str:
    """Write the ASR exchanges of the first ``n`` speech training transcripts to ``data/asr-text``, each
    ``copies`` times with the transcript stretched over the user turn in a different way
    (`speech_span_text.stretch_transcript`), so the LM learns to read a speech span (``copies=0``: one
    exchange each with an empty user turn, the LM learns only the prompt and the kind of answer). With
    ``copies``, also ``silent`` × ``copies`` exchanges of a silent clip's span (`SILENCE_SECONDS`, fillers and
    `SILENCE_TRANSCRIPT`) answered `SILENCE_TRANSCRIPT`: an LM that learned to copy spans, and never saw an empty
    one, answers silence with words."""
    import random

    from mm_llama.adapters.speech_adapter import speech_token_count
    from mm_llama.data.prompts import asr_system_prompt
    from mm_llama.data.shard_writer import ShardWriter
    from mm_llama.data.synth.speech import LANGUAGE, speech_transcript
    from mm_llama.data.synth.speech_span_text import stretch_transcript
    from mm_llama.data.synth.splits import sample_key
    from mm_llama.data.synth.text import chat_turn
    from mm_llama.encoders.audio_features import FRAMES_PER_SECOND

    system = asr_system_prompt(LANGUAGE)
    rng = random.Random(f"{seed}-asr-text")
    exchanges = []
    for index in range(n):
        transcript = speech_transcript(seed, "train", index)
        users = [stretch_transcript(transcript, rng) for _ in range(copies)] if copies else [""]
        exchanges += [(user, transcript) for user in users]
    for _ in range(silent * copies):
        frames = int(rng.uniform(*SILENCE_SECONDS) * FRAMES_PER_SECOND)
        exchanges.append((stretch_transcript(SILENCE_TRANSCRIPT, rng, length=speech_token_count(frames)),
                          SILENCE_TRANSCRIPT))
    with ShardWriter(data / ASR_TEXT_LAYOUT, prefix="train", samples_per_shard=samples_per_shard,
                     overwrite=True) as writer:
        for index, (user, answer) in enumerate(exchanges):
            writer.write(sample_key("train", index), {"txt": chat_turn(user, answer, system=system).encode("utf-8")})
    return f"{len(exchanges)} ASR exchanges"


def write_silence(data: Path, n: int, *, seed: int, samples_per_shard: int) -> str:
    """Write ``n`` training clips without speech to ``data/speech-silence``, each 1-6 s of digital silence or
    faint white noise (peak amplitude up to 1 % of full scale), transcribed `SILENCE_TRANSCRIPT`, in the
    ``speech`` layout's record format. Without them a speech model has only ever heard sentences, and
    answers silence (the evaluation's control) with a guessed one."""
    import numpy as np

    from mm_llama.data.shard_writer import ShardWriter
    from mm_llama.data.synth.speech import LANGUAGE, SAMPLE_RATE, encode_flac
    from mm_llama.data.synth.splits import sample_key

    rng = np.random.default_rng([seed, 0x511E])
    with ShardWriter(data / SILENCE_LAYOUT, prefix="train", samples_per_shard=samples_per_shard,
                     overwrite=True) as writer:
        for index in range(n):
            samples = int(rng.uniform(1.0, 6.0) * SAMPLE_RATE)
            level = 0.0 if index % 2 == 0 else float(rng.uniform(1e-4, 1e-2))
            noise = np.clip(rng.standard_normal(samples) / 3, -1.0, 1.0) * level  # peak at most `level`
            pcm = np.round(noise * 32767).astype(np.int16)
            meta = {"text": SILENCE_TRANSCRIPT, "language": LANGUAGE, "duration": samples / SAMPLE_RATE,
                    "sample_rate": SAMPLE_RATE, "source": "silence"}
            writer.write(sample_key("train", index), {"flac": encode_flac(pcm),
                                                      "json": json.dumps(meta, sort_keys=True).encode("utf-8")})
    return f"{n} silent clips"


def tokenizer_documents(chat_shards: list[str], corpus: Path) -> list[str]:
    """What the tokenizer learns from: the plain corpus, and the chat shards with their special-token text
    cut out — answers then also occur right after a line break, as they do after the assistant header, so
    BPE learns them as whole words ("red", not "r"+"ed") and one-word answers are single tokens."""
    from mm_llama.data.packed_text import read_documents
    from mm_llama.data.synth import read_corpus

    documents = list(read_corpus(corpus))
    for shard in chat_shards:
        documents += [SPECIAL_TOKEN_TEXT.sub("\n", text) for text in read_documents(shard)]
    return documents


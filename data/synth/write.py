"""Write a synthetic kind as webdataset shards through `mm_llama.data.shard_writer.ShardWriter`.

Folder layout (one ``OUTDIR`` can hold every kind and every split; shard names start with the split, or with
``glyphs-`` and the split for glyphs, which shares the image and text folders with shapes and text)::

    OUTDIR/image-caption/{split}-000000.tar          shapes: KEY.png + KEY.txt + KEY.json (caption, qa list)
    OUTDIR/image-qa/{split}-000000.tar               shapes: KEY-qJ.png + KEY-qJ.json (question, answer)
    OUTDIR/image-caption/glyphs-{split}-000000.tar   glyphs: as shapes (one character, identity/position QA)
    OUTDIR/image-qa/glyphs-{split}-000000.tar        glyphs: as shapes
    OUTDIR/text/glyphs-{split}-000000.tar            glyphs: KEY.txt (caption + both QA as chat, for the LM)
    OUTDIR/image-caption/objects-{split}-000000.tar  objects: KEY.png + KEY.txt (colour-free caption) + KEY.json
    OUTDIR/video-caption/{split}-000000.tar          moving-shapes: KEY.mp4 + KEY.txt + KEY.json
    OUTDIR/video-qa/{split}-000000.tar               moving-shapes: KEY-qJ.mp4 + KEY-qJ.json (question, answer)
    OUTDIR/speech/{split}-000000.tar                 speech: KEY.flac + KEY.json (text, language, duration, ...)
    OUTDIR/text/{split}-000000.tar                   text: KEY.txt (one document; chat=True: chat-formatted)
    OUTDIR/text/{split}-corpus.txt                   text: all documents (plain form), blank-line separated
    OUTDIR/synth-{kind}-{split}.json                 what was written (arguments, shards, samples, bytes)

Every file is a pure function of (kind, seed, split, n, options): samples are generated independently
(`splits.sample_rng`) and written in index order, also with ``workers > 1``.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, field
from functools import partial
from multiprocessing import get_context
from pathlib import Path
from typing import Any

from mm_llama.atomic_file import atomic_write
from mm_llama.data.synth import glyphs, moving_shapes, objects, shapes, speech, text
from mm_llama.data.synth.splits import check_split

Records = dict[str, list[tuple[str, dict[str, bytes]]]]


@dataclass(frozen=True)
class KindSpec:
    """A synthetic kind: the layouts it writes, its per-sample record function and its options."""

    name: str
    layouts: tuple[str, ...]
    records: Callable[..., Records]
    options: tuple[str, ...] = ()
    corpus_records: str | None = None  # key of `records`' result whose texts go to the corpus file, not a shard
    description: str = ""
    shard_prefix: str = ""  # before the split in shard names; a kind sharing another's layout folders needs one


KINDS: dict[str, KindSpec] = {
    "shapes": KindSpec("shapes", shapes.LAYOUTS, shapes.shapes_records, options=("square",),
                       description="PNG images of 1-3 coloured shapes with captions and QA"),
    # glyphs writes shapes' and text's layouts under its own shard names
    "glyphs": KindSpec("glyphs", glyphs.LAYOUTS, glyphs.glyphs_records, shard_prefix="glyphs-",
                       description="128x128 PNG images of one digit or letter in a 3x3 grid cell, with "
                                   "identity and position QA (and as chat text for the LM)"),
    # objects writes shapes' image-caption layout under its own shard names
    "objects": KindSpec("objects", objects.LAYOUTS, objects.objects_records, shard_prefix="objects-",
                        description="PNG images of one coloured shape captioned by size, shape and position, "
                                    "not colour (contrastive encoder pretraining that needs shape)"),
    "moving-shapes": KindSpec("moving-shapes", moving_shapes.LAYOUTS, moving_shapes.moving_shapes_records,
                              description="mp4 clips of a shape that moves or changes colour, captions and QA"),
    "speech": KindSpec("speech", speech.LAYOUTS, speech.speech_records, options=("noise_prob",),
                       description="espeak-ng speech of grammar sentences and digit strings (16 kHz FLAC)"),
    "text": KindSpec("text", text.LAYOUTS, text.text_records, options=("chat",), corpus_records=text.CORPUS,
                     description="text documents covering the grammar (shards + corpus.txt)"),
}
"""Every kind `write_synth` knows, by its command-line name."""


@dataclass
class LayoutSummary:
    """What one layout folder received (``directory`` is relative to the output folder)."""

    directory: str
    shards: list[str]
    samples: int
    bytes: int


@dataclass
class SynthSummary:
    """Result of `write_synth`: per-layout shards and counts, extra files, wall time."""

    kind: str
    seed: int
    split: str
    n: int
    options: dict[str, Any]
    layouts: dict[str, LayoutSummary]
    files: list[str] = field(default_factory=list)
    seconds: float = 0.0

    def manifest(self) -> dict[str, Any]:
        """JSON form written to ``synth-{kind}-{split}.json`` (no wall time: the file is reproducible)."""
        d = asdict(self)
        d.pop("seconds")
        return d


def summary_path(out_dir: str | Path, kind: str, split: str) -> Path:
    """Where `write_synth` records what it wrote."""
    return Path(out_dir) / f"synth-{kind}-{split}.json"


def _check_int(name: str, value: object, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")
    return value


def write_synth(
    kind: str,
    out_dir: str | Path,
    *,
    n: int,
    seed: int = 0,
    split: str = "train",
    samples_per_shard: int = 1000,
    max_shard_bytes: int | None = None,
    overwrite: bool = False,
    workers: int = 1,
    progress: Callable[[int], None] | None = None,
    **options: Any,
) -> SynthSummary:
    """Generate ``n`` samples of ``kind`` for ``(seed, split)`` and write them as shards under ``out_dir``.

    Args:
        kind: one of `KINDS` (``shapes``, ``glyphs``, ``moving-shapes``, ``speech``, ``text``).
        out_dir: output folder; each layout gets a sub-folder (see the module docstring).
        n: number of samples (images, clips, utterances or documents). QA layouts get one record per
            selected question, so they hold more records than ``n``.
        seed: any integer; with ``split`` it fixes every byte written.
        split: ``train``, ``val`` or ``test`` (disjoint content, see `splits.py`).
        samples_per_shard / max_shard_bytes: passed to `ShardWriter`.
        overwrite: replace shards (and the corpus) of this split from an earlier run instead of failing.
        workers: generator processes (1 = in this process); the output does not depend on it.
        progress: called with the number of finished samples after each sample.
        options: kind-specific (``shapes``: ``square``; ``speech``: ``noise_prob``; ``text``: ``chat``, see
            `shapes`, `speech`, `text`).
    """
    from mm_llama.data.shard_writer import ShardWriter

    if kind not in KINDS:
        raise ValueError(f"unknown synthetic kind {kind!r}; choose one of {', '.join(KINDS)}")
    spec = KINDS[kind]
    unknown = set(options) - set(spec.options)
    if unknown:
        raise ValueError(f"kind {kind!r} takes no option(s) {sorted(unknown)}; it takes {list(spec.options) or 'none'}")
    check_split(split)
    _check_int("n", n, 1)
    _check_int("workers", workers, 1)
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise ValueError(f"seed must be an integer, got {seed!r}")
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise ValueError(f"output path {str(out)!r} exists and is not a directory; choose a folder")
    corpus = text.corpus_path(out, split) if spec.corpus_records else None
    if corpus is not None and corpus.exists() and not overwrite:
        raise ValueError(f"{str(corpus)!r} exists from an earlier run; choose another folder or pass overwrite")

    start = time.perf_counter()
    make = partial(spec.records, seed, split, **options)
    writers = {
        layout: ShardWriter(out / layout, prefix=spec.shard_prefix + split, samples_per_shard=samples_per_shard,
                            max_shard_bytes=max_shard_bytes, overwrite=overwrite)
        for layout in spec.layouts
    }
    corpus_file = None
    corpus_tmp = corpus.with_name(corpus.name + ".tmp") if corpus is not None else None
    try:
        if corpus_tmp is not None:
            corpus_file = open(corpus_tmp, "wb")  # noqa: SIM115 - closed below
        if workers == 1:
            results = map(make, range(n))
            executor = None
        else:
            executor = ProcessPoolExecutor(max_workers=workers, mp_context=get_context("spawn"))
            results = executor.map(make, range(n), chunksize=max(1, min(16, n // (4 * workers))))
        try:
            for done, records in enumerate(results, start=1):
                for layout, items in records.items():
                    for key, files in items:
                        if layout != spec.corpus_records:
                            writers[layout].write(key, files)
                        elif corpus_file is not None:
                            corpus_file.write(files["txt"].rstrip(b"\n") + b"\n\n")
                if progress is not None:
                    progress(done)
        finally:
            if executor is not None:
                executor.shutdown(cancel_futures=True)
        for w in writers.values():
            w.close()
        if corpus_file is not None and corpus is not None and corpus_tmp is not None:
            corpus_file.flush()
            os.fsync(corpus_file.fileno())
            corpus_file.close()
            os.replace(corpus_tmp, corpus)
    except BaseException:
        for w in writers.values():
            w.__exit__(RuntimeError, RuntimeError("aborted"), None)  # drops the unfinished shard
        if corpus_file is not None:
            corpus_file.close()
        if corpus_tmp is not None:
            corpus_tmp.unlink(missing_ok=True)
        raise

    summary = SynthSummary(
        kind=kind, seed=seed, split=split, n=n, options=dict(sorted(options.items())),
        layouts={
            layout: LayoutSummary(layout, [p.name for p in w.shards], w.samples,
                                  sum(p.stat().st_size for p in w.shards))
            for layout, w in writers.items()
        },
        files=[str(corpus.relative_to(out))] if corpus is not None else [],
    )
    manifest = summary_path(out, kind, split)
    atomic_write(manifest, (json.dumps(summary.manifest(), indent=2, sort_keys=True) + "\n").encode())
    summary.files.append(manifest.name)
    summary.seconds = time.perf_counter() - start
    return summary

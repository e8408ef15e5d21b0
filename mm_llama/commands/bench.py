"""`mm-llama bench …`: throughput benchmarks, each printed next to a baseline measured in the same run.

`bench data SHARDS --task TASK` measures a data pipeline (`mm_llama.data.pipelines`) on real shards:

1. baseline: plain `tarfile` reading of the same shards in this process (every member read, nothing
   decoded) — the ceiling for one process;
2. the pipeline in-process (`num_workers=0`): samples/s, MB/s (encoded sample bytes), the ratio to the
   baseline, and the fraction of pipeline time per stage (read, decode, transform, tokenize, collate;
   timed with `time.perf_counter` inside the pipeline);
3. the pipeline with `--workers N` DataLoader workers: samples/s in total and per worker, MB/s per
   worker, the ratio to the baseline (worker start-up included).

The in-process run uses one torch thread (as DataLoader workers do) after an untimed warm-up batch.

Each pipeline run reads `--batches M` × `--batch-size` samples from resampled shards (so that any
number of shards keeps every worker busy). Without `--tokenizer` a tiny BPE tokenizer is trained on the
shards' texts first. Other benchmarks are further subcommands of `bench`.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tarfile
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path
from time import perf_counter
from typing import Any

import torch

from mm_llama.data.json_limits import loads_limited
from mm_llama.data.loader_stats import STAGES, LoaderStats, TooManySkippedError
from mm_llama.commands.bench_generate import add_generate_parser
from mm_llama.commands.bench_train import add_train_parser
from mm_llama.commands.help_format import HelpFormatter
from mm_llama.data.tasks import get_task, task_names

TASKS = task_names("image_text", "video_text", "audio_text", mixtures=False)
_TEXT_FIELDS = ("caption", "question", "answer", "text", "translation")


EPILOG = """\
Exit status: 0 when measured; 2 on bad input (shards, a flag), named in one line on stderr; 1 when
transformers (the baseline of generate and train) is missing or on an unexpected error.

Examples (mm-llama bench BENCHMARK --help says more):
  mm-llama bench data data/image-qa --task vqa --workers 2
  mm-llama bench generate --shape tiny --new 64 --repeats 5
  mm-llama bench train --shape tiny --batch 4 --text-len 128 --steps 10
"""

DATA_EPILOG = """\
Exit status: 0 when measured; 2 on bad input (no readable shard, shards of another task, a bad flag), named in
one line on stderr; 1 on an unexpected error.

Example (the image-qa shards of `mm-llama synth shapes data/`):
  mm-llama bench data data/image-qa --task vqa --workers 2
"""


def add_parser(sub: argparse._SubParsersAction) -> None:
    """Register `bench` (with its own subcommands) on the `mm-llama` subparsers."""
    p = sub.add_parser(
        "bench",
        help="throughput benchmarks against a baseline measured in the same run",
        description="Throughput benchmarks. Each prints its figures next to a baseline measured in the same run.",
        epilog=EPILOG, formatter_class=HelpFormatter,
    )
    bench_sub = p.add_subparsers(dest="benchmark", metavar="BENCHMARK", required=True)
    add_data_parser(bench_sub)
    add_generate_parser(bench_sub)
    add_train_parser(bench_sub)


def add_data_parser(sub: argparse._SubParsersAction) -> None:
    d = sub.add_parser(
        "data",
        help="data pipeline throughput (samples/s, MB/s per worker, time per stage) vs plain tar reading",
        description="Benchmark a data pipeline on webdataset shards: samples/s and MB/s per worker, the "
        "fraction of time spent reading, decoding, transforming, tokenizing and collating, and the ratio to "
        "plain tarfile reading of the same shards in the same run.",
        epilog=DATA_EPILOG, formatter_class=HelpFormatter,
    )
    d.add_argument("shards", nargs="+", metavar="SHARDS",
                   help="shard files, directories, globs or brace patterns ('dir/shard-{000000..000009}.tar')")
    d.add_argument("--task", required=True, choices=TASKS, help="the pipeline family and task to run")
    d.add_argument("--workers", type=int, default=2, metavar="N",
                   help="DataLoader workers for the multi-worker run (0: only the in-process run; default 2)")
    d.add_argument("--batches", type=int, default=20, metavar="M",
                   help="each pipeline run reads M × batch-size samples (default 20)")
    d.add_argument("--batch-size", type=int, default=8, help="samples per batch (default 8)")
    d.add_argument("--tokenizer", type=Path, default=None, metavar="DIR",
                   help="tokenizer directory or file (default: train a tiny one on the shards' texts)")
    d.add_argument("--tile-size", type=int, default=560, help="image / frame tile size (default 560)")
    d.add_argument("--max-tiles", type=int, default=4, help="tiles per image or frame at most (default 4)")
    d.add_argument("--num-frames", type=int, default=8, help="frames per video clip (default 8)")
    d.add_argument("--max-batch-seconds", type=float, default=120.0,
                   help="audio seconds per batch, padded (default 120)")
    d.add_argument("--seed", type=int, default=0)
    d.add_argument("--json", action="store_true", help="also print the figures as one JSON object")
    d.set_defaults(run=run_data)


# --------------------------------------------------------------------------------------------------
# measurements


@dataclass
class Throughput:
    """One measured run: `samples` and `bytes` in `seconds` by `workers` processes (1 for in-process)."""

    name: str
    samples: int
    bytes: int
    seconds: float
    workers: int
    first_batch_s: float = 0.0

    @property
    def samples_per_s(self) -> float:
        return self.samples / self.seconds if self.seconds > 0 else 0.0

    @property
    def mb_per_s(self) -> float:
        return self.bytes / 1e6 / self.seconds if self.seconds > 0 else 0.0

    @property
    def per_worker_samples_per_s(self) -> float:
        return self.samples_per_s / self.workers

    @property
    def per_worker_mb_per_s(self) -> float:
        return self.mb_per_s / self.workers

    def as_dict(self) -> dict[str, float | int | str]:
        return {
            "name": self.name, "samples": self.samples, "bytes": self.bytes, "seconds": self.seconds,
            "workers": self.workers, "first_batch_s": self.first_batch_s, "samples_per_s": self.samples_per_s, "mb_per_s": self.mb_per_s,
            "per_worker_samples_per_s": self.per_worker_samples_per_s,
            "per_worker_mb_per_s": self.per_worker_mb_per_s,
        }


def _local(url: str) -> str:
    for prefix in ("file://", "file:"):
        if url.startswith(prefix):
            return url[len(prefix):]
    return url


def _read_tars(urls: list[str]) -> tuple[int, int]:
    """Read every member of every shard with plain tarfile; `(samples = distinct keys, member bytes)`."""
    samples = nbytes = 0
    for url in urls:
        keys: set[str] = set()
        try:
            with tarfile.open(_local(url), "r|*") as tf:
                for info in tf:
                    if not info.isfile():
                        continue
                    f = tf.extractfile(info)
                    if f is None:
                        continue
                    nbytes += len(f.read())
                    keys.add(info.name.split("/")[-1].split(".", 1)[0])
        except (tarfile.TarError, OSError, EOFError):
            pass  # a damaged shard: count what was read, as the pipeline does
        samples += len(keys)
    return samples, nbytes


def tar_baseline(urls: list[str], min_seconds: float = 0.3) -> Throughput:
    """Plain tarfile reading of all shards (one untimed pass warms the page cache), repeated until
    `min_seconds` have passed."""
    _read_tars(urls)
    samples = nbytes = passes = 0
    t0 = perf_counter()
    while True:
        s, b = _read_tars(urls)
        samples, nbytes, passes = samples + s, nbytes + b, passes + 1
        elapsed = perf_counter() - t0
        if elapsed >= min_seconds or passes >= 1000:
            return Throughput("baseline tarfile read", samples, nbytes, elapsed, 1)


def shard_texts(urls: list[str], limit: int = 20000) -> list[str]:
    """Texts of the shards (KEY.txt and the text fields of KEY.json) for training a tiny tokenizer."""
    texts: list[str] = []
    for url in urls:
        try:
            with tarfile.open(_local(url), "r|*") as tf:
                for info in tf:
                    name = info.name.lower()
                    if not info.isfile() or not name.endswith((".txt", ".json")):
                        continue
                    f = tf.extractfile(info)
                    raw = f.read() if f is not None else b""
                    try:
                        if name.endswith(".txt"):
                            texts.append(raw.decode("utf-8"))
                        else:
                            meta = loads_limited(raw)  # a deeply nested KEY.json is skipped, not a crash
                            if isinstance(meta, dict):
                                texts += [v for k in _TEXT_FIELDS if isinstance(v := meta.get(k), str)]
                    except (UnicodeDecodeError, ValueError):  # JSONLimitError is a ValueError
                        continue
                    if len(texts) >= limit:
                        return texts
        except (tarfile.TarError, OSError, EOFError):
            continue
    return texts


def _train_tokenizer(urls: list[str], out_dir: Path) -> Path:
    from mm_llama.tokenizer_training import train_llama3_tokenizer

    texts = shard_texts(urls) + ["Describe this image in one sentence.", "Repeat after me in English:",
                                 "Translate the following sentence into English:"]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "the corpus supplied only N merges" is expected for tiny corpora
        return train_llama3_tokenizer(texts, 1024, out_dir, min_frequency=1)


def _loader(args: argparse.Namespace, urls: list[str], tokenizer: Any, workers: int, samples: int) -> Any:
    from mm_llama.data.pipelines import LoaderConfig, loader_for_task

    config = LoaderConfig(
        urls, batch_size=args.batch_size, num_workers=workers, resampled=True, seed=args.seed,
        samples_per_epoch=samples, shuffle_buffer=100, rank=0, world_size=1,
        max_skip_fraction=1.0, tile_size=args.tile_size, max_tiles=args.max_tiles,
    )
    options: dict[str, Any] = {}
    family = get_task(args.task).family
    if family == "video_text":
        options["num_frames"] = args.num_frames
    if family == "audio_text":
        options["max_batch_seconds"] = args.max_batch_seconds
    return loader_for_task(args.task, config, tokenizer, **options)


def run_pipeline(args: argparse.Namespace, urls: list[str], tokenizer: Any, workers: int) -> tuple[Throughput, LoaderStats]:
    """Run the task's pipeline for `args.batches` × `args.batch_size` samples with `workers` workers.

    The in-process run is preceded by an untimed one-batch warm-up and runs with one torch thread,
    like a DataLoader worker, so that its figures are per-worker figures. The multi-worker run's time
    includes starting the workers.
    """
    threads = torch.get_num_threads()
    if workers == 0:
        for _ in _loader(args, urls, tokenizer, 0, args.batch_size):
            pass
        torch.set_num_threads(1)
    try:
        loader = _loader(args, urls, tokenizer, workers, args.batches * args.batch_size)
        t0 = perf_counter()
        first = None
        for _ in loader:
            if first is None:
                first = perf_counter() - t0
        elapsed = perf_counter() - t0
    finally:
        torch.set_num_threads(threads)
    name = "pipeline in-process" if workers == 0 else f"pipeline {workers} workers"
    stats = loader.stats
    return Throughput(name, stats.samples, stats.bytes, elapsed, max(workers, 1), first or 0.0), stats


def _fractions(stats: LoaderStats) -> dict[str, float]:
    total = sum(stats.seconds.get(s, 0.0) for s in STAGES)
    return {s: (stats.seconds.get(s, 0.0) / total if total > 0 else 0.0) for s in STAGES}


# --------------------------------------------------------------------------------------------------
# the command


def run_data(args: argparse.Namespace) -> int:
    from mm_llama.data.shard_source import expand_shards
    from mm_llama.tokenizer import Tokenizer

    for name in ("workers", "batches", "batch_size", "tile_size", "max_tiles", "num_frames"):
        value = getattr(args, name)
        if value < (0 if name == "workers" else 1):
            raise ValueError(f"--{name.replace('_', '-')} must be {'>= 0' if name == 'workers' else '>= 1'}, got {value}")
    urls = expand_shards(args.shards)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")  # workers fork after the tokenizer is used

    baseline = tar_baseline(urls)
    with tempfile.TemporaryDirectory(prefix="mm-llama-bench-tok-") as tmp:
        if args.tokenizer is not None:
            tokenizer = Tokenizer.from_path(args.tokenizer)
            tok_note = str(args.tokenizer)
        else:
            tokenizer = Tokenizer.from_dir(_train_tokenizer(urls, Path(tmp)))
            tok_note = f"tiny BPE trained on the shards' texts ({tokenizer.vocab_size} ids)"
        try:
            inproc, inproc_stats = run_pipeline(args, urls, tokenizer, 0)
            multi = run_pipeline(args, urls, tokenizer, args.workers) if args.workers > 0 else None
        except TooManySkippedError as e:  # every sample failed: report it as a usage error, not a crash
            raise ValueError(f"{e} (task {args.task}: are these the shards for this task?)") from None

    total_mb = sum(os.path.getsize(_local(u)) for u in urls if os.path.isfile(_local(u))) / 1e6
    fractions = _fractions(inproc_stats)
    out = sys.stdout
    print(f"bench data: task {args.task}, {len(urls)} shard(s) ({total_mb:.1f} MB), batch size {args.batch_size}, "
          f"{args.batches * args.batch_size} samples per run, tokenizer: {tok_note}", file=out)
    print(f"  {'baseline tarfile read (1 process)':<36} {baseline.samples_per_s:10.1f} samples/s "
          f"{baseline.mb_per_s:9.2f} MB/s", file=out)

    def line(run: Throughput) -> None:
        ratio = run.per_worker_mb_per_s / baseline.mb_per_s if baseline.mb_per_s > 0 else 0.0
        print(f"  {run.name:<36} {run.per_worker_samples_per_s:10.1f} samples/s {run.per_worker_mb_per_s:9.2f} MB/s "
              f"per worker ({run.samples_per_s:.1f} samples/s total, {run.samples} samples in {run.seconds:.2f} s, "
              f"first batch after {run.first_batch_s:.2f} s); "
              f"ratio pipeline/baseline {ratio:.4f}", file=out)

    line(inproc)
    print("  time per stage (in-process): " + "  ".join(f"{s} {100 * f:.1f}%" for s, f in fractions.items()),
          file=out)
    if multi is not None:
        line(multi[0])
    both = LoaderStats().merge(inproc_stats)
    if multi is not None:
        both.merge(multi[1])
    skipped, seen = both.unusable, both.seen  # skipped samples + samples known lost in damaged shards
    print(f"  skipped: {skipped} of {seen} samples" + (
        f" ({', '.join(f'{r} {c}' for r, c in both.skipped.most_common(3))})" if both.skipped_total else "")
        + (f"; {both.lost_text()}" if both.lost or both.lost_unknown else ""), file=out)
    if args.json:
        print(json.dumps({
            "task": args.task, "shards": len(urls), "baseline": baseline.as_dict(),
            "in_process": inproc.as_dict(), "workers": multi[0].as_dict() if multi is not None else None,
            "stage_fractions": fractions, "skipped": skipped, "lost": both.lost,
            "lost_unknown_shards": both.lost_unknown,
            "ratio_in_process": inproc.per_worker_mb_per_s / baseline.mb_per_s if baseline.mb_per_s else 0.0,
            "ratio_per_worker": (multi[0].per_worker_mb_per_s / baseline.mb_per_s
                                 if multi is not None and baseline.mb_per_s else None),
        }), file=out)
    return 0

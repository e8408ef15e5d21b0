"""`mm-llama bench data` on a tiny shard set prints throughput, stage fractions and the baseline ratio."""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path

import pytest

from mm_llama.commands import bench
from tests.data.test_pipelines import audio_sample, image_sample, tokenizer_dir, write_shards


def run_bench(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="mm-llama")
    sub = parser.add_subparsers(dest="command", required=True)
    bench.add_parser(sub)
    args = parser.parse_args(argv)
    return args.run(args)


def test_bench_data_prints_the_expected_fields(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    write_shards(tmp_path, [image_sample(i) for i in range(6)], per_shard=3)
    code = run_bench(["bench", "data", str(tmp_path / "shard-{000000..000001}.tar"), "--task", "caption",
                      "--workers", "1", "--batches", "2", "--batch-size", "2", "--tile-size", "28",
                      "--max-tiles", "2", "--json"])
    assert code == 0
    out = capsys.readouterr().out
    assert "task caption" in out and "tiny BPE trained on the shards' texts" in out
    assert re.search(r"baseline tarfile read .* samples/s .* MB/s", out)
    assert re.search(r"pipeline in-process .* samples/s .* MB/s per worker .* ratio pipeline/baseline \d", out)
    assert re.search(r"pipeline 1 workers .* samples/s .* MB/s per worker", out)
    assert re.search(r"time per stage \(in-process\): read [\d.]+%  decode [\d.]+%  transform [\d.]+%  "
                     r"tokenize [\d.]+%  collate [\d.]+%", out)
    assert "skipped: 0 of 8 samples" in out
    figures = json.loads(out.strip().splitlines()[-1])
    assert figures["in_process"]["samples"] == 4 and figures["workers"]["samples"] == 4
    assert figures["baseline"]["samples_per_s"] > 0 and figures["ratio_in_process"] > 0
    assert abs(sum(figures["stage_fractions"].values()) - 1.0) < 1e-6


def test_bench_data_audio_with_given_tokenizer(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    write_shards(tmp_path, [audio_sample(i, 0.3) for i in range(4)], per_shard=2)
    code = run_bench(["bench", "data", str(tmp_path), "--task", "asr", "--workers", "0", "--batches", "2",
                      "--batch-size", "2", "--tokenizer", str(tokenizer_dir())])
    assert code == 0
    out = capsys.readouterr().out
    assert "task asr" in out and "pipeline in-process" in out and "workers" not in out.split("tokenizer:")[0]
    assert "pipeline 0 workers" not in out


def test_bench_requires_a_subcommand_and_valid_numbers(tmp_path: Path) -> None:
    with pytest.raises(SystemExit):
        run_bench(["bench"])
    write_shards(tmp_path, [image_sample(0)])
    with pytest.raises(ValueError, match="--batches must be >= 1"):
        run_bench(["bench", "data", str(tmp_path), "--task", "caption", "--batches", "0"])

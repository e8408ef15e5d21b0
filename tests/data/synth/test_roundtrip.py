"""Synthetic shards load through the project's webdataset pipelines as the standard layouts."""

from __future__ import annotations

import warnings

import pytest

from mm_llama.data.synth import read_corpus, write_synth

pipelines = pytest.importorskip("mm_llama.data.pipelines")


def test_every_layout_loads_without_skips(tmp_path) -> None:
    from mm_llama.tokenizer_training import train_llama3_tokenizer

    for kind in ("text", "shapes", "moving-shapes", "speech"):
        write_synth(kind, tmp_path, n=8, seed=0, split="train", samples_per_shard=4)
    docs = list(read_corpus(tmp_path / "text" / "train-corpus.txt"))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        train_llama3_tokenizer(docs * 4, 400, tmp_path / "tok")
    cases = [("caption", "image-caption", {}), ("vqa", "image-qa", {}),
             ("video_caption", "video-caption", {"num_frames": 4}), ("video_qa", "video-qa", {"num_frames": 4}),
             ("asr", "speech", {})]
    for task, layout, options in cases:
        config = pipelines.LoaderConfig(shards=str(tmp_path / layout), batch_size=4, tile_size=56, max_tiles=2,
                                        shuffle=False)
        loader = pipelines.loader_for_task(task, config, tmp_path / "tok", **options)
        batches = list(loader)
        assert batches, task
        assert loader.stats.samples >= 8 and not loader.stats.skipped, (task, loader.stats)

"""`text` corpus: covers the grammar's words; shards and corpus.txt hold the same documents."""

from __future__ import annotations

import re

from mm_llama.data.synth import grammar, write_synth
from mm_llama.data.synth.text import corpus_path, make_text_sample, read_corpus
from tests.data.synth.helpers import read_shards


def test_corpus_covers_the_vocabulary(tmp_path) -> None:
    summary = write_synth("text", tmp_path, n=300, seed=0, split="train", samples_per_shard=100)
    assert summary.layouts["text"].samples == 300 and len(summary.layouts["text"].shards) == 3
    docs = list(read_corpus(corpus_path(tmp_path, "train")))
    assert len(docs) == 300
    words = set(re.findall(r"[a-z]+", "\n".join(docs).lower()))
    missing = set(grammar.VOCABULARY) - words
    assert not missing, f"corpus misses {sorted(missing)}"
    assert {"user", "assistant", "question", "answer"} <= words  # chat-style and QA lines
    shards = read_shards(tmp_path / "text", "train")
    assert [s["txt"].decode() for s in shards.values()] == docs
    assert all("\n\n" not in d for d in docs)


def test_documents_are_about_one_content() -> None:
    for i in range(30):
        s = make_text_sample(1, "val", i)
        if s.content.scene is not None:
            for o in s.content.scene.objects:
                assert o.shape in s.text
        elif s.content.digits is not None:
            assert grammar.digit_words(s.content.digits) in s.text

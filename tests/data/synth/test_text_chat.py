"""`text` with ``chat=True``: chat-formatted shards that tokenize to the Llama 3 template, a plain corpus."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest

from mm_llama.commands import synth
from mm_llama.data.synth import write_synth
from mm_llama.data.synth.text import (
    ASSISTANT_HEADER, EOT, USER_HEADER, chat_turn, corpus_path, make_text_sample, read_corpus, render,
)
from mm_llama.tokenizer import Tokenizer
from mm_llama.tokenizer_training import train_llama3_tokenizer
from mm_llama.data.packed_text import read_documents
from tests.data.synth.helpers import read_shards, tree_bytes

N = 40


@pytest.fixture(scope="module")
def chat_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("chat")
    write_synth("text", out, n=N, seed=2, split="train", samples_per_shard=16, chat=True)
    return out


@pytest.fixture(scope="module")
def tokenizer(chat_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Tokenizer:
    docs = list(read_corpus(corpus_path(chat_dir, "train")))
    return Tokenizer.from_dir(train_llama3_tokenizer(docs, 300, tmp_path_factory.mktemp("tok"), min_frequency=1))


def test_shards_hold_chat_documents_and_the_corpus_the_same_documents_plain(chat_dir: Path, tmp_path) -> None:
    shard_docs = [s["txt"].decode() for s in read_shards(chat_dir / "text", "train").values()]
    corpus_docs = list(read_corpus(corpus_path(chat_dir, "train")))
    assert len(shard_docs) == len(corpus_docs) == N
    assert all(d.count(USER_HEADER) == d.count(ASSISTANT_HEADER) for d in shard_docs)
    assert sum(USER_HEADER in d for d in shard_docs) > N // 2  # every scene / clip document has turns
    assert not any("<|" in d or "\n\n" in d for d in corpus_docs)
    # the corpus is exactly what the plain kind writes
    write_synth("text", tmp_path, n=N, seed=2, split="train", samples_per_shard=16)
    assert corpus_path(tmp_path, "train").read_bytes() == corpus_path(chat_dir, "train").read_bytes()
    manifest = json.loads((chat_dir / "synth-text-train.json").read_text())
    assert manifest["options"] == {"chat": True} and manifest["layouts"]["text"]["samples"] == N
    # the LM reader sees one document per shard record
    docs = [d for shard in sorted((chat_dir / "text").glob("train-*.tar")) for d in read_documents(shard)]
    assert docs == shard_docs


def test_every_qa_and_user_assistant_line_becomes_a_chat_turn() -> None:
    for i in range(40):
        sample = make_text_sample(5, "train", i)
        assert render(list(sample.lines)) == sample.text
        assert "\n".join(render([line], chat=True) for line in sample.lines) == sample.chat_text()
        for line in sample.lines:
            plain, chat = render([line]), render([line], chat=True)
            is_qa = plain.startswith(("Question: ", "Q: ", "User: ")) or "? " in plain
            assert chat.startswith(USER_HEADER) == is_qa, (plain, chat)
            if is_qa:
                assert chat.endswith(EOT) and chat.count(EOT) == 2 and ASSISTANT_HEADER in chat
            else:  # captions and digit sentences stay plain
                assert chat == plain


def test_chat_documents_tokenize_to_the_llama3_template(chat_dir: Path, tokenizer: Tokenizer) -> None:
    header, end, eot = (tokenizer.special_id(n) for n in ("start_header_id", "end_header_id", "eot_id"))
    doc = next(d for s in read_shards(chat_dir / "text", "train").values() if USER_HEADER in (d := s["txt"].decode()))
    ids = tokenizer.encode(doc, bos=True, eos=True, allow_special=True)
    turns = doc.count(USER_HEADER)
    assert ids.count(header) == ids.count(end) == 2 * turns and ids.count(eot) == 2 * turns
    plain_ids = tokenizer.encode(doc)  # without allow_special the markers are ordinary text
    assert header not in plain_ids and eot not in plain_ids
    # one exchange is token for token what the chat template (and so the image prompts) produce
    q, a = "What colour is the circle?", "red"
    expected = tokenizer.encode_message("user", q) + tokenizer.encode_message("assistant", a)
    assert tokenizer.encode(chat_turn(q, a), allow_special=True) == expected
    # with a system turn: the ASR exchange the demo's LM reads (the speech span goes in the empty user turn)
    system, said = "Repeat after me in English:", "two nine five"
    expected = (tokenizer.encode_message("system", system) + tokenizer.encode_message("user", "")
                + tokenizer.encode_message("assistant", said))
    assert tokenizer.encode(chat_turn("", said, system=system), allow_special=True) == expected


def test_chat_is_deterministic_and_rejects_other_kinds(tmp_path, chat_dir: Path) -> None:
    write_synth("text", tmp_path, n=N, seed=2, split="train", samples_per_shard=16, chat=True)
    assert tree_bytes(tmp_path) == tree_bytes(chat_dir)
    with pytest.raises(ValueError, match="no option"):
        write_synth("shapes", tmp_path / "s", n=1, chat=True)
    with pytest.raises(ValueError, match="chat must be True or False"):
        write_synth("text", tmp_path / "t", n=1, chat="yes")


def test_command_chat_flag(tmp_path, capsys) -> None:
    p = argparse.ArgumentParser()
    sub = p.add_subparsers(dest="command")
    synth.add_parser(sub)
    args = p.parse_args(["synth", "text", str(tmp_path), "--n", "5", "--chat", "--no-progress"])
    assert args.run(args) == 0
    assert any(USER_HEADER in s["txt"].decode() for s in read_shards(tmp_path / "text", "train").values())
    assert json.loads((tmp_path / "synth-text-train.json").read_text())["options"] == {"chat": True}
    args = p.parse_args(["synth", "shapes", str(tmp_path), "--n", "1", "--chat"])
    with pytest.raises(ValueError, match="--chat applies to the text kind only"):
        args.run(args)

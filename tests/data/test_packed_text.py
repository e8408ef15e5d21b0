"""Packed LM data: BOS/EOS per document, fixed rows, document ids, labels, determinism, resumption, ranks."""

from __future__ import annotations

import tarfile
import io
from pathlib import Path

import pytest
import torch

from mm_llama.config import preset
from mm_llama.data.prompts import IGNORE_INDEX
from mm_llama.model import LlamaDecoder
from mm_llama.tokenizer import Tokenizer
from mm_llama.data.packed_text import PackedTextData, expand_text_sources, read_documents
from tests.train.test_trainer_setup import Assets, assets  # noqa: F401


@pytest.fixture(scope="module")
def tok(assets: Assets) -> Tokenizer:  # noqa: F811
    return Tokenizer.from_dir(assets.tokenizer)


def _corpus(a: Assets) -> Path:
    return a.data / "text" / "train-corpus.txt"


def test_tar_shards_and_corpus_file_hold_the_same_documents(assets: Assets) -> None:  # noqa: F811
    from_tar = [d for f in expand_text_sources(str(assets.data / "text" / "train-*.tar")) for d in read_documents(f)]
    from_txt = list(read_documents(_corpus(assets)))
    assert len(from_txt) == 60 and from_tar == from_txt


def test_rows_documents_and_labels(assets: Assets, tok: Tokenizer) -> None:  # noqa: F811
    data = PackedTextData(_corpus(assets), tok, seq_len=32, batch_size=4, seed=3)
    batch = next(iter(data))
    ids, labels, docs = batch.input_ids, batch.labels, batch.document_ids
    assert ids.shape == labels.shape == docs.shape == (4, 32)
    assert (docs[:, 0] == 0).all() and ((docs[:, 1:] - docs[:, :-1]) >= 0).all()
    starts = torch.ones_like(ids, dtype=torch.bool)
    starts[:, 1:] = docs[:, 1:] != docs[:, :-1]
    assert (labels[starts] == IGNORE_INDEX).all()
    assert torch.equal(labels[~starts], ids[~starts])  # nothing inside a document is masked
    # a segment that starts inside a row starts with BOS, and the token before it is EOS
    inner = starts.clone()
    inner[:, 0] = False
    assert (ids[inner] == tok.bos_id).all()
    assert (ids[:, :-1][inner[:, 1:]] == tok.eos_id).all()
    assert data.num_tokens == sum(len(tok.encode(d)) + 2 for d in read_documents(_corpus(assets)))


def test_deterministic_epochs_and_start_anywhere(assets: Assets, tok: Tokenizer) -> None:  # noqa: F811
    a = PackedTextData(_corpus(assets), tok, seq_len=32, batch_size=4, seed=1)
    b = PackedTextData(_corpus(assets), tok, seq_len=32, batch_size=4, seed=1)
    epoch0 = list(a.iter_epoch(0))
    assert len(epoch0) == a.batches_per_epoch > 3
    assert all(torch.equal(x.input_ids, y.input_ids) for x, y in zip(epoch0, b.iter_epoch(0)))
    assert not torch.equal(epoch0[0].input_ids, next(a.iter_epoch(1)).input_ids)  # reshuffled per epoch
    tail = list(a.iter_epoch(0, start=3))
    assert all(torch.equal(x.input_ids, y.input_ids) and torch.equal(x.labels, y.labels) for x, y in zip(tail, epoch0[3:]))
    other_seed = PackedTextData(_corpus(assets), tok, seq_len=32, batch_size=4, seed=2)
    assert not torch.equal(epoch0[0].input_ids, next(other_seed.iter_epoch(0)).input_ids)


def test_ranks_split_the_global_batch(assets: Assets, tok: Tokenizer) -> None:  # noqa: F811
    whole = PackedTextData(_corpus(assets), tok, seq_len=32, batch_size=4, seed=0)
    ranks = [PackedTextData(_corpus(assets), tok, seq_len=32, batch_size=2, seed=0, rank=r, world_size=2) for r in (0, 1)]
    assert ranks[0].batches_per_epoch == ranks[1].batches_per_epoch == whole.batches_per_epoch
    for full, r0, r1 in zip(whole.iter_epoch(0), ranks[0].iter_epoch(0), ranks[1].iter_epoch(0)):
        assert torch.equal(full.input_ids, torch.cat([r0.input_ids, r1.input_ids]))


def test_attention_stays_inside_each_document(assets: Assets, tok: Tokenizer) -> None:  # noqa: F811
    data = PackedTextData(_corpus(assets), tok, seq_len=128, batch_size=1, seed=0)
    batch = next(b for b in data.iter_epoch(0) if int((b.document_ids[0] == 1).sum()) > 4)
    second = (batch.document_ids[0] == 1).nonzero().flatten()  # a document that starts inside the row
    torch.manual_seed(0)
    model = LlamaDecoder(preset("tiny", vocab_size=tok.vocab_size)).eval()
    with torch.no_grad():
        packed = model(batch.input_ids, document_ids=batch.document_ids)[0, second]
        alone = model(batch.input_ids[:, second])[0]
    torch.testing.assert_close(packed, alone, rtol=0, atol=1e-5)


def test_clear_errors(assets: Assets, tok: Tokenizer, tmp_path: Path) -> None:  # noqa: F811
    with pytest.raises(ValueError, match="global batch needs"):
        PackedTextData(_corpus(assets), tok, seq_len=256, batch_size=512)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        PackedTextData(tmp_path / "missing.txt", tok, seq_len=8, batch_size=1)
    with pytest.raises(FileNotFoundError, match="matches no file"):
        expand_text_sources(str(tmp_path / "*.tar"))
    empty = tmp_path / "empty.txt"
    empty.write_text("\n\n")
    with pytest.raises(ValueError, match="no documents"):
        PackedTextData(empty, tok, seq_len=8, batch_size=1)


def test_directories_and_brace_patterns(tmp_path: Path) -> None:
    shard = _text_shard(tmp_path / "text" / "a-000000.tar", ["first doc", "second doc"])
    (tmp_path / "text" / "notes.txt").write_text("ignored: the directory has shards\n")
    assert expand_text_sources(tmp_path / "text") == [shard]
    assert expand_text_sources(str(tmp_path / "text" / "a-{000000..000000}.tar")) == [shard]
    assert list(read_documents(shard)) == ["first doc", "second doc"]


def _text_shard(path: Path, documents: list[str]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(path, "w") as tar:
        for i, text in enumerate(documents):
            data = text.encode()
            info = tarfile.TarInfo(f"k{i:04d}.txt")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


def test_special_token_text_only_with_allow_special(tok: Tokenizer, tmp_path: Path) -> None:
    # chat documents hold blank lines ("\n\n" after each header): they go in .tar shards, one per KEY.txt
    shard = _text_shard(tmp_path / "chat-000000.tar", ["<|start_header_id|>user<|end_header_id|>\n\nhi<|eot_id|>"] * 8)
    plain = PackedTextData(shard, tok, seq_len=8, batch_size=1)
    chat = PackedTextData(shard, tok, seq_len=8, batch_size=1, allow_special=True)
    header = tok.special_id("start_header_id")
    assert header not in torch.cat(plain.documents).tolist()
    ids = chat.documents[0].tolist()
    assert ids[:2] == [tok.bos_id, header] and ids[-2:] == [tok.eot_id, tok.eos_id]


def test_a_damaged_text_shard_is_an_error_not_a_silently_shorter_corpus(tmp_path: Path) -> None:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for i in range(3):
            data = f"document {i}".encode()
            info = tarfile.TarInfo(f"k{i}.txt")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    whole, cut = tmp_path / "whole.tar", tmp_path / "cut.tar"
    whole.write_bytes(buf.getvalue())
    cut.write_bytes(buf.getvalue()[:1100])  # inside the second member's header
    assert list(read_documents(whole)) == ["document 0", "document 1", "document 2"]
    with pytest.raises(ValueError, match=r"cannot read text shard .*cut\.tar: corrupt tar header at byte 1024"):
        list(read_documents(cut))

"""Packed LM pretraining data for tiny models: documents → BOS/EOS-delimited token stream → fixed rows.

Sources (`data.shards` of an `lm` recipe) are text shards (`.tar` files whose `KEY.txt` members are
one document each, e.g. `OUT/text/train-*.tar` from `mm-llama synth text`) or plain `*.txt` corpus
files (documents separated by a blank line, e.g. `OUT/text/train-corpus.txt`; documents that contain
blank lines themselves, such as chat-formatted ones, belong in `.tar` shards). Entries may be files,
globs, brace patterns or directories (a directory means its `.tar` files, else its `.txt` files).
Everything is tokenized once, in memory: this is for the small corpora tiny LMs train on.

Each epoch shuffles the document order with `(seed, epoch)`, concatenates `[BOS] + ids + [EOS]` per
document, and cuts the stream into rows of `seq_len` tokens (the remainder is dropped; a document may
continue in the next row). A row carries per-token `document_ids` (0, 1, … within the row), so
attention stays inside a document (`LlamaDecoder(document_ids=…)` also restarts positions there).
Labels are aligned with `input_ids`, as everywhere in `mm_llama.data` (the loss compares the logits at
`t − 1` with `labels[t]`): `labels[t] = input_ids[t]` except at the first token of each document
segment, where the previous token belongs to another document (−100). Nothing inside a document is
masked.

Batches are deterministic for a seed and can start at any batch of any epoch (`iter_epoch(epoch,
start)`), which is how a resumed run continues exactly where it stopped. In a distributed run every
rank builds the same rows; global batch `k` is rows `[k·B·W, (k+1)·B·W)` and rank `r` takes its `B`
of them, so `W` ranks × batch `B` see exactly what one process with batch `B·W` sees.
"""

from __future__ import annotations

import glob
import os
import random
import tarfile
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Sequence

import torch
from webdataset.tariterators import tarfile_samples

from mm_llama.data.prompts import IGNORE_INDEX
from mm_llama.data.tar_check import inspect_tar_file
from mm_llama.data.shard_source import mix_seed
from mm_llama.tokenizer import Tokenizer

_GLOB_CHARS = set("*?[")


@dataclass
class PackedBatch:
    """One batch of packed rows.

    input_ids: `[B, T]` long. labels: `[B, T]` long, aligned with input_ids, −100 at each document
    segment's first token. document_ids: `[B, T]` long, 0-based document index within the row.
    """

    input_ids: torch.Tensor
    labels: torch.Tensor
    document_ids: torch.Tensor

    def to(self, device: torch.device | str, non_blocking: bool = False) -> PackedBatch:
        return PackedBatch(self.input_ids.to(device, non_blocking=non_blocking),
                           self.labels.to(device, non_blocking=non_blocking),
                           self.document_ids.to(device, non_blocking=non_blocking))

    def __len__(self) -> int:
        return int(self.input_ids.shape[0])


# ------------------------------------------------------------------------------------------ sources
def expand_text_sources(sources: str | os.PathLike[str] | Sequence[str | os.PathLike[str]]) -> list[Path]:
    """Files named by `sources` (files, globs, `{a,b}` / `{000..009}` brace patterns, directories)."""
    import braceexpand

    entries = [sources] if isinstance(sources, (str, os.PathLike)) else list(sources)
    if not entries:
        raise ValueError("no text sources: set data.shards to text shards (.tar with KEY.txt) or *.txt corpus files")
    out: list[Path] = []
    for entry in entries:
        for spec in braceexpand.braceexpand(str(entry)):
            if _GLOB_CHARS & set(spec):
                found = sorted(Path(p) for p in glob.glob(spec))
                if not found:
                    raise FileNotFoundError(f"text source pattern {spec!r} matches no file")
                out += found
            elif Path(spec).is_dir():
                directory = Path(spec)
                found = sorted(directory.glob("*.tar")) or sorted(directory.glob("*.txt"))
                if not found:
                    raise FileNotFoundError(f"text source directory {directory} holds no .tar shards or .txt files")
                out += found
            elif Path(spec).is_file():
                out.append(Path(spec))
            else:
                raise FileNotFoundError(f"text source {spec!r} does not exist; give .tar text shards, *.txt corpus "
                                        "files, a glob or a directory")
    return out


def read_documents(path: str | Path) -> Iterator[str]:
    """Documents of one source: each `KEY.txt` of a `.tar` shard (read in order with webdataset's tar
    reader, as the training loader reads shards), or the blank-line separated blocks of a text file.
    Empty documents are dropped."""
    path = Path(path)
    if path.suffix == ".tar" or path.name.endswith((".tar.gz", ".tgz")):
        damage = inspect_tar_file(str(path)).problem  # what the streaming reader would drop silently
        if damage is not None:
            raise ValueError(f"cannot read text shard {path}: {damage}")
        try:
            for sample in tarfile_samples([{"url": str(path)}]):
                data = sample.get("txt")
                text = bytes(data).decode("utf-8").strip() if data is not None else ""
                if text:
                    yield text
        except (OSError, tarfile.TarError, UnicodeDecodeError, ValueError) as err:
            raise ValueError(f"cannot read text shard {path}: {err}") from err
        return
    block: list[str] = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            line = line.rstrip("\n")
            if line.strip():
                block.append(line)
            elif block:
                yield "\n".join(block)
                block = []
    if block:
        yield "\n".join(block)


# ------------------------------------------------------------------------------------------ packing
class PackedTextData:
    """Packed, shuffled rows of `seq_len` tokens in batches of `batch_size` (per rank); see the module
    docstring. `set_epoch` / `iter(...)` mirror `mm_llama.data.pipelines.Loader`; `iter_epoch(epoch,
    start)` starts anywhere. `allow_special`: special-token text in the documents (e.g. chat-formatted
    `<|start_header_id|>user<|end_header_id|>…<|eot_id|>`) becomes the special tokens, so a tiny LM can
    learn the Llama 3 chat template that the image tasks' prompts use; otherwise it is plain text."""

    def __init__(
        self,
        sources: str | os.PathLike[str] | Sequence[str | os.PathLike[str]],
        tokenizer: Tokenizer,
        *,
        seq_len: int,
        batch_size: int,
        seed: int = 0,
        shuffle: bool = True,
        rank: int = 0,
        world_size: int = 1,
        allow_special: bool = False,
    ) -> None:
        for name, value in (("seq_len", seq_len), ("batch_size", batch_size), ("world_size", world_size)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is outside 0..{world_size - 1}")
        self.files = expand_text_sources(sources)
        self.seq_len, self.batch_size, self.seed, self.shuffle = seq_len, batch_size, seed, shuffle
        self.rank, self.world_size = rank, world_size
        self.epoch = 0
        self.documents: list[torch.Tensor] = []
        for file in self.files:
            for text in read_documents(file):
                ids = tokenizer.encode(text, bos=True, eos=True, allow_special=allow_special)
                self.documents.append(torch.tensor(ids, dtype=torch.long))
        if not self.documents:
            raise ValueError(f"the text sources {[str(f) for f in self.files][:5]} hold no documents")
        self.num_tokens = sum(len(d) for d in self.documents)
        self.global_batch = batch_size * world_size
        self.rows_per_epoch = self.num_tokens // seq_len
        if self.batches_per_epoch == 0:
            raise ValueError(
                f"the corpus has {self.num_tokens} tokens ({len(self.documents)} documents) but one global batch needs "
                f"{self.global_batch} rows × {seq_len} tokens = {self.global_batch * seq_len}; lower data.batch_size "
                "or data.max_seq_len, or add text"
            )

    @property
    def batches_per_epoch(self) -> int:
        """Batches each rank gets per epoch (the same on every rank)."""
        return self.rows_per_epoch // self.global_batch

    def __len__(self) -> int:
        return self.batches_per_epoch

    def set_epoch(self, epoch: int) -> None:
        if isinstance(epoch, bool) or not isinstance(epoch, int) or epoch < 0:
            raise ValueError(f"epoch must be an integer >= 0, got {epoch!r}")
        self.epoch = epoch

    def __iter__(self) -> Iterator[PackedBatch]:
        epoch = self.epoch
        self.epoch += 1
        return self.iter_epoch(epoch)

    def epoch_rows(self, epoch: int) -> tuple[torch.Tensor, torch.Tensor]:
        """`(tokens [R, T], doc_index [R, T])` of every row of `epoch` (doc_index counts documents in stream order)."""
        order = list(range(len(self.documents)))
        if self.shuffle:
            random.Random(mix_seed(self.seed, epoch)).shuffle(order)
        docs = [self.documents[i] for i in order]
        stream = torch.cat(docs)
        doc_index = torch.repeat_interleave(torch.arange(len(docs)), torch.tensor([len(d) for d in docs]))
        n = self.rows_per_epoch * self.seq_len
        return stream[:n].view(-1, self.seq_len), doc_index[:n].view(-1, self.seq_len)

    def iter_epoch(self, epoch: int, start: int = 0) -> Iterator[PackedBatch]:
        """This rank's batches of `epoch`, from batch `start` on."""
        if not 0 <= start <= self.batches_per_epoch:
            raise ValueError(f"start batch {start} is outside 0..{self.batches_per_epoch}")
        tokens, doc_index = self.epoch_rows(epoch)
        for k in range(start, self.batches_per_epoch):
            first = k * self.global_batch + self.rank * self.batch_size
            rows = slice(first, first + self.batch_size)
            yield pack_rows(tokens[rows], doc_index[rows])


def pack_rows(tokens: torch.Tensor, doc_index: torch.Tensor) -> PackedBatch:
    """`tokens [B, T]` and stream document indices `[B, T]` → a `PackedBatch` (row-local document ids,
    −100 labels at each segment's first token)."""
    document_ids = doc_index - doc_index[:, :1]
    starts = torch.ones_like(tokens, dtype=torch.bool)
    starts[:, 1:] = document_ids[:, 1:] != document_ids[:, :-1]
    labels = tokens.masked_fill(starts, IGNORE_INDEX)
    return PackedBatch(tokens.clone(), labels, document_ids)


__all__ = ["PackedBatch", "PackedTextData", "expand_text_sources", "pack_rows", "read_documents"]

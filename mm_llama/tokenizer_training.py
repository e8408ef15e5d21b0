"""Train small Llama 3-style byte-level BPE tokenizers and write them in both real formats.

:func:`train_llama3_tokenizer` writes ``tokenizer.json`` (Hugging Face) and ``tokenizer.model``
(Meta's tiktoken format) describing the same vocabulary: same ids, same merges, same Llama 3
pre-tokenization, and the 256 Llama 3.1 special tokens after the base vocabulary.
:func:`write_tiktoken_model` is the converter from a byte-level BPE ``tokenizer.json``.
"""

from __future__ import annotations

import base64
import json
import warnings
from collections.abc import Iterable, Mapping
from functools import lru_cache
from pathlib import Path
from typing import Any

from mm_llama.tokenizer import (
    HF_FILE,
    IMAGE_TOKEN,
    LLAMA3_PATTERN,
    TIKTOKEN_FILE,
    llama3_special_token_names,
)

__all__ = [
    "bytes_to_unicode",
    "merges_from_ranks",
    "train_llama3_tokenizer",
    "unicode_to_bytes",
    "write_tiktoken_model",
]


@lru_cache(maxsize=1)
def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte → printable-character table used by byte-level BPE vocabularies.

    Bytes that are printable Latin-1 characters ('!'..'~', '¡'..'¬', '®'..'ÿ') map to themselves; the
    other 68 bytes map, in increasing byte order, to ``chr(256)``, ``chr(257)``, ...
    """
    printable = set(range(ord("!"), ord("~") + 1))
    printable |= set(range(ord("¡"), ord("¬") + 1))
    printable |= set(range(ord("®"), ord("ÿ") + 1))
    table: dict[int, str] = {}
    extra = 0
    for b in range(256):
        if b in printable:
            table[b] = chr(b)
        else:
            table[b] = chr(256 + extra)
            extra += 1
    return table


@lru_cache(maxsize=1)
def unicode_to_bytes() -> dict[str, int]:
    """Inverse of :func:`bytes_to_unicode`."""
    return {c: b for b, c in bytes_to_unicode().items()}


def _token_bytes(token: str, where: str) -> bytes:
    table = unicode_to_bytes()
    try:
        return bytes(table[c] for c in token)
    except KeyError as e:
        raise ValueError(
            f"{where}: token {token!r} has character {e.args[0]!r} outside the byte-level alphabet; "
            f"only byte-level BPE vocabularies (GPT-2 bytes_to_unicode) can be converted"
        ) from None


def _token_str(token: bytes) -> str:
    table = bytes_to_unicode()
    return "".join(table[b] for b in token)


def merges_from_ranks(ranks: Mapping[bytes, int]) -> list[tuple[bytes, bytes]]:
    """The BPE merges implied by tiktoken ranks, in priority order.

    tiktoken merges the adjacent pair whose concatenation has the lowest rank, so every split
    ``token = left + right`` with both halves in the vocabulary is a merge, ranked by ``ranks[token]``
    (ties: by the ranks of the halves). This is how Llama 3's own ``tokenizer.json`` was derived.
    """
    merges: list[tuple[int, int, int, bytes, bytes]] = []
    for token, rank in ranks.items():
        for i in range(1, len(token)):
            left, right = token[:i], token[i:]
            if left in ranks and right in ranks:
                merges.append((rank, ranks[left], ranks[right], left, right))
    merges.sort()
    return [(left, right) for *_, left, right in merges]


def _llama3_pre_tokenizer() -> Any:
    from tokenizers import Regex, pre_tokenizers

    return pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(LLAMA3_PATTERN), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=False),
        ]
    )


def _build_hf_tokenizer(ranks: Mapping[bytes, int]) -> Any:
    """A Llama 3-layout ``tokenizers.Tokenizer`` for the base vocabulary ``ranks`` + 256 specials + ``<|image|>``."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, processors

    vocab = {_token_str(tok): rank for tok, rank in ranks.items()}
    merges = [(_token_str(a), _token_str(b)) for a, b in merges_from_ranks(ranks)]
    tok = Tokenizer(
        models.BPE(
            vocab=vocab, merges=merges, ignore_merges=True, fuse_unk=False, byte_fallback=False
        )
    )
    tok.pre_tokenizer = _llama3_pre_tokenizer()
    tok.decoder = decoders.ByteLevel()
    names = llama3_special_token_names()
    # + <|image|> right after them, where the published Llama 3.2 Vision tokenizer.json has it
    tok.add_special_tokens(
        [AddedToken(n, special=True, normalized=False, lstrip=False, rstrip=False) for n in names + [IMAGE_TOKEN]]
    )
    bos = names[0]
    # Like Meta's tokenizer.json: BOS is added when a caller asks transformers for special tokens.
    tok.post_processor = processors.TemplateProcessing(
        single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, len(ranks))]
    )
    return tok


def _check_contiguous(ids: Iterable[int], where: str) -> int:
    ids = sorted(ids)
    n = len(ids)
    if ids != list(range(n)):
        gap = next((i for i, v in enumerate(ids) if v != i), n)
        raise ValueError(
            f"{where}: base-vocabulary ids must be contiguous 0..{n - 1}; first gap at id {gap}"
        )
    return n


def train_llama3_tokenizer(
    texts: Iterable[str],
    vocab_size: int,
    out_dir: str | Path,
    *,
    min_frequency: int = 2,
) -> Path:
    """Train a Llama 3-style byte-level BPE on ``texts``; write ``tokenizer.json`` and ``tokenizer.model``.

    ``vocab_size`` is the base BPE vocabulary (the 256 bytes + merges, at least 257); the 256 Llama 3.1
    special tokens come after it, so the model's vocabulary is ``n_base + 256`` (``<|image|>``, a model input
    only, follows at ``n_base + 256`` as in Llama 3.2 Vision's tokenizer). A corpus too small to
    supply enough merges gives a smaller ``n_base`` (with a warning). Returns ``out_dir``.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    if not isinstance(vocab_size, int) or vocab_size < 257:
        raise ValueError(
            f"vocab_size={vocab_size!r} is too small: the base vocabulary holds the 256 bytes plus at "
            f"least one merge, so pass vocab_size >= 257"
        )
    if min_frequency < 0:
        raise ValueError(f"min_frequency must be >= 0, got {min_frequency}")
    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise ValueError(f"out_dir {out_dir} exists and is not a directory; pass a directory path")

    tok = Tokenizer(models.BPE(ignore_merges=True))
    tok.pre_tokenizer = _llama3_pre_tokenizer()
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        show_progress=False,
        special_tokens=[],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(_checked_texts(texts), trainer)

    vocab = tok.get_vocab(with_added_tokens=False)
    n_base = _check_contiguous(vocab.values(), "trained BPE")
    ranks = {_token_bytes(t, "trained BPE"): i for t, i in vocab.items()}
    if len(ranks) != n_base:
        raise ValueError("trained BPE maps two tokens to the same bytes; this is a bug, please report")
    if n_base < vocab_size:
        warnings.warn(
            f"the corpus supplied only {n_base - 256} merges: base vocabulary is {n_base}, not the "
            f"requested {vocab_size} (train on more text or lower min_frequency)",
            stacklevel=2,
        )

    # Rebuild the merges from the ranks, as tiktoken applies them, so that tokenizer.json and
    # tokenizer.model give the same ids (the trainer's own merge list can miss or reorder splits).
    final = _build_hf_tokenizer(ranks)
    out_dir.mkdir(parents=True, exist_ok=True)
    json_path = out_dir / HF_FILE
    final.save(str(json_path))
    write_tiktoken_model(json_path, out_dir / TIKTOKEN_FILE)
    return out_dir


def _checked_texts(texts: Iterable[str]) -> Iterable[str]:
    if isinstance(texts, str):
        raise ValueError("texts must be an iterable of strings, not one str (wrap it in a list)")
    for i, t in enumerate(texts):
        if not isinstance(t, str):
            raise ValueError(f"training text {i} must be a str, got {type(t).__name__}: {t!r:.80}")
        yield t


def _is_llama3_pre_tokenizer(pre: Any) -> bool:
    if not isinstance(pre, dict) or pre.get("type") != "Sequence":
        return False
    steps = pre.get("pretokenizers", [])
    if len(steps) != 2:
        return False
    split, byte_level = steps
    return (
        split.get("type") == "Split"
        and split.get("pattern", {}).get("Regex") == LLAMA3_PATTERN
        and str(split.get("behavior")).lower() == "isolated"
        and not split.get("invert", False)
        and byte_level.get("type") == "ByteLevel"
        and not byte_level.get("add_prefix_space", False)
        and not byte_level.get("use_regex", True)
    )


def write_tiktoken_model(
    hf_tokenizer_json_path: str | Path, out_path: str | Path, *, strict: bool = True
) -> Path:
    """Convert a byte-level BPE ``tokenizer.json`` to Meta's tiktoken ``tokenizer.model``.

    Each base token (``model.vocab``; ``added_tokens`` are not written, Meta's loader re-creates the
    256 specials) is written as ``base64(raw bytes) id``. Ids must be contiguous ``0..n-1`` and cover
    all 256 bytes. With ``strict`` (default) the file must also tokenize exactly like tiktoken with the
    Llama 3 pattern: no normalizer, Llama 3 pre-tokenizer, ``ignore_merges``, and merges equal to the
    ones implied by the ids (:func:`merges_from_ranks`); otherwise a ValueError says what differs.
    With ``strict=False`` those differences only warn. Returns ``out_path``.
    """
    src = Path(hf_tokenizer_json_path)
    out = Path(out_path)
    if not src.is_file():
        raise FileNotFoundError(f"HF tokenizer file not found: {src}; expected a {HF_FILE}")
    try:
        spec = json.loads(src.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{src} is not valid JSON: {e}") from e
    model = spec.get("model") or {}
    if model.get("type") != "BPE":
        raise ValueError(
            f"{src}: model type is {model.get('type')!r}; only BPE tokenizers can become tiktoken files"
        )
    vocab: dict[str, int] = model.get("vocab") or {}
    n_base = _check_contiguous(vocab.values(), str(src))
    ranks = {_token_bytes(t, str(src)): i for t, i in vocab.items()}
    if len(ranks) != n_base:
        raise ValueError(f"{src}: two vocabulary entries decode to the same bytes")
    missing = [b for b in range(256) if bytes([b]) not in ranks]
    if missing:
        raise ValueError(
            f"{src}: {len(missing)} of the 256 single bytes are not tokens (e.g. byte {missing[0]}); "
            f"train with initial_alphabet=ByteLevel.alphabet() so any text can be encoded"
        )

    problems: list[str] = []
    if spec.get("normalizer") is not None:
        problems.append(f"it has a normalizer ({spec['normalizer'].get('type')}), tiktoken has none")
    if not _is_llama3_pre_tokenizer(spec.get("pre_tokenizer")):
        problems.append(
            "its pre_tokenizer is not Split(Llama 3 pattern, isolated) + ByteLevel(use_regex=false)"
        )
    if not model.get("ignore_merges", False):
        problems.append("model.ignore_merges is false (tiktoken looks whole pieces up first)")
    raw_merges = model.get("merges") or []
    merges = [tuple(m.split(" ", 1)) if isinstance(m, str) else tuple(m) for m in raw_merges]
    expected = [(_token_str(a), _token_str(b)) for a, b in merges_from_ranks(ranks)]
    if merges != expected:
        have, want = set(merges), set(expected)
        problems.append(
            f"its merges differ from those implied by the ids ({len(want - have)} missing, "
            f"{len(have - want)} extra, order {'differs' if have == want else 'not compared'})"
        )
    if problems:
        msg = (
            f"{src} would tokenize differently as a tiktoken file: " + "; ".join(problems) + ". "
            "Rebuild it with mm_llama.tokenizer_training.train_llama3_tokenizer, or pass "
            "strict=False to convert anyway."
        )
        if strict:
            raise ValueError(msg)
        warnings.warn(msg, stacklevel=2)

    out.parent.mkdir(parents=True, exist_ok=True)
    lines = [
        base64.b64encode(tok).decode("ascii") + " " + str(rank)
        for tok, rank in sorted(ranks.items(), key=lambda kv: kv[1])
    ]
    out.write_text("\n".join(lines) + "\n", encoding="ascii")
    return out

"""Llama 3 tokenizer with two interchangeable backends and the Llama 3 chat template.

* ``tokenizer.model`` (Meta's tiktoken BPE file: ``base64(token_bytes) rank`` per line) → tiktoken.
* ``tokenizer.json`` (Hugging Face) → the ``tokenizers`` library.

Both backends expose the same API and, for a vocabulary written in both formats (see
:mod:`mm_llama.tokenizer_training`), produce the same ids. BOS/EOS are never added by a backend;
:meth:`Tokenizer.encode` adds them when asked. Special-token text inside ordinary text (for example a
user typing ``<|eot_id|>``) is encoded as plain text unless ``allow_special=True``.
"""

from __future__ import annotations

import base64
import binascii
import re
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

# Meta's Llama 3 pre-tokenization pattern (REFERENCE.md §1).
LLAMA3_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
NUM_RESERVED_SPECIAL_TOKENS = 256
TIKTOKEN_FILE = "tokenizer.model"
HF_FILE = "tokenizer.json"

# Llama 3.2 Vision's image placeholder. It is a model input only (a trainable embedding row after the text
# vocabulary): the published tokenizer.json lists it as an added special token at the text vocabulary size
# (128256), and Meta's / torchtune's tiktoken tokenizers define it at the same id.
IMAGE_TOKEN = "<|image|>"

# Short names of the special tokens every Llama 3 tokenizer must define.
REQUIRED_SPECIALS = ("begin_of_text", "end_of_text", "start_header_id", "end_header_id", "eot_id")
CHAT_ROLES = ("system", "user", "assistant", "ipython", "tool")

# Encoding of very long inputs with tiktoken is split into pieces of at most this many characters
# (tiktoken's BPE is quadratic in the length of one pre-token; Meta splits at 25k-char runs too).
MAX_CHUNK_CHARS = 25_000
# The last position in a window where cutting cannot change the result (see `_split_for_tiktoken`):
# a non-whitespace char followed by an ASCII space, or a CR/LF followed by a non-whitespace char.
_LAST_SAFE_CUT = re.compile(r".*(?:[^\s\u180e](?= )|[\r\n](?=[^\s\u180e]))", re.DOTALL)


def llama3_special_token_names(n: int = NUM_RESERVED_SPECIAL_TOKENS) -> list[str]:
    """The ``n`` special-token strings in Meta's Llama 3.1 order (ids ``n_base .. n_base + n - 1``)."""
    named = [
        "<|begin_of_text|>",
        "<|end_of_text|>",
        "<|reserved_special_token_0|>",
        "<|reserved_special_token_1|>",
        "<|finetune_right_pad_id|>",
        "<|step_id|>",
        "<|start_header_id|>",
        "<|end_header_id|>",
        "<|eom_id|>",
        "<|eot_id|>",
        "<|python_tag|>",
    ]
    if n < len(named):
        raise ValueError(f"need at least {len(named)} special tokens for the Llama 3 layout, got n={n}")
    return named + [f"<|reserved_special_token_{2 + i}|>" for i in range(n - len(named))]


def _full_name(name: str) -> str:
    """``"eot_id"`` → ``"<|eot_id|>"``; full names pass through."""
    return name if name.startswith("<|") and name.endswith("|>") else f"<|{name}|>"


class UnknownSpecialTokenError(KeyError):
    """A special-token name this tokenizer does not define."""

    def __str__(self) -> str:  # KeyError would repr() the message
        return str(self.args[0]) if self.args else ""


def _split_for_tiktoken(text: str, max_chars: int = MAX_CHUNK_CHARS) -> list[str]:
    """Split ``text`` into pieces of at most ``max_chars`` characters for tiktoken.

    Cuts are placed only where the Llama 3 pattern always ends a pre-token and no pattern branch
    looks across the cut (non-whitespace followed by ``" "``, or CR/LF followed by
    non-whitespace), so encoding the pieces separately gives exactly the ids of the whole text. Only a
    window of ``max_chars`` with no such position (one pathological run, e.g. 25k letters or spaces)
    is cut blindly, as Meta does — there the ids may differ from an (impractically slow) whole encode.
    """
    if len(text) <= max_chars:
        return [text]
    pieces: list[str] = []
    start = 0
    while len(text) - start > max_chars:
        m = _LAST_SAFE_CUT.match(text, start, start + max_chars)
        cut = m.end() if m is not None else start + max_chars
        pieces.append(text[start:cut])
        start = cut
    pieces.append(text[start:])
    return pieces


def read_tiktoken_ranks(path: Path) -> dict[bytes, int]:
    """Parse a tiktoken BPE file (`base64(token) rank` per line) into `{token_bytes: rank}`.

    Read directly rather than with `tiktoken.load.load_tiktoken_bpe`, which copies every file it reads
    into a cache keyed by path (`/tmp/data-gym-cache`) and would serve a rewritten file stale.
    """
    ranks: dict[bytes, int] = {}
    for lineno, line in enumerate(path.read_bytes().splitlines(), start=1):
        if not line.strip():
            continue
        try:
            token, rank = line.split()
            ranks[base64.b64decode(token, validate=True)] = int(rank)
        except (ValueError, binascii.Error):
            raise ValueError(
                f"{path} is not a valid tiktoken BPE file: line {lineno} is {line[:60]!r}, "
                "expected 'base64(token) rank'"
            ) from None
    return ranks


class Tokenizer:
    """A Llama 3 tokenizer (tiktoken or HF ``tokenizers`` backend) with the Llama 3 chat template.

    Build it with :meth:`from_path`, :meth:`from_dir`, :meth:`from_tiktoken_model` or
    :meth:`from_tokenizer_json`. Ids of the base vocabulary are ``0 .. n_base - 1``; special tokens
    follow (``bos_id == n_base`` for Meta's layout). A ``<|image|>`` listed right after the text vocabulary
    (Llama 3.2 Vision) is a media token: :attr:`image_id` gives it, and :attr:`vocab_size` leaves it out.
    """

    def __init__(
        self,
        *,
        backend: str,
        special_tokens: Mapping[str, int],
        vocab_size: int,
        source: Path,
        tiktoken_encoding: Any = None,
        hf_plain: Any = None,
        hf_special: Any = None,
    ) -> None:
        """Internal: use the ``from_*`` constructors."""
        if backend not in ("tiktoken", "tokenizers"):
            raise ValueError(f"unknown backend {backend!r}; expected 'tiktoken' or 'tokenizers'")
        self.backend = backend
        self.source = source
        self.special_tokens: dict[str, int] = dict(special_tokens)
        self._n_ids = int(vocab_size)
        image = self.special_tokens.get(IMAGE_TOKEN)
        # <|image|> at the end of the id range is a model input after the text vocabulary, not a text token
        self._image_id = image if image is not None and image == self._n_ids - 1 else None
        self._vocab_size = self._n_ids - (self._image_id is not None)
        self._special_ids = frozenset(self.special_tokens.values())
        self._headers: dict[str, list[int]] = {}
        self._enc = tiktoken_encoding
        self._hf_plain = hf_plain  # encode_special_tokens=True: special text is plain text
        self._hf_special = hf_special  # special text parsed as special tokens
        missing = [n for n in REQUIRED_SPECIALS if _full_name(n) not in self.special_tokens]
        if missing:
            raise ValueError(
                f"tokenizer {source} lacks required special token(s) "
                f"{', '.join(_full_name(n) for n in missing)}; a Llama 3 tokenizer must define "
                f"{', '.join(_full_name(n) for n in REQUIRED_SPECIALS)}"
            )

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_tiktoken_model(cls, path: str | Path) -> Tokenizer:
        """Load Meta's ``tokenizer.model`` (tiktoken BPE file) with the 256 Llama 3.1 special tokens."""
        import tiktoken

        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(
                f"tiktoken tokenizer file not found: {path}; expected Meta's {TIKTOKEN_FILE} "
                f"(lines 'base64(token) rank')"
            )
        ranks = read_tiktoken_ranks(path)
        n_base = len(ranks)
        if n_base < 256:
            raise ValueError(
                f"{path} defines only {n_base} tokens; a byte-level BPE needs at least the 256 bytes"
            )
        rank_set = set(ranks.values())
        if len(rank_set) != n_base or min(rank_set) != 0 or max(rank_set) != n_base - 1:
            raise ValueError(
                f"{path}: ranks must be the contiguous ids 0..{n_base - 1} (one per token); got "
                f"{len(rank_set)} distinct ranks in {min(rank_set)}..{max(rank_set)}"
            )
        missing_bytes = [b for b in range(256) if bytes([b]) not in ranks]
        if missing_bytes:
            raise ValueError(
                f"{path} lacks {len(missing_bytes)} single-byte token(s) (e.g. byte {missing_bytes[0]}); "
                f"every byte must be a token so that any text can be encoded"
            )
        names = llama3_special_token_names()
        specials = {name: n_base + i for i, name in enumerate(names)}
        specials[IMAGE_TOKEN] = n_base + len(names)  # Meta's Llama 3.2 Vision convention (128256)
        enc = tiktoken.Encoding(
            name=path.stem,
            pat_str=LLAMA3_PATTERN,
            mergeable_ranks=ranks,
            special_tokens=specials,
            explicit_n_vocab=n_base + len(specials),
        )
        return cls(
            backend="tiktoken",
            special_tokens=specials,
            vocab_size=n_base + len(specials),
            source=path,
            tiktoken_encoding=enc,
        )

    @classmethod
    def from_tokenizer_json(cls, path: str | Path) -> Tokenizer:
        """Load a Hugging Face ``tokenizer.json``; special tokens are its ``added_tokens`` marked special."""
        from tokenizers import Tokenizer as HFTokenizer

        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"HF tokenizer file not found: {path}; expected a {HF_FILE}")
        text = path.read_text(encoding="utf-8")
        try:
            plain = HFTokenizer.from_str(text)
            special = HFTokenizer.from_str(text)
        except Exception as e:  # tokenizers raises its own Exception type on bad files
            raise ValueError(f"{path} is not a valid HF tokenizer.json: {e}") from e
        plain.encode_special_tokens = True
        special.encode_special_tokens = False
        added = plain.get_added_tokens_decoder()  # {id: AddedToken}
        specials = {tok.content: int(i) for i, tok in sorted(added.items()) if tok.special}
        not_special = {tok.content for tok in added.values() if not tok.special}
        missing = [_full_name(n) for n in REQUIRED_SPECIALS if _full_name(n) not in specials]
        if missing:
            hint = [m for m in missing if m in not_special]
            extra = (
                f" ({', '.join(hint)} present but not marked \"special\": true)" if hint else ""
            )
            raise ValueError(
                f"{path}: added_tokens lack required special token(s) {', '.join(missing)}{extra}; "
                f"a Llama 3 tokenizer.json must define "
                f"{', '.join(_full_name(n) for n in REQUIRED_SPECIALS)} as special added tokens"
            )
        return cls(
            backend="tokenizers",
            special_tokens=specials,
            vocab_size=plain.get_vocab_size(with_added_tokens=True),
            source=path,
            hf_plain=plain,
            hf_special=special,
        )

    @classmethod
    def from_dir(cls, path: str | Path) -> Tokenizer:
        """Load ``tokenizer.model`` from a directory if present, else ``tokenizer.json``."""
        path = Path(path)
        if not path.is_dir():
            raise FileNotFoundError(
                f"tokenizer directory not found: {path}; expected a directory holding "
                f"{TIKTOKEN_FILE} or {HF_FILE}"
            )
        if (path / TIKTOKEN_FILE).is_file():
            return cls.from_tiktoken_model(path / TIKTOKEN_FILE)
        if (path / HF_FILE).is_file():
            return cls.from_tokenizer_json(path / HF_FILE)
        raise FileNotFoundError(
            f"no tokenizer in {path}: expected {TIKTOKEN_FILE} (Meta/tiktoken) or {HF_FILE} (HF)"
        )

    @classmethod
    def from_path(cls, path: str | Path) -> Tokenizer:
        """Load from a directory (see :meth:`from_dir`), a ``*.json`` file or a tiktoken file."""
        path = Path(path)
        if path.is_dir():
            return cls.from_dir(path)
        if not path.exists():
            raise FileNotFoundError(
                f"tokenizer path not found: {path}; pass a {TIKTOKEN_FILE}, a {HF_FILE} or a "
                f"directory holding one of them"
            )
        if path.suffix == ".json":
            return cls.from_tokenizer_json(path)
        return cls.from_tiktoken_model(path)

    # ------------------------------------------------------------------ encode / decode
    def encode(
        self, text: str, *, bos: bool = False, eos: bool = False, allow_special: bool = False
    ) -> list[int]:
        """Token ids of ``text``; ``bos``/``eos`` add begin/end-of-text ids around them.

        With ``allow_special=False`` (default) special-token text such as ``"<|eot_id|>"`` is encoded
        as ordinary text; with ``allow_special=True`` it becomes the special token.
        """
        if not isinstance(text, str):
            raise TypeError(f"encode() expects a str, got {type(text).__name__}")
        ids: list[int] = [self.bos_id] if bos else []
        if self._enc is not None:
            for piece in _split_for_tiktoken(text):
                if allow_special:
                    ids.extend(self._enc.encode(piece, allowed_special="all"))
                else:
                    ids.extend(self._enc.encode_ordinary(piece))
        else:
            hf = self._hf_special if allow_special else self._hf_plain
            ids.extend(hf.encode(text, add_special_tokens=False).ids)
        if eos:
            ids.append(self.eos_id)
        return ids

    def decode(self, ids: Iterable[int], *, skip_special: bool = False) -> str:
        """Text of ``ids``; invalid UTF-8 becomes U+FFFD. ``skip_special`` drops special tokens."""
        ids = [int(i) for i in ids]
        bad = [i for i in ids if not 0 <= i < self._n_ids]
        if bad:
            raise ValueError(
                f"token id {bad[0]} out of range: this tokenizer has ids 0..{self._n_ids - 1}"
            )
        if skip_special:
            ids = [i for i in ids if i not in self._special_ids]
        if self._enc is not None:
            return self._enc.decode(ids, errors="replace")
        return self._hf_plain.decode(ids, skip_special_tokens=False)

    # ------------------------------------------------------------------ special tokens
    def special_id(self, name: str) -> int:
        """Id of a special token, by full (``"<|eot_id|>"``) or short (``"eot_id"``) name."""
        full = _full_name(name)
        try:
            return self.special_tokens[full]
        except KeyError:
            known = [n for n in self.special_tokens if "reserved" not in n][:12]
            raise UnknownSpecialTokenError(
                f"unknown special token {name!r} (looked up as {full!r}); known special tokens "
                f"include {', '.join(known)}"
            ) from None

    def _optional_id(self, name: str) -> int | None:
        return self.special_tokens.get(_full_name(name))

    def is_special(self, token_id: int) -> bool:
        """Whether ``token_id`` is a special token."""
        return int(token_id) in self._special_ids

    @property
    def vocab_size(self) -> int:
        """Text vocabulary: base tokens plus special tokens (128256 for Llama 3), the rows of the LM's output
        head. A trailing ``<|image|>`` (see :attr:`image_id`) is not counted."""
        return self._vocab_size

    @property
    def image_id(self) -> int | None:
        """``<|image|>`` when the tokenizer lists it right after the text vocabulary (128256 in Llama 3.2
        Vision's tokenizer.json and in Meta's tiktoken convention); None when it does not list it."""
        return self._image_id

    @property
    def bos_id(self) -> int:
        """``<|begin_of_text|>``."""
        return self.special_tokens["<|begin_of_text|>"]

    @property
    def eos_id(self) -> int:
        """``<|end_of_text|>``."""
        return self.special_tokens["<|end_of_text|>"]

    @property
    def eot_id(self) -> int:
        """``<|eot_id|>`` (end of a chat turn)."""
        return self.special_tokens["<|eot_id|>"]

    @property
    def eom_id(self) -> int | None:
        """``<|eom_id|>`` (end of message, tool use); None where the vocabulary lacks it (Llama 3.0)."""
        return self._optional_id("eom_id")

    @property
    def pad_id(self) -> int | None:
        """``<|finetune_right_pad_id|>``; None where the vocabulary lacks it (Llama 3.0)."""
        return self._optional_id("finetune_right_pad_id")

    @property
    def stop_ids(self) -> frozenset[int]:
        """Ids that end generation: end_of_text, eom_id and eot_id (those present)."""
        ids = {self.eos_id, self.eot_id}
        if self.eom_id is not None:
            ids.add(self.eom_id)
        return frozenset(ids)

    # ------------------------------------------------------------------ chat template
    @staticmethod
    def _check_role(role: str) -> None:
        if role not in CHAT_ROLES:
            raise ValueError(f"unknown chat role {role!r}; expected one of {', '.join(CHAT_ROLES)}")

    def encode_header(self, role: str) -> list[int]:
        """``<|start_header_id|>role<|end_header_id|>\\n\\n`` as ids."""
        self._check_role(role)
        cached = self._headers.get(role)
        if cached is None:  # encoded once per role: training builds a header for every sample
            cached = self._headers[role] = (
                [self.special_id("start_header_id")] + self.encode(role)
                + [self.special_id("end_header_id")] + self.encode("\n\n")
            )
        return list(cached)

    def encode_message(self, role: str, content: str) -> list[int]:
        """One chat turn: header, ``content.strip()`` (special text stays plain text), ``<|eot_id|>``."""
        if not isinstance(content, str):
            raise TypeError(f"message content must be a str, got {type(content).__name__}")
        return self.encode_header(role) + self.encode(content.strip()) + [self.eot_id]

    @staticmethod
    def _check_messages(messages: Sequence[Mapping[str, Any]]) -> None:
        for i, m in enumerate(messages):
            if not isinstance(m, Mapping) or "role" not in m or "content" not in m:
                raise ValueError(
                    f"message {i} must be a mapping with 'role' and 'content', got {m!r}"
                )
            if not isinstance(m["content"], str):
                raise ValueError(
                    f"message {i} content must be a str, got {type(m['content']).__name__}"
                )
            if m["role"] not in CHAT_ROLES:
                raise ValueError(
                    f"message {i} has unknown role {m['role']!r}; expected one of "
                    f"{', '.join(CHAT_ROLES)}"
                )

    def encode_chat(
        self, messages: Sequence[Mapping[str, Any]], add_generation_prompt: bool = True
    ) -> list[int]:
        """``<|begin_of_text|>`` + each message + (optionally) an open assistant header."""
        self._check_messages(messages)
        ids = [self.bos_id]
        for m in messages:
            ids.extend(self.encode_message(m["role"], m["content"]))
        if add_generation_prompt:
            ids.extend(self.encode_header("assistant"))
        return ids

    def render_chat(
        self, messages: Sequence[Mapping[str, Any]], add_generation_prompt: bool = True
    ) -> str:
        """The chat of :meth:`encode_chat` as text with special-token strings.

        ``encode(render_chat(m), allow_special=True) == encode_chat(m)`` whenever no content contains
        special-token text (which :meth:`encode_chat` keeps as plain text but this string cannot).
        """
        self._check_messages(messages)
        parts = ["<|begin_of_text|>"]
        for m in messages:
            parts.append(
                f"<|start_header_id|>{m['role']}<|end_header_id|>\n\n{m['content'].strip()}<|eot_id|>"
            )
        if add_generation_prompt:
            parts.append("<|start_header_id|>assistant<|end_header_id|>\n\n")
        return "".join(parts)

    def __repr__(self) -> str:
        return (
            f"Tokenizer(backend={self.backend!r}, vocab_size={self.vocab_size}, "
            f"source={str(self.source)!r})"
        )


def load_tokenizer(path: str | Path) -> Tokenizer:
    """Shorthand for :meth:`Tokenizer.from_path`."""
    return Tokenizer.from_path(path)


__all__ = [
    "CHAT_ROLES",
    "LLAMA3_PATTERN",
    "Tokenizer",
    "UnknownSpecialTokenError",
    "llama3_special_token_names",
    "load_tokenizer",
]

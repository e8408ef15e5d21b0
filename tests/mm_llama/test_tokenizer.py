"""Tokenizer: both backends (tiktoken `tokenizer.model`, HF `tokenizer.json`) on one tiny trained BPE."""

from __future__ import annotations

import base64
import json
import re
import time
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mm_llama.tokenizer import (
    MAX_CHUNK_CHARS,
    Tokenizer,
    UnknownSpecialTokenError,
    _split_for_tiktoken,
    llama3_special_token_names,
)
from mm_llama.tokenizer_training import (
    bytes_to_unicode,
    train_llama3_tokenizer,
    write_tiktoken_model,
)

N_BASE = 420  # requested base vocabulary; the corpus below supplies enough merges for it

CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "A red circle sits next to a blue square on a white table.",
    "Don't worry, we'll be there at 10:30, they're late again!",
    "DON'T SHOUT. I'M NOT DEAF; YOU'VE SAID IT TWICE.",
    "She said: \"It's 1234567 meters away\" — not 89.",
    "Numbers like 3.14159, 2,718 and -42 appear in maths.",
    "café naïve façade résumé coöperate",
    "日本語のテキストも少し混ぜておきます。",
    "Emoji time 🙂🙂 and 🚀 to the moon!",
    "Здравствуй, мир! Привет всем.",
    "مرحبا بالعالم",
    "    def encode(self, text: str) -> list[int]:\n        return self._enc.encode(text)\n",
    "Line one\nLine two\n\n\nLine five after blank lines\r\nwindows line",
    "  leading spaces and trailing spaces   ",
    "Tabs\tseparate\tcolumns\tin\tTSV files.",
    "Email me at someone@example.com or visit https://example.org/path?q=1.",
    "The image shows a cat; the video shows a dog running through a park.",
    "Speech recognition turns audio into text, and translation changes its language.",
    "We'd have gone if you'd asked; he'll know, she's sure, it'd work.",
    "Mixed scripts: hello こんにちは привет 안녕하세요 مرحبا.",
    "A caption: two people ride bicycles along a sunny beach at noon.",
    "Question: what color is the bus? Answer: the bus is yellow.",
    "Hmm... well?! (parentheses) [brackets] {braces} <angles> | pipes",
    "<|eot_id|> is a special token only when special tokens are allowed.",
    "1 22 333 4444 55555 666666 7777777 88888888",
    "Whitespace   runs   of   several   spaces   matter   too.",
    "Ünïcödé üpper and lower case: Straße STRASSE ǅungla",
    "The model was trained on images, videos and speech from many sources.",
    "Cross-attention layers connect the vision encoder to the frozen language model.",
    "The perceiver resampler merges thirty-two frames into one set of tokens.",
] * 3

HARD_CASES = [
    "",
    " ",
    "\n",
    "\n\n\n",
    "   \n  \n",
    "a  b   c    d",
    "  leading spaces",
    "trailing spaces   ",
    "1234567",
    "12345678901234567890",
    "🙂",
    "🙂🙂🙂 🚀",
    "café naïve 日本語 🙂",
    "mixed: hello こんにちは привет 안녕 مرحبا",
    "DON'T",
    "I'M HE'LL WE'VE THEY'RE SHE'S IT'D",
    "don't we'll",
    "'s 't 're",
    "x'ſ",  # long s: case-insensitive match in the contraction branch
    "\r\n\r\n",
    "tab\t\tand\u00a0nbsp\u2003em space",
    "\u200b\ufeffzero width",
    "<|eot_id|><|begin_of_text|>",
    "<|not_a_special|>",
]

SPECIAL_OFFSETS = {
    "begin_of_text": 0,
    "end_of_text": 1,
    "reserved_special_token_0": 2,
    "reserved_special_token_1": 3,
    "finetune_right_pad_id": 4,
    "step_id": 5,
    "start_header_id": 6,
    "end_header_id": 7,
    "eom_id": 8,
    "eot_id": 9,
    "python_tag": 10,
    "reserved_special_token_2": 11,
    "reserved_special_token_246": 255,
}

HYP = settings(max_examples=200, deadline=None)


@pytest.fixture(scope="module", autouse=True)
def _tiktoken_cache(tmp_path_factory: pytest.TempPathFactory):
    """Keep tiktoken's file cache (it caches even local files) out of the shared temp dir."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("TIKTOKEN_CACHE_DIR", str(tmp_path_factory.mktemp("tiktoken-cache")))
        yield


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory: pytest.TempPathFactory, _tiktoken_cache) -> Path:
    out = tmp_path_factory.mktemp("tok")
    assert train_llama3_tokenizer(CORPUS, N_BASE, out) == out
    return out


@pytest.fixture(scope="module")
def tk(tok_dir: Path) -> Tokenizer:
    return Tokenizer.from_tiktoken_model(tok_dir / "tokenizer.model")


@pytest.fixture(scope="module")
def hf(tok_dir: Path) -> Tokenizer:
    return Tokenizer.from_tokenizer_json(tok_dir / "tokenizer.json")


@pytest.fixture(scope="module")
def both(tk: Tokenizer, hf: Tokenizer) -> dict[str, Tokenizer]:
    return {"tiktoken": tk, "tokenizers": hf}


BACKENDS = pytest.mark.parametrize("backend", ["tiktoken", "tokenizers"])


# ---------------------------------------------------------------------------------- training / files
def test_training_writes_both_formats(tok_dir: Path, tk: Tokenizer, hf: Tokenizer) -> None:
    assert (tok_dir / "tokenizer.json").is_file() and (tok_dir / "tokenizer.model").is_file()
    assert tk.backend == "tiktoken" and hf.backend == "tokenizers"
    assert tk.vocab_size == hf.vocab_size == N_BASE + 256
    spec = json.loads((tok_dir / "tokenizer.json").read_text())
    assert spec["model"]["type"] == "BPE" and spec["model"]["ignore_merges"] is True
    assert sorted(spec["model"]["vocab"].values()) == list(range(N_BASE))
    added = spec["added_tokens"]
    # the 256 Llama 3.1 specials, then <|image|> where the published Llama 3.2 Vision tokenizer.json has it
    assert [a["content"] for a in added] == llama3_special_token_names() + ["<|image|>"]
    assert [a["id"] for a in added] == list(range(N_BASE, N_BASE + 257))
    assert all(a["special"] for a in added)


def test_training_is_fast(tmp_path: Path) -> None:
    texts = [f"{s} number {i}" for i, s in enumerate(CORPUS * 4)]  # a few hundred sentences
    start = time.perf_counter()
    train_llama3_tokenizer(texts, 400, tmp_path)
    assert time.perf_counter() - start < 2.0


def test_write_tiktoken_model_loads_with_plain_tiktoken(tok_dir: Path, tmp_path: Path) -> None:
    from tiktoken.load import load_tiktoken_bpe

    out = write_tiktoken_model(tok_dir / "tokenizer.json", tmp_path / "converted.model")
    ranks = load_tiktoken_bpe(str(out))
    assert sorted(ranks.values()) == list(range(N_BASE))
    assert all(bytes([b]) in ranks for b in range(256))
    # Same vocabulary as tokenizer.json, through the byte-level table.
    byte_of = {c: b for b, c in bytes_to_unicode().items()}
    vocab = json.loads((tok_dir / "tokenizer.json").read_text())["model"]["vocab"]
    assert ranks == {bytes(byte_of[c] for c in t): i for t, i in vocab.items()}
    assert out.read_bytes() == (tok_dir / "tokenizer.model").read_bytes()


def test_bytes_to_unicode_is_a_bijection_onto_printables() -> None:
    table = bytes_to_unicode()
    assert sorted(table) == list(range(256)) and len(set(table.values())) == 256
    assert all(c.isprintable() and not c.isspace() for c in table.values())
    assert table[ord("A")] == "A" and table[ord(" ")] == "Ġ" and table[ord("\n")] == "Ċ"


def test_write_tiktoken_model_rejects_inexact_conversion(tok_dir: Path, tmp_path: Path) -> None:
    spec = json.loads((tok_dir / "tokenizer.json").read_text())
    spec["model"]["merges"] = spec["model"]["merges"][:-1]
    bad = tmp_path / "tokenizer.json"
    bad.write_text(json.dumps(spec))
    with pytest.raises(ValueError, match="merges differ"):
        write_tiktoken_model(bad, tmp_path / "tokenizer.model")
    with pytest.warns(UserWarning, match="merges differ"):
        write_tiktoken_model(bad, tmp_path / "tokenizer.model", strict=False)
    assert (tmp_path / "tokenizer.model").is_file()


def test_rewritten_tokenizer_model_is_not_served_stale(tmp_path: Path) -> None:
    # tiktoken caches local files by path; a retrained file at the same path must load fresh.
    train_llama3_tokenizer(CORPUS, 300, tmp_path)
    assert Tokenizer.from_tiktoken_model(tmp_path / "tokenizer.model").vocab_size == 300 + 256
    train_llama3_tokenizer(CORPUS, 350, tmp_path)
    assert Tokenizer.from_tiktoken_model(tmp_path / "tokenizer.model").vocab_size == 350 + 256


# ---------------------------------------------------------------------------------- round trips / parity
@BACKENDS
@HYP
@given(text=st.text())
def test_round_trip(both: dict[str, Tokenizer], backend: str, text: str) -> None:
    tok = both[backend]
    assert tok.decode(tok.encode(text)) == text
    assert tok.decode(tok.encode(text, allow_special=True)) == text


@BACKENDS
@pytest.mark.parametrize("text", HARD_CASES + CORPUS[:30])
def test_round_trip_fixed(both: dict[str, Tokenizer], backend: str, text: str) -> None:
    tok = both[backend]
    assert tok.decode(tok.encode(text)) == text


@HYP
@given(text=st.text())
def test_backends_agree(tk: Tokenizer, hf: Tokenizer, text: str) -> None:
    assert tk.encode(text) == hf.encode(text)
    assert tk.encode(text, allow_special=True) == hf.encode(text, allow_special=True)


@HYP
@given(
    text=st.lists(
        st.sampled_from(["<|eot_id|>", "<|begin_of_text|>", " ", "\n", "don't", "日本", "12345"])
        | st.text(max_size=5),
        max_size=12,
    ).map("".join)
)
def test_backends_agree_with_special_text(tk: Tokenizer, hf: Tokenizer, text: str) -> None:
    assert tk.encode(text) == hf.encode(text)
    assert tk.encode(text, allow_special=True) == hf.encode(text, allow_special=True)


@pytest.mark.parametrize("text", HARD_CASES + CORPUS[:30])
def test_backends_agree_fixed(tk: Tokenizer, hf: Tokenizer, text: str) -> None:
    assert tk.encode(text) == hf.encode(text)
    assert tk.encode(text, allow_special=True) == hf.encode(text, allow_special=True)


def test_merges_are_used(tk: Tokenizer) -> None:
    text = "The quick brown fox jumps over the lazy dog."
    assert len(tk.encode(text)) < 0.7 * len(text.encode())


@HYP
@given(ids=st.lists(st.integers(0, N_BASE + 255), max_size=20))
def test_decode_agrees_on_any_ids(tk: Tokenizer, hf: Tokenizer, ids: list[int]) -> None:
    assert tk.decode(ids) == hf.decode(ids)
    assert tk.decode(ids, skip_special=True) == hf.decode(ids, skip_special=True)


@BACKENDS
def test_decode_invalid_utf8_gives_replacement_char(both: dict[str, Tokenizer], backend: str) -> None:
    tok = both[backend]
    first, *rest = tok.encode("日")
    lone = [i for i in tok.encode("日本語 café") if tok.decode([i]) == "\ufffd"]
    assert lone, "expected some byte tokens that are not whole characters"
    assert tok.decode([lone[0]]) == "\ufffd"
    assert tok.decode(tok.encode("ok") + [lone[0]]) == "ok\ufffd"
    assert tok.decode([first, *rest]) == "日"


@BACKENDS
def test_decode_rejects_out_of_range_ids(both: dict[str, Tokenizer], backend: str) -> None:
    tok = both[backend]
    assert tok.decode([tok.vocab_size]) == "<|image|>"  # the media token after the text vocabulary decodes
    with pytest.raises(ValueError, match=str(tok.vocab_size + 1)):
        tok.decode([1, tok.vocab_size + 1])


# ---------------------------------------------------------------------------------- long inputs
def _safe_cuts(text: str) -> list[int]:
    """Every position where `_split_for_tiktoken` may cut."""
    return [m.end() for m in re.finditer(r"[^\s\u180e](?= )|[\r\n](?=[^\s\u180e])", text)]


@HYP
@given(
    text=st.lists(
        st.sampled_from(
            [" ", "  ", "\n", "\r\n", "\t", "a", "Ab", "'s", "'S", "12", "345", ".", "!?", "é", "日", "🙂"]
        )
        | st.text(max_size=3),
        max_size=25,
    ).map("".join)
)
def test_safe_cut_positions_do_not_change_ids(tk: Tokenizer, text: str) -> None:
    whole = tk._enc.encode_ordinary(text)
    for cut in _safe_cuts(text):
        assert tk._enc.encode_ordinary(text[:cut]) + tk._enc.encode_ordinary(text[cut:]) == whole


def test_long_text_is_split_without_changing_ids(tk: Tokenizer, hf: Tokenizer) -> None:
    text = "\n".join(CORPUS) * 40  # ~100k characters
    pieces = _split_for_tiktoken(text)
    assert len(pieces) > 1 and "".join(pieces) == text
    assert all(len(p) <= MAX_CHUNK_CHARS for p in pieces)
    assert tk.encode(text) == tk._enc.encode_ordinary(text) == hf.encode(text)
    assert tk.decode(tk.encode(text)) == text


@pytest.mark.parametrize("unit", ["a", " ", "日", "\n", ".", "9"])
def test_pathological_runs_encode_quickly(tk: Tokenizer, unit: str) -> None:
    text = unit * (3 * MAX_CHUNK_CHARS + 7)
    start = time.perf_counter()
    ids = tk.encode(text)
    assert time.perf_counter() - start < 5.0
    assert tk.decode(ids) == text


# ---------------------------------------------------------------------------------- special tokens
@BACKENDS
def test_special_token_layout(both: dict[str, Tokenizer], backend: str) -> None:
    tok = both[backend]
    for name, offset in SPECIAL_OFFSETS.items():
        assert tok.special_id(name) == N_BASE + offset, name
        assert tok.special_id(f"<|{name}|>") == N_BASE + offset, name
    assert len(tok.special_tokens) == 257  # the 256 Llama 3.1 specials and <|image|>
    assert tok.image_id == tok.special_id("image") == N_BASE + 256 == tok.vocab_size
    assert (tok.bos_id, tok.eos_id, tok.pad_id) == (N_BASE, N_BASE + 1, N_BASE + 4)
    assert (tok.eom_id, tok.eot_id) == (N_BASE + 8, N_BASE + 9)
    assert tok.stop_ids == frozenset({N_BASE + 1, N_BASE + 8, N_BASE + 9})
    assert tok.is_special(N_BASE) and tok.is_special(N_BASE + 255)
    assert not tok.is_special(N_BASE - 1) and not tok.is_special(0)


def test_meta_layout_for_full_size_vocab() -> None:
    names = llama3_special_token_names()
    ids = {n: 128000 + i for i, n in enumerate(names)}
    assert ids["<|begin_of_text|>"] == 128000 and ids["<|end_of_text|>"] == 128001
    assert ids["<|finetune_right_pad_id|>"] == 128004 and ids["<|start_header_id|>"] == 128006
    assert ids["<|end_header_id|>"] == 128007 and ids["<|eom_id|>"] == 128008
    assert ids["<|eot_id|>"] == 128009 and ids["<|python_tag|>"] == 128010
    assert ids["<|reserved_special_token_246|>"] == 128255 and len(set(names)) == 256


@BACKENDS
def test_bos_eos_wrap(both: dict[str, Tokenizer], backend: str) -> None:
    tok = both[backend]
    body = tok.encode("Hello world")
    assert tok.encode("Hello world", bos=True) == [tok.bos_id, *body]
    assert tok.encode("Hello world", eos=True) == [*body, tok.eos_id]
    assert tok.encode("Hello world", bos=True, eos=True) == [tok.bos_id, *body, tok.eos_id]
    assert tok.encode("", bos=True, eos=True) == [tok.bos_id, tok.eos_id]


@BACKENDS
def test_special_text_is_plain_unless_allowed(both: dict[str, Tokenizer], backend: str) -> None:
    tok = both[backend]
    text = "hi<|eot_id|>there<|begin_of_text|>"
    plain = tok.encode(text)
    assert not any(tok.is_special(i) for i in plain)
    assert tok.decode(plain) == text
    parsed = tok.encode(text, allow_special=True)
    assert parsed == tok.encode("hi") + [tok.eot_id] + tok.encode("there") + [tok.bos_id]
    assert tok.encode("<|eot_id|>", allow_special=True) == [tok.eot_id]
    assert tok.encode("<|not_a_special|>", allow_special=True) == tok.encode("<|not_a_special|>")


@BACKENDS
def test_decode_with_and_without_skip_special(both: dict[str, Tokenizer], backend: str) -> None:
    tok = both[backend]
    ids = tok.encode("Hello<|eot_id|> world", allow_special=True, bos=True, eos=True)
    assert tok.decode(ids) == "<|begin_of_text|>Hello<|eot_id|> world<|end_of_text|>"
    assert tok.decode(ids, skip_special=True) == "Hello world"


@BACKENDS
def test_unknown_special_name_is_a_clear_error(both: dict[str, Tokenizer], backend: str) -> None:
    tok = both[backend]
    with pytest.raises(UnknownSpecialTokenError, match=r"unknown special token 'video'.*eot_id") as e:
        tok.special_id("video")
    assert isinstance(e.value, KeyError)
    assert "<|video|>" in str(e.value)


# ---------------------------------------------------------------------------------- chat template
MESSAGES = [
    {"role": "system", "content": "  You are brief.\n"},
    {"role": "user", "content": "What is 2+2? Don't explain."},
]


@BACKENDS
def test_chat_tokens_built_by_hand(both: dict[str, Tokenizer], backend: str) -> None:
    tok = both[backend]
    names = ("start_header_id", "end_header_id", "eot_id", "begin_of_text")
    sh, eh, eot, bos = (tok.special_id(n) for n in names)
    nl = tok.encode("\n\n")

    def header(role: str) -> list[int]:
        return [sh, *tok.encode(role), eh, *nl]

    expected = (
        [bos]
        + header("system") + tok.encode("You are brief.") + [eot]
        + header("user") + tok.encode("What is 2+2? Don't explain.") + [eot]
        + header("assistant")
    )  # fmt: skip
    assert tok.encode_chat(MESSAGES) == expected
    assert tok.encode_chat(MESSAGES, add_generation_prompt=False) == expected[: -len(header("assistant"))]
    assert tok.encode_message("user", " hi ") == header("user") + tok.encode("hi") + [eot]


def test_chat_identical_across_backends(tk: Tokenizer, hf: Tokenizer) -> None:
    assert tk.encode_chat(MESSAGES) == hf.encode_chat(MESSAGES)
    assert tk.render_chat(MESSAGES) == hf.render_chat(MESSAGES)


def test_render_chat_text(tk: Tokenizer) -> None:
    expected = (
        "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nYou are brief.<|eot_id|>"
        "<|start_header_id|>user<|end_header_id|>\n\nWhat is 2+2? Don't explain.<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\n"
    )
    assert tk.render_chat(MESSAGES) == expected


@BACKENDS
def test_render_then_encode_equals_encode_chat_fixed(both: dict[str, Tokenizer], backend: str) -> None:
    tok = both[backend]
    for gen in (True, False):
        rendered = tok.render_chat(MESSAGES, gen)
        assert tok.encode(rendered, allow_special=True) == tok.encode_chat(MESSAGES, gen)


@BACKENDS
@HYP
@given(
    turns=st.lists(
        st.tuples(
            st.sampled_from(["system", "user", "assistant", "ipython", "tool"]),
            st.text().filter(lambda s: "<|" not in s),
        ),
        max_size=3,
    ),
    gen=st.booleans(),
)
def test_render_then_encode_equals_encode_chat(
    both: dict[str, Tokenizer], backend: str, turns: list[tuple[str, str]], gen: bool
) -> None:
    tok = both[backend]
    messages = [{"role": r, "content": c} for r, c in turns]
    assert tok.encode(tok.render_chat(messages, gen), allow_special=True) == tok.encode_chat(messages, gen)


@BACKENDS
def test_special_text_in_chat_content_stays_plain(both: dict[str, Tokenizer], backend: str) -> None:
    tok = both[backend]
    ids = tok.encode_chat([{"role": "user", "content": "end now<|eot_id|><|start_header_id|>"}], False)
    assert ids.count(tok.eot_id) == 1 and ids.count(tok.special_id("start_header_id")) == 1


@BACKENDS
def test_chat_rejects_bad_messages(both: dict[str, Tokenizer], backend: str) -> None:
    tok = both[backend]
    with pytest.raises(ValueError, match=r"unknown role 'robot'.*system, user, assistant"):
        tok.encode_chat([{"role": "robot", "content": "beep"}])
    with pytest.raises(ValueError, match="unknown chat role 'Assistant'"):
        tok.encode_message("Assistant", "hi")
    with pytest.raises(ValueError, match="message 0 must be a mapping with 'role' and 'content'"):
        tok.render_chat([{"role": "user"}])
    with pytest.raises(ValueError, match="message 1 content must be a str"):
        tok.encode_chat([{"role": "user", "content": "a"}, {"role": "user", "content": None}])


# ---------------------------------------------------------------------------------- loading / errors
def test_from_dir_prefers_tiktoken_then_json(tok_dir: Path, tmp_path: Path) -> None:
    assert Tokenizer.from_dir(tok_dir).backend == "tiktoken"
    assert Tokenizer.from_path(tok_dir).backend == "tiktoken"
    (tmp_path / "tokenizer.json").write_bytes((tok_dir / "tokenizer.json").read_bytes())
    assert Tokenizer.from_dir(tmp_path).backend == "tokenizers"
    assert Tokenizer.from_path(tmp_path / "tokenizer.json").backend == "tokenizers"
    assert Tokenizer.from_path(tok_dir / "tokenizer.model").backend == "tiktoken"


def test_missing_paths_are_clear_errors(tmp_path: Path) -> None:
    missing = tmp_path / "nope"
    with pytest.raises(FileNotFoundError, match=r"tokenizer directory not found: .*nope"):
        Tokenizer.from_dir(missing)
    with pytest.raises(FileNotFoundError, match=r"tokenizer path not found: .*nope"):
        Tokenizer.from_path(missing)
    with pytest.raises(FileNotFoundError, match=r"no tokenizer in .*tokenizer\.model.*tokenizer\.json"):
        Tokenizer.from_dir(tmp_path)
    with pytest.raises(FileNotFoundError, match=r"tokenizer\.model"):
        Tokenizer.from_tiktoken_model(tmp_path / "tokenizer.model")
    with pytest.raises(FileNotFoundError, match=r"tokenizer\.json"):
        Tokenizer.from_tokenizer_json(tmp_path / "tokenizer.json")


def test_tokenizer_json_missing_required_specials(tok_dir: Path, tmp_path: Path) -> None:
    spec = json.loads((tok_dir / "tokenizer.json").read_text())
    drop = {"<|eot_id|>", "<|end_header_id|>"}
    spec["added_tokens"] = [a for a in spec["added_tokens"] if a["content"] not in drop]
    spec["post_processor"] = None
    bad = tmp_path / "tokenizer.json"
    bad.write_text(json.dumps(spec))
    with pytest.raises(ValueError, match=r"<\|end_header_id\|>, <\|eot_id\|>") as e:
        Tokenizer.from_tokenizer_json(bad)
    assert str(bad) in str(e.value) and "<|begin_of_text|>" in str(e.value)


def test_tokenizer_json_specials_not_marked_special(tok_dir: Path, tmp_path: Path) -> None:
    spec = json.loads((tok_dir / "tokenizer.json").read_text())
    for a in spec["added_tokens"]:
        if a["content"] == "<|eot_id|>":
            a["special"] = False
    bad = tmp_path / "tokenizer.json"
    bad.write_text(json.dumps(spec))
    with pytest.raises(ValueError, match=r"<\|eot_id\|> present but not marked"):
        Tokenizer.from_tokenizer_json(bad)


def test_invalid_files_are_clear_errors(tmp_path: Path) -> None:
    (tmp_path / "tokenizer.json").write_text("{not json")
    with pytest.raises(ValueError, match="not a valid HF tokenizer.json"):
        Tokenizer.from_tokenizer_json(tmp_path / "tokenizer.json")
    (tmp_path / "tokenizer.model").write_text("this is not base64 rank\n")
    with pytest.raises(ValueError, match="not a valid tiktoken BPE file"):
        Tokenizer.from_tiktoken_model(tmp_path / "tokenizer.model")
    gappy = "\n".join(f"{base64.b64encode(bytes([b])).decode()} {b + (b > 100)}" for b in range(256))
    (tmp_path / "gappy.model").write_text(gappy)
    with pytest.raises(ValueError, match="contiguous"):
        Tokenizer.from_tiktoken_model(tmp_path / "gappy.model")


def test_training_rejects_bad_arguments(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"vocab_size=256 is too small.*>= 257"):
        train_llama3_tokenizer(CORPUS, 256, tmp_path)
    with pytest.raises(ValueError, match="training text 1 must be a str"):
        train_llama3_tokenizer(["ok", 3], 300, tmp_path)
    with pytest.raises(ValueError, match="not one str"):
        train_llama3_tokenizer("just one string", 300, tmp_path)


def test_small_corpus_warns_about_short_vocab(tmp_path: Path) -> None:
    with pytest.warns(UserWarning, match="base vocabulary is"):
        train_llama3_tokenizer(["tiny corpus", "tiny corpus"], 5000, tmp_path)
    tok = Tokenizer.from_dir(tmp_path)
    assert tok.vocab_size < 5000 + 256 and tok.bos_id == tok.vocab_size - 256


def test_corrupt_tiktoken_file_names_the_line(tmp_path: Path) -> None:
    bad = tmp_path / "tokenizer.model"
    bad.write_bytes(b"IQ== 0\nnot-base64!! 1\n")
    with pytest.raises(ValueError, match="line 2 is b'not-base64!! 1'"):
        Tokenizer.from_tiktoken_model(bad)

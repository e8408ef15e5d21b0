"""Tests for `mm_llama.data.prompts`: exact chat-format ids per task, label masks, identity with
`image_chat.image_prompt`, the speech token count contract, truncation and errors.

Expected sequences are built by hand from special-token ids and plain-text encodes of each segment (as
Meta's chat formatter encodes them), and cross-checked by decoding the ids back to the rendered chat text.
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mm_llama.data.prompts import (
    DEFAULT_CAPTION_PROMPT,
    DEFAULT_VIDEO_PROMPT,
    IGNORE_INDEX,
    RESPONSE_FIELDS,
    TASKS,
    EmptyLabelsError,
    Example,
    build_example,
    language_name,
    multiple_choice_question,
    prompt_ids,
    short_answer_question,
    speech_span,
    speech_token_count,
)
from mm_llama.image_chat import DEFAULT_CAPTION_PROMPT as IMAGE_CHAT_DEFAULT
from mm_llama.image_chat import image_prompt
from mm_llama.media_tokens import MediaTokens
from mm_llama.tokenizer import Tokenizer
from mm_llama.tokenizer_training import train_llama3_tokenizer

CORPUS = [
    "Describe this image in one sentence.",
    "Describe this video in one sentence.",
    "A red circle is on the left. A blue square is at the top.",
    "What colour is the circle? Red. How many shapes are there? Two.",
    "Answer the question using a single word or phrase.",
    "Select the correct answer from the following options. Answer with the correct option letter and nothing else",
    "Repeat after me in English: the quick brown fox jumps over the lazy dog.",
    "Translate the following sentence into French: le renard brun saute.",
    "system user assistant",
] * 3


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("prompt-tok")
    train_llama3_tokenizer(CORPUS, 330, out)
    return out


@pytest.fixture(scope="module")
def tok(tok_dir: Path) -> Tokenizer:
    return Tokenizer.from_tiktoken_model(tok_dir / "tokenizer.model")


@pytest.fixture(scope="module")
def hf_tok(tok_dir: Path) -> Tokenizer:
    return Tokenizer.from_tokenizer_json(tok_dir / "tokenizer.json")


@pytest.fixture(scope="module")
def media(tok: Tokenizer) -> MediaTokens:
    return MediaTokens(tok.vocab_size)


MARKS = {"image": "<IMG>", "video": "<VID>", "speech_start": "<SS>", "speech": "<SP>", "speech_end": "<SE>"}


def render(tok: Tokenizer, media: MediaTokens, ids: list[int]) -> str:
    """Decode ids to text, spelling media ids (which the tokenizer does not know) as markers."""
    names = {getattr(media, name): mark for name, mark in MARKS.items()}
    out, run = [], []
    for i in ids:
        if i in names:
            out.append(tok.decode(run))
            out.append(names[i])
            run = []
        else:
            run.append(i)
    out.append(tok.decode(run))
    return "".join(out)


def header(tok: Tokenizer, role: str) -> list[int]:
    """`<|start_header_id|>role<|end_header_id|>\\n\\n` built from its pieces."""
    return [tok.special_id("<|start_header_id|>")] + tok.encode(role) + [tok.special_id("<|end_header_id|>")] + tok.encode("\n\n")


# (task, fields, system text or None, media marker names, user text, response text)
CASES = [
    ("caption", {"caption": "A red circle is on the left."}, None, ["image"], DEFAULT_CAPTION_PROMPT,
     "A red circle is on the left."),
    ("caption", {"caption": " Two shapes. ", "prompt": "  What is shown?\n"}, None, ["image"], "What is shown?",
     "Two shapes."),
    ("vqa", {"question": "What colour is the circle?", "answer": "Red"}, None, ["image"],
     "What colour is the circle?", "Red"),
    ("video_caption", {"caption": "A blue square moves to the top."}, None, ["video"], DEFAULT_VIDEO_PROMPT,
     "A blue square moves to the top."),
    ("video_qa", {"question": short_answer_question("How many shapes are there?"), "answer": "Two"}, None,
     ["video"], "Answer the question using a single word or phrase. How many shapes are there?", "Two"),
    ("asr", {"language": "English", "n_speech_tokens": 3, "text": "the quick brown fox"},
     "Repeat after me in English:", ["speech_start", "speech", "speech", "speech", "speech_end"], "",
     "the quick brown fox"),
    ("ast", {"target_language": "fr", "n_speech_tokens": 1, "translation": "le renard brun"},
     "Translate the following sentence into French:", ["speech_start", "speech", "speech_end"], "",
     "le renard brun"),
]


@pytest.mark.parametrize("task, fields, system, marks, user, response", CASES, ids=[c[0] for c in CASES])
def test_each_task_gives_the_hand_built_ids_and_labels(
    tok: Tokenizer, media: MediaTokens, task, fields, system, marks, user, response
) -> None:
    bos, eot = tok.special_id("<|begin_of_text|>"), tok.special_id("<|eot_id|>")
    expected_prompt = [bos]
    if system is not None:
        expected_prompt += header(tok, "system") + tok.encode(system) + [eot]
    expected_prompt += header(tok, "user") + [getattr(media, m) for m in marks] + tok.encode(user) + [eot]
    expected_prompt += header(tok, "assistant")
    expected_response = tok.encode(response) + [eot]

    assert prompt_ids(tok, media, task, fields) == expected_prompt
    ex = build_example(tok, media, task, fields)
    assert ex.input_ids == expected_prompt + expected_response
    assert ex.labels == [IGNORE_INDEX] * len(expected_prompt) + expected_response
    assert ex.task == task and ex.media == media and ex.num_labels == len(expected_response)
    # no media id is ever a label
    assert not set(ex.labels) & media.all()

    # decoded back, the ids are exactly the Llama 3 chat text
    sys_turn = f"<|start_header_id|>system<|end_header_id|>\n\n{system}<|eot_id|>" if system else ""
    media_text = "".join(MARKS[m] for m in marks)
    assert render(tok, media, ex.input_ids) == (
        f"<|begin_of_text|>{sys_turn}<|start_header_id|>user<|end_header_id|>\n\n{media_text}{user}<|eot_id|>"
        f"<|start_header_id|>assistant<|end_header_id|>\n\n{response}<|eot_id|>"
    )


@pytest.mark.parametrize("task", TASKS)
def test_prompt_is_the_prefix_of_the_training_example_and_needs_no_response(
    tok: Tokenizer, media: MediaTokens, task: str
) -> None:
    fields = next(c[1] for c in CASES if c[0] == task)
    prompt_only = {k: v for k, v in fields.items() if k != RESPONSE_FIELDS[task]}
    prompt = prompt_ids(tok, media, task, prompt_only)
    ex = build_example(tok, media, task, fields)
    assert ex.input_ids[: len(prompt)] == prompt
    assert ex.labels[: len(prompt)] == [IGNORE_INDEX] * len(prompt)
    assert all(y != IGNORE_INDEX for y in ex.labels[len(prompt):])
    assert ex.input_ids[-1] == tok.eot_id and ex.labels[-1] == tok.eot_id


@pytest.mark.parametrize("backend", ["tiktoken", "tokenizers"])
@pytest.mark.parametrize(
    "task, fields, text",
    [
        ("caption", {}, "Describe this image in one sentence."),
        ("caption", {"prompt": "  What is shown here?  "}, "  What is shown here?  "),
        ("vqa", {"question": "What colour is the circle?\n"}, "What colour is the circle?\n"),
    ],
)
def test_image_prompts_equal_image_chat(
    tok: Tokenizer, hf_tok: Tokenizer, media: MediaTokens, backend: str, task: str, fields: dict, text: str
) -> None:
    t = tok if backend == "tiktoken" else hf_tok
    assert prompt_ids(t, media, task, fields) == image_prompt(t, text, media.image, chat=True)


def test_an_image_marker_in_a_typed_prompt_places_the_image_there(tok: Tokenizer, media: MediaTokens) -> None:
    """`vqa "Look at <image> — what colour is it?"` asks as a LLaVA-style record trained with the marker there."""
    chat = image_prompt(tok, "Look at <image> what colour is it?", media.image, chat=True)
    assert chat == ([tok.bos_id] + tok.encode_header("user") + tok.encode("Look at") + [media.image]
                    + tok.encode("what colour is it?") + [tok.eot_id] + tok.encode_header("assistant"))
    plain = image_prompt(tok, "A photo of <image> showing", media.image, chat=False)
    assert plain == tok.encode("A photo of", bos=True) + [media.image] + tok.encode("showing")
    assert image_prompt(tok, "<image>\nWhat is it?", media.image) == image_prompt(tok, "What is it?", media.image)
    with pytest.raises(ValueError, match="holds 2 <image> markers; one image goes in one place"):
        image_prompt(tok, "<image> and <image>?", media.image)


def test_default_caption_prompt_matches_image_chat() -> None:
    assert DEFAULT_CAPTION_PROMPT == IMAGE_CHAT_DEFAULT


# ---------------------------------------------------------------------------------------- speech count
@pytest.mark.parametrize("frames, tokens", [(0, 0), (1, 1), (4, 1), (8, 1), (9, 2), (16, 2), (17, 3), (100, 13), (6000, 750)])
def test_speech_token_count_values(frames: int, tokens: int) -> None:
    assert speech_token_count(frames) == tokens


@given(st.integers(min_value=0, max_value=10**7))
@settings(max_examples=200, deadline=None)
def test_speech_token_count_is_stack4_then_stride2(n: int) -> None:
    stacked = math.ceil(n / 4)
    assert speech_token_count(n) == math.ceil(stacked / 2) == -(-n // 8)


@pytest.mark.parametrize("bad", [-1, 1.5, True, "10"])
def test_speech_token_count_rejects_bad_input(bad) -> None:
    with pytest.raises(ValueError, match="n_frames"):
        speech_token_count(bad)


def test_speech_span(media: MediaTokens) -> None:
    assert speech_span(media, 2) == [media.speech_start, media.speech, media.speech, media.speech_end]
    with pytest.raises(ValueError, match="n_speech_tokens"):
        speech_span(media, 0)


# ---------------------------------------------------------------------------------------- wording
def test_evaluation_wording() -> None:
    assert short_answer_question(" Is it red? ") == "Answer the question using a single word or phrase. Is it red?"
    assert multiple_choice_question("Which shape? (A) circle (B) star") == (
        "Select the correct answer from the following options: Which shape? (A) circle (B) star. "
        "Answer with the correct option letter and nothing else"
    )
    with pytest.raises(ValueError, match="question"):
        short_answer_question("  ")


@pytest.mark.parametrize(
    "given_, name",
    [("en", "English"), ("EN", "English"), ("fr-FR", "French"), ("pt_br", "Portuguese"), ("zh-Hant-TW", "Chinese"),
     ("English", "English"), (" German ", "German"), ("Klingon", "Klingon"), ("xx", "xx")],
)
def test_language_names(given_: str, name: str) -> None:
    assert language_name(given_) == name


# ---------------------------------------------------------------------------------------- labels / truncation
@pytest.mark.parametrize("response", ["", "   \n"])
def test_empty_response_raises_empty_labels_error_naming_the_task(tok, media, response: str) -> None:
    with pytest.raises(EmptyLabelsError, match="'vqa'"):
        build_example(tok, media, "vqa", {"question": "What colour?", "answer": response})
    assert issubclass(EmptyLabelsError, ValueError)


def test_truncation_keeps_the_prompt_and_cuts_the_response(tok: Tokenizer, media: MediaTokens) -> None:
    fields = {"caption": "A red circle is on the left. A blue square is at the top."}
    full = build_example(tok, media, "caption", fields)
    prompt = prompt_ids(tok, media, "caption", fields)
    assert build_example(tok, media, "caption", fields, max_len=len(full)) == full
    cut = build_example(tok, media, "caption", fields, max_len=len(prompt) + 2)
    assert cut.input_ids == full.input_ids[: len(prompt) + 2]
    assert cut.labels == full.labels[: len(prompt) + 2] and cut.num_labels == 2
    assert cut.input_ids[-1] != tok.eot_id  # the eot goes first
    one = build_example(tok, media, "caption", fields, max_len=len(prompt) + 1)
    assert one.num_labels == 1
    for max_len in (len(prompt), len(prompt) - 3, 1):
        with pytest.raises(EmptyLabelsError, match="max_len"):
            build_example(tok, media, "caption", fields, max_len=max_len)
    with pytest.raises(ValueError, match="max_len"):
        build_example(tok, media, "caption", fields, max_len=0)


def test_speech_truncation_never_cuts_the_speech_span(tok: Tokenizer, media: MediaTokens) -> None:
    fields = {"language": "en", "n_speech_tokens": 40, "text": "the quick brown fox jumps over the lazy dog"}
    prompt = prompt_ids(tok, media, "asr", fields)
    ex = build_example(tok, media, "asr", fields, max_len=len(prompt) + 1)
    assert ex.input_ids.count(media.speech) == 40 and media.speech_end in ex.input_ids
    with pytest.raises(EmptyLabelsError, match="'asr'"):
        build_example(tok, media, "asr", fields, max_len=len(prompt) - 1)


# ---------------------------------------------------------------------------------------- errors
def test_unknown_task_is_named(tok: Tokenizer, media: MediaTokens) -> None:
    with pytest.raises(ValueError, match=r"unknown task 'ocr'.*caption"):
        prompt_ids(tok, media, "ocr", {})


@pytest.mark.parametrize(
    "task, fields, field",
    [
        ("caption", {}, "caption"),
        ("vqa", {"answer": "Red"}, "question"),
        ("vqa", {"question": "What?"}, "answer"),
        ("video_qa", {"question": "What?", "answer": None}, "answer"),
        ("asr", {"n_speech_tokens": 3, "text": "hi"}, "language"),
        ("asr", {"language": "en", "text": "hi"}, "n_speech_tokens"),
        ("ast", {"language": "en", "n_speech_tokens": 3, "translation": "hi"}, "target_language"),
        ("ast", {"target_language": "fr", "n_speech_tokens": 3, "text": "hi"}, "translation"),
    ],
)
def test_missing_field_names_the_field_and_the_task(tok, media, task: str, fields: dict, field: str) -> None:
    with pytest.raises(ValueError, match=rf"task '{task}'.*'{field}'") as info:
        build_example(tok, media, task, fields)
    assert not isinstance(info.value, EmptyLabelsError)


@pytest.mark.parametrize(
    "task, fields, field",
    [
        ("vqa", {"question": 3, "answer": "Red"}, "question"),
        ("vqa", {"question": "  ", "answer": "Red"}, "question"),
        ("caption", {"prompt": "", "caption": "x"}, "prompt"),
        ("asr", {"language": "en", "n_speech_tokens": 0, "text": "hi"}, "n_speech_tokens"),
        ("asr", {"language": "en", "n_speech_tokens": True, "text": "hi"}, "n_speech_tokens"),
        ("asr", {"language": "en", "n_speech_tokens": 2.0, "text": "hi"}, "n_speech_tokens"),
    ],
)
def test_bad_field_values_are_named(tok, media, task: str, fields: dict, field: str) -> None:
    with pytest.raises(ValueError, match=rf"task '{task}'.*'{field}'"):
        build_example(tok, media, task, fields)


def test_media_ids_must_not_collide_with_the_vocabulary(tok: Tokenizer) -> None:
    with pytest.raises(ValueError, match="MediaTokens"):
        prompt_ids(tok, MediaTokens(tok.vocab_size - 1), "caption", {})


def test_example_lengths_must_agree() -> None:
    with pytest.raises(ValueError, match="same length"):
        Example(input_ids=[1, 2, 3], labels=[-100, 2])


def test_a_conversation_labels_every_answer_and_nothing_else(tok: Tokenizer, media: MediaTokens) -> None:
    fields = {"question": "What colour is the circle?", "answer": "Red",
              "turns": [("How many shapes are there?", "Two"), ("Where is the square?", "at the top")]}
    ex = build_example(tok, media, "vqa", fields)
    single = build_example(tok, media, "vqa", {"question": fields["question"], "answer": "Red"})
    assert ex.input_ids[:len(single)] == single.input_ids and ex.labels[:len(single)] == single.labels
    later = []
    for question, answer in fields["turns"]:
        asked = header(tok, "user") + tok.encode(question) + [tok.eot_id] + header(tok, "assistant")
        later.append((asked, tok.encode(answer) + [tok.eot_id]))
    assert ex.input_ids[len(single):] == [i for asked, answered in later for i in asked + answered]
    assert ex.labels[len(single):] == [i for asked, answered in later
                                       for i in [IGNORE_INDEX] * len(asked) + answered]
    cut = build_example(tok, media, "vqa", fields, max_len=len(single) + len(later[0][0]) + len(later[0][1]) + 3)
    assert cut.input_ids == single.input_ids + later[0][0] + later[0][1]  # a turn that does not fit is left out whole

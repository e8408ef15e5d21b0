"""Conversation records in the public formats — LLaVA / ShareGPT ``conversations`` and OpenAI / Hugging Face
chat ``messages`` — through the reader training uses, the label mask, `mm-llama shards` and the loader.

Expected token sequences are written by hand from special-token ids and plain-text encodes of each piece
(`header` builds ``<|start_header_id|>role<|end_header_id|>\\n\\n`` from its parts), never by the code
under test.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch

from mm_llama.data.manifest import write_shards
from mm_llama.data.pipelines import image_text_loader
from mm_llama.data.prompts import IGNORE_INDEX, build_example, prompt_ids
from mm_llama.data.records import IMAGE_SLOT, RecordError, read_question_answer
from mm_llama.data.shard_writer import ShardWriter
from mm_llama.data.tasks import get_task
from mm_llama.media_tokens import MediaTokens
from mm_llama.tokenizer import Tokenizer
from tests.data.test_decoders import make_image
from tests.data.test_pipelines import collect, config, image_bytes, tokenizer
from tests.data.test_prompts import header

LLAVA = {"image": "media/red.png", "id": "llava-1", "conversations": [
    {"from": "system", "value": "Answer briefly."},
    {"from": "human", "value": "Look at this picture:\n<image>\nWhat is it?"},
    {"from": "gpt", "value": "A red circle."},
    {"from": "human", "value": "Where is it?"},
    {"from": "gpt", "value": "On the left."},
]}

MESSAGES = {"image": "media/blue.png", "messages": [
    {"role": "user", "content": [{"type": "text", "text": "What shape is this? "}, {"type": "image"},
                                 {"type": "text", "text": " Answer in words."}]},
    {"role": "assistant", "content": [{"type": "text", "text": "A circle."}]},
    {"role": "user", "content": "And its colour?"},
    {"role": "assistant", "content": "Red."},
    {"role": "user", "content": "Thanks!"},  # a trailing user message: nothing to label, dropped
]}


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    return tokenizer()


@pytest.fixture(scope="module")
def media(tok: Tokenizer) -> MediaTokens:
    return MediaTokens(tok.vocab_size)


def example(tok: Tokenizer, media: MediaTokens, meta: dict[str, Any]):
    """The training example of a KEY.json, read and built as the loader does."""
    return build_example(tok, media, "vqa", get_task("vqa").read(None, meta).fields)


def labelled_spans(tok: Tokenizer, input_ids: list[int], labels: list[int]) -> list[str]:
    """Each run of labelled positions decoded (special tokens spelled out); labels must equal the ids there."""
    spans: list[list[int]] = []
    for i, (x, y) in enumerate(zip(input_ids, labels)):
        if y == IGNORE_INDEX:
            continue
        assert y == x, f"label {y} at {i} is not the input id {x}"
        if spans and labels[i - 1] != IGNORE_INDEX:
            spans[-1].append(y)
        else:
            spans.append([y])
    return [tok.decode(s) for s in spans]


def turn(tok: Tokenizer, role: str, text: str) -> list[int]:
    return header(tok, role) + tok.encode(text) + [tok.eot_id]


# --------------------------------------------------------------------------------------------------
# (a) label mask and image place


def test_a_llava_record_labels_exactly_the_assistant_turns_with_the_image_where_the_marker_stood(
        tok: Tokenizer, media: MediaTokens) -> None:
    ex = example(tok, media, LLAVA)
    before_image = ([tok.bos_id] + turn(tok, "system", "Answer briefly.") + header(tok, "user")
                    + tok.encode("Look at this picture:"))
    expected = (before_image + [media.image] + tok.encode("What is it?") + [tok.eot_id] + header(tok, "assistant")
                + tok.encode("A red circle.") + [tok.eot_id] + turn(tok, "user", "Where is it?")
                + header(tok, "assistant") + tok.encode("On the left.") + [tok.eot_id])
    assert ex.input_ids == expected
    assert ex.input_ids.index(media.image) == len(before_image) and ex.input_ids.count(media.image) == 1
    assert labelled_spans(tok, ex.input_ids, ex.labels) == ["A red circle.<|eot_id|>", "On the left.<|eot_id|>"]
    assert ex.num_labels == len(tok.encode("A red circle.")) + len(tok.encode("On the left.")) + 2


def test_a_messages_record_labels_exactly_the_assistant_turns_with_the_image_where_its_part_stood(
        tok: Tokenizer, media: MediaTokens) -> None:
    ex = example(tok, media, MESSAGES)
    before_image = [tok.bos_id] + header(tok, "user") + tok.encode("What shape is this?")
    expected = (before_image + [media.image] + tok.encode("Answer in words.") + [tok.eot_id]
                + header(tok, "assistant") + tok.encode("A circle.") + [tok.eot_id]
                + turn(tok, "user", "And its colour?") + header(tok, "assistant") + tok.encode("Red.") + [tok.eot_id])
    assert ex.input_ids == expected  # no system turn, the trailing "Thanks!" dropped
    assert ex.input_ids.index(media.image) == len(before_image) and ex.input_ids.count(media.image) == 1
    assert labelled_spans(tok, ex.input_ids, ex.labels) == ["A circle.<|eot_id|>", "Red.<|eot_id|>"]


def test_without_a_marker_the_image_opens_the_first_user_turn_as_for_turns_records(
        tok: Tokenizer, media: MediaTokens) -> None:
    turns = {"turns": [{"question": "What is it?", "answer": "A red circle."},
                       {"question": "Where is it?", "answer": "On the left."}]}
    llava = {"conversations": [{"from": "human", "value": "What is it?"}, {"from": "gpt", "value": "A red circle."},
                               {"from": "human", "value": "Where is it?"}, {"from": "gpt", "value": "On the left."}]}
    chat = {"messages": [{"role": "user", "content": "What is it?"}, {"role": "assistant", "content": "A red circle."},
                         {"role": "user", "content": [{"type": "text", "text": "Where is it?"}]},
                         {"role": "assistant", "content": "On the left."}]}
    marker_first = {"conversations": [{"from": "human", "value": "<image>\nWhat is it?"}, *llava["conversations"][1:]]}
    capitalised = {"conversations": [{**m, "from": {"human": "Human", "gpt": " GPT"}[m["from"]]}
                                     for m in llava["conversations"]]}  # as some ShareGPT dumps write them
    image_url_first = {"messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "https://example.com/x.png"}}, {"type": "text", "text": "What is it?"}]},
        *chat["messages"][1:]]}
    want = example(tok, media, turns)
    assert want.input_ids[:len(header(tok, "user")) + 2] == [tok.bos_id] + header(tok, "user") + [media.image]
    for meta in (llava, chat, marker_first, image_url_first, capitalised):
        ex = example(tok, media, meta)
        assert (ex.input_ids, ex.labels) == (want.input_ids, want.labels), meta


def test_the_first_assistant_answer_is_the_reference_and_evaluation_asks_as_training_did(
        tok: Tokenizer, media: MediaTokens) -> None:
    record = get_task("caption_vqa").read(None, {**LLAVA, "image_key": "k"})
    assert record.references == ("A red circle.",) and record.extra == {"image_key": "k"}
    assert record.fields["question"] == f"Look at this picture:\n{IMAGE_SLOT}\nWhat is it?"
    assert record.fields["system"] == "Answer briefly." and record.fields["turns"] == [("Where is it?", "On the left.")]
    prompt = prompt_ids(tok, media, "vqa", {"question": record.fields["question"], "system": "Answer briefly."})
    ex = example(tok, media, LLAVA)
    assert ex.input_ids[:len(prompt)] == prompt and ex.labels[len(prompt) - 1] == IGNORE_INDEX != ex.labels[len(prompt)]


# --------------------------------------------------------------------------------------------------
# (c) malformed records: a skip with its reason


def llava(*messages: tuple[str, Any]) -> dict[str, Any]:
    return {"conversations": [{"from": role, "value": value} for role, value in messages]}


BAD = [
    ("two <image>", llava(("human", "<image> and <image>?"), ("gpt", "a")), "bad_field", "holds 2 image markers"),
    ("image part and marker", {"messages": [
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "<image> what?"}]},
        {"role": "assistant", "content": "a"}]}, "bad_field", "holds 2 image markers"),
    ("user, user", llava(("human", "q"), ("human", "q2"), ("gpt", "a")), "bad_field",
     "conversations[1] has role 'user' where 'assistant' was expected"),
    ("assistant first", llava(("gpt", "a"), ("human", "q")), "bad_field",
     "conversations[0] has role 'assistant' where 'user' was expected"),
    ("late system", llava(("human", "q"), ("gpt", "a"), ("system", "s"), ("gpt", "b")), "bad_field",
     "conversations[2] is a system message; one may only come first"),
    ("non-string value", llava(("human", ["q"]), ("gpt", "a")), "bad_field",
     "conversations[0]['value'] must be a string, got list"),
    ("non-string content", {"messages": [{"role": "user", "content": 7}, {"role": "assistant", "content": "a"}]},
     "bad_field", "messages[0]['content'] must be a string or a list of content parts, got int"),
    ("audio part", {"messages": [{"role": "user", "content": [{"type": "audio"}]},
                                 {"role": "assistant", "content": "a"}]}, "bad_field", "messages[0]['content'][0]"),
    ("unknown role", llava(("human", "q"), ("bot", "a")), "bad_field", "conversations[1]['from'] is 'bot'"),
    ("marker in an answer", llava(("human", "q"), ("gpt", "<image>")), "bad_field",
     "the image marker is in conversations[1] (assistant)"),
    ("marker in a later question", llava(("human", "q"), ("gpt", "a"), ("human", "<image> q"), ("gpt", "b")),
     "bad_field", "it must be in the first user message, conversations[0]"),
    ("empty question", llava(("human", "  "), ("gpt", "a")), "bad_field", "conversations[0] is an empty user message"),
    ("object replacement character", llava(("human", "q \ufffc"), ("gpt", "a")), "bad_field", "holds U+FFFC"),
    ("no answer", llava(("human", "<image> q")), "missing_field", "no user message answered"),
    ("empty answer", llava(("human", "q"), ("gpt", " ")), "empty_labels", "empty assistant message"),
    ("two conversations", {**llava(("human", "q"), ("gpt", "a")), "messages": [{"role": "user", "content": "q"}]},
     "bad_field", "a record holds one conversation"),
    ("not a list", {"messages": "hello"}, "bad_field", "must be a non-empty list"),
    ("U+FFFC in a plain question", {"question": "what \ufffc?", "answer": "a"}, "bad_field", "holds U+FFFC"),
]


@pytest.mark.parametrize("meta, reason, message", [b[1:] for b in BAD], ids=[b[0] for b in BAD])
def test_malformed_conversations_are_skipped_with_their_reason(meta: dict[str, Any], reason: str, message: str) -> None:
    with pytest.raises(RecordError) as caught:
        read_question_answer(None, meta)
    assert caught.value.reason == reason and message in str(caught.value), str(caught.value)


def test_a_later_question_may_not_hold_the_image_slot(tok: Tokenizer, media: MediaTokens) -> None:
    fields = {"question": "q", "answer": "a", "turns": [(f"{IMAGE_SLOT} q2", "b")]}
    with pytest.raises(ValueError, match="first question"):
        build_example(tok, media, "vqa", fields)


# --------------------------------------------------------------------------------------------------
# (b) manifest → shards → the training loader


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("chat")
    (root / "media").mkdir()
    for i, name in enumerate(("red", "blue", "green")):
        (root / "media" / f"{name}.png").write_bytes(make_image("PNG", size=(30 + i, 20), color=(60 * i, 90, 200)))
    return root


def manifest(root: Path, name: str, lines: list[dict[str, Any]]) -> Path:
    path = root / f"{name}.jsonl"
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    return path


def variants(record: dict[str, Any]) -> list[dict[str, Any]]:
    """The record on each of the three images, with keys."""
    return [{**record, "image": f"media/{c}.png", "key": f"{c}-{i}"} for i, c in enumerate(("red", "blue", "green"))]


@pytest.mark.parametrize("record, answers", [(LLAVA, ["A red circle.", "On the left."]),
                                             (MESSAGES, ["A circle.", "Red."])], ids=["llava", "messages"])
def test_shards_written_from_a_manifest_train_with_no_skip(tok: Tokenizer, media: MediaTokens, folder: Path,
                                                           tmp_path: Path, record: dict[str, Any],
                                                           answers: list[str]) -> None:
    lines = variants(record)
    stats = write_shards(manifest(folder, tmp_path.name, lines), tmp_path / "shards", progress=False)
    assert (stats["samples"], stats["skipped"], stats["layouts"]["image-qa"]) == (3, 0, 3)
    loader = image_text_loader(config(str(tmp_path / "shards" / "*.tar"), batch_size=3, shuffle=False),
                               tok, task="vqa", media=media)
    batches, sources = collect(loader)
    assert loader.stats.skipped_total == 0 and loader.stats.samples == 3 and len(sources) == 3
    text = batches[0].text
    for b in range(3):
        ids = text.input_ids[b][text.attention_mask[b]].tolist()
        labels = text.labels[b][text.attention_mask[b]].tolist()
        assert ids.count(media.image) == 1
        assert labelled_spans(tok, ids, labels) == [f"{a}<|eot_id|>" for a in answers]
        built = example(tok, media, {k: v for k, v in record.items() if k != "image"})
        assert (ids, labels) == (built.input_ids, built.labels)  # the loader builds what the reader says
    assert torch.equal(batches[0].images.tile_mask[:, 0, 0], torch.ones(3, dtype=torch.bool))


def test_the_conversation_is_copied_into_key_json_as_given(folder: Path, tmp_path: Path) -> None:
    import webdataset as wds

    stats = write_shards(manifest(folder, "copy", [LLAVA, MESSAGES]), tmp_path / "out", progress=False)
    samples = {s["__key__"]: json.loads(s["json"])
               for s in wds.WebDataset([str(tmp_path / "out" / n) for n in stats["shards"]], shardshuffle=False)}
    assert samples["000000001"]["conversations"] == LLAVA["conversations"] and samples["000000001"]["id"] == "llava-1"
    assert samples["000000002"]["messages"] == MESSAGES["messages"]
    assert "question" not in samples["000000001"] and "turns" not in samples["000000002"]


def test_malformed_manifest_lines_are_skipped_with_their_reason(folder: Path, tmp_path: Path) -> None:
    lines = [{"image": "media/red.png", **meta} for _, meta, _, _ in (BAD[0], BAD[2], BAD[5], BAD[6])]
    lines.append({**LLAVA, "question": "also?"})
    stats = write_shards(manifest(folder, "bad", lines), tmp_path / "out", progress=False)
    assert stats["samples"] == 0 and stats["skipped"] == 5
    reasons = [s["reason"] for s in stats["skipped_samples"]]
    for reason, (_, _, code, message) in zip(reasons, (BAD[0], BAD[2], BAD[5], BAD[6])):
        assert message in reason and f"({code})" in reason, reason
    assert reasons[0].startswith("'conversations': ") and reasons[3].startswith("'messages': ")
    assert "has both 'conversations' and 'question'/'answer'" in reasons[4]


def test_malformed_records_in_shards_are_counted_by_reason(tok: Tokenizer, media: MediaTokens, tmp_path: Path) -> None:
    bad = [meta for _, meta, _, _ in (BAD[0], BAD[2], BAD[5], BAD[6], BAD[14])]
    with ShardWriter(tmp_path, samples_per_shard=10) as w:
        for i, meta in enumerate([LLAVA, *bad]):
            w.write(f"{i:09d}", {"png": image_bytes("PNG", 40, 30, i), "json": json.dumps(meta).encode()})
    loader = image_text_loader(config([str(p) for p in w.shards], max_skip_fraction=1.0), tok, task="vqa",
                               media=media)
    _, sources = collect(loader)
    assert len(sources) == 1 and loader.stats.skipped == {"bad_field": 4, "empty_labels": 1}


def test_a_question_wording_wraps_each_question_and_keeps_the_image_in_place(tok: Tokenizer, media: MediaTokens,
                                                                             folder: Path, tmp_path: Path) -> None:
    write_shards(manifest(folder, "wording", [LLAVA]), tmp_path / "shards", progress=False)
    loader = image_text_loader(config(str(tmp_path / "shards" / "*.tar"), batch_size=1), tok, task="vqa",
                               media=media, prompt="Answer briefly. {question}")
    (batch,), _ = collect(loader)
    ids = batch.text.input_ids[0][batch.text.attention_mask[0]].tolist()
    expected = ([tok.bos_id] + turn(tok, "system", "Answer briefly.") + header(tok, "user")
                + tok.encode("Answer briefly. Look at this picture:") + [media.image] + tok.encode("What is it?")
                + [tok.eot_id] + header(tok, "assistant") + tok.encode("A red circle.") + [tok.eot_id]
                + turn(tok, "user", "Answer briefly. Where is it?") + header(tok, "assistant")
                + tok.encode("On the left.") + [tok.eot_id])
    assert ids == expected

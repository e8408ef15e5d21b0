"""Record readers and the task registry: one reader per task for training and evaluation, skip reasons,
VQA v2 answer lists, caption lists, mixtures."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from mm_llama.data.pipelines import image_text_loader
from mm_llama.data.prompts import RESPONSE_FIELDS, TASKS
from mm_llama.data.records import EmptyReferenceError, RecordError, read_caption, read_question_answer
from mm_llama.data.tasks import get_task, task_names
from tests.data.test_pipelines import collect, config, image_bytes, labelled_text, tokenizer, write_shards


def test_vqa_v2_answer_lists_target_the_most_frequent_answer() -> None:
    answers = [{"answer": "two", "answer_confidence": "yes"}, {"answer": "2"}, {"answer": "2"}, "two", " 2 "]
    record = read_question_answer(None, {"question": "How many?", "answers": answers, "type": "count",
                                         "image_key": "img-7"})
    assert record.fields == {"question": "How many?", "answer": "2"}
    assert record.references == ("2", "two", "2", "two", "2")  # every answer kept: VQA scoring counts matches
    assert (record.qtype, record.extra) == ("count", {"image_key": "img-7"})
    tie = read_question_answer(None, {"question": "q", "answers": ["b", "a", "a", "b"]})
    assert tie.fields["answer"] == "b"  # the first of the equally frequent answers


def test_caption_references_come_from_txt_json_and_a_captions_list() -> None:
    record = read_caption(" a red circle ", {"captions": ["a red circle", "one circle, red", ""]})
    assert record.fields == {"caption": "a red circle"} and record.references == ("a red circle", "one circle, red")
    assert read_caption(None, {"caption": "a cat"}).references == ("a cat",)
    assert read_caption(None, {"captions": ["x", "y"]}).fields == {"caption": "x"}


@pytest.mark.parametrize("reader, text, meta, reason", [
    (read_caption, None, {}, "missing_field"),
    (read_caption, "  ", {}, "empty_labels"),
    (read_caption, None, {"caption": 3}, "bad_field"),
    (read_question_answer, None, {"answer": "red"}, "missing_field"),
    (read_question_answer, None, {"question": "q", "answers": [{"text": "red"}]}, "bad_field"),
    (read_question_answer, None, {"question": "q", "answer": " "}, "empty_labels"),
])
def test_unusable_records_name_their_skip_reason(reader, text, meta, reason: str) -> None:
    with pytest.raises(RecordError) as caught:
        reader(text, meta)
    assert caught.value.reason == reason
    assert isinstance(caught.value, EmptyReferenceError) == (reason == "empty_labels")


def test_the_registry_names_each_task_once() -> None:
    assert task_names("image_text") == ("caption", "vqa", "caption_vqa")
    assert task_names("audio_text") == ("asr", "ast")
    assert TASKS == ("caption", "vqa", "video_caption", "video_qa", "asr", "ast")
    assert RESPONSE_FIELDS == {"caption": "caption", "vqa": "answer", "video_caption": "caption",
                               "video_qa": "answer", "asr": "text", "ast": "translation"}
    mixture = get_task("caption_vqa")
    assert mixture.resolve({"question": "q", "answer": "a"}).name == "vqa"
    assert mixture.resolve({"source": "x"}).name == "caption"
    assert get_task("caption_vqa").layouts == ("image-qa", "image-caption")
    with pytest.raises(ValueError, match=r"unknown task 'vqa2'; expected one of caption, vqa, caption_vqa"):
        get_task("vqa2")


def test_training_reads_vqa_v2_records_as_evaluation_does(tmp_path: Path) -> None:
    answers = [{"answer": "blue"}, {"answer": "red"}, {"answer": "red"}]
    sample = {"png": image_bytes("PNG", 40, 30, 1),
              "json": json.dumps({"question": "what colour is it?", "answers": answers}).encode()}
    shards = write_shards(tmp_path, [sample])
    (batch,), _ = collect(image_text_loader(config(shards, batch_size=1), tokenizer(), task="vqa"))
    assert labelled_text(tokenizer(), batch.text.input_ids[0], batch.text.labels[0]).strip() == "red"


def test_a_conversation_record_asks_its_turns_in_order() -> None:
    turns = [{"question": "What character is shown?", "answers": ["7", "7", "1"], "type": "identity"},
             {"question": "Where is it?", "answer": " top left "}, {"question": "Colour?", "answers": [{"answer": "red"}]}]
    record = read_question_answer(None, {"turns": turns, "image_key": "k"})
    assert record.fields == {"question": "What character is shown?", "answer": "7",
                             "turns": [("Where is it?", "top left"), ("Colour?", "red")]}
    assert record.references == ("7", "7", "1")  # evaluation scores the first turn
    assert (record.qtype, record.extra) == ("identity", {"image_key": "k"})
    assert get_task("caption_vqa").resolve({"turns": turns}).name == "vqa"
    for bad in ([], "q?", [{"question": "q"}], [{"question": "q", "answer": "a"}, {"question": " ", "answer": "b"}]):
        with pytest.raises(RecordError):
            read_question_answer(None, {"turns": bad})

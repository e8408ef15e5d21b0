"""Evaluation: metrics on hand-computed cases, the sequential shard reader, and `evaluate` end to end on a
tiny random Llama 3.2 Vision model over synthetic shapes shards."""

from __future__ import annotations

import io
import json
import tarfile
import warnings
from pathlib import Path

import pytest
import torch
from PIL import Image

from mm_llama.data.image_transform import ImageTransform, collate_images
from mm_llama.data.prompts import DEFAULT_CAPTION_PROMPT, prompt_ids
from mm_llama.data.synth import write_synth
from mm_llama.media_tokens import MediaTokens
from mm_llama.tokenizer import Tokenizer
from mm_llama.train import evaluation
from mm_llama.train.eval_reader import CorruptSampleWarning, EvalShardReader, expand_eval_shards, split_member_name
from mm_llama.train.evaluation import (
    BLANK_GREY,
    caption_tokens,
    cider,
    cider_scores,
    evaluate,
    exact_match,
    majority_baseline,
    normalize_answer,
    question_type,
    vqa_accuracy,
    vqa_score,
    write_result,
)


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny models gain nothing from intra-op threads, and on a busy 2-core machine OpenMP's spinning
    threads make them orders of magnitude slower; run this module single-threaded."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# --------------------------------------------------------------------------------------------------
# normalisation and answer metrics


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("Two.", "2"),
        ("two", "2"),
        ("The Red Circle!", "red circle"),
        ("  an   apple\t", "apple"),
        ("A", ""),
        ("", ""),
        ("Yes.", "yes"),
        ("1,000", "1000"),
        ("1, 2", "1 2"),
        ("left,right", "left right"),
        ("3.5", "3.5"),
        ("3.5.", "3.5"),
        ("t-shirt", "t shirt"),
        ("don't know", "dont know"),
        ("What\u2019s that?", "whats that"),
        ("none", "0"),
        ("Ten apples", "10 apples"),
        ("twenty-one", "20 1"),
        ("snake_case", "snake case"),
        ("Theory", "theory"),  # articles are whole words only
    ],
)
def test_normalize_answer_table(text: str, expected: str) -> None:
    assert normalize_answer(text) == expected


def test_normalize_answer_rejects_non_strings() -> None:
    with pytest.raises(TypeError, match="expects a str"):
        normalize_answer(2)  # type: ignore[arg-type]


def test_vqa_accuracy_single_and_multi_reference() -> None:
    predictions = ["2", "Red", "cat", "yes", "blue"]
    references = [
        "two",                            # single: match → 1
        ["red", "red"] + ["blue"] * 8,    # 10 answers, 2 match → 2/3
        ["cat", "dog", "cat", "cat"],     # 3 match → 1
        "no",                             # single: no match → 0
        ["blue"],                         # list of one = exact match → 1
    ]
    assert [vqa_score(p, r) for p, r in zip(predictions, references)] == pytest.approx([1, 2 / 3, 1, 0, 1])
    assert vqa_accuracy(predictions, references) == pytest.approx((1 + 2 / 3 + 1 + 0 + 1) / 5)
    # exact match: any reference counts in full
    assert exact_match(predictions, references) == pytest.approx(4 / 5)
    assert vqa_score("blue", ["blue", "navy"]) == pytest.approx(0.5)  # two references: both needed for full credit


def test_answer_metrics_reject_mismatched_or_empty_input() -> None:
    with pytest.raises(ValueError, match="2 predictions but 1 references"):
        vqa_accuracy(["a", "b"], ["a"])
    with pytest.raises(ValueError, match="no predictions"):
        exact_match([], [])
    with pytest.raises(ValueError, match=r"references\[0\]"):
        exact_match(["a"], [[]])


# --------------------------------------------------------------------------------------------------
# CIDEr


def test_caption_tokens_lowercase_strip_punctuation_keep_articles() -> None:
    assert caption_tokens("A Red circle, on the LEFT.") == ["a", "red", "circle", "on", "the", "left"]
    assert caption_tokens("  ") == []


def test_cider_identical_captions_beat_unrelated_ones() -> None:
    refs = [["a red circle on the left"], ["two blue squares at the top"], ["a green star in the middle"]]
    identical = cider([r[0] for r in refs], refs)
    unrelated = cider(["purple hexagon", "nothing here", "big yellow diamond"], refs)
    assert identical > 0
    assert unrelated == 0.0
    assert identical > cider(["a red circle", "blue squares", "a star"], refs) > unrelated


def test_cider_matches_pycocoevalcap_on_the_same_tokens() -> None:
    from pycocoevalcap.cider.cider import Cider

    predictions = ["A red circle.", "Two BLUE squares!", "a star"]
    references = [["a red circle", "one red circle on the left"], ["two blue squares", "blue squares"],
                  ["a green star in the middle"]]
    expected, expected_each = Cider().compute_score(
        {0: ["a red circle", "one red circle on the left"], 1: ["two blue squares", "blue squares"],
         2: ["a green star in the middle"]},
        {0: ["a red circle"], 1: ["two blue squares"], 2: ["a star"]},
    )
    score, each = cider_scores(predictions, references)
    assert score == pytest.approx(float(expected), abs=1e-12)
    assert each == pytest.approx([float(x) for x in expected_each], abs=1e-12)
    assert cider(predictions, references) == pytest.approx(score)


def test_cider_edge_cases() -> None:
    # one image: every n-gram is in every "document", so the IDF (and the score) is 0
    assert cider(["a red circle"], [["a red circle"]]) == 0.0
    # an empty prediction scores 0 without crashing; a single string reference is accepted
    assert cider_scores(["", "blue squares"], ["a red circle", "two blue squares"])[1][0] == 0.0
    with pytest.raises(ValueError, match="empty after tokenisation"):
        cider(["x", "y"], [["..."], ["y"]])


# --------------------------------------------------------------------------------------------------
# majority baseline

QUESTIONS = ["How many circles?", "How many squares?", "How many stars?", "What colour is the star?",
             "What colour is the circle?", "What colour is the square?", "Is there a star?"]
ANSWERS = ["2", "two", "1", "red", "blue", "Red", "yes"]
TYPES = ["count", "count", "count", "colour", "colour", "colour", None]


def test_majority_baseline_by_type_field() -> None:
    # count → "2" right 2 of 3; colour → "red" right 2 of 3; the untyped question is its own group → 1
    assert majority_baseline(QUESTIONS, ANSWERS, key=TYPES) == pytest.approx(5 / 7)


def test_majority_baseline_by_function_and_default_question_text() -> None:
    assert majority_baseline(QUESTIONS, ANSWERS, key=lambda q: q.split()[0]) == pytest.approx(5 / 7)
    # default: the normalised question text (nouns kept), so every question here is its own group
    assert question_type("How many circles?") == "how many circles"
    assert question_type("What colour is THE star") == question_type("what colour is the star?")
    assert majority_baseline(QUESTIONS, ANSWERS) == 1.0
    # repeated question strings share a group
    assert majority_baseline(["Is it red?"] * 4, ["yes", "yes", "no", "yes"]) == pytest.approx(3 / 4)


def test_majority_baseline_ties_and_multiple_references() -> None:
    # tie between blue and red → alphabetically first ("blue")
    assert majority_baseline(["q", "q"], ["red", "blue"], key=["t", "t"]) == pytest.approx(0.5)
    # multi-reference answers: counts over all references; scored by the VQA rule
    answers = [["cat", "cat", "cat"], ["cat", "dog", "dog"]]
    assert majority_baseline(["q1", "q2"], answers, key=["t", "t"]) == pytest.approx((1 + 1 / 3) / 2)
    with pytest.raises(ValueError, match="2 questions but 1 answers"):
        majority_baseline(["a", "b"], ["x"])
    with pytest.raises(ValueError, match="1 types for 2 questions"):
        majority_baseline(["a", "b"], ["x", "y"], key=["t"])


# --------------------------------------------------------------------------------------------------
# data: synthetic shapes test shards and damaged copies


@pytest.fixture(scope="module")
def synth_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("synth")
    write_synth("shapes", out, n=3, seed=0, split="test", samples_per_shard=4)
    return out


def _read_tar(path: Path) -> list[tuple[str, bytes]]:
    with tarfile.open(path) as tar:
        return [(m.name, tar.extractfile(m).read()) for m in tar if m.isfile()]  # type: ignore[union-attr]


def _write_tar(path: Path, members: list[tuple[str, bytes]]) -> Path:
    with tarfile.open(path, "w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


@pytest.fixture(scope="module")
def damaged_dir(synth_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Two shards: `a.tar` = 4 QA samples of which #1 has an undecodable png and #2 a json without an
    answer; `b.tar` = a shard cut in the header of its 2nd sample (its 1st sample survives)."""
    out = tmp_path_factory.mktemp("damaged")
    members = _read_tar(sorted((synth_dir / "image-qa").glob("*.tar"))[0])
    fixed = []
    for name, data in members:
        if name.endswith("-q1.png"):
            data = b"\x89PNG\r\n\x1a\n not really a png"
        if name.endswith("-q2.json"):
            meta = json.loads(data)
            del meta["answer"]
            data = json.dumps(meta).encode()
        fixed.append((name, data))
    _write_tar(out / "a.tar", fixed)
    whole = _write_tar(out / "whole.tar", members[:4])  # 2 samples: json + png each
    with tarfile.open(whole) as tar:
        third_header = tar.getmembers()[2].offset
    (out / "b.tar").write_bytes(whole.read_bytes()[: third_header + 300])  # cut inside the 3rd header
    whole.unlink()
    return out


def test_split_member_name_like_webdataset() -> None:
    assert split_member_name("dir/abc.seg.png") == ("dir/abc", "seg.png")
    assert split_member_name("k-q0.JSON") == ("k-q0", "json")
    assert split_member_name("README") is None
    assert split_member_name("d/.hidden.txt") is None


def test_expand_eval_shards(synth_dir: Path, tmp_path: Path) -> None:
    qa = synth_dir / "image-qa"
    listed = sorted(str(p) for p in qa.glob("*.tar"))
    assert expand_eval_shards(qa) == listed
    assert expand_eval_shards(str(qa / "*.tar")) == listed
    assert expand_eval_shards(str(qa / "test-{000000..000001}.tar")) == listed[:2]
    assert expand_eval_shards([listed[1], listed[0]]) == [listed[1], listed[0]]  # order as given
    with pytest.raises(ValueError, match="does not exist"):
        expand_eval_shards(tmp_path / "nope.tar")
    with pytest.raises(ValueError, match="holds no"):
        expand_eval_shards(tmp_path)
    # the specs training takes: remote URLs and pipe: commands pass through as given, `::` joins patterns
    assert expand_eval_shards("https://example.com/a-{0..1}.tar") == ["https://example.com/a-0.tar",
                                                                      "https://example.com/a-1.tar"]
    assert expand_eval_shards([f"pipe:cat {listed[0]}", listed[1]]) == [f"pipe:cat {listed[0]}", listed[1]]
    assert expand_eval_shards(f"{listed[0]}::{listed[1]}") == listed[:2]


def test_reader_yields_every_sample_in_tar_order(synth_dir: Path) -> None:
    shards = sorted((synth_dir / "image-qa").glob("*.tar"))
    expected = []
    for shard in shards:
        for name, _ in _read_tar(shard):
            key = name.split(".")[0]
            if not expected or expected[-1] != (str(shard), key):
                expected.append((str(shard), key))
    reader = EvalShardReader(synth_dir / "image-qa")
    samples = list(reader)
    assert [(s["shard"], s["key"]) for s in samples] == expected
    assert reader.count_samples() == len(samples) == 18 and reader.skipped == []
    first = samples[0]
    assert isinstance(first["image"], Image.Image) and first["image"].mode == "RGB"
    assert set(first["json"]) >= {"question", "answer", "type"} and first["txt"] is None
    assert first["image_name"] == f"{first['shard']}:{first['key']}.png"
    assert [s["key"] for s in EvalShardReader(synth_dir / "image-qa")] == [s["key"] for s in samples]  # stable
    captions = list(EvalShardReader(synth_dir / "image-caption"))
    assert len(captions) == 3 and all(isinstance(s["txt"], str) and s["txt"] for s in captions)


def test_reader_skips_and_names_damaged_samples_and_shards(damaged_dir: Path) -> None:
    reader = EvalShardReader([damaged_dir / "a.tar", damaged_dir / "b.tar"])
    with pytest.warns(CorruptSampleWarning) as caught:
        samples = list(reader)
    keys = [s["key"] for s in samples]
    assert len(keys) == 4  # a.tar: 3 (the bad png is skipped; the answerless json is the eval loop's business)
    assert not any(k.endswith("-q1") and s["shard"].endswith("a.tar") for k, s in zip(keys, samples))
    assert [s.key for s in reader.skipped if s.key is not None] == [keys[0].rsplit("-", 1)[0] + "-q1"]
    damaged = [s for s in reader.skipped if s.key is None]
    assert len(damaged) == 1 and damaged[0].shard.endswith("b.tar") and "corrupt tar header" in damaged[0].reason
    messages = [str(w.message) for w in caught]
    assert any("a.tar" in m and "-q1" in m for m in messages)
    assert any("b.tar" in m for m in messages)


def test_reader_names_shards_cut_inside_a_member_or_not_tar_at_all(synth_dir: Path, tmp_path: Path) -> None:
    members = _read_tar(sorted((synth_dir / "image-qa").glob("*.tar"))[0])[:4]  # 2 samples: json + png each
    whole = _write_tar(tmp_path / "whole.tar", members).read_bytes()
    png_data_end = 512 * 3 + len(members[0][1]) // 512 * 512  # inside the first sample's png data
    (tmp_path / "cut.tar").write_bytes(whole[:png_data_end + 100])
    (tmp_path / "junk.tar").write_bytes(b"not a tar archive " * 40)
    reader = EvalShardReader([tmp_path / "cut.tar", tmp_path / "junk.tar"], warn=False)
    assert list(reader) == [] and reader.count_samples() is None
    damaged = [s for s in reader.skipped if s.key is None]
    assert [Path(s.shard).name for s in damaged] == ["cut.tar", "junk.tar"]
    assert all("truncated or corrupt" in s.reason and "samples after this point are lost" in s.reason for s in damaged)
    partial = [s for s in reader.skipped if s.key is not None]  # the cut sample kept only its json
    assert [(Path(s.shard).name, "no image member" in s.reason) for s in partial] == [("cut.tar", True)]


def test_reader_skips_deeply_nested_json_like_the_training_loader(synth_dir: Path, tmp_path: Path) -> None:
    members = _read_tar(sorted((synth_dir / "image-qa").glob("*.tar"))[0])[:4]  # 2 samples: json + png each
    first_json = next(i for i, (name, _) in enumerate(members) if name.endswith(".json"))
    members[first_json] = (members[first_json][0], b"[" * 100_000 + b"]" * 100_000)  # RecursionError for json.loads
    reader = EvalShardReader(_write_tar(tmp_path / "deep.tar", members))
    with pytest.warns(CorruptSampleWarning, match="nested deeper than the limit"):
        samples = list(reader)
    assert len(samples) == 1 and len(reader.skipped) == 1


# --------------------------------------------------------------------------------------------------
# evaluate, end to end on a tiny model


@pytest.fixture(scope="module")
def model_and_tokenizer(tmp_path_factory: pytest.TempPathFactory):
    from mm_llama.image_chat import load_image_model
    from mm_llama.tiny_checkpoint import sample_sentences
    from mm_llama.tokenizer_training import train_llama3_tokenizer
    from tests.reference.hf_mllama import save_hf_mllama, tiny_hf_mllama

    path = tmp_path_factory.mktemp("mllama")
    train_llama3_tokenizer(sample_sentences(), 300, path)
    save_hf_mllama(tiny_hf_mllama(vocab=Tokenizer.from_dir(path).vocab_size), path)
    return load_image_model(path, dtype=torch.float32, device=torch.device("cpu"))


class _Spy:
    """Wraps `generate` in the evaluation module and keeps its prompts and image batches."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.calls: list[tuple[list[list[int]], torch.Tensor]] = []
        real = evaluation.generate

        def spy(model, prompts, gen, *, prefill_inputs=None, **kwargs):
            self.calls.append((prompts, prefill_inputs["images"].pixels.clone()))
            assert gen.greedy
            return real(model, prompts, gen, prefill_inputs=prefill_inputs, **kwargs)

        monkeypatch.setattr(evaluation, "generate", spy)


def test_evaluate_vqa(model_and_tokenizer, synth_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    model, tok = model_and_tokenizer
    spy = _Spy(monkeypatch)
    result = evaluate(model, tok, synth_dir / "image-qa", "vqa", batch_size=3, max_samples=5, max_new_tokens=3,
                      progress=False)
    assert set(result.metrics) == {"vqa_accuracy", "exact_match", "majority_baseline"}
    assert all(0.0 <= v <= 1.0 for v in result.metrics.values())
    assert result.counts == {"samples": 5, "skipped_samples": 0, "damaged_shards": 0, "shards": 5, "empty_references": 0}
    assert [len(p) for p, _ in spy.calls] == [3, 2]
    expected = list(EvalShardReader(synth_dir / "image-qa"))[:5]
    assert [r["key"] for r in result.records] == [s["key"] for s in expected]
    media = MediaTokens(model.text_cfg.vocab_size)
    prompts = [p for batch, _ in spy.calls for p in batch]
    for record, sample, prompt in zip(result.records, expected, prompts):
        assert set(record) >= {"key", "question", "prediction", "references", "type", "score"}
        assert record["question"] == sample["json"]["question"]
        assert record["references"] == [sample["json"]["answer"]] and record["type"] == sample["json"]["type"]
        assert record["image_key"] == sample["json"]["image_key"] == record["key"].rsplit("-q", 1)[0]
        # the training template, exactly
        assert prompt == prompt_ids(tok, media, "vqa", {"question": sample["json"]["question"]})
    assert set(result.by_type) <= {"count", "colour", "shape", "position", "size", "exists"}
    assert sum(v["samples"] for v in result.by_type.values()) == 5
    assert result.settings["blank_images"] is False and result.settings["decoding"] == "greedy"


def test_evaluate_caption_and_write_result(model_and_tokenizer, synth_dir: Path, tmp_path: Path) -> None:
    model, tok = model_and_tokenizer
    result = evaluate(model, tok, synth_dir / "image-caption", "caption", batch_size=2, max_new_tokens=4,
                      progress=False)
    assert set(result.metrics) == {"cider", "exact_match"}
    assert result.metrics["cider"] >= 0.0 and 0.0 <= result.metrics["exact_match"] <= 1.0
    assert result.counts["samples"] == len(result.records) == 3
    samples = list(EvalShardReader(synth_dir / "image-caption"))
    assert [r["references"] for r in result.records] == [[s["txt"].strip()] for s in samples]
    assert all(r["prompt"] == DEFAULT_CAPTION_PROMPT and isinstance(r["prediction"], str) for r in result.records)

    path = write_result(result, tmp_path / "out" / "eval.json", settings={"model": tmp_path / "m"})
    data = json.loads(path.read_text())
    assert data["task"] == "caption" and data["metrics"] == pytest.approx(result.metrics)
    assert data["counts"]["samples"] == 3 and len(data["records"]) == 3
    assert data["settings"]["model"] == str(tmp_path / "m") and data["settings"]["max_new_tokens"] == 4
    assert not (tmp_path / "out" / "eval.json.tmp").exists()


def test_blank_images_replace_the_pixels_not_the_prompts(model_and_tokenizer, synth_dir: Path,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    model, tok = model_and_tokenizer
    spy = _Spy(monkeypatch)
    kwargs = dict(batch_size=4, max_samples=4, max_new_tokens=2, progress=False)
    real = evaluate(model, tok, synth_dir / "image-qa", "vqa", **kwargs)
    blank = evaluate(model, tok, synth_dir / "image-qa", "vqa", blank_images=True, **kwargs)
    (real_prompts, real_pixels), (blank_prompts, blank_pixels) = spy.calls
    assert real_prompts == blank_prompts
    assert not torch.equal(real_pixels, blank_pixels)
    transform = ImageTransform(tile_size=model.image.vision_cfg.tile_size, max_tiles=model.image.vision_cfg.max_tiles)
    samples = list(EvalShardReader(synth_dir / "image-qa"))[:4]
    grey = [[transform(Image.new("RGB", s["image"].size, BLANK_GREY))] for s in samples]
    assert torch.equal(blank_pixels, collate_images(grey, max_tiles=model.image.vision_cfg.max_tiles).pixels)
    assert blank.settings["blank_images"] is True
    assert [r["key"] for r in blank.records] == [r["key"] for r in real.records]


def test_evaluate_counts_and_skips_damaged_samples(model_and_tokenizer, damaged_dir: Path) -> None:
    model, tok = model_and_tokenizer
    with pytest.warns(CorruptSampleWarning):
        result = evaluate(model, tok, [damaged_dir / "a.tar", damaged_dir / "b.tar"], "vqa", batch_size=8,
                          max_new_tokens=2, progress=False)
    # a.tar: bad png + json without answer skipped, 2 evaluated; b.tar: 1 evaluated, then damaged
    assert result.counts == {"samples": 3, "skipped_samples": 2, "damaged_shards": 1, "shards": 2,
                             "empty_references": 0}
    where = [(Path(s["shard"]).name, s["key"]) for s in result.skipped]
    assert [w for w in where if w[1] is None] == [("b.tar", None)]
    skipped_keys = sorted(k for _, k in where if k is not None)
    assert [k.rsplit("-", 1)[1] for k in skipped_keys] == ["q1", "q2"]
    reasons = " | ".join(s["reason"] for s in result.skipped)
    assert "no 'answer'" in reasons and "png" in reasons.lower()
    assert len(result.records) == 3 and not {r["key"] for r in result.records} & set(skipped_keys)


def test_evaluate_rejects_bad_arguments_and_unusable_data(model_and_tokenizer, synth_dir: Path,
                                                          tmp_path: Path) -> None:
    model, tok = model_and_tokenizer
    qa = synth_dir / "image-qa"
    with pytest.raises(ValueError, match="unknown eval task"):
        evaluate(model, tok, qa, "asr")
    with pytest.raises(ValueError, match="batch_size"):
        evaluate(model, tok, qa, "vqa", batch_size=0)
    with pytest.raises(ValueError, match="caption task only"):
        evaluate(model, tok, qa, "vqa", prompt="Describe.")
    # caption task on QA shards: no sample has a caption → a clear error, not a crash
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", CorruptSampleWarning)
        with pytest.raises(ValueError, match="no sample of the 5 shard"):
            evaluate(model, tok, qa, "caption", progress=False)

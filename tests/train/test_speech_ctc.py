"""The CTC aid (`train.speech_ctc`): its targets come from the answer labels, its loss is CTC over cosine
logits against the embedding table (checked against a brute-force sum over alignments), its settings are
validated against the tokenizer, and the speech step adds it to the answer loss."""

from __future__ import annotations

import itertools
import math

import pytest
import torch
import torch.nn.functional as F

from mm_llama.data.prompts import IGNORE_INDEX
from mm_llama.tokenizer import Tokenizer
from mm_llama.tokenizer_training import train_llama3_tokenizer
from mm_llama.train.speech_ctc import SpeechCtc, embedding_ctc_loss, response_targets, speech_ctc_from

X = IGNORE_INDEX
EOT = 99


def test_response_targets_are_each_rows_answer_without_its_closing_token() -> None:
    labels = torch.tensor([[X, X, 5, 6, 7, EOT, X],
                           [X, X, X, X, 8, EOT, X],
                           [X, 3, EOT, X, X, X, X]])
    targets, lengths = response_targets(labels)
    assert lengths.tolist() == [3, 1, 1]
    assert targets[0, :3].tolist() == [5, 6, 7]
    assert targets[1, :1].tolist() == [8]
    assert targets[2, :1].tolist() == [3]


def _collapse(path: tuple[int, ...], blank: int) -> list[int]:
    out: list[int] = []
    previous = None
    for token in path:
        if token != previous and token != blank:
            out.append(token)
        previous = token
    return out


def _brute_force_ctc(log_probs: torch.Tensor, target: list[int], blank: int) -> float:
    """−log Σ over every path of `log_probs [N, V]` that collapses to `target` of Π p (independent of
    F.ctc_loss's dynamic programme)."""
    n, v = log_probs.shape
    total = 0.0
    for path in itertools.product(range(v), repeat=n):
        if _collapse(path, blank) == target:
            total += math.exp(sum(float(log_probs[t, s]) for t, s in enumerate(path)))
    return -math.log(total)


def test_embedding_ctc_loss_is_ctc_over_scaled_cosines_summed_over_rows() -> None:
    torch.manual_seed(0)
    table = torch.randn(4, 6)
    embeds = torch.randn(2, 4, 6) * 3.0  # norms differ from the table's: only the directions count
    lengths = torch.tensor([4, 3])
    targets = torch.tensor([[1, 2], [3, 0]])
    target_lengths = torch.tensor([2, 1])
    scale, blank = 5.0, 0
    loss = embedding_ctc_loss(embeds, lengths, table, targets, target_lengths, blank=blank, scale=scale)
    cos = F.normalize(embeds, dim=-1) @ F.normalize(table, dim=-1).T
    log_probs = F.log_softmax(scale * cos, dim=-1)
    expected = _brute_force_ctc(log_probs[0, :4], [1, 2], blank) + _brute_force_ctc(log_probs[1, :3], [3], blank)
    assert float(loss) == pytest.approx(expected, rel=1e-5)


def test_embedding_ctc_loss_falls_when_outputs_point_at_the_target_rows() -> None:
    table = torch.eye(4)
    aligned = table[[0, 1, 0, 2]][None]  # blank, 1, blank, 2
    shuffled = table[[3, 3, 1, 3]][None]
    args = dict(lengths=torch.tensor([4]), table=table, targets=torch.tensor([[1, 2]]),
                target_lengths=torch.tensor([2]), blank=0, scale=30.0)
    assert float(embedding_ctc_loss(aligned, **args)) < 1e-3
    assert float(embedding_ctc_loss(shuffled, **args)) > 10.0


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory: pytest.TempPathFactory) -> Tokenizer:
    out = tmp_path_factory.mktemp("tok")
    with pytest.warns(UserWarning):  # a small corpus gives fewer merges than asked
        train_llama3_tokenizer(["a red circle at the top"] * 20, 300, out)
    return Tokenizer.from_dir(out)


def test_speech_ctc_from_resolves_the_blank_and_keeps_defaults(tokenizer: Tokenizer) -> None:
    filler = "<|reserved_special_token_10|>"
    aid = speech_ctc_from({"blank": filler}, tokenizer)
    assert aid == SpeechCtc(tokenizer.special_tokens[filler], 1.0, 30.0)
    assert tokenizer.decode([aid.blank_id]) == filler
    assert speech_ctc_from({"blank": 7, "weight": 0.5, "scale": 10}, tokenizer) == SpeechCtc(7, 0.5, 10)
    assert speech_ctc_from(None, tokenizer) is None


@pytest.mark.parametrize(("fields", "message"), [
    ({"blank": "<|no_such_token|>"}, "not a special token"),
    ({"blank": 10**6}, "token id below"),
    ({}, "token id below"),
    ({"blank": 3, "weight": 0}, "weight must be a positive number"),
    ({"blank": 3, "scale": "big"}, "scale must be a positive number"),
    ({"blank": 3, "lambda": 1}, "unknown key"),
    ("<|reserved_special_token_10|>", "must be a mapping"),
])
def test_speech_ctc_from_rejects_bad_settings(tokenizer: Tokenizer, fields: object, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        speech_ctc_from(fields, tokenizer)  # type: ignore[arg-type]


def test_task_for_refuses_the_aid_outside_the_speech_tasks() -> None:
    from mm_llama.train.tasks import AudioTextTask, task_for

    aid = SpeechCtc(3)
    assert isinstance(task_for("asr", torch.device("cpu"), speech_ctc=aid), AudioTextTask)
    with pytest.raises(ValueError, match="speech tasks"):
        task_for("vqa", torch.device("cpu"), speech_ctc=aid)



def test_the_speech_step_adds_the_weighted_aid_to_the_answer_loss() -> None:
    from mm_llama.adapters.speech_adapter import speech_token_count
    from mm_llama.data.collate import AudioTextBatch, TextBatch, collate_audio
    from mm_llama.data.prompts import build_example
    from mm_llama.media_tokens import MediaTokens
    from mm_llama.train.tasks import task_for
    from tests.data.test_pipelines import tokenizer as test_tokenizer
    from tests.mm_llama.modalities.test_speech import _model

    model, lm = _model()
    tok = test_tokenizer()
    frames = [57, 30]
    examples = [build_example(tok, MediaTokens(lm.cfg.vocab_size), "asr",
                              {"text": text, "language": "en", "n_speech_tokens": speech_token_count(n)})
                for text, n in zip(["hello world", "world"], frames)]
    width = max(len(e.input_ids) for e in examples)
    tokens = torch.tensor([e.input_ids + [0] * (width - len(e.input_ids)) for e in examples])
    labels = torch.tensor([e.labels + [X] * (width - len(e.labels)) for e in examples])
    torch.manual_seed(3)
    features, lengths = collate_audio([torch.randn(n, 80) for n in frames])
    batch = AudioTextBatch(TextBatch(tokens, labels, tokens != 0), features, lengths, lengths / 100)
    plain = task_for("asr", torch.device("cpu"))(model, batch)
    aided = task_for("asr", torch.device("cpu"), speech_ctc=SpeechCtc(blank_id=5, weight=0.5, scale=20.0))(model, batch)
    with torch.no_grad():
        embeds, out_lengths = model.speech.encode(batch)
        targets, target_lengths = response_targets(labels)
        ctc = embedding_ctc_loss(embeds, out_lengths, lm.tok_embeddings.weight, targets, target_lengths, blank=5,
                                 scale=20.0)
    assert target_lengths.tolist() == [len(tok.encode("hello world")), len(tok.encode("world"))]
    assert aided.units == plain.units
    assert float(aided.loss_sum.detach()) == pytest.approx(float(plain.loss_sum.detach()) + 0.5 * float(ctc), rel=1e-5)
    assert aided.metrics["ctc_loss"] == pytest.approx(float(ctc) / plain.units, rel=1e-5)
    aided.loss_sum.backward()
    assert model.speech.encoder.parameters().__next__().grad is not None

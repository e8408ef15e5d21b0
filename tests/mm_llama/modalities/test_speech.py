"""Speech on the frozen LM: an ASR prompt's `<speech>` span carries the adapter's outputs, start / end
tokens their own rows, the groups are `speech.encoder` / `speech.adapter`, and speech sits beside images."""

from __future__ import annotations

import pytest
import torch

from mm_llama import LlamaDecoder, preset
from mm_llama.adapters.speech_adapter import SPEECH_ADAPTER_PRESETS, speech_token_count
from mm_llama.data.collate import collate_audio
from mm_llama.data.prompts import build_example
from mm_llama.encoders.conformer import CONFORMER_PRESETS
from mm_llama.encoders.mllama_vision import VisionConfig
from mm_llama.media_tokens import MediaTokens
from mm_llama.modalities import ImageModality, SpeechModality
from mm_llama.multimodal import MultimodalLlama
from tests.data.test_pipelines import tokenizer


class _Audio:
    def __init__(self, features: torch.Tensor, lengths: torch.Tensor) -> None:
        self.features, self.feature_lengths = features, lengths


def _model() -> tuple[MultimodalLlama, LlamaDecoder]:
    torch.manual_seed(0)
    tok = tokenizer()
    text = preset("tiny", vocab_size=tok.vocab_size, n_layers=4)
    lm = LlamaDecoder(text).eval()
    vision = VisionConfig(tile_size=28, patch_size=14, width=32, heads=4, mlp_dim=64, n_local_layers=2,
                          n_global_layers=1, max_tiles=4, taps=(1,))
    speech = SpeechModality(text, CONFORMER_PRESETS["tiny"], SPEECH_ADAPTER_PRESETS["tiny"])
    image = ImageModality(text, vision, fusion_layers=(1, 3))
    return MultimodalLlama(lm, [image, speech]).eval(), lm


def _asr_batch(frames: list[int]) -> tuple[torch.Tensor, _Audio]:
    tok = tokenizer()
    media = MediaTokens(tok.vocab_size)
    rows = [build_example(tok, media, "asr", {"text": "hello world", "language": "en",
                                               "n_speech_tokens": speech_token_count(n)}).input_ids for n in frames]
    width = max(len(r) for r in rows)
    tokens = torch.tensor([r + [0] * (width - len(r)) for r in rows])
    torch.manual_seed(3)
    features, lengths = collate_audio([torch.randn(n, 80) for n in frames])
    return tokens, _Audio(features, lengths)


def test_groups_and_rows_of_the_speech_modality() -> None:
    model, _ = _model()
    groups = model.parameter_groups()
    assert list(groups) == ["image.encoder", "image.fusion", "speech.encoder", "speech.adapter", "decoder"]
    assert "decoder.tok_embeddings.media.speech.weight" in groups["speech.adapter"]
    assert model.decoder.tok_embeddings.media["speech"].weight.shape[0] == 3  # start, end, placeholder
    assert all(n.startswith("speech.encoder.") for n in groups["speech.encoder"])


def test_the_speech_span_carries_the_adapter_outputs() -> None:
    model, lm = _model()
    tokens, audio = _asr_batch([57, 30])
    placeholder = MediaTokens(lm.cfg.vocab_size).speech
    assert (tokens == placeholder).sum(1).tolist() == [speech_token_count(57), speech_token_count(30)]
    with torch.no_grad():
        got = model(tokens, media={"speech": audio})
        embeds = model.decoder.tok_embeddings(tokens).clone()
        outputs, lengths = model.speech.encode(audio)
        for b in range(2):
            embeds[b, tokens[b] == placeholder] = outputs[b, : lengths[b]]
        assert torch.equal(got, lm(embeds=embeds))
        alone = model(tokens[1:2, : int((tokens[1] != 0).sum())], media={"speech": _Audio(audio.features[1:2, :30],
                                                                                            torch.tensor([30]))})
    n = alone.shape[1]
    assert (alone[0] - got[1, :n]).abs().max().item() <= 1e-5  # the same alone and padded in a batch


def test_a_span_that_does_not_fit_the_audio_is_an_error() -> None:
    model, _ = _model()
    tokens, audio = _asr_batch([57])
    audio.feature_lengths = torch.tensor([40])
    with pytest.raises(ValueError, match=r"the rows hold \[8\] <speech> placeholder\(s\) but their audio gives \[5\]"):
        model(tokens, media={"speech": audio})

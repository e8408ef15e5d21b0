"""The speech adapter: its geometry (12.5 outputs per second), batch invariance, the paper preset's size."""

from __future__ import annotations

import pytest
import torch

from mm_llama.adapters.speech_adapter import SPEECH_ADAPTER_PRESETS, SpeechAdapter, speech_token_count
from mm_llama.encoders.conformer import CONFORMER_PRESETS, ConformerEncoder


@pytest.mark.parametrize("frames", [1, 7, 8, 9, 100, 457, 6000])
def test_the_adapter_gives_speech_token_count_outputs(frames: int) -> None:
    torch.manual_seed(0)
    encoder = ConformerEncoder(CONFORMER_PRESETS["tiny"]).eval()
    adapter = SpeechAdapter(SPEECH_ADAPTER_PRESETS["tiny"], encoder.out_dim, 64).eval()
    features = torch.randn(1, frames, 80)
    with torch.no_grad():
        states, lengths = encoder(features, torch.tensor([frames]))
        out, out_lengths = adapter(states, lengths)
    assert out.shape == (1, speech_token_count(frames), 64) and out_lengths.tolist() == [speech_token_count(frames)]
    assert speech_token_count(100) == 13 and speech_token_count(6000) == 750  # 12.5 per second


def test_an_utterance_gets_the_same_embeddings_alone_and_in_a_padded_batch() -> None:
    torch.manual_seed(1)
    adapter = SpeechAdapter(SPEECH_ADAPTER_PRESETS["tiny"], 96, 64).eval()
    states = torch.randn(3, 40, 96)
    lengths = torch.tensor([40, 15, 33])
    alone_states = states[1:2, :15].clone()
    states[1, 15:] = 0.0  # the encoder zeroes what lies past a row's length
    with torch.no_grad():
        batch, batch_lengths = adapter(states, lengths)
        alone, _ = adapter(alone_states, torch.tensor([15]))
    assert batch_lengths.tolist() == [20, 8, 17]
    assert (batch[1, :8] - alone[0]).abs().max().item() <= 1e-5
    assert torch.equal(batch[1, 8:], torch.zeros_like(batch[1, 8:]))


def test_the_paper_adapter_has_about_100m_parameters() -> None:
    with torch.device("meta"):
        adapter = SpeechAdapter(SPEECH_ADAPTER_PRESETS["paper"], 1536, 4096)  # Conformer 1536 → Llama 3 8B
    count = sum(p.numel() for p in adapter.parameters())
    print(f"speech adapter paper preset: {count / 1e6:.1f}M parameters")
    assert 90e6 <= count <= 110e6

"""The Conformer speech encoder against a reference written here from the paper's equations, batch
invariance under padding, frame stacking, and the parameter count of the paper preset."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from mm_llama.encoders.conformer import CONFORMER_PRESETS, ConformerConfig, ConformerEncoder, stack_frames

CFG = ConformerConfig(dim=32, n_layers=2, n_heads=4, ffn_dim=48, conv_kernel=7)


def _rope_reference(x: torch.Tensor, theta: float) -> torch.Tensor:
    """Meta-style rotary embedding on `[B, H, S, hd]` with complex numbers: channel pairs (2i, 2i+1)."""
    hd, steps = x.shape[-1], x.shape[-2]
    freqs = 1.0 / theta ** (torch.arange(0, hd, 2).double() / hd)
    angles = torch.outer(torch.arange(steps).double(), freqs)
    rot = torch.polar(torch.ones_like(angles), angles)  # [S, hd/2]
    pairs = torch.view_as_complex(x.double().reshape(*x.shape[:-1], hd // 2, 2).contiguous())
    return torch.view_as_real(pairs * rot).flatten(-2).to(x.dtype)


def _layer_reference(layer, x: torch.Tensor, real: torch.Tensor, cfg: ConformerConfig) -> torch.Tensor:
    """x += ½FFN(LN x); x += RoPE-MHSA(LN x); x += Conv(LN x); x += ½FFN(LN x); x = LN x — written out."""

    def ln(norm, h):
        mean, var = h.mean(-1, keepdim=True), h.var(-1, unbiased=False, keepdim=True)
        return (h - mean) / torch.sqrt(var + norm.eps) * norm.weight + norm.bias

    def ffn(mod, h):
        norm, lin1, _, lin2 = mod
        return F.linear(F.silu(F.linear(ln(norm, h), lin1.weight, lin1.bias)), lin2.weight, lin2.bias)

    x = x + 0.5 * ffn(layer.ffn1, x)
    att = layer.attention
    b, s, d = x.shape
    qkv = F.linear(ln(att.norm, x), att.qkv.weight, att.qkv.bias).reshape(b, s, 3, cfg.n_heads, cfg.head_dim)
    q, k, v = (qkv[:, :, i].transpose(1, 2) for i in range(3))
    q, k = _rope_reference(q, cfg.rope_theta), _rope_reference(k, cfg.rope_theta)
    scores = q @ k.transpose(-1, -2) / math.sqrt(cfg.head_dim)
    scores = scores.masked_fill(~real[:, None, None, :], float("-inf"))
    out = (scores.softmax(-1) @ v).transpose(1, 2).reshape(b, s, d)
    x = x + F.linear(out, att.out.weight, att.out.bias)
    conv = layer.conv
    h = ln(conv.norm, x).transpose(1, 2)
    h = F.conv1d(h, conv.pointwise_in.weight, conv.pointwise_in.bias)
    h = h[:, :d] * torch.sigmoid(h[:, d:])  # GLU
    h = h * real[:, None]
    h = F.conv1d(h, conv.depthwise.weight, conv.depthwise.bias, padding=cfg.conv_kernel // 2, groups=d)
    h = F.silu(ln(conv.depthwise_norm, h.transpose(1, 2)))
    x = x + F.conv1d(h.transpose(1, 2), conv.pointwise_out.weight, conv.pointwise_out.bias).transpose(1, 2)
    x = x + 0.5 * ffn(layer.ffn2, x)
    return ln(layer.norm, x)


def _encoder(seed: int = 0) -> ConformerEncoder:
    torch.manual_seed(seed)
    model = ConformerEncoder(CFG).eval()
    with torch.no_grad():
        for p in model.parameters():  # non-trivial norms and biases, so a wrong formula cannot hide
            p.add_(torch.randn_like(p) * 0.1)
        model.set_feature_stats(torch.randn(80) * 2, torch.rand(80) + 0.5)
    return model


def test_encoder_equals_the_equations_written_out() -> None:
    model = _encoder()
    features = torch.randn(2, 45, 80) * 3 + 1
    lengths = torch.tensor([45, 29])
    with torch.no_grad():
        got, got_lengths = model(features, lengths)
        normed = (features - model.feature_mean) / model.feature_std
        normed = normed * (torch.arange(45)[None] < lengths[:, None])[..., None]
        stacked = torch.cat([normed, torch.zeros(2, 3, 80)], 1).reshape(2, 12, 320)  # 45 → 48 frames
        x = F.linear(stacked, model.input.weight, model.input.bias)
        real = torch.arange(12)[None] < torch.tensor([12, 8])[:, None]
        for layer in model.layers:
            x = _layer_reference(layer, x, real, CFG)
        expected = x * real[..., None]
    assert got_lengths.tolist() == [12, 8]
    assert (got - expected).abs().max().item() <= 1e-5


def test_an_utterance_is_encoded_the_same_alone_and_padded_in_a_batch() -> None:
    model = _encoder(1)
    short = torch.randn(1, 21, 80)
    batch = torch.randn(3, 64, 80) * 5  # whatever the padding holds must not matter
    batch[1, :21] = short[0]
    with torch.no_grad():
        alone, alone_len = model(short, torch.tensor([21]))
        padded, lengths = model(batch, torch.tensor([64, 21, 50]))
    assert alone_len.tolist() == [6] and lengths.tolist() == [16, 6, 13]
    assert (padded[1, :6] - alone[0]).abs().max().item() <= 1e-5
    assert torch.equal(padded[1, 6:], torch.zeros_like(padded[1, 6:]))


def test_stacking_zero_pads_the_last_group() -> None:
    features = torch.arange(2 * 6 * 2, dtype=torch.float32).reshape(2, 6, 2)
    stacked, lengths = stack_frames(features, torch.tensor([6, 5]), 4)
    assert stacked.shape == (2, 2, 8) and lengths.tolist() == [2, 2]
    assert stacked[1, 1].tolist() == [20.0, 21.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0]  # frame 4; frame 5 is past the length


def test_bad_inputs_are_named() -> None:
    model = _encoder()
    with pytest.raises(ValueError, match=r"lengths must give 1\.\.10 real frames for each of the 2 rows, got \[10, 0\]"):
        model(torch.randn(2, 10, 80), torch.tensor([10, 0]))
    with pytest.raises(ValueError, match=r"features must be \[batch, frames, 80\], got \(2, 10, 40\)"):
        model(torch.randn(2, 10, 40), torch.tensor([10, 10]))
    with pytest.raises(ValueError, match="even width"):
        ConformerConfig(dim=36, n_heads=4)


def test_the_paper_preset_has_about_a_billion_parameters() -> None:
    with torch.device("meta"):
        paper = ConformerEncoder(CONFORMER_PRESETS["paper"])
    count = sum(p.numel() for p in paper.parameters())
    print(f"Conformer paper preset: {count / 1e9:.3f}B parameters")
    assert 0.95e9 <= count <= 1.05e9

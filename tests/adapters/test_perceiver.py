"""The perceiver resampler: parity with a per-group reference, group isolation, time encoding, grouping."""

from __future__ import annotations

import math

import pytest
import torch

from mm_llama.adapters.perceiver import PERCEIVER_PRESETS, PerceiverConfig, PerceiverResampler

TINY = PERCEIVER_PRESETS["tiny"]  # group_size 8
DIM, TOKENS = 32, 3
WIDE = PerceiverConfig(depth=1, n_heads=2, head_dim=8, n_latents=4, ffn_mult=2, group_size=32)


def _module(cfg: PerceiverConfig = TINY, dim: int = DIM, seed: int = 0) -> PerceiverResampler:
    """A resampler with every parameter moved off its init (LayerNorm weights ≠ 1, biases ≠ 0)."""
    torch.manual_seed(seed)
    module = PerceiverResampler(cfg, dim).eval()
    with torch.no_grad():
        for p in module.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    return module


def _mask(lengths: list[int], n_frames: int) -> torch.Tensor:
    return torch.arange(n_frames)[None] < torch.tensor(lengths)[:, None]


def _layer_norm(x: torch.Tensor, norm: torch.nn.LayerNorm) -> torch.Tensor:
    mean = x.mean(-1, keepdim=True)
    var = (x - mean).square().mean(-1, keepdim=True)
    return (x - mean) / torch.sqrt(var + norm.eps) * norm.weight + norm.bias


def _reference(module: PerceiverResampler, frames: torch.Tensor,
               frame_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The module docstring's equations, one group at a time, from the module's weights only."""
    cfg = module.cfg
    size, heads, hd, n_lat = cfg.group_size, cfg.n_heads, cfg.head_dim, cfg.n_latents
    batch, n_frames, tokens, dim = frames.shape
    groups = math.ceil(n_frames / size)
    out = torch.zeros(batch, groups, n_lat, dim)
    group_mask = torch.zeros(batch, groups, dtype=torch.bool)
    for b in range(batch):
        for g in range(groups):
            media, allowed = [], []
            for j in range(size):
                f = g * size + j
                real = f < n_frames and bool(frame_mask[b, f])
                media.append(frames[b, f] + module.time_embed[j] if real else torch.zeros(tokens, dim))
                allowed += [real] * tokens
            media_t = torch.cat(media)  # [S·P, D]
            group_mask[b, g] = any(allowed)
            keep = torch.tensor(allowed + [True] * n_lat)
            z = module.latents.clone()
            for layer in module.layers:
                m, lat = _layer_norm(media_t, layer.norm_media), _layer_norm(z, layer.norm_latents)
                kv_in = torch.cat([m, lat])
                w_k, w_v = layer.to_kv.weight.chunk(2, dim=0)
                q = torch.einsum("ld,ed->le", lat, layer.to_q.weight).view(n_lat, heads, hd)
                k = torch.einsum("nd,ed->ne", kv_in, w_k).view(-1, heads, hd)
                v = torch.einsum("nd,ed->ne", kv_in, w_v).view(-1, heads, hd)
                scores = torch.einsum("lhc,nhc->hln", q, k) / math.sqrt(hd)
                scores = scores.masked_fill(~keep, float("-inf"))
                weights = torch.exp(scores - scores.amax(-1, keepdim=True))
                weights = weights / weights.sum(-1, keepdim=True)
                attn = torch.einsum("hln,nhc->lhc", weights, v).reshape(n_lat, heads * hd)
                z = z + torch.einsum("le,de->ld", attn, layer.to_out.weight)
                norm_ffn, lin_in, lin_out = layer.ffn[0], layer.ffn[1], layer.ffn[3]
                h = torch.einsum("ld,ed->le", _layer_norm(z, norm_ffn), lin_in.weight)
                h = 0.5 * h * (1.0 + torch.erf(h / math.sqrt(2.0)))
                z = z + torch.einsum("le,de->ld", h, lin_out.weight)
            out[b, g] = _layer_norm(z, module.norm)
    return out, group_mask


@pytest.mark.parametrize(("n_frames", "lengths"), [(13, [13, 10, 5]), (16, [16, 16])],
                         ids=["partial-group-and-padded-rows", "full-groups-no-mask"])
def test_the_resampler_matches_a_per_group_reference(n_frames: int, lengths: list[int]) -> None:
    module = _module()
    frames = torch.randn(len(lengths), n_frames, TOKENS, DIM)
    mask = _mask(lengths, n_frames)
    frames[~mask] = 50.0 * torch.randn_like(frames[~mask])  # padding holds junk
    with torch.no_grad():
        out, group_mask = module(frames, mask)
        ref, ref_mask = _reference(module, frames, mask)
    assert out.shape == (len(lengths), math.ceil(n_frames / TINY.group_size), TINY.n_latents, DIM)
    assert torch.equal(group_mask, ref_mask)
    assert (out - ref).abs().max().item() <= 1e-5


def test_a_group_sees_only_its_own_real_frames() -> None:
    module = _module(seed=1)
    frames = torch.randn(2, 20, TOKENS, DIM)  # groups: frames 0-7, 8-15, 16-19 (+4 padding)
    mask = _mask([20, 14], 20)  # row 1: group 1 holds real frames 8-13, group 2 none
    with torch.no_grad():
        base, group_mask = module(frames, mask)
        junk = frames.clone()
        junk[1, 15] = float("nan")  # padding of row 1's group 1
        junk[1, 16:] = float("inf")  # row 1's empty group 2
        junk[1, 3] += torch.randn(TOKENS, DIM)  # a real frame of row 1's group 0 (LayerNorm removes a constant shift)
        junk_out, _ = module(junk, mask)
        moved = frames.clone()
        moved[1, 10] += torch.randn(TOKENS, DIM)  # a real frame of row 1's group 1
        moved_out, _ = module(moved, mask)
    assert group_mask.tolist() == [[True, True, True], [True, True, False]]
    assert torch.isfinite(junk_out).all()
    assert (junk_out[1, 1:] - base[1, 1:]).abs().max().item() <= 1e-6
    assert (junk_out[1, 0] - base[1, 0]).abs().max().item() > 1e-3
    assert (junk_out[0] - base[0]).abs().max().item() <= 1e-6  # rows never mix
    assert (moved_out[1, 1] - base[1, 1]).abs().max().item() > 1e-3
    others = [(0, slice(None)), (1, 0), (1, 2)]
    assert all((moved_out[i] - base[i]).abs().max().item() <= 1e-6 for i in others)


def test_reversing_the_frames_changes_the_output() -> None:
    torch.manual_seed(2)
    module = PerceiverResampler(TINY, DIM).eval()  # as initialised: time embeddings of std 0.02
    frames = torch.randn(1, TINY.group_size, TOKENS, DIM)
    mask = torch.ones(1, TINY.group_size, dtype=torch.bool)
    with torch.no_grad():
        forward, _ = module(frames, mask)
        backward, _ = module(frames.flip(1), mask)
        diff = (forward - backward).abs().max().item()
        module.time_embed.zero_()  # without time embeddings attention over frames is order-blind
        blind = (module(frames, mask)[0] - module(frames.flip(1), mask)[0]).abs().max().item()
    print(f"reversed clip: max |Δ| {diff:.2e} with time embeddings, {blind:.2e} without")
    assert blind <= 1e-5
    assert diff > 1e-3


def test_40_frames_make_two_aggregated_frames_and_the_second_uses_frames_32_to_39() -> None:
    module = _module(WIDE, dim=16, seed=3)
    frames = torch.randn(2, 40, 2, 16)
    mask = _mask([40, 30], 40)
    with torch.no_grad():
        base, group_mask = module(frames, mask)
        tail = frames.clone()
        tail[0, 32:] += torch.randn(8, 2, 16)
        tail_out, _ = module(tail, mask)
        head = frames.clone()
        head[0, :32] += torch.randn(32, 2, 16)
        head_out, _ = module(head, mask)
        alone, alone_mask = module(frames[:1, 32:], torch.ones(1, 8, dtype=torch.bool))
    assert base.shape == (2, 2, WIDE.n_latents, 16)
    assert group_mask.tolist() == [[True, True], [True, False]]
    assert torch.isfinite(base).all()
    assert (tail_out[0, 0] - base[0, 0]).abs().max().item() <= 1e-6
    assert (tail_out[0, 1] - base[0, 1]).abs().max().item() > 1e-3
    assert (head_out[0, 1] - base[0, 1]).abs().max().item() <= 1e-6
    assert (head_out[0, 0] - base[0, 0]).abs().max().item() > 1e-3
    # Frames 32-39 alone form one group with the same frame-time positions 0-7.
    assert alone_mask.tolist() == [[True]]
    assert (alone[0, 0] - base[0, 1]).abs().max().item() <= 1e-5


@pytest.mark.parametrize(("frames_shape", "mask_shape", "shown"), [
    ((2, 8, DIM), (2, 8), r"\(2, 8, 32\)"),
    ((2, 8, TOKENS, DIM), (2, 9), r"\(2, 9\)"),
    ((2, 8, TOKENS, DIM + 1), (2, 8), r"\(2, 8, 3, 33\)"),
], ids=["ndim", "mask-shape", "width"])
def test_bad_inputs_raise_value_errors_naming_the_shape(frames_shape: tuple[int, ...], mask_shape: tuple[int, ...],
                                                        shown: str) -> None:
    module = PerceiverResampler(TINY, DIM)
    with pytest.raises(ValueError, match=shown):
        module(torch.randn(frames_shape), torch.ones(mask_shape, dtype=torch.bool))


@pytest.mark.parametrize(("field", "value"), [("depth", 0), ("n_heads", -1), ("group_size", 2.0),
                                              ("n_latents", True), ("norm_eps", 0.0)])
def test_bad_config_values_raise_value_errors_naming_the_field(field: str, value: object) -> None:
    with pytest.raises(ValueError, match=rf"{field}.*{value!r}"):
        PerceiverConfig(**{field: value})


def test_gradients_reach_latents_time_embeddings_and_every_layer() -> None:
    torch.manual_seed(4)
    module = PerceiverResampler(PerceiverConfig(depth=2, n_heads=2, head_dim=8, n_latents=4, ffn_mult=2,
                                                group_size=4), 16)
    frames = torch.randn(2, 6, 2, 16)
    out, _ = module(frames, _mask([6, 3], 6))
    (out * torch.randn_like(out)).sum().backward()
    for name, p in module.named_parameters():
        assert p.grad is not None, name
        assert torch.isfinite(p.grad).all(), name
    assert module.latents.grad.abs().sum() > 0 and module.time_embed.grad.abs().sum() > 0


def test_masked_tokens_of_a_real_frame_are_not_keys() -> None:
    torch.manual_seed(0)
    cfg = PerceiverConfig(depth=1, n_heads=2, head_dim=8, n_latents=3, ffn_mult=2, group_size=2)
    resampler = PerceiverResampler(cfg, 16).eval()
    frames = torch.randn(1, 3, 4, 16)
    frame_mask = torch.ones(1, 3, dtype=torch.bool)
    token_mask = torch.ones(1, 3, 4, dtype=torch.bool)
    token_mask[0, :, 2:] = False
    noisy = frames.clone()
    noisy[0, :, 2:] = torch.randn(3, 2, 16) * 100
    with torch.no_grad():
        out, _ = resampler(frames, frame_mask, token_mask)
        same, _ = resampler(noisy, frame_mask, token_mask)
        fewer, _ = resampler(frames[:, :, :2], frame_mask)
        unmasked, _ = resampler(noisy, frame_mask)
    assert torch.allclose(out, same, atol=1e-6) and torch.allclose(out, fewer, atol=1e-5)
    assert not torch.allclose(out, unmasked, atol=1e-3)
    with pytest.raises(ValueError, match=r"token_mask must be a bool \[B, K, P\]"):
        resampler(frames, frame_mask, token_mask[:, :, :3])


def test_space_embeddings_make_a_tokens_place_in_its_frame_count() -> None:
    torch.manual_seed(0)
    cfg = PerceiverConfig(depth=1, n_heads=2, head_dim=8, n_latents=3, ffn_mult=2, group_size=2)
    frames = torch.randn(1, 2, 5, 16)
    mask = torch.ones(1, 2, dtype=torch.bool)
    moved = frames[:, :, torch.tensor([4, 0, 1, 2, 3])]  # the same tokens, each at another place
    plain, placed = PerceiverResampler(cfg, 16).eval(), PerceiverResampler(cfg, 16, tokens_per_frame=5).eval()
    with torch.no_grad():
        assert torch.allclose(plain(frames, mask)[0], plain(moved, mask)[0], atol=1e-5)  # attention alone: a set
        assert not torch.allclose(placed(frames, mask)[0], placed(moved, mask)[0], atol=1e-3)
    with pytest.raises(ValueError, match=r"built for tokens_per_frame=5"):
        placed(frames[:, :, :4], mask)

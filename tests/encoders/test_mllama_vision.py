"""Llama 3.2 Vision encoder: parity with HF `MllamaVisionModel`, taps, Meta conversion, batch invariance.

HF quirks these tests pin down:
- transformers 5.x taps the hidden state *leaving* layer `i` for `intermediate_layers_indices = [i]`;
  Meta's reference (and transformers 4.x) taps the state *entering* layer `i`. We follow Meta, so the HF
  oracle is built with its indices shifted by the convention `_hf_tap_shift()` detects.
- For an image with no real tile HF masks every pair with an additive `finfo.min`, which turns into a
  uniform average; we leave such images unmasked. Both outputs are meaningless, so padding images are
  not compared (padding tiles of real images are well defined and are compared).
"""

from __future__ import annotations

import functools

import pytest
import torch
import torch.nn.functional as F

from mm_llama.encoders.mllama_vision import (
    MllamaVisionEncoder,
    VisionConfig,
    grid_to_aspect_ratio_table,
    meta_vision_state_dict_to_ours,
)
from mm_llama.encoders.tiling import aspect_ratio_id, num_aspect_ratio_ids

transformers = pytest.importorskip("transformers")
from transformers import MllamaVisionConfig, MllamaVisionModel  # noqa: E402

CFG = VisionConfig.tiny()
GATES = {
    "gated_positional_embedding.gate": 0.7,
    "pre_tile_positional_embedding.gate": -0.4,
    "post_tile_positional_embedding.gate": 0.6,
}


def _randomize_(model: torch.nn.Module, seed: int = 0) -> None:
    """Random weights everywhere (embeddings std 0.5, projections std fan_in^-½, LayerNorm weights
    around 1) and nonzero gates."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            is_projection = p.ndim >= 2 and "embedding" not in name
            scale = p[0].numel() ** -0.5 if is_projection else 0.5
            p.copy_(torch.randn(p.shape, generator=gen) * scale)
            if "layernorm" in name and name.endswith("weight"):
                p.add_(1.0)
            if name in GATES:
                p.fill_(GATES[name])
            elif name.endswith("gate_attn"):
                p.fill_(0.7)
            elif name.endswith("gate_ffn"):
                p.fill_(-0.4)


def _hf_model(cfg: VisionConfig, hf_taps: list[int], seed: int = 0) -> MllamaVisionModel:
    d = cfg.to_hf_dict()
    d["intermediate_layers_indices"] = hf_taps
    model = MllamaVisionModel(MllamaVisionConfig(**d)).eval()
    model.set_attn_implementation("eager")  # the additive-mask reference path
    _randomize_(model, seed)
    return model


def _hf_out(model: MllamaVisionModel, pixels, ids, tile_mask) -> torch.Tensor:
    with torch.no_grad():
        return model(pixel_values=pixels, aspect_ratio_ids=ids, aspect_ratio_mask=tile_mask.long()).last_hidden_state


@functools.lru_cache(maxsize=1)
def _hf_tap_shift() -> int:
    """0 if HF's tap `i` is the state entering layer `i` (Meta), 1 if it is the state leaving it."""
    model = _hf_model(CFG, list(CFG.taps))
    entering: dict[int, torch.Tensor] = {}
    for i, layer in enumerate(model.transformer.layers):
        layer.register_forward_pre_hook(
            lambda mod, args, kwargs, i=i: entering.__setitem__(i, (args or (kwargs["hidden_states"],))[0]),
            with_kwargs=True,
        )
    pixels, ids, mask = _inputs([[(1, 1)]])
    out = _hf_out(model, pixels, ids, mask)
    tap0 = out[0, 0, 0, :, CFG.width :].reshape(CFG.tokens_per_tile, CFG.width, len(CFG.taps))[..., 0]
    for shift in (0, 1):
        ref = entering[CFG.taps[0] + shift][0, : CFG.tokens_per_tile]
        if torch.allclose(tap0, ref, atol=1e-5):
            return shift
    raise AssertionError("HF's taps match neither the input nor the output of the tapped layer")


def _inputs(grids: list[list[tuple[int, int] | None]], seed: int = 1):
    """Per sample a list of image grids (None = padding image) → pixels, aspect ids, tile mask."""
    b, n, t = len(grids), max(len(g) for g in grids), CFG.max_tiles
    gen = torch.Generator().manual_seed(seed)
    pixels = torch.randn(b, n, t, 3, CFG.tile_size, CFG.tile_size, generator=gen)
    ids = torch.zeros(b, n, dtype=torch.long)
    mask = torch.zeros(b, n, t, dtype=torch.bool)
    for i, sample in enumerate(grids):
        for j, grid in enumerate(sample):
            if grid is not None:
                ids[i, j] = aspect_ratio_id(grid, t)
                mask[i, j, : grid[0] * grid[1]] = True
    return pixels, ids, mask


def _ours_from_hf(hf: MllamaVisionModel, cfg: VisionConfig = CFG) -> MllamaVisionEncoder:
    ours = MllamaVisionEncoder(cfg).eval()
    ours.load_state_dict(hf.state_dict(), strict=True)
    return ours


# --------------------------------------------------------------------------------------------- config


def test_state_dict_names_and_shapes_match_hf() -> None:
    ours = MllamaVisionEncoder(CFG).state_dict()
    hf = MllamaVisionModel(MllamaVisionConfig(**CFG.to_hf_dict())).state_dict()
    assert {k: tuple(v.shape) for k, v in ours.items()} == {k: tuple(v.shape) for k, v in hf.items()}


def test_config_round_trip_and_defaults() -> None:
    hf_cfg = MllamaVisionConfig(**CFG.to_hf_dict())
    assert VisionConfig.from_hf_dict(hf_cfg.to_dict()) == CFG
    assert VisionConfig.from_hf_dict({"vision_config": hf_cfg.to_dict()}) == CFG
    default = VisionConfig.from_hf_dict(MllamaVisionConfig().to_dict())
    assert (default.tile_size, default.width, default.taps) == (448, 1280, (3, 7, 15, 23, 30))
    full = VisionConfig()
    assert (full.tokens_per_tile, full.padded_tokens_per_tile, full.out_dim) == (1601, 1608, 7680)
    enc = MllamaVisionEncoder(CFG)
    assert (enc.tile_size, enc.max_tiles, enc.tokens_per_tile, enc.out_dim) == (28, 4, 5, 96)


@pytest.mark.parametrize(
    "changes, match",
    [({"taps": (2, 1)}, "increasing"), ({"taps": (4,)}, "local layers"), ({"width": 30}, "divisible"),
     ({"tile_size": 30}, "multiple")],
)  # fmt: skip
def test_config_errors(changes: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        CFG.replace(**changes)


def test_from_hf_dict_rejects_other_activation() -> None:
    with pytest.raises(ValueError, match="hidden_act"):
        VisionConfig.from_hf_dict({**CFG.to_hf_dict(), "hidden_act": "quick_gelu"})


# --------------------------------------------------------------------------------------------- HF parity

PARITY_CASES = {
    "one_image_one_tile": [[(1, 1)]],
    "one_image_2x2": [[(2, 2)]],
    "two_images_and_padding_batch2": [[(1, 3), (2, 1), None], [(2, 1), (1, 3), None]],
}


@pytest.mark.parametrize("case", list(PARITY_CASES))
def test_parity_with_hf(case: str) -> None:
    grids = PARITY_CASES[case]
    hf = _hf_model(CFG, [t - _hf_tap_shift() for t in CFG.taps])
    ours = _ours_from_hf(hf)
    pixels, ids, mask = _inputs(grids)
    want = _hf_out(hf, pixels, ids, mask)
    with torch.no_grad():
        got = ours(pixels, ids, mask)
    assert got.shape == want.shape == (*ids.shape, CFG.max_tiles, CFG.tokens_per_tile, CFG.out_dim)
    assert torch.isfinite(got).all()
    real = ids > 0  # padding images are meaningless in both (see module docstring)
    assert (got[real] - want[real]).abs().max().item() < 1e-4


def test_hf_tap_convention_documented() -> None:
    """Same indices in both: final features agree; HF's tap t equals ours at layer t + shift."""
    shift = _hf_tap_shift()
    hf = _hf_model(CFG, list(CFG.taps))
    pixels, ids, mask = _inputs([[(2, 2)]])
    want = _hf_out(hf, pixels, ids, mask)
    ours = _ours_from_hf(hf, CFG.replace(taps=tuple(t + shift for t in CFG.taps)))
    with torch.no_grad():
        got = ours(pixels, ids, mask)
    assert (got - want).abs().max().item() < 1e-4


# --------------------------------------------------------------------------------------------- taps


def test_taps_are_hidden_states_entering_the_layers() -> None:
    ours = MllamaVisionEncoder(CFG).eval()
    _randomize_(ours)
    entering: dict[int, torch.Tensor] = {}
    for i, layer in enumerate(ours.transformer.layers):
        layer.register_forward_pre_hook(lambda mod, args, i=i: entering.__setitem__(i, args[0]))
    pixels, ids, mask = _inputs([[(1, 2), (2, 2)]])
    with torch.no_grad():
        out = ours(pixels, ids, mask)
    d, n_taps, t, lp, l = CFG.width, len(CFG.taps), CFG.max_tiles, CFG.padded_tokens_per_tile, CFG.tokens_per_tile
    assert ours.out_dim == out.shape[-1] == d * (1 + n_taps)
    taps = out[..., d:].reshape(*out.shape[:-1], d, n_taps)  # channel-interleaved: feature d + c·n_taps + k
    for k, layer_index in enumerate(CFG.taps):
        ref = entering[layer_index].reshape(1, 2, t, lp, d)[:, :, :, :l]
        assert torch.equal(taps[..., k], ref)


# --------------------------------------------------------------------------------------------- Meta


def _meta_state_dict(cfg: VisionConfig, seed: int = 3) -> dict[str, torch.Tensor]:
    """A random state dict in Meta's llama-models layout (prefix `vision_model.vision_encoder.` stripped)."""
    gen = torch.Generator().manual_seed(seed)
    d, p, t, l, h = cfg.width, cfg.patch_size, cfg.max_tiles, cfg.tokens_per_tile, cfg.mlp_dim

    def r(*shape: int, scale: float = 0.5, offset: float = 0.0) -> torch.Tensor:
        return torch.randn(*shape, generator=gen) * scale + offset

    sd = {
        "conv1._linear.weight": r(d, 3 * p * p, scale=0.1),
        "class_embedding": r(d),
        "positional_embedding": r(l, d),
        "gated_positional_embedding": r(t, t, l, d),
        "gated_positional_embedding_gate": torch.tensor([0.7]),
        "pre_tile_pos_embed.embedding": r(t, t, 1, d),
        "pre_tile_pos_embed.gate": torch.tensor([-0.4]),
        "post_tile_pos_embed.embedding": r(t, t, 1, d),
        "post_tile_pos_embed.gate": torch.tensor([0.6]),
        "ln_pre.weight": r(d, offset=1.0), "ln_pre.bias": r(d),
        "ln_post.weight": r(d, offset=1.0), "ln_post.bias": r(d),
    }  # fmt: skip
    for stack, count, gated in (("transformer", cfg.n_local_layers, False),
                                ("global_transformer", cfg.n_global_layers, True)):  # fmt: skip
        for i in range(count):
            k = f"{stack}.resblocks.{i}."
            for w in ("wq", "wk", "wv", "wo"):
                sd[k + f"attn.{w}.weight"] = r(d, d, scale=d**-0.5)
            for ln in ("ln_1", "ln_2"):
                sd[k + f"{ln}.weight"], sd[k + f"{ln}.bias"] = r(d, offset=1.0), r(d)
            sd[k + "mlp.c_fc.weight"], sd[k + "mlp.c_fc.bias"] = r(h, d, scale=d**-0.5), r(h)
            sd[k + "mlp.c_proj.weight"], sd[k + "mlp.c_proj.bias"] = r(d, h, scale=h**-0.5), r(d)
            if gated:
                sd[k + "gate_attn"], sd[k + "gate_ffn"] = torch.tensor([0.7]), torch.tensor([-0.4])
    return sd


def _meta_reference(sd: dict[str, torch.Tensor], cfg: VisionConfig, tiles: torch.Tensor, grid: tuple[int, int]):
    """Independent Meta-style forward of one image: `tiles [T, 3, H, W]` → `[T, L, out_dim]`.

    Slices the Meta grids per image (`[:h, :w]`, row-major), builds Meta's additive mask from the grid,
    and taps the states entering the tap layers.
    """
    d, p, t, l = cfg.width, cfg.patch_size, cfg.max_tiles, cfg.tokens_per_tile
    h, w = grid
    lp = -(-l // 8) * 8
    x = F.unfold(tiles, kernel_size=p, stride=p).transpose(1, 2) @ sd["conv1._linear.weight"].T  # [T, P, D]

    def tile_embed(name: str, x: torch.Tensor) -> torch.Tensor:
        emb = torch.zeros(t, 1, d)
        emb[: h * w] = sd[f"{name}.embedding"][:h, :w].reshape(h * w, 1, d)
        return x + emb * sd[f"{name}.gate"].tanh()

    x = tile_embed("pre_tile_pos_embed", x)
    x = torch.cat([sd["class_embedding"].expand(t, 1, d), x], dim=1)
    g = sd["gated_positional_embedding_gate"].tanh()
    x = x + sd["positional_embedding"] * (1 - g)
    x[: h * w] += sd["gated_positional_embedding"][:h, :w].reshape(h * w, l, d) * g
    x = F.layer_norm(x, (d,), sd["ln_pre.weight"], sd["ln_pre.bias"], 1e-5)
    x = F.pad(x, (0, 0, 0, lp - l)).reshape(1, t * lp, d)
    pad = torch.ones(t, lp)
    pad[: h * w, :l] = 0
    pad = pad.reshape(-1, 1)
    bias = pad @ pad.T * torch.finfo(torch.float32).min

    def block(x: torch.Tensor, k: str, gated: bool) -> torch.Tensor:
        ga = sd[k + "gate_attn"].tanh() if gated else 1.0
        gf = sd[k + "gate_ffn"].tanh() if gated else 1.0
        y = F.layer_norm(x, (d,), sd[k + "ln_1.weight"], sd[k + "ln_1.bias"], 1e-5)
        nh, hd = cfg.heads, d // cfg.heads
        q, kk, v = ((y @ sd[k + f"attn.{n}.weight"].T).view(1, -1, nh, hd).transpose(1, 2) for n in ("wq", "wk", "wv"))
        att = torch.softmax(q @ kk.transpose(-1, -2) * hd**-0.5 + bias, dim=-1) @ v
        x = x + ga * (att.transpose(1, 2).reshape(1, -1, d) @ sd[k + "attn.wo.weight"].T)
        y = F.layer_norm(x, (d,), sd[k + "ln_2.weight"], sd[k + "ln_2.bias"], 1e-5)
        y = F.gelu(y @ sd[k + "mlp.c_fc.weight"].T + sd[k + "mlp.c_fc.bias"])
        return x + gf * (y @ sd[k + "mlp.c_proj.weight"].T + sd[k + "mlp.c_proj.bias"])

    taps = []
    for i in range(cfg.n_local_layers):
        if i in cfg.taps:
            taps.append(x)
        x = block(x, f"transformer.resblocks.{i}.", gated=False)
    x = F.layer_norm(x, (d,), sd["ln_post.weight"], sd["ln_post.bias"], 1e-5)
    x = tile_embed("post_tile_pos_embed", x.reshape(t, lp, d)).reshape(1, t * lp, d)
    for i in range(cfg.n_global_layers):
        x = block(x, f"global_transformer.resblocks.{i}.", gated=True)
    x = torch.cat([x, torch.stack(taps, dim=-1).flatten(-2)], dim=-1)
    return x.reshape(t, lp, -1)[:, :l]


def test_meta_conversion_precomputes_aspect_ratio_tables() -> None:
    sd = _meta_state_dict(CFG)
    ours = meta_vision_state_dict_to_ours(sd, CFG)
    t, l, d = CFG.max_tiles, CFG.tokens_per_tile, CFG.width
    n_ids = num_aspect_ratio_ids(t)
    tables = {
        "gated_positional_embedding.tile_embedding.weight": ("gated_positional_embedding", l),
        "pre_tile_positional_embedding.embedding.weight": ("pre_tile_pos_embed.embedding", 1),
        "post_tile_positional_embedding.embedding.weight": ("post_tile_pos_embed.embedding", 1),
    }
    for ours_name, (meta_name, k) in tables.items():
        table = ours[ours_name].reshape(n_ids, t, k, d)
        assert torch.count_nonzero(table[0]) == 0
        for h, w in [(1, 3), (2, 1), (2, 2), (4, 1)]:
            row = table[aspect_ratio_id((h, w), t)]
            for tile in range(t):
                if tile < h * w:
                    r, c = divmod(tile, w)
                    assert torch.equal(row[tile], sd[meta_name][r, c]), (ours_name, (h, w), tile)
                else:
                    assert torch.count_nonzero(row[tile]) == 0
    assert torch.equal(ours["patch_embedding.weight"].flatten(1), sd["conv1._linear.weight"])
    assert torch.equal(ours["global_transformer.layers.1.gate_ffn"], sd["global_transformer.resblocks.1.gate_ffn"])
    MllamaVisionEncoder(CFG).load_state_dict(ours, strict=True)


def test_meta_conversion_matches_independent_meta_reference() -> None:
    sd = _meta_state_dict(CFG)
    enc = MllamaVisionEncoder(CFG).eval()
    enc.load_state_dict(meta_vision_state_dict_to_ours(sd, CFG), strict=True)
    grids = [[(1, 3), (2, 2)], [(2, 1), None]]
    pixels, ids, mask = _inputs(grids, seed=5)
    with torch.no_grad():
        got = enc(pixels, ids, mask)
        for i, sample in enumerate(grids):
            for j, grid in enumerate(sample):
                if grid is not None:
                    want = _meta_reference(sd, CFG, pixels[i, j], grid)
                    assert (got[i, j] - want).abs().max().item() < 1e-4, (i, j, grid)


def test_meta_conversion_errors() -> None:
    sd = _meta_state_dict(CFG)
    with pytest.raises(ValueError, match="prefix"):
        meta_vision_state_dict_to_ours({f"vision_model.vision_encoder.{k}": v for k, v in sd.items()}, CFG)
    with pytest.raises(ValueError, match="lacks 'ln_post.bias'"):
        meta_vision_state_dict_to_ours({k: v for k, v in sd.items() if k != "ln_post.bias"}, CFG)
    with pytest.raises(ValueError, match="not converted"):
        meta_vision_state_dict_to_ours({**sd, "transformer.resblocks.9.ln_1.weight": torch.ones(CFG.width)}, CFG)
    with pytest.raises(ValueError, match="shape"):
        meta_vision_state_dict_to_ours({**sd, "class_embedding": torch.ones(3)}, CFG)
    with pytest.raises(ValueError, match="grid"):
        grid_to_aspect_ratio_table(torch.zeros(2, 2, 1, 4), 4)


# --------------------------------------------------------------------------------------------- batching


def test_batch_invariance_and_padding_images_are_finite() -> None:
    enc = MllamaVisionEncoder(CFG).eval()
    _randomize_(enc)
    pixels, ids, mask = _inputs([[(1, 4), None, (3, 1)], [(1, 1), (1, 2), (2, 2)]], seed=7)
    with torch.no_grad():
        batched = enc(pixels, ids, mask)
        assert torch.isfinite(batched).all()
        for i, j in [(0, 0), (0, 2), (1, 0), (1, 2)]:
            alone = enc(pixels[i : i + 1, j : j + 1], ids[i : i + 1, j : j + 1], mask[i : i + 1, j : j + 1])
            assert (alone[0, 0] - batched[i, j]).abs().max().item() <= 1e-5, (i, j)


def test_input_errors() -> None:
    enc = MllamaVisionEncoder(CFG)
    pixels, ids, mask = _inputs([[(1, 1)]])
    with pytest.raises(ValueError, match="pixels must be"):
        enc(pixels[:, :, :2], ids, mask)
    with pytest.raises(ValueError, match="aspect_ratio_ids must lie"):
        enc(pixels, torch.full_like(ids, 9), mask)
    with pytest.raises(ValueError, match="aspect_ratio_ids must be \\["):
        enc(pixels, ids[:, :0], mask)
    with pytest.raises(ValueError, match="tile_mask"):
        enc(pixels, ids, mask[..., :2])

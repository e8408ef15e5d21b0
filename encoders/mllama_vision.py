"""Llama 3.2 Vision tiled image encoder (REFERENCE.md §2), numerically equal to HF `MllamaVisionModel`.

Parameter names are Hugging Face's, so the `vision_model.*` keys of an HF Mllama checkpoint load after
stripping that prefix; `meta_vision_state_dict_to_ours` converts Meta's llama-models layout.

Forward, per image of `T = max_tiles` tiles (`L = tokens_per_tile`, `Lp` = L rounded up to 8):
patchify → + tanh(g)·pre-tile embedding[ar_id] → CLS → + (1 − tanh g)·pos + tanh g·tile_pos[ar_id]
→ ln_pre → pad each tile to `Lp` tokens → local layers over all `T·Lp` tokens of the image (taps =
hidden states entering the tap layers) → ln_post → + post-tile embedding → gated global layers → strip
padding → `[final | taps interleaved]`, so feature `D + c·n_taps + t` is channel `c` of tap `t`.

Attention mask (HF/Meta): a token is "padding" if it is a pad token or lies in a padding tile
(`tile_mask` False); only padding→padding pairs are masked, so real tokens see every token of the image
(padding tiles included) and padding queries see the real tokens. An image with no real tile would mask
every pair; it is left unmasked instead (its output is meaningless but finite).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from mm_llama.config import ConfigFields, show_value
from mm_llama.encoders.base import TiledImageEncoder
from mm_llama.encoders.tiling import num_aspect_ratio_ids, supported_aspect_ratios
from mm_llama.encoders.vit_layers import VisionLayerStack

# HF and Meta build ln_pre / ln_post with LayerNorm's default eps, whatever the config's norm_eps says.
PRE_POST_NORM_EPS = 1e-5


def _square(f: ConfigFields, key: str, default: int) -> int:
    """An HF size that may be an int or `[h, w]`; only square sizes are supported."""
    value = f.raw(key, default)
    if isinstance(value, list):
        if len(value) != 2 or value[0] != value[1]:
            raise ValueError(f"{f.name(key)!r} is {show_value(value)}; expected a square size (one int or [n, n])")
        return ConfigFields({key: value[0]}, where=f.where).integer(key)
    return f.integer(key, default)


@dataclass
class VisionConfig:
    """Shape of the Llama 3.2 Vision encoder (defaults: 11B-Instruct / 90B, tile 560).

    `taps` are 0-based indices of local layers whose **input** hidden states are appended to the output
    (HF `intermediate_layers_indices`). The 11B base model uses `tile_size=448`: read it from the
    checkpoint's config.
    """

    tile_size: int = 560
    patch_size: int = 14
    width: int = 1280
    heads: int = 16
    mlp_dim: int = 5120
    n_local_layers: int = 32
    n_global_layers: int = 8
    max_tiles: int = 4
    taps: tuple[int, ...] = (3, 7, 15, 23, 30)
    norm_eps: float = 1e-5
    num_channels: int = 3

    def __post_init__(self) -> None:
        def integer(value: Any) -> bool:
            return isinstance(value, int) and not isinstance(value, bool)

        if not all(integer(t) for t in self.taps):
            raise ValueError(f"VisionConfig.taps must be layer indices (integers), got {self.taps!r}")
        self.taps = tuple(self.taps)
        for name in ("tile_size", "patch_size", "width", "heads", "mlp_dim", "max_tiles", "num_channels"):
            if not integer(getattr(self, name)) or getattr(self, name) < 1:
                raise ValueError(f"VisionConfig.{name} must be an integer >= 1, got {getattr(self, name)!r}")
        for name in ("n_local_layers", "n_global_layers"):
            if not integer(getattr(self, name)) or getattr(self, name) < 0:
                raise ValueError(f"VisionConfig.{name} must be an integer >= 0, got {getattr(self, name)!r}")
        if isinstance(self.norm_eps, bool) or not isinstance(self.norm_eps, (int, float)) or not 0 < self.norm_eps < float("inf"):
            raise ValueError(f"VisionConfig.norm_eps must be a finite number > 0, got {self.norm_eps!r}")
        if self.tile_size % self.patch_size:
            raise ValueError(f"tile_size {self.tile_size} is not a multiple of patch_size {self.patch_size}")
        if self.width % self.heads:
            raise ValueError(f"width {self.width} is not divisible by heads {self.heads}")
        if list(self.taps) != sorted(set(self.taps)):
            raise ValueError(f"taps must be strictly increasing layer indices, got {self.taps}")
        if self.taps and not (0 <= self.taps[0] and self.taps[-1] < self.n_local_layers):
            raise ValueError(f"taps {self.taps} must lie in 0..{self.n_local_layers - 1} (the local layers)")

    @property
    def tokens_per_tile(self) -> int:
        """Patches per tile plus the CLS token: `(tile/patch)² + 1` (1601 for 560/14)."""
        return (self.tile_size // self.patch_size) ** 2 + 1

    @property
    def padded_tokens_per_tile(self) -> int:
        """`tokens_per_tile` rounded up to a multiple of 8 (1608 for 560/14)."""
        return -(-self.tokens_per_tile // 8) * 8

    @property
    def out_dim(self) -> int:
        """Features per output token: `width · (len(taps) + 1)` (7680 for Llama 3.2 Vision)."""
        return self.width * (len(self.taps) + 1)

    @classmethod
    def tiny(cls) -> VisionConfig:
        """A test-sized encoder: 2×2 patches per tile (5 tokens, padded to 8), width 32, 4+2 layers."""
        return cls(
            tile_size=28, patch_size=14, width=32, heads=4, mlp_dim=64,
            n_local_layers=4, n_global_layers=2, max_tiles=4, taps=(1, 2),
        )  # fmt: skip

    @classmethod
    def from_hf_dict(cls, vision_config: dict[str, Any]) -> VisionConfig:
        """From an HF `MllamaVisionConfig` dict (or a full Mllama config dict holding `vision_config`).

        `intermediate_layers_indices` is taken as Meta's "entering layer i" indices, which is what the
        released checkpoints were trained with (transformers 5.x reads them as "leaving layer i").
        """
        nested = isinstance(vision_config, dict) and "vision_config" in vision_config
        f = ConfigFields(vision_config["vision_config"] if nested else vision_config,
                         where="vision_config" if nested else "")
        act = f.raw("hidden_act", "gelu")
        if act != "gelu":
            raise ValueError(f"hidden_act {act!r} is not supported; the Mllama vision encoder uses exact 'gelu'")
        max_tiles = f.integer("max_num_tiles", 4)
        ratios = f.raw("supported_aspect_ratios")
        standard = [list(r) for r in supported_aspect_ratios(max_tiles)]
        if ratios is not None and ratios != standard:
            raise ValueError(
                f"supported_aspect_ratios {show_value(ratios)} differ from the standard list for "
                f"max_num_tiles={max_tiles} ({standard}); custom grids are not supported"
            )
        heads_key = "attention_heads" if "attention_heads" in f.data else "num_attention_heads"
        taps = f.raw("intermediate_layers_indices")
        if taps is not None and not (isinstance(taps, list) and all(
                isinstance(t, int) and not isinstance(t, bool) and t >= 0 for t in taps)):
            raise ValueError(f"{f.name('intermediate_layers_indices')!r} is {show_value(taps)}; "
                             "expected a list of layer indices >= 0")
        return cls(
            tile_size=_square(f, "image_size", 448),
            patch_size=_square(f, "patch_size", 14),
            width=f.integer("hidden_size", 1280),
            heads=f.integer(heads_key, 16),
            mlp_dim=f.integer("intermediate_size", 5120),
            n_local_layers=f.integer("num_hidden_layers", 32),
            n_global_layers=f.integer("num_global_layers", 8, minimum=0),
            max_tiles=max_tiles,
            taps=tuple(taps if taps is not None else (3, 7, 15, 23, 30)),
            norm_eps=f.number("norm_eps", 1e-5),
            num_channels=f.integer("num_channels", 3),
        )

    def to_hf_dict(self) -> dict[str, Any]:
        """The HF `MllamaVisionConfig` keyword arguments describing this encoder."""
        return {
            "hidden_size": self.width,
            "hidden_act": "gelu",
            "num_hidden_layers": self.n_local_layers,
            "num_global_layers": self.n_global_layers,
            "attention_heads": self.heads,
            "num_channels": self.num_channels,
            "intermediate_size": self.mlp_dim,
            "vision_output_dim": self.out_dim,
            "image_size": self.tile_size,
            "patch_size": self.patch_size,
            "norm_eps": self.norm_eps,
            "max_num_tiles": self.max_tiles,
            "intermediate_layers_indices": list(self.taps),
            "supported_aspect_ratios": [list(r) for r in supported_aspect_ratios(self.max_tiles)],
        }

    def replace(self, **changes: Any) -> VisionConfig:
        """A copy with some fields changed."""
        return dataclasses.replace(self, **changes)


def grid_to_aspect_ratio_table(grid: torch.Tensor, max_tiles: int) -> torch.Tensor:
    """Meta's per-grid embedding `[T, T, K, D]` → HF's precomputed table `[n_ids, T·K·D]`.

    Row `id` (1-based index of `(h, w)` in `supported_aspect_ratios`) holds `grid[:h, :w]` flattened
    row-major to `h·w` tiles, zero-padded to `T` tiles; row 0 (padding image) is zero.
    """
    if grid.ndim != 4 or grid.shape[0] != max_tiles or grid.shape[1] != max_tiles:
        raise ValueError(f"expected a [{max_tiles}, {max_tiles}, K, D] grid embedding, got {list(grid.shape)}")
    _, _, k, d = grid.shape
    table = grid.new_zeros(num_aspect_ratio_ids(max_tiles), max_tiles, k, d)
    for ratio_id, (h, w) in enumerate(supported_aspect_ratios(max_tiles), start=1):
        table[ratio_id, : h * w] = grid[:h, :w].reshape(h * w, k, d)
    return table.reshape(table.shape[0], -1)


class TilePositionalEmbedding(nn.Module):
    """One learned vector per tile and aspect-ratio id, scaled by `tanh(gate)` and added to every token.

    `embedding.weight [n_ids, T·D]`, `gate [1]`.
    """

    def __init__(self, max_tiles: int, width: int) -> None:
        super().__init__()
        self.max_tiles, self.width = max_tiles, width
        grid = torch.randn(max_tiles, max_tiles, 1, width) * width**-0.5
        self.embedding = nn.Embedding(num_aspect_ratio_ids(max_tiles), max_tiles * width)
        with torch.no_grad():
            self.embedding.weight.copy_(grid_to_aspect_ratio_table(grid, max_tiles))
        self.gate = nn.Parameter(torch.zeros(1))

    def forward(self, x: torch.Tensor, aspect_ratio_ids: torch.Tensor) -> torch.Tensor:
        """`x [M, T, K, D]`, `aspect_ratio_ids [M]` → `[M, T, K, D]`."""
        emb = self.embedding(aspect_ratio_ids).view(-1, self.max_tiles, 1, self.width)
        return x + self.gate.tanh() * emb


class GatedPositionalEmbedding(nn.Module):
    """`x + (1 − tanh g)·embedding + tanh g·tile_embedding[ar_id]` (per-token, per-tile positions).

    `embedding [L, D]`, `gate [1]`, `tile_embedding.weight [n_ids, T·L·D]`.
    """

    def __init__(self, max_tiles: int, tokens: int, width: int) -> None:
        super().__init__()
        self.max_tiles, self.tokens, self.width = max_tiles, tokens, width
        scale = width**-0.5
        self.embedding = nn.Parameter(torch.randn(tokens, width) * scale)
        self.gate = nn.Parameter(torch.zeros(1))
        self.tile_embedding = nn.Embedding(num_aspect_ratio_ids(max_tiles), max_tiles * tokens * width)
        with torch.no_grad():
            grid = torch.randn(max_tiles, max_tiles, tokens, width) * scale
            self.tile_embedding.weight.copy_(grid_to_aspect_ratio_table(grid, max_tiles))

    def forward(self, x: torch.Tensor, aspect_ratio_ids: torch.Tensor) -> torch.Tensor:
        """`x [M, T, L, D]`, `aspect_ratio_ids [M]` → `[M, T, L, D]`."""
        g = self.gate.tanh()
        tile = self.tile_embedding(aspect_ratio_ids).view(-1, self.max_tiles, self.tokens, self.width)
        return x + (1 - g) * self.embedding + g * tile


def encoder_attention_mask(tile_mask: torch.Tensor, tokens_per_tile: int, padded_tokens: int) -> torch.Tensor:
    """Boolean attention mask for images laid out as `T` tiles of `padded_tokens` tokens.

    `tile_mask [M, T]` (True = real tile) → `[M, 1, T·Lp, T·Lp]`, True = may attend. Padding tokens are
    the pad positions `tokens_per_tile..Lp-1` of every tile and all tokens of padding tiles; only
    padding→padding pairs are masked (HF/Meta). Images with no real tile are left unmasked, so no row
    is ever fully masked.
    """
    m, t = tile_mask.shape
    pad = (~tile_mask)[:, :, None].expand(m, t, padded_tokens).clone()
    pad[:, :, tokens_per_tile:] = True
    pad &= tile_mask.any(dim=1)[:, None, None]
    pad = pad.reshape(m, t * padded_tokens)
    return ~(pad[:, :, None] & pad[:, None, :]).unsqueeze(1)


class MllamaVisionEncoder(TiledImageEncoder):
    """The Llama 3.2 Vision ViT: local layers with taps, then gated global layers (HF parameter names)."""

    def __init__(self, config: VisionConfig) -> None:
        super().__init__()
        c = config
        self.config = c
        self.tile_size = c.tile_size
        self.max_tiles = c.max_tiles
        self.tokens_per_tile = c.tokens_per_tile
        self.out_dim = c.out_dim

        self.patch_embedding = nn.Conv2d(
            c.num_channels, c.width, kernel_size=c.patch_size, stride=c.patch_size, bias=False
        )
        self.class_embedding = nn.Parameter(torch.randn(c.width) * c.width**-0.5)
        self.gated_positional_embedding = GatedPositionalEmbedding(c.max_tiles, c.tokens_per_tile, c.width)
        self.pre_tile_positional_embedding = TilePositionalEmbedding(c.max_tiles, c.width)
        self.post_tile_positional_embedding = TilePositionalEmbedding(c.max_tiles, c.width)
        self.layernorm_pre = nn.LayerNorm(c.width, eps=PRE_POST_NORM_EPS)
        self.layernorm_post = nn.LayerNorm(c.width, eps=PRE_POST_NORM_EPS)
        self.transformer = VisionLayerStack(c.n_local_layers, c.width, c.heads, c.mlp_dim, c.norm_eps)
        self.global_transformer = VisionLayerStack(
            c.n_global_layers, c.width, c.heads, c.mlp_dim, c.norm_eps, gated=True
        )

    def _check_inputs(
        self, pixels: torch.Tensor, aspect_ratio_ids: torch.Tensor, tile_mask: torch.Tensor
    ) -> torch.Tensor:
        """Validates shapes and ids; returns `tile_mask` as bool."""
        c = self.config
        want = (c.max_tiles, c.num_channels, c.tile_size, c.tile_size)
        if pixels.ndim != 6 or tuple(pixels.shape[2:]) != want:
            raise ValueError(
                f"pixels must be [B, N, {want[0]}, {want[1]}, {want[2]}, {want[3]}] "
                f"(B, N, max_tiles, channels, tile, tile), got {list(pixels.shape)}"
            )
        b, n = pixels.shape[:2]
        if tuple(aspect_ratio_ids.shape) != (b, n):
            raise ValueError(f"aspect_ratio_ids must be [{b}, {n}], got {list(aspect_ratio_ids.shape)}")
        if aspect_ratio_ids.dtype.is_floating_point or aspect_ratio_ids.dtype == torch.bool:
            raise ValueError(f"aspect_ratio_ids must be an integer tensor, got {aspect_ratio_ids.dtype}")
        n_ids = num_aspect_ratio_ids(c.max_tiles)
        if aspect_ratio_ids.numel() and not (0 <= int(aspect_ratio_ids.min()) and int(aspect_ratio_ids.max()) < n_ids):
            raise ValueError(
                f"aspect_ratio_ids must lie in 0..{n_ids - 1} for max_tiles={c.max_tiles}, "
                f"got values {aspect_ratio_ids.unique().tolist()}"
            )
        if tuple(tile_mask.shape) != (b, n, c.max_tiles):
            raise ValueError(f"tile_mask must be [{b}, {n}, {c.max_tiles}], got {list(tile_mask.shape)}")
        return tile_mask.bool()

    def forward(
        self, pixels: torch.Tensor, aspect_ratio_ids: torch.Tensor, tile_mask: torch.Tensor
    ) -> torch.Tensor:
        """`pixels [B, N, T, 3, H, W]`, `aspect_ratio_ids [B, N]` (0 = padding image),
        `tile_mask [B, N, T]` (True = real tile) → `[B, N, T, tokens_per_tile, out_dim]`.

        Output features are `[final (D) | taps (D·n_taps, channel-interleaved: D + c·n_taps + t)]`.
        Tokens of padding tiles are computed like HF's (well defined, but carry no image content); those
        of images without any real tile are meaningless.
        """
        c = self.config
        tile_mask = self._check_inputs(pixels, aspect_ratio_ids, tile_mask)
        b, n, t = pixels.shape[:3]
        m, d, tokens, padded = b * n, c.width, c.tokens_per_tile, c.padded_tokens_per_tile
        weight = self.patch_embedding.weight
        ids = aspect_ratio_ids.reshape(m).to(weight.device, torch.long)
        tile_mask = tile_mask.to(weight.device)
        x = self.patch_embedding(pixels.reshape(m * t, *pixels.shape[3:]).to(weight.device, weight.dtype))
        x = x.flatten(2).transpose(1, 2).reshape(m, t, tokens - 1, d)  # [M, T, P, D]
        x = self.pre_tile_positional_embedding(x, ids)
        cls = self.class_embedding.to(x.dtype).expand(m, t, 1, d)
        x = torch.cat([cls, x], dim=2)  # [M, T, L, D]
        x = self.gated_positional_embedding(x, ids)
        x = self.layernorm_pre(x)
        x = F.pad(x, (0, 0, 0, padded - tokens)).reshape(m, t * padded, d)  # [M, T·Lp, D]

        mask = encoder_attention_mask(tile_mask.reshape(m, t), tokens, padded)
        x, taps = self.transformer(x, mask, c.taps)
        x = self.layernorm_post(x)
        x = self.post_tile_positional_embedding(x.view(m, t, padded, d), ids).reshape(m, t * padded, d)
        x, _ = self.global_transformer(x, mask)

        if taps:
            x = torch.cat([x, torch.stack(taps, dim=-1).flatten(-2)], dim=-1)  # [M, T·Lp, out_dim]
        x = x.view(m, t, padded, c.out_dim)[:, :, :tokens]
        return x.reshape(b, n, t, tokens, c.out_dim)


def meta_vision_state_dict_to_ours(sd: dict[str, torch.Tensor], cfg: VisionConfig) -> dict[str, torch.Tensor]:
    """Meta llama-models vision encoder weights → `MllamaVisionEncoder` state dict.

    `sd` holds the keys under `vision_model.vision_encoder.` with that prefix stripped (`conv1._linear.weight`,
    `transformer.resblocks.0.attn.wq.weight`, ...). Per-grid embeddings (`[T, T, K, D]`) become HF's
    per-aspect-ratio tables (see `grid_to_aspect_ratio_table`). Raises `ValueError` on missing keys,
    wrong shapes or leftover keys.
    """
    d, p, t, tokens = cfg.width, cfg.patch_size, cfg.max_tiles, cfg.tokens_per_tile
    prefixed = [k for k in sd if k.endswith("conv1._linear.weight") and k != "conv1._linear.weight"]
    if "conv1._linear.weight" not in sd and prefixed:
        prefix = prefixed[0][: -len("conv1._linear.weight")]
        raise ValueError(f"keys still carry the prefix {prefix!r}; strip it before converting (found {prefixed[0]!r})")
    used: set[str] = set()

    def take(name: str, shape: tuple[int, ...]) -> torch.Tensor:
        if name not in sd:
            raise ValueError(f"Meta vision state dict lacks {name!r} (expected shape {list(shape)})")
        tensor = sd[name]
        if tuple(tensor.shape) != shape:
            if len(shape) == 1 and shape[0] == 1 and tensor.numel() == 1:  # scalar gates
                tensor = tensor.reshape(1)
            else:
                raise ValueError(f"{name!r} has shape {list(tensor.shape)}, expected {list(shape)} for {cfg}")
        used.add(name)
        return tensor

    out: dict[str, torch.Tensor] = {
        "patch_embedding.weight": take("conv1._linear.weight", (d, cfg.num_channels * p * p)).reshape(
            d, cfg.num_channels, p, p
        ),
        "class_embedding": take("class_embedding", (d,)),
        "gated_positional_embedding.embedding": take("positional_embedding", (tokens, d)),
        "gated_positional_embedding.gate": take("gated_positional_embedding_gate", (1,)),
        "gated_positional_embedding.tile_embedding.weight": grid_to_aspect_ratio_table(
            take("gated_positional_embedding", (t, t, tokens, d)), t
        ),
    }
    for meta, ours in (("pre_tile_pos_embed", "pre_tile_positional_embedding"),
                       ("post_tile_pos_embed", "post_tile_positional_embedding")):  # fmt: skip
        out[f"{ours}.embedding.weight"] = grid_to_aspect_ratio_table(take(f"{meta}.embedding", (t, t, 1, d)), t)
        out[f"{ours}.gate"] = take(f"{meta}.gate", (1,))
    for meta, ours in (("ln_pre", "layernorm_pre"), ("ln_post", "layernorm_post")):
        for kind in ("weight", "bias"):
            out[f"{ours}.{kind}"] = take(f"{meta}.{kind}", (d,))

    layer_names = {
        "attn.wq.weight": ("self_attn.q_proj.weight", (d, d)),
        "attn.wk.weight": ("self_attn.k_proj.weight", (d, d)),
        "attn.wv.weight": ("self_attn.v_proj.weight", (d, d)),
        "attn.wo.weight": ("self_attn.o_proj.weight", (d, d)),
        "ln_1.weight": ("input_layernorm.weight", (d,)),
        "ln_1.bias": ("input_layernorm.bias", (d,)),
        "ln_2.weight": ("post_attention_layernorm.weight", (d,)),
        "ln_2.bias": ("post_attention_layernorm.bias", (d,)),
        "mlp.c_fc.weight": ("mlp.fc1.weight", (cfg.mlp_dim, d)),
        "mlp.c_fc.bias": ("mlp.fc1.bias", (cfg.mlp_dim,)),
        "mlp.c_proj.weight": ("mlp.fc2.weight", (d, cfg.mlp_dim)),
        "mlp.c_proj.bias": ("mlp.fc2.bias", (d,)),
    }
    gate_names = {"gate_attn": ("gate_attn", (1,)), "gate_ffn": ("gate_ffn", (1,))}
    for stack, count, gated in (("transformer", cfg.n_local_layers, False),
                                ("global_transformer", cfg.n_global_layers, True)):  # fmt: skip
        names = {**layer_names, **gate_names} if gated else layer_names
        for i in range(count):
            for meta, (ours, shape) in names.items():
                out[f"{stack}.layers.{i}.{ours}"] = take(f"{stack}.resblocks.{i}.{meta}", shape)

    leftover = sorted(set(sd) - used)
    if leftover:
        raise ValueError(
            f"{len(leftover)} Meta vision keys were not converted, e.g. {leftover[:5]}; "
            f"check that the config ({cfg}) matches the checkpoint"
        )
    return out

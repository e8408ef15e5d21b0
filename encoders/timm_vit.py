"""The paper's image encoder recipe (Llama 3 §7.2) on any timm ViT.

A timm Vision Transformer (the paper's is ViT-H/14, `vit_huge_patch14_clip_336`) encodes each tile on
its own; on top of it come the paper's additions:

* **multi-layer taps** — the hidden states *entering* the configured backbone blocks (paper: blocks
  3, 7, 15, 23, 30, 0-based), kept next to the final output so fine-grained features survive;
* **tile positional embeddings** per aspect-ratio id, added before the backbone (to the patch tokens)
  and after it (to every token), each scaled by a tanh gate that starts at 0;
* **gated self-attention layers** (paper: 8) running over *all tiles of one image concatenated*:
  ``x += tanh(gate_attn)·attn(ln_1 x); x += tanh(gate_ffn)·mlp(ln_2 x)`` with both gates initialised
  to 0, so at init the stack is exactly the identity. Padding tiles are excluded as attention keys.

Output per token (block layout, *not* Meta's channel-interleaved tap layout)::

    features[..., 0:W]                 final hidden state (backbone final norm → post-tile emb → gated stack)
    features[..., W·(1+j):W·(2+j)]     tap j: hidden state entering backbone block taps[j] (no norm)

so ``out_dim = W × (1 + len(taps))`` (7680 = 1280 × 6 for the paper's ViT-H/14).

Tap-index convention. ``taps`` name block indices whose **input** is tapped. timm's
``forward_intermediates(indices=...)`` returns block **outputs**, so tap ``i > 0`` is timm index
``i − 1``. Tap ``0`` is the input of block 0, i.e. the embedded tokens after patch embedding, prefix
tokens, position embedding and ``norm_pre`` (CLIP's ``ln_pre``); timm offers no index for it, so it is
captured with a forward pre-hook on ``backbone.blocks[0]``.

Final output. The final slice is the backbone's output after its final norm (``backbone.norm``, CLIP's
``ln_post``) — the same order as Meta's Llama 3.2 Vision (``ln_post`` → post-tile embedding → global
layers) — while taps are raw, un-normalised block inputs (``norm=False``).

Tokens. Every token the backbone carries is kept: ``tokens_per_tile = patches + prefix tokens``, with
the prefix (class token, then any register tokens of ``*_reg*`` models) first, as timm orders them. A
model without a class token (e.g. SigLIP) simply has ``tokens_per_tile = patches``.

Weights. ``weights=`` names a local ``.safetensors`` / ``.pth`` / ``.bin`` file holding a timm state dict
(or an OpenCLIP / OpenAI-CLIP visual tower that timm's own ``checkpoint_filter_fn`` converts). Nothing is
ever downloaded: the backbone is always created with ``pretrained=False``.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import math
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

import timm
import timm.models
import torch
from timm.layers import Mlp
from torch import nn

from mm_llama.attention import attend
from mm_llama.encoders.conv_stem import check_conv_stem, conv_stem_embed_layer, pixel_path_name
from mm_llama.encoders.base import TiledImageEncoder
from mm_llama.encoders.tiling import num_aspect_ratio_ids

_log = logging.getLogger(__name__)

DEFAULT_POS_EMBED_INIT_STD = 0.6
"""Position-embedding std of a randomly initialised backbone: the RMS of patch embeddings at init."""
PAPER_TAPS: tuple[int, ...] = (3, 7, 15, 23, 30)
"""Block indices (0-based) whose input hidden states the paper taps (its layers 4, 8, 16, 24, 31)."""

# Classifier / pooling-head keys a timm checkpoint may hold; the encoder emits tokens, so the backbone
# is built without them and these keys are dropped (and logged) when loading.
_HEAD_PREFIXES: tuple[str, ...] = ("head.", "head_dist.", "attn_pool.", "fc_norm.")
# timm.create_model arguments this module owns; passing them in `timm_kwargs` is an error.
_RESERVED_TIMM_KWARGS: dict[str, str] = {
    "pretrained": "weights are never downloaded; name a local file with `weights=`",
    "checkpoint_path": "name the local file with `weights=` so key prefixes and head keys are handled",
    "num_classes": "the encoder always builds the backbone with num_classes=0 (tokens, no classifier)",
}


@dataclass
class TimmEncoderConfig:
    """How to build a `TimmTiledEncoder`.

    `model_name`: any timm ViT-style model (has `forward_intermediates`, `blocks`, `patch_embed`).
    `timm_kwargs`: extra `timm.create_model` arguments (e.g. a tiny test model's `embed_dim`, `depth`).
    `tile_size`: tile side in pixels; passed to timm as `img_size`.
    `taps`: backbone block indices whose *input* hidden states are tapped (see module docstring).
    `n_gated_layers`: new gated self-attention layers over all tiles of an image (paper: 8).
    `gated_num_heads` / `gated_mlp_dim`: sizes of those layers; None copies the backbone's blocks.
    `weights`: a local `.safetensors` / `.pth` / `.bin` backbone state dict, or None (random init).
    `pos_embed_init_std`: std of the learned position embedding when the backbone starts from random
    weights (no `weights`); None keeps timm's 0.02. Patch embeddings of normalised pixels start with an
    RMS near 0.6, so at timm's scale a from-scratch ViT hardly knows where a patch is and, on small data,
    learns spatial content (shape, position, characters) several times slower. Loaded weights replace it.
    `stem_channels` / `stem_strides` / `stem_norm`: when set, the patch embedding becomes a convolutional
    stem plus the linear projection of the raw patches (`encoders/conv_stem.py`): one 3×3 convolution per
    entry, the token grid being the tile side over the product of the strides (a `patch_size` in
    `timm_kwargs` must equal that product). Empty (the default): timm's linear patch embedding.
    `stem_pixel_path`: with a stem, what is added to its tokens (`conv_stem.PIXEL_PATHS`): true or ``patch``,
    the linear projection of the raw patches (keeps a tile's absolute colour, which the stem's per-tile norms
    remove); ``mean``, a projection of each patch's mean colour only; false or ``none``: the stem's tokens alone.
    """

    model_name: str = "vit_huge_patch14_clip_336"
    timm_kwargs: dict[str, Any] = field(default_factory=dict)
    tile_size: int = 336
    max_tiles: int = 4
    taps: tuple[int, ...] = PAPER_TAPS
    n_gated_layers: int = 8
    gated_num_heads: int | None = None
    gated_mlp_dim: int | None = None
    weights: str | None = None
    pos_embed_init_std: float | None = DEFAULT_POS_EMBED_INIT_STD
    stem_channels: tuple[int, ...] = ()
    stem_strides: tuple[int, ...] = ()
    stem_norm: str = "instance"
    stem_pixel_path: bool | str = True

    def __post_init__(self) -> None:
        self.taps = tuple(self.taps)
        self.stem_channels, self.stem_strides = tuple(self.stem_channels), tuple(self.stem_strides)
        pixel_path_name(self.stem_pixel_path)  # raises on a bad value
        if self.stem_channels or self.stem_strides:
            check_conv_stem(self.stem_channels, self.stem_strides, self.stem_norm, self.tile_size,
                            self.timm_kwargs.get("patch_size"))
        std = self.pos_embed_init_std
        if std is not None and (isinstance(std, bool) or not isinstance(std, (int, float)) or not 0 < std < math.inf):
            raise ValueError(f"pos_embed_init_std must be a positive number or null (timm's init), got {std!r}")
        if not self.model_name:
            raise ValueError("model_name is empty; name a timm ViT such as 'vit_huge_patch14_clip_336'")
        if self.tile_size < 1:
            raise ValueError(f"tile_size must be a positive pixel count, got {self.tile_size}")
        if self.max_tiles < 1:
            raise ValueError(f"max_tiles must be >= 1, got {self.max_tiles}")
        if self.n_gated_layers < 0:
            raise ValueError(f"n_gated_layers must be >= 0, got {self.n_gated_layers}")
        bad = [t for t in self.taps if not isinstance(t, int) or isinstance(t, bool) or t < 0]
        if bad:
            raise ValueError(f"taps must be non-negative block indices, got {list(self.taps)} (bad: {bad})")
        if len(set(self.taps)) != len(self.taps):
            raise ValueError(f"taps contains duplicates: {list(self.taps)}; list each block index once")
        for key, why in _RESERVED_TIMM_KWARGS.items():
            if key in self.timm_kwargs:
                raise ValueError(f"timm_kwargs[{key!r}]={self.timm_kwargs[key]!r} is not allowed: {why}")
        img_size = self.timm_kwargs.get("img_size")
        if img_size is not None and img_size not in (self.tile_size, (self.tile_size, self.tile_size)):
            raise ValueError(
                f"timm_kwargs['img_size']={img_size!r} disagrees with tile_size={self.tile_size}; "
                "set tile_size only (it is passed to timm as img_size)"
            )


# --------------------------------------------------------------------------------------------------
# weights


def _strip_prefix(state_dict: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    return {k[len(prefix):]: v for k, v in state_dict.items() if k.startswith(prefix)}


def _checkpoint_filter(backbone: nn.Module) -> Callable[..., dict[str, torch.Tensor]] | None:
    """The `checkpoint_filter_fn` timm defines next to the backbone's class, if any.

    For `VisionTransformer` it converts OpenAI-CLIP / OpenCLIP visual towers to timm keys and resamples
    the position embedding to the model's grid (the paper's ViT-H/14 was trained at 224 px and runs on
    336 px tiles).
    """
    fn = getattr(sys.modules.get(type(backbone).__module__), "checkpoint_filter_fn", None)
    return fn if callable(fn) else None


def read_backbone_state_dict(path: str | Path, backbone: nn.Module) -> dict[str, torch.Tensor]:
    """Read a local weights file into a state dict keyed like `backbone.state_dict()`.

    Accepts safetensors or torch files (`torch.load(weights_only=True)`); unwraps `state_dict` /
    `model` / EMA entries and strips `module.` / `_orig_mod.` (via timm), a `model.` prefix on every
    key, and a `visual.` prefix (keeping only the visual tower of a CLIP checkpoint); then applies timm's
    checkpoint filter for the backbone's family. Raises FileNotFoundError / ValueError with the path.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(
            f"encoder weights file {str(path)!r} does not exist (or is not a file); "
            "pass the path of a local .safetensors/.pth/.bin timm state dict"
        )
    try:
        state_dict = timm.models.load_state_dict(str(path), use_ema=True, device="cpu", weights_only=True)
    except Exception as err:  # safetensors / pickle / zip errors all mean "not a readable state dict"
        raise ValueError(
            f"could not read encoder weights from {str(path)!r} ({type(err).__name__}: {err}); "
            "expected a safetensors file or a torch-saved state dict of tensors"
        ) from err
    if not isinstance(state_dict, dict) or not state_dict:
        raise ValueError(f"encoder weights file {str(path)!r} holds no state dict (got {type(state_dict).__name__})")
    non_tensors = [k for k, v in state_dict.items() if not isinstance(v, torch.Tensor)]
    if non_tensors:
        raise ValueError(
            f"encoder weights file {str(path)!r} is not a flat state dict of tensors "
            f"(non-tensor entries: {non_tensors[:5]}); save `model.state_dict()`"
        )
    if all(k.startswith("model.") for k in state_dict):
        state_dict = _strip_prefix(state_dict, "model.")
    # OpenAI-CLIP (`visual.class_embedding`) and OpenCLIP-timm (`visual.trunk.*`) layouts are left for
    # timm's filter, which knows them; any other `visual.` tower is a timm state dict under a prefix.
    clip_layout = "visual.class_embedding" in state_dict or any(k.startswith("visual.trunk.") for k in state_dict)
    if not clip_layout and any(k.startswith("visual.") for k in state_dict):
        state_dict = _strip_prefix(state_dict, "visual.")
    filter_fn = _checkpoint_filter(backbone)
    if filter_fn is not None:
        before = {k: tuple(v.shape) for k, v in state_dict.items()}
        state_dict = filter_fn(state_dict, backbone)
        for k, v in state_dict.items():
            if k in before and before[k] != tuple(v.shape):
                _log.warning("encoder weights %s: %s resampled from %s to %s", path, k, before[k], tuple(v.shape))
    return state_dict


def load_backbone_weights(backbone: nn.Module, path: str | Path) -> list[str]:
    """Load a local weights file into a timm backbone, all-or-nothing.

    Every backbone key must be present with its exact shape (after timm's position-embedding
    resampling); classifier/pooling-head keys (`head.`, `head_dist.`, `attn_pool.`, `fc_norm.`) that the
    token-emitting backbone lacks are ignored and returned. Anything else raises ValueError listing the
    missing, unexpected and mismatched keys. Returns the ignored keys.
    """
    state_dict = read_backbone_state_dict(path, backbone)
    expected = backbone.state_dict()
    missing = [k for k in expected if k not in state_dict]
    extra = [k for k in state_dict if k not in expected]
    ignored = [k for k in extra if k.startswith(_HEAD_PREFIXES)]
    unexpected = [k for k in extra if not k.startswith(_HEAD_PREFIXES)]
    mismatched = [
        f"{k}: file {tuple(state_dict[k].shape)} vs model {tuple(v.shape)}"
        for k, v in expected.items()
        if k in state_dict and tuple(state_dict[k].shape) != tuple(v.shape)
    ]
    if missing or unexpected or mismatched:
        problems = []
        if missing:
            problems.append(f"{len(missing)} missing key(s) {missing[:8]}")
        if unexpected:
            problems.append(f"{len(unexpected)} unexpected key(s) {unexpected[:8]}")
        if mismatched:
            problems.append(f"{len(mismatched)} shape mismatch(es) {mismatched[:8]}")
        hint = ""
        if any(k.startswith("norm.") for k in missing) and any(k.startswith("fc_norm.") for k in ignored):
            hint = " (the file's model normalises after pooling: fc_norm, not norm; set timm_kwargs global_pool='avg')"
        raise ValueError(
            f"encoder weights {str(path)!r} do not fit backbone {type(backbone).__name__}: "
            + "; ".join(problems)
            + hint
            + ". Check model_name, tile_size and timm_kwargs against the model that saved the file."
        )
    if any(p.is_meta for p in backbone.parameters()):
        backbone.load_state_dict({k: state_dict[k] for k in expected}, strict=True, assign=True)
    else:
        backbone.load_state_dict({k: state_dict[k] for k in expected}, strict=True)
    if ignored:
        _log.info("encoder weights %s: ignored head keys %s", path, ignored)
    return ignored


# --------------------------------------------------------------------------------------------------
# paper additions


class TilePositionalEmbedding(nn.Module):
    """Tanh-gated learned embedding per (aspect-ratio id, tile index).

    `table [num_aspect_ratio_ids, max_tiles, width]` (row 0 belongs to padding images and is never used
    by real tiles), `gate [1]` initialised to 0 so the embedding starts switched off.
    """

    def __init__(self, max_tiles: int, width: int) -> None:
        super().__init__()
        self.table = nn.Parameter(torch.randn(num_aspect_ratio_ids(max_tiles), max_tiles, width) / math.sqrt(width))
        self.gate = nn.Parameter(torch.zeros(1))

    def forward(self, aspect_ratio_ids: torch.Tensor, tile_index: torch.Tensor) -> torch.Tensor:
        """`aspect_ratio_ids [R]`, `tile_index [R]` (long) → `[R, width]`."""
        return torch.tanh(self.gate) * self.table[aspect_ratio_ids, tile_index]


class GatedSelfAttention(nn.Module):
    """Multi-head self-attention through `mm_llama.attention.attend`: `[M, S, W]` → `[M, S, W]`."""

    def __init__(self, width: int, num_heads: int, qkv_bias: bool = True) -> None:
        super().__init__()
        if width % num_heads:
            raise ValueError(
                f"width {width} is not divisible by num_heads {num_heads}; pick gated_num_heads dividing it"
            )
        self.num_heads = num_heads
        self.qkv = nn.Linear(width, 3 * width, bias=qkv_bias)
        self.proj = nn.Linear(width, width)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """`x [M, S, W]`, `mask [M, 1, 1, S]` bool (True = key may be attended) or None."""
        m, s, w = x.shape
        q, k, v = self.qkv(x).view(m, s, 3, self.num_heads, w // self.num_heads).permute(2, 0, 3, 1, 4)
        out = attend(q, k, v, mask=mask)  # [M, H, S, hd]
        return self.proj(out.transpose(1, 2).reshape(m, s, w))


class GatedTransformerLayer(nn.Module):
    """Pre-norm layer with tanh gates on both residual branches (gates start at 0 → identity).

    `x += tanh(gate_attn)·attn(ln_1 x); x += tanh(gate_ffn)·mlp(ln_2 x)`.
    """

    def __init__(
        self,
        width: int,
        num_heads: int,
        mlp_dim: int,
        *,
        eps: float = 1e-5,
        act_layer: Callable[[], nn.Module] = nn.GELU,
        qkv_bias: bool = True,
    ) -> None:
        super().__init__()
        self.ln_1 = nn.LayerNorm(width, eps=eps)
        self.attn = GatedSelfAttention(width, num_heads, qkv_bias=qkv_bias)
        self.ln_2 = nn.LayerNorm(width, eps=eps)
        self.mlp = Mlp(width, hidden_features=mlp_dim, act_layer=act_layer)
        self.gate_attn = nn.Parameter(torch.zeros(1))
        self.gate_ffn = nn.Parameter(torch.zeros(1))

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """`x [M, S, W]`, `mask [M, 1, 1, S]` bool or None → `[M, S, W]`."""
        x = x + torch.tanh(self.gate_attn) * self.attn(self.ln_1(x), mask)
        return x + torch.tanh(self.gate_ffn) * self.mlp(self.ln_2(x))


class GatedTransformer(nn.Module):
    """A stack of `GatedTransformerLayer`s over the concatenated tiles of each image."""

    def __init__(self, depth: int, width: int, num_heads: int, mlp_dim: int, **layer_kwargs: Any) -> None:
        super().__init__()
        self.layers = nn.ModuleList(
            GatedTransformerLayer(width, num_heads, mlp_dim, **layer_kwargs) for _ in range(depth)
        )
        self.apply(_init_linear)

    def forward(self, x: torch.Tensor, key_mask: torch.Tensor | None = None) -> torch.Tensor:
        """`x [M, S, W]`, `key_mask [M, S]` bool (True = real token; every row needs one) → `[M, S, W]`."""
        mask = None if key_mask is None else key_mask[:, None, None, :]
        for layer in self.layers:
            x = layer(x, mask)
        return x


def _init_linear(module: nn.Module) -> None:
    if isinstance(module, nn.Linear):
        nn.init.trunc_normal_(module.weight, std=0.02)
        if module.bias is not None:
            nn.init.zeros_(module.bias)


# --------------------------------------------------------------------------------------------------
# the encoder


def init_position_embedding(backbone: nn.Module, std: float) -> None:
    """Re-draw the backbone's learned position embedding (`pos_embed [1, L, W]`, if it has one) from a
    normal with `std`, truncated at ±3 std. Models without a learned table (RoPE, sin-cos) are left alone."""
    pos_embed = getattr(backbone, "pos_embed", None)
    if isinstance(pos_embed, nn.Parameter):
        nn.init.trunc_normal_(pos_embed, std=std, a=-3 * std, b=3 * std)


def _build_backbone(cfg: TimmEncoderConfig) -> nn.Module:
    kwargs = dict(cfg.timm_kwargs)
    kwargs.setdefault("global_pool", "")
    kwargs["img_size"] = cfg.tile_size
    if cfg.stem_channels:
        kwargs["patch_size"] = 1
        kwargs["embed_layer"] = conv_stem_embed_layer(cfg.stem_channels, cfg.stem_strides, cfg.stem_norm,
                                                      cfg.stem_pixel_path)
    try:
        backbone = timm.create_model(cfg.model_name, pretrained=False, num_classes=0, **kwargs)
    except RuntimeError as err:
        if "Unknown model" in str(err):
            raise ValueError(
                f"timm has no model {cfg.model_name!r}; list candidates with timm.list_models('vit_*')"
            ) from err
        raise
    needed = ("forward_intermediates", "blocks", "patch_embed", "num_prefix_tokens", "embed_dim", "norm")
    lacking = [a for a in needed if not hasattr(backbone, a)]
    if lacking:
        raise ValueError(
            f"timm model {cfg.model_name!r} ({type(backbone).__name__}) is not a ViT-style model "
            f"(lacks {lacking}); pick a plain ViT such as 'vit_huge_patch14_clip_336'"
        )
    return backbone


class TimmTiledEncoder(TiledImageEncoder):
    """Paper §7.2 tiled image encoder on a timm ViT: taps + tile embeddings + gated layers.

    Attributes: `backbone` (the timm model), `gated_layers` (`GatedTransformer`),
    `pre_tile_embed` / `post_tile_embed` (`TilePositionalEmbedding`), `width`, `taps`, and the
    `TiledImageEncoder` fields `tile_size`, `max_tiles`, `tokens_per_tile`, `out_dim`.
    """

    def __init__(self, config: TimmEncoderConfig) -> None:
        super().__init__()
        self.config = config
        self.backbone = _build_backbone(config)
        depth = len(self.backbone.blocks)
        too_deep = [t for t in config.taps if t >= depth]
        if too_deep:
            raise ValueError(
                f"taps {too_deep} are out of range for {config.model_name!r} with {depth} blocks "
                f"(a tap names the block whose input is tapped: 0..{depth - 1})"
            )
        self.taps: tuple[int, ...] = config.taps
        self.width: int = int(self.backbone.embed_dim)
        self.tile_size = config.tile_size
        self.max_tiles = config.max_tiles
        self.tokens_per_tile = int(self.backbone.patch_embed.num_patches) + int(self.backbone.num_prefix_tokens)
        self.out_dim = self.width * (1 + len(self.taps))

        if config.weights is not None:
            load_backbone_weights(self.backbone, config.weights)
        elif config.pos_embed_init_std is not None:
            init_position_embedding(self.backbone, config.pos_embed_init_std)

        num_heads, mlp_dim, layer_kwargs = self._gated_layer_shape(config)
        self.pre_tile_embed = TilePositionalEmbedding(config.max_tiles, self.width)
        self.post_tile_embed = TilePositionalEmbedding(config.max_tiles, self.width)
        self.gated_layers = GatedTransformer(config.n_gated_layers, self.width, num_heads, mlp_dim, **layer_kwargs)

    def _gated_layer_shape(self, config: TimmEncoderConfig) -> tuple[int, int, dict[str, Any]]:
        """Heads, MLP width, and norm/activation/bias of the new layers, copied from the backbone's blocks."""
        block = self.backbone.blocks[0]
        attn = getattr(block, "attn", None)
        mlp = getattr(block, "mlp", None)
        num_heads = config.gated_num_heads or getattr(attn, "num_heads", None)
        fc1 = getattr(mlp, "fc1", None)
        mlp_dim = config.gated_mlp_dim or (fc1.out_features if isinstance(fc1, nn.Linear) else None)
        if num_heads is None or mlp_dim is None:
            raise ValueError(
                f"cannot read head count / MLP width from {config.model_name!r} blocks; "
                "set gated_num_heads and gated_mlp_dim in TimmEncoderConfig"
            )
        kwargs: dict[str, Any] = {}
        eps = getattr(self.backbone.norm, "eps", None)
        if isinstance(eps, float):
            kwargs["eps"] = eps
        act = getattr(mlp, "act", None)
        if isinstance(act, nn.Module) and not isinstance(act, nn.Identity):
            kwargs["act_layer"] = lambda: copy.deepcopy(act)
        qkv = getattr(attn, "qkv", None)
        if isinstance(qkv, nn.Linear):
            kwargs["qkv_bias"] = qkv.bias is not None
        return int(num_heads), int(mlp_dim), kwargs

    # ------------------------------------------------------------------------------------------------

    @contextlib.contextmanager
    def _backbone_hooks(self, pre_tile: torch.Tensor, store: dict[str, torch.Tensor]) -> Iterator[None]:
        """While active: add `pre_tile [R, W]` to every patch-embedding output token (before prefix
        tokens, position embedding and `norm_pre`, Meta's placement), and, when tap 0 is configured,
        record the input of `blocks[0]` in `store['block0_input']`."""
        handles = []

        def add_pre_tile(_module: nn.Module, _args: Any, output: torch.Tensor) -> torch.Tensor:
            shape = (output.shape[0],) + (1,) * (output.dim() - 2) + (output.shape[-1],)  # NLC or NHWC
            return output + pre_tile.view(shape).to(output.dtype)

        def record_block0_input(_module: nn.Module, args: tuple[Any, ...]) -> None:
            store["block0_input"] = args[0]

        handles.append(self.backbone.patch_embed.register_forward_hook(add_pre_tile))
        if 0 in self.taps:
            handles.append(self.backbone.blocks[0].register_forward_pre_hook(record_block0_input))
        try:
            yield
        finally:
            for handle in handles:
                handle.remove()

    def run_backbone(
        self, tiles: torch.Tensor, pre_tile: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """Tiles `[R, 3, H, W]` (+ optional `pre_tile [R, W]`) → final tokens after the backbone's final
        norm `[R, L, W]` and the taps `[R, L, W]` each, in `self.taps` order (raw block inputs)."""
        if pre_tile is None:
            pre_tile = tiles.new_zeros(tiles.shape[0], self.width)
        store: dict[str, torch.Tensor] = {}
        timm_indices = sorted(t - 1 for t in self.taps if t > 0)  # input of block t = output of block t-1
        with self._backbone_hooks(pre_tile, store):
            if timm_indices:
                final, intermediates = self.backbone.forward_intermediates(
                    tiles, indices=timm_indices, output_fmt="NLC", norm=False, return_prefix_tokens=True
                )
            else:
                final, intermediates = self.backbone.forward_features(tiles), []
        by_block: dict[int, torch.Tensor] = {}
        for index, item in zip(timm_indices, intermediates):  # timm returns them in block order
            if isinstance(item, tuple):  # (spatial, prefix) when the model has prefix tokens
                spatial, prefix = item
                item = torch.cat([prefix, spatial], dim=1)
            by_block[index + 1] = item
        if 0 in self.taps:
            by_block[0] = store["block0_input"]
        return final, [by_block[t] for t in self.taps]

    def _check_inputs(self, pixels: torch.Tensor, aspect_ratio_ids: torch.Tensor, tile_mask: torch.Tensor) -> None:
        expected = ("B", "N", self.max_tiles, 3, self.tile_size, self.tile_size)
        if pixels.dim() != 6 or tuple(pixels.shape[2:]) != expected[2:]:
            raise ValueError(
                f"pixels must be [B, N, T={self.max_tiles}, 3, {self.tile_size}, {self.tile_size}], "
                f"got {list(pixels.shape)}; tile images with tile_size={self.tile_size}, max_tiles={self.max_tiles}"
            )
        b, n, t = pixels.shape[:3]
        if tuple(aspect_ratio_ids.shape) != (b, n):
            raise ValueError(f"aspect_ratio_ids must be [B, N] = [{b}, {n}], got {list(aspect_ratio_ids.shape)}")
        if tuple(tile_mask.shape) != (b, n, t) or tile_mask.dtype != torch.bool:
            raise ValueError(
                f"tile_mask must be a bool tensor [B, N, T] = [{b}, {n}, {t}], "
                f"got {tile_mask.dtype} {list(tile_mask.shape)}"
            )
        n_ids = num_aspect_ratio_ids(self.max_tiles)
        if aspect_ratio_ids.numel() and (aspect_ratio_ids.min() < 0 or aspect_ratio_ids.max() >= n_ids):
            raise ValueError(
                f"aspect_ratio_ids must lie in 0..{n_ids - 1} for max_tiles={self.max_tiles} "
                f"(0 = padding image), got values {sorted(set(aspect_ratio_ids.flatten().tolist()))}"
            )
        if (tile_mask & (aspect_ratio_ids == 0)[..., None]).any():
            raise ValueError(
                "tile_mask marks real tiles on a padding image (aspect_ratio_id 0); "
                "set tile_mask False for every tile of a padding image"
            )

    def forward(self, pixels: torch.Tensor, aspect_ratio_ids: torch.Tensor, tile_mask: torch.Tensor) -> torch.Tensor:
        """`pixels [B, N, T, 3, H, W]`, `aspect_ratio_ids [B, N]` (1-based; 0 = padding image),
        `tile_mask [B, N, T]` bool → `[B, N, T, tokens_per_tile, out_dim]` (zeros on padding tiles).

        Only real tiles go through the backbone (flattened into one batch); the gated layers then see
        each image's `T × tokens_per_tile` tokens at once, with padding tiles masked out as keys.
        """
        self._check_inputs(pixels, aspect_ratio_ids, tile_mask)
        b, n, t = tile_mask.shape
        length, width = self.tokens_per_tile, self.width
        if not tile_mask.any():
            return pixels.new_zeros(b, n, t, length, self.out_dim)

        ids = aspect_ratio_ids.long()[..., None].expand(b, n, t)[tile_mask]  # [R]
        tile_index = torch.arange(t, device=tile_mask.device).expand(b, n, t)[tile_mask]  # [R]
        final, taps = self.run_backbone(pixels[tile_mask], self.pre_tile_embed(ids, tile_index))  # [R, L, W]
        if final.shape[1] != length:
            raise ValueError(
                f"backbone {self.config.model_name!r} returned {final.shape[1]} tokens per tile, expected "
                f"tokens_per_tile={length}; models that drop or merge tokens are not supported"
            )
        final = final + self.post_tile_embed(ids, tile_index)[:, None, :].to(final.dtype)

        real_image = tile_mask.any(-1)  # [B, N]
        key_tiles = tile_mask[real_image]  # [M, T]
        hidden = final.new_zeros(b, n, t, length, width)
        hidden[tile_mask] = final
        hidden = hidden[real_image].reshape(-1, t * length, width)  # [M, T·L, W]
        key_mask = None if bool(key_tiles.all()) else key_tiles.repeat_interleave(length, dim=1)  # [M, T·L]
        hidden = self.gated_layers(hidden, key_mask).reshape(-1, t, length, width)
        final = hidden[key_tiles]  # [R, L, W], same (b, n, t) order as pixels[tile_mask]

        features = torch.cat([final, *(tap.to(final.dtype) for tap in taps)], dim=-1)  # [R, L, out_dim]
        out = features.new_zeros(b, n, t, length, self.out_dim)
        out[tile_mask] = features
        return out

    @staticmethod
    def split_features(features: torch.Tensor, num_taps: int) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """Undo the block layout: `[..., W·(1+num_taps)]` → final `[..., W]` and taps `[..., W]` each."""
        if features.shape[-1] % (1 + num_taps):
            raise ValueError(f"last dim {features.shape[-1]} is not a multiple of 1 + num_taps = {1 + num_taps}")
        chunks = features.chunk(1 + num_taps, dim=-1)
        return chunks[0], list(chunks[1:])

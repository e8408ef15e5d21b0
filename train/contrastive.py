"""`image_encoder_pretrain`: contrastive image–text pretraining of a ViT against a frozen LM (LiT-style).

For users without a CLIP checkpoint (and for the tiny built-in default): the image tower is the timm
ViT backbone that `TimmTiledEncoder` later wraps; the text tower is the **frozen** Llama LM, so no text
encoder needs training.

    image:  tiles → backbone → pooled token (CLS, or mean of patch tokens) → mean over an image's tiles
            → Linear(width → d) → L2-normalise                                        `[B, d]`
    text:   BOS + caption tokens → frozen LM final-norm hidden states → mean over the caption tokens
            → standardise per feature (BatchNorm, no affine) → Linear(dim → d) → L2-normalise   `[B, d]`
    loss:   symmetric InfoNCE over the batch, logits = exp(s)·img·txtᵀ with a learnable s initialised to
            log(1/0.07) and clamped to log(100) (CLIP's rule)

Why the standardisation: a small LM's pooled hidden states share one large common component (the mean
pairwise cosine of tiny-LM caption features is about 0.8), so a freshly initialised projection maps every
caption to nearly the same direction and InfoNCE collapses to the uniform solution (loss stuck at
log(batch)). Centring and scaling each feature over the batch removes that component before the projection; the
frozen LM itself is untouched.

In a distributed run the embeddings of all ranks are gathered (with gradients), so the negatives are
the global batch. Settings (`model.contrastive` in the recipe): `embed_dim` (default: the smaller of the
ViT width and the LM dim), `pool` (`cls` or `mean`), `init_temperature` (0.07), `max_logit_scale` (100).

The run exports `encoder.safetensors`: the backbone's state dict, which `TimmEncoderConfig(weights=…)`
and the recipes' `model.encoder_checkpoint` load.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable

import torch
import torch.distributed as dist
import torch.nn.functional as F
from safetensors.torch import save as safetensors_bytes
from torch import nn

from mm_llama.atomic_file import atomic_write
from mm_llama.data.prompts import IGNORE_INDEX
from mm_llama.model import LlamaDecoder
from mm_llama.tokenizer import Tokenizer
from mm_llama.train.recipe import DECODER_GROUP, RecipeConfig, RecipeError

ENCODER_GROUP = "image.encoder"  # the backbone, named as in the adapter stages that start from it
HEADS_GROUP = "contrastive"  # the two projections and the logit scale


@dataclass(frozen=True)
class ContrastiveSettings:
    """`model.contrastive` of a recipe (see the module docstring)."""

    embed_dim: int | None = None
    pool: str = "cls"
    init_temperature: float = 0.07
    max_logit_scale: float = 100.0

    def __post_init__(self) -> None:
        if self.pool not in ("cls", "mean"):
            raise RecipeError(f"model.contrastive.pool must be 'cls' or 'mean', got {self.pool!r}")
        if self.embed_dim is not None and self.embed_dim < 1:
            raise RecipeError(f"model.contrastive.embed_dim must be > 0, got {self.embed_dim}")
        if not 0 < self.init_temperature:
            raise RecipeError(f"model.contrastive.init_temperature must be > 0, got {self.init_temperature}")
        if not self.max_logit_scale >= 1.0 / self.init_temperature:
            raise RecipeError(f"model.contrastive.max_logit_scale ({self.max_logit_scale}) must be at least "
                              f"1/init_temperature ({1.0 / self.init_temperature:g})")

    @classmethod
    def from_dict(cls, fields: dict[str, Any]) -> ContrastiveSettings:
        known = [f.name for f in dataclasses.fields(cls)]
        unknown = sorted(set(fields) - set(known))
        if unknown:
            raise RecipeError(f"unknown key(s) model.contrastive.{', model.contrastive.'.join(unknown)}; valid keys: "
                              f"{', '.join(known)}")
        return cls(**fields)


def caption_tokens(text: Any, pad_id: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """The captions of a caption-task `TextBatch` as LM input: `(ids [B, L], mask [B, L])`.

    Each row is its BOS token (the prompt's first token) followed by the labelled response tokens
    without the closing `<|eot_id|>`; right-padded with `pad_id`, `mask` True on real tokens.
    """
    input_ids, labels = text.input_ids, text.labels
    rows = []
    for b in range(input_ids.shape[0]):
        positions = (labels[b] != IGNORE_INDEX).nonzero().flatten()
        caption = input_ids[b, positions[:-1]] if len(positions) > 1 else input_ids[b, :0]
        rows.append(torch.cat([input_ids[b, :1], caption]))
    length = max(len(r) for r in rows)
    ids = torch.full((len(rows), length), pad_id, dtype=torch.long, device=input_ids.device)
    mask = torch.zeros((len(rows), length), dtype=torch.bool, device=input_ids.device)
    for b, row in enumerate(rows):
        ids[b, : len(row)] = row
        mask[b, : len(row)] = True
    return ids, mask


def _gather(x: torch.Tensor) -> torch.Tensor:
    """`x [n, d]` of every rank concatenated (rank order), with gradients flowing back to each rank."""
    if not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
        return x
    from torch.distributed.nn.functional import all_gather

    sizes = torch.tensor([x.shape[0]], device=x.device)
    low, high = sizes.clone(), sizes.clone()
    dist.all_reduce(low, op=dist.ReduceOp.MIN)
    dist.all_reduce(high, op=dist.ReduceOp.MAX)
    if int(low) != int(high):
        raise RuntimeError(f"contrastive batches differ in size across ranks ({int(low)}..{int(high)}); "
                           "set data.drop_last=true so that every rank has full batches")
    return torch.cat(all_gather(x), dim=0)


class ContrastiveModel(nn.Module):
    """Trainable ViT backbone + projections + temperature against a frozen `LlamaDecoder`.

    Parameter groups (for the optimizer and `set_trainable`): `image.encoder` = the backbone (the name
    it has in the adapter stages it is pretrained for), `contrastive` = the two projections and the logit
    scale, `decoder` = the LM (frozen).
    """

    def __init__(self, backbone: nn.Module, lm: LlamaDecoder, settings: ContrastiveSettings = ContrastiveSettings(),
                 *, tile_size: int | None = None, max_tiles: int = 1) -> None:
        super().__init__()
        self.settings = settings
        self.tile_size = tile_size  # what the data loader must tile images to (the backbone's img_size)
        self.max_tiles = max_tiles
        self.encoder = backbone
        self.lm = lm
        width = int(backbone.embed_dim)
        dim = settings.embed_dim or min(width, lm.cfg.dim)
        self.num_prefix_tokens = int(getattr(backbone, "num_prefix_tokens", 0))
        if settings.pool == "cls" and getattr(backbone, "cls_token", None) is None:
            raise RecipeError("model.contrastive.pool=cls but the ViT has no class token; use pool: mean")
        self.image_proj = nn.Linear(width, dim)
        # batch statistics always (no running buffers): nothing to checkpoint, the same in training and eval
        self.text_norm = nn.BatchNorm1d(lm.cfg.dim, affine=False, track_running_stats=False)
        self.text_proj = nn.Linear(lm.cfg.dim, dim)
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1.0 / settings.init_temperature)))

    def parameter_groups(self) -> dict[str, dict[str, nn.Parameter]]:
        groups: dict[str, dict[str, nn.Parameter]] = {ENCODER_GROUP: {}, HEADS_GROUP: {}, DECODER_GROUP: {}}
        for name, p in self.named_parameters():
            group = ENCODER_GROUP if name.startswith("encoder.") else DECODER_GROUP if name.startswith("lm.") else HEADS_GROUP
            groups[group][name] = p
        return groups

    def group_names(self) -> tuple[str, ...]:
        return tuple(self.parameter_groups())

    def set_trainable(self, groups: Iterable[str]) -> None:
        """Train exactly `groups` (of `group_names()`); everything else is frozen."""
        wanted = list(groups)
        all_groups = self.parameter_groups()
        unknown = [g for g in wanted if g not in all_groups]
        if unknown:
            raise ValueError(f"unknown trainable group(s) {unknown}; this model's groups are {list(all_groups)}")
        for group, params in all_groups.items():
            for p in params.values():
                p.requires_grad_(group in wanted)

    def encode_images(self, images: Any) -> torch.Tensor:
        """The first image of each row (`images.pixels [B, N, T, 3, H, W]`, `tile_mask [B, N, T]`) →
        L2-normalised `[B, d]`; tiles are encoded separately and their pooled features averaged."""
        pixels, tile_mask = images.pixels[:, 0], images.tile_mask[:, 0]  # [B, T, 3, H, W], [B, T]
        if not bool(tile_mask.any(dim=1).all()):
            raise ValueError("every contrastive sample needs an image (a row has no real tile)")
        feats = self.encoder.forward_features(pixels[tile_mask])  # [R, S, W]
        pooled = feats[:, 0] if self.settings.pool == "cls" else feats[:, self.num_prefix_tokens:].mean(dim=1)
        counts = tile_mask.sum(dim=1)  # [B]
        owner = torch.repeat_interleave(torch.arange(len(counts), device=pooled.device), counts)
        per_image = torch.zeros(len(counts), pooled.shape[-1], device=pooled.device, dtype=pooled.dtype)
        per_image = per_image.index_add(0, owner, pooled) / counts[:, None].to(pooled.dtype)
        return F.normalize(self.image_proj(per_image).float(), dim=-1)

    def encode_text(self, captions: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """`captions [B, L]` (BOS first), `mask [B, L]` → L2-normalised `[B, d]` (mean of the frozen LM's
        final hidden states over the caption tokens, BOS excluded)."""
        frozen = not any(p.requires_grad for p in self.lm.parameters())
        with torch.no_grad() if frozen else torch.enable_grad():
            hidden = self.lm.forward_hidden(captions, attention_mask=mask)  # [B, L, D]
        weights = mask.clone()
        weights[:, 0] = False
        weights = weights.to(hidden.dtype)[..., None]
        pooled = (hidden * weights).sum(dim=1) / weights.sum(dim=1).clamp(min=1.0)
        return F.normalize(self.text_proj(self.text_norm(pooled.float())), dim=-1)

    def forward(self, images: Any, captions: torch.Tensor, mask: torch.Tensor) -> dict[str, torch.Tensor]:
        """`{"loss": symmetric InfoNCE (fp32 scalar), "accuracy": image→text top-1, "temperature"}`.

        In training mode the negatives are the global batch (embeddings gathered over ranks); in eval
        mode (every rank evaluates the same data) only this rank's batch."""
        img, txt = self.encode_images(images), self.encode_text(captions, mask)
        if self.training:
            img, txt = _gather(img), _gather(txt)
        scale = self.logit_scale.clamp(max=math.log(self.settings.max_logit_scale)).exp()
        logits = scale * img @ txt.T  # [N, N]
        target = torch.arange(logits.shape[0], device=logits.device)
        loss = 0.5 * (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target))
        accuracy = (logits.argmax(dim=1) == target).float().mean()
        return {"loss": loss, "accuracy": accuracy.detach(), "temperature": (1.0 / scale).detach()}


def build_contrastive(cfg: RecipeConfig, tokenizer: Tokenizer) -> ContrastiveModel:
    """The recipe's `ContrastiveModel`: a timm backbone (`model.vision`, optionally starting from
    `model.encoder_checkpoint`) and the frozen LM of `model.base_lm`."""
    from mm_llama.checkpoints.loading import load_llama
    from mm_llama.checkpoints.multimodal_loading import vision_config_from_dict
    from mm_llama.encoders.timm_vit import TimmTiledEncoder, load_backbone_weights
    from mm_llama.train.build import check_data_geometry, encoder_weights_file, lm_checkpoint_dir, vision_fields

    m = cfg.model
    if m.encoder != "timm":
        raise RecipeError(f"contrastive image-encoder pretraining trains a timm ViT: set model.encoder=timm (got {m.encoder!r})")
    if not m.base_lm:
        raise RecipeError("contrastive pretraining needs model.base_lm: the frozen LM is the text tower")
    if m.init_from:
        raise RecipeError("model.init_from is for adapter stages; continue an encoder with model.encoder_checkpoint")
    settings = ContrastiveSettings.from_dict(dict(m.contrastive))
    lm = load_llama(lm_checkpoint_dir(m.base_lm))
    if lm.cfg.vocab_size < tokenizer.vocab_size:
        raise RecipeError(f"the base LM has {lm.cfg.vocab_size} vocabulary rows but the tokenizer has "
                          f"{tokenizer.vocab_size} ids; use the base LM's tokenizer")
    fields = {**vision_fields(cfg), "n_gated_layers": 0}  # only the backbone is pretrained
    torch.manual_seed(cfg.train.seed)
    encoder = TimmTiledEncoder(vision_config_from_dict("timm", fields))
    check_data_geometry(cfg, encoder.tile_size, encoder.max_tiles)
    backbone = encoder.backbone
    if m.encoder_checkpoint:
        load_backbone_weights(backbone, encoder_weights_file(m.encoder_checkpoint))
    model = ContrastiveModel(backbone, lm, settings, tile_size=encoder.tile_size, max_tiles=encoder.max_tiles)
    trained = m.trainable_groups(model.group_names())
    if DECODER_GROUP in trained:
        raise RecipeError("contrastive pretraining keeps the LM frozen (LiT); remove decoder from model.train")
    model.set_trainable(trained)
    model.train()
    return model


def save_encoder(model: ContrastiveModel, path: str | Path) -> Path:
    """Write the backbone's state dict to `path` (safetensors, atomically)."""
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in model.encoder.state_dict().items()}
    return atomic_write(target, safetensors_bytes(tensors, metadata={"format": "pt"}))


__all__ = ["ContrastiveModel", "ContrastiveSettings", "build_contrastive", "caption_tokens", "save_encoder"]

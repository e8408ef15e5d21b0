"""`image_encoder_pretrain`: contrastive image–text pretraining of a ViT against a frozen LM (LiT-style).

For users without a CLIP checkpoint (and for the tiny built-in default): the image tower is the timm
ViT backbone that `TimmTiledEncoder` later wraps; the text tower is the **frozen** Llama LM, so no text
encoder needs training. The model and its loss are `mm_llama.encoders.contrastive.ContrastiveModel`;
this module builds it from a recipe (`model.contrastive`: `embed_dim`, `pool`, `init_temperature`,
`max_logit_scale`), turns caption batches into its text input and writes the stage's product.

The run exports `encoder.safetensors`: the backbone's state dict, which `TimmEncoderConfig(weights=…)`
and the recipes' `model.encoder_checkpoint` load.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save as safetensors_bytes

from mm_llama.atomic_file import atomic_write
from mm_llama.data.prompts import IGNORE_INDEX
from mm_llama.encoders.contrastive import DECODER_GROUP, ContrastiveModel, ContrastiveSettings
from mm_llama.tokenizer import Tokenizer
from mm_llama.train.recipe import RecipeConfig, RecipeError


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
    try:
        settings = ContrastiveSettings.from_dict(dict(m.contrastive))
    except ValueError as err:
        raise RecipeError(str(err)) from err
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
    try:
        model = ContrastiveModel(backbone, lm, settings, tile_size=encoder.tile_size, max_tiles=encoder.max_tiles)
    except ValueError as err:
        raise RecipeError(str(err)) from err
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

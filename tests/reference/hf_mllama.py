"""Tiny random `transformers.MllamaForConditionalGeneration` models, their inputs, and a test-side writer
of the same weights in Meta's llama-models layout (written from the published key names, independently
of mm_llama's loaders)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import MllamaConfig, MllamaForConditionalGeneration
from transformers.models.mllama.processing_mllama import (
    convert_sparse_cross_attention_mask_to_dense,
    get_cross_attention_token_mask,
)

from tests.reference.hf_llama import LLAMA31_ROPE, META_FFN

VOCAB = 384
IMAGE = VOCAB  # <|image|> as a model input
TILE, PATCH, MAX_TILES = 28, 14, 4
TOKENS_PER_TILE = (TILE // PATCH) ** 2 + 1
CROSS_MERGED = [1, 4]  # 6 merged layers: self 0, cross, self 1, self 2, cross, self 3
RATIOS = [(1, 1), (1, 2), (1, 3), (1, 4), (2, 1), (2, 2), (3, 1), (4, 1)]  # (h, w), ids 1..8

TAPS = [1, 2]  # hidden states *entering* local layers 1 and 2 (Meta's meaning, and real checkpoints')
# transformers 5.x collects the states *leaving* layer i (4.x and Meta: entering), so its oracle needs i - 1.
HF_5_TAPS = [t - 1 for t in TAPS]
VISION = dict(hidden_size=32, num_hidden_layers=4, num_global_layers=2, attention_heads=4, intermediate_size=64,
              image_size=TILE, patch_size=PATCH, max_num_tiles=MAX_TILES, intermediate_layers_indices=HF_5_TAPS,
              vision_output_dim=32 * 3, norm_eps=1e-5)
TEXT = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=META_FFN["intermediate_size"], num_hidden_layers=6,
            num_attention_heads=4, num_key_value_heads=2, cross_attention_layers=CROSS_MERGED,
            rope_parameters={**LLAMA31_ROPE, "rope_theta": 500000.0}, rms_norm_eps=1e-5,
            max_position_embeddings=256, tie_word_embeddings=False, bos_token_id=1, eos_token_id=2, pad_token_id=0)


GATES = ("gate", "gate_attn", "gate_ffn", "cross_attn_attn_gate", "cross_attn_mlp_gate")


def tiny_hf_mllama(seed: int = 0, vocab: int = VOCAB) -> MllamaForConditionalGeneration:
    """Random weights (std 0.2 for matrices), every gate nonzero, per-aspect-ratio tables consistent with one
    Meta-style `[tiles, tiles, …]` grid so the model also has an exact Meta-layout twin."""
    torch.manual_seed(seed)
    cfg = MllamaConfig(vision_config=VISION, text_config=dict(TEXT, vocab_size=vocab), image_token_index=vocab)
    model = MllamaForConditionalGeneration(cfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.rsplit(".", 1)[-1] in GATES:
                p.fill_(0.0).add_(torch.empty_like(p).uniform_(0.4, 0.9) * torch.sign(torch.randn_like(p)))
            elif name.endswith("norm.weight") or "layernorm" in name:
                p.uniform_(0.5, 1.5)
            elif p.dim() >= 2:
                p.normal_(0.0, 0.2)
        for name, grid in meta_grids(model, seed).items():
            _module(model, name).weight.copy_(precompute(grid))
    return model


def save_hf_mllama(model, directory: Path) -> Path:
    """`save_pretrained`, then state the taps in Meta's meaning as the released checkpoints do."""
    model.save_pretrained(directory)
    config = json.loads((directory / "config.json").read_text())
    config["vision_config"]["intermediate_layers_indices"] = TAPS
    (directory / "config.json").write_text(json.dumps(config))
    return directory


def _module(model, name: str):
    vision = model.model.vision_model
    return {"pre": vision.pre_tile_positional_embedding.embedding, "post": vision.post_tile_positional_embedding.embedding,
            "gated": vision.gated_positional_embedding.tile_embedding}[name]


def meta_grids(model, seed: int) -> dict[str, torch.Tensor]:
    """Random Meta-style grids `[tiles, tiles, tokens, width]` for the three per-aspect-ratio tables."""
    g = torch.Generator().manual_seed(seed + 1)
    width = VISION["hidden_size"]
    return {"pre": torch.randn(MAX_TILES, MAX_TILES, 1, width, generator=g) * 0.3,
            "post": torch.randn(MAX_TILES, MAX_TILES, 1, width, generator=g) * 0.3,
            "gated": torch.randn(MAX_TILES, MAX_TILES, TOKENS_PER_TILE, width, generator=g) * 0.3}


def precompute(grid: torch.Tensor) -> torch.Tensor:
    """Meta grid → HF table `[9, tiles·tokens·width]`: row id holds `grid[:h, :w]` row-major, zero padded."""
    tiles, _, tokens, width = grid.shape
    table = torch.zeros(len(RATIOS) + 1, tiles, tokens, width)
    for i, (h, w) in enumerate(RATIOS, start=1):
        table[i, : h * w] = grid[:h, :w].reshape(h * w, tokens, width)
    return table.flatten(1)


@dataclass
class Images:
    """The four tensors both models take, plus the per-image tile counts."""

    pixels: torch.Tensor  # [B, N, T, 3, H, W]
    aspect_ratio_ids: torch.Tensor  # [B, N]
    tile_mask: torch.Tensor  # [B, N, T]
    num_tiles: list[list[int]]


def make_images(grids: list[list[tuple[int, int]]], seed: int = 0) -> Images:
    """Random normalised pixels for each sample's list of `(h, w)` tile grids (padding to the batch max)."""
    g = torch.Generator().manual_seed(seed)
    n = max(1, max(len(s) for s in grids))
    pixels = torch.zeros(len(grids), n, MAX_TILES, 3, TILE, TILE)
    ids = torch.zeros(len(grids), n, dtype=torch.long)
    mask = torch.zeros(len(grids), n, MAX_TILES, dtype=torch.bool)
    for b, sample in enumerate(grids):
        for i, (h, w) in enumerate(sample):
            pixels[b, i, : h * w] = torch.randn(h * w, 3, TILE, TILE, generator=g)
            ids[b, i] = RATIOS.index((h, w)) + 1
            mask[b, i, : h * w] = True
    return Images(pixels, ids, mask, [[h * w for h, w in s] for s in grids])


def hf_cross_attention_mask(tokens: torch.Tensor, images: Images, image_token: int = IMAGE) -> torch.Tensor:
    """`[B, T, N, tiles]` built by transformers' own processor helpers."""
    sparse = [get_cross_attention_token_mask(row, image_token) for row in tokens.tolist()]
    dense = torch.from_numpy(convert_sparse_cross_attention_mask_to_dense(sparse, images.num_tiles, MAX_TILES, tokens.shape[1]))
    if dense.shape[2] < images.pixels.shape[1]:  # transformers builds no slot for padding images
        dense = torch.nn.functional.pad(dense, (0, 0, 0, images.pixels.shape[1] - dense.shape[2]))
    return dense


def hf_logits(model, tokens: torch.Tensor, images: Images, *, meta_row_mask: bool = False,
              image_token: int = IMAGE) -> torch.Tensor:
    """HF logits. With `meta_row_mask`, forward hooks zero each cross-attention output on text rows that see
    no image, which is Meta's reference behaviour (transformers zeroes only the FFN there: issue 39379)."""
    dense = hf_cross_attention_mask(tokens, images, image_token)
    rows = dense.flatten(2).any(-1)[..., None].float()  # [B, T, 1]
    hooks = []
    if meta_row_mask:
        def zero_rows(module, args, output):
            return (output[0] * rows,) + tuple(output[1:])

        hooks = [layer.cross_attn.register_forward_hook(zero_rows) for layer in model.model.language_model.layers
                 if hasattr(layer, "cross_attn")]
    try:
        with torch.no_grad():
            return model(
                input_ids=tokens, pixel_values=images.pixels, aspect_ratio_ids=images.aspect_ratio_ids,
                aspect_ratio_mask=images.tile_mask.long(), cross_attention_mask=dense,
            ).logits
    finally:
        for hook in hooks:
            hook.remove()


def _hf_to_meta_text(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    from tests.reference.hf_llama import _unpermute

    heads, kv_heads = TEXT["num_attention_heads"], TEXT["num_key_value_heads"]
    out = {"text_model.norm.weight": sd["model.language_model.norm.weight"], "text_model.output.weight": sd["lm_head.weight"],
           "text_model.rope.freqs": torch.ones(8)}
    embed = sd["model.language_model.embed_tokens.weight"]
    out["text_model.tok_embeddings.weight"], out["text_model.learnable_embedding.weight"] = embed[:VOCAB], embed[VOCAB:]
    self_index = cross_index = 0
    for merged in range(TEXT["num_hidden_layers"]):
        p = f"model.language_model.layers.{merged}."
        if merged in CROSS_MERGED:
            q = f"text_model.cross_attention_layers.{cross_index}."
            cross_index += 1
            out |= {
                q + "attention.wq.weight": sd[p + "cross_attn.q_proj.weight"], q + "attention.wk.weight": sd[p + "cross_attn.k_proj.weight"],
                q + "attention.wv.weight": sd[p + "cross_attn.v_proj.weight"], q + "attention.wo.weight": sd[p + "cross_attn.o_proj.weight"],
                q + "attention.q_norm.weight": sd[p + "cross_attn.q_norm.weight"], q + "attention.k_norm.weight": sd[p + "cross_attn.k_norm.weight"],
                q + "attention_norm.weight": sd[p + "input_layernorm.weight"], q + "ffn_norm.weight": sd[p + "post_attention_layernorm.weight"],
                q + "feed_forward.w1.weight": sd[p + "mlp.gate_proj.weight"], q + "feed_forward.w2.weight": sd[p + "mlp.down_proj.weight"],
                q + "feed_forward.w3.weight": sd[p + "mlp.up_proj.weight"], q + "gate_attn": sd[p + "cross_attn_attn_gate"],
                q + "gate_ffwd": sd[p + "cross_attn_mlp_gate"],
            }
        else:
            q = f"text_model.layers.{self_index}."
            self_index += 1
            out |= {
                q + "attention.wq.weight": _unpermute(sd[p + "self_attn.q_proj.weight"], heads),
                q + "attention.wk.weight": _unpermute(sd[p + "self_attn.k_proj.weight"], kv_heads),
                q + "attention.wv.weight": sd[p + "self_attn.v_proj.weight"], q + "attention.wo.weight": sd[p + "self_attn.o_proj.weight"],
                q + "feed_forward.w1.weight": sd[p + "mlp.gate_proj.weight"], q + "feed_forward.w2.weight": sd[p + "mlp.down_proj.weight"],
                q + "feed_forward.w3.weight": sd[p + "mlp.up_proj.weight"], q + "attention_norm.weight": sd[p + "input_layernorm.weight"],
                q + "ffn_norm.weight": sd[p + "post_attention_layernorm.weight"],
            }
    return out


_VISION_BLOCK = {"self_attn.q_proj": "attn.wq", "self_attn.k_proj": "attn.wk", "self_attn.v_proj": "attn.wv",
                 "self_attn.o_proj": "attn.wo", "mlp.fc1": "mlp.c_fc", "mlp.fc2": "mlp.c_proj",
                 "input_layernorm": "ln_1", "post_attention_layernorm": "ln_2"}


def _hf_to_meta_vision(sd: dict[str, torch.Tensor], grids: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    v, m = "model.vision_model.", "vision_model.vision_encoder."
    out = {
        m + "conv1._linear.weight": sd[v + "patch_embedding.weight"].flatten(1),
        m + "class_embedding": sd[v + "class_embedding"],
        m + "positional_embedding": sd[v + "gated_positional_embedding.embedding"],
        m + "gated_positional_embedding": grids["gated"],
        m + "gated_positional_embedding_gate": sd[v + "gated_positional_embedding.gate"],
        m + "pre_tile_pos_embed.embedding": grids["pre"], m + "pre_tile_pos_embed.gate": sd[v + "pre_tile_positional_embedding.gate"],
        m + "post_tile_pos_embed.embedding": grids["post"], m + "post_tile_pos_embed.gate": sd[v + "post_tile_positional_embedding.gate"],
        "vision_model.vision_projection.weight": sd["model.multi_modal_projector.weight"],
        "vision_model.vision_projection.bias": sd["model.multi_modal_projector.bias"],
    }
    for norm_hf, norm_meta in (("layernorm_pre", "ln_pre"), ("layernorm_post", "ln_post")):
        for t in ("weight", "bias"):
            out[f"{m}{norm_meta}.{t}"] = sd[f"{v}{norm_hf}.{t}"]
    for key, tensor in sd.items():
        for stack in ("transformer", "global_transformer"):
            prefix = f"{v}{stack}.layers."
            if key.startswith(prefix):
                index, _, rest = key[len(prefix):].partition(".")
                for hf_name, meta_name in _VISION_BLOCK.items():
                    if rest.startswith(hf_name + "."):
                        rest = meta_name + rest[len(hf_name):]
                out[f"{m}{stack}.resblocks.{index}.{rest}"] = tensor
    return out


def write_meta_mllama(model, directory: Path, seed: int = 0) -> Path:
    """`consolidated.00.pth` + `params.json` in Meta's llama-models layout, same weights as `model`."""
    directory.mkdir(parents=True, exist_ok=True)
    sd = {k: v.detach().clone() for k, v in model.state_dict().items()}
    state = _hf_to_meta_text(sd) | _hf_to_meta_vision(sd, meta_grids(model, seed))
    torch.save(state, directory / "consolidated.00.pth")
    params = {
        "dim": TEXT["hidden_size"], "n_layers": 4, "n_heads": TEXT["num_attention_heads"],
        "n_kv_heads": TEXT["num_key_value_heads"], "vocab_size": VOCAB, "multiple_of": META_FFN["multiple_of"],
        "ffn_dim_multiplier": META_FFN["ffn_dim_multiplier"], "norm_eps": 1e-5, "rope_theta": 500000.0,
        "use_scaled_rope": True, "vision_chunk_size": TILE, "vision_max_num_chunks": MAX_TILES,
        "vision_num_cross_attention_layers": len(CROSS_MERGED),
        # mm-llama extension: Meta hard-codes ViT-H/14; a tiny test encoder states its shape.
        "vision_encoder": {"patch_size": PATCH, "width": VISION["hidden_size"], "heads": VISION["attention_heads"],
                           "mlp_dim": VISION["intermediate_size"], "n_local_layers": VISION["num_hidden_layers"],
                           "n_global_layers": VISION["num_global_layers"], "taps": TAPS},
    }
    (directory / "params.json").write_text(json.dumps(params))
    return directory

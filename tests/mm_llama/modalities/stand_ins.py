"""Stand-in modalities for composition tests (and a counter of keys/values computations): a second cross-attention
modality ("sketch": images through its own encoder, blocks and `<|video|>` id) and an early-fusion one
("probe": a linear map of a feature vector per placeholder token, in place of speech)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from mm_llama.config import LlamaConfig
from mm_llama.media_tokens import MediaTokens
from mm_llama.modalities import ImageModality, Modality, SpanEmbeddings


class SketchModality(ImageModality):
    """The image path under another name and media id: deep fusion with its own weights."""

    name = "sketch"

    def __init__(self, text: LlamaConfig, vision, *, fusion_layers: tuple[int, ...], encoder: str = "mllama") -> None:
        super().__init__(text, vision, encoder=encoder, fusion_layers=fusion_layers)
        self.token_id = MediaTokens(text.vocab_size).video


class ProbeModality(Modality):
    """Early fusion: `features [N, F]` (one row per `<speech>` placeholder) → embeddings `[N, D]`."""

    name = "probe"
    adapter_group = "adapter"

    def __init__(self, text: LlamaConfig, n_features: int = 6) -> None:
        super().__init__(text)
        self.placeholder = MediaTokens(text.vocab_size).speech
        self.adapter = nn.Linear(n_features, text.dim)

    def token_ids(self) -> tuple[int, ...]:
        return (self.placeholder,)

    def groups(self) -> dict[str, nn.Module]:
        return {"adapter": self.adapter}

    def prepare(self, tokens: torch.Tensor, inputs: torch.Tensor | None, attention_mask) -> SpanEmbeddings | None:
        if inputs is None:
            return None
        return SpanEmbeddings(positions=tokens == self.placeholder, embeds=self.adapter(inputs))


def count_kv_computations(model) -> dict[str, int]:
    """Wrap every fusion block's `compute_kv` so that calls are counted per modality; returns the live counts."""
    from mm_llama.fusion import FusionLayer

    counts: dict[str, int] = {}
    for layer in model.decoder.layers:
        if isinstance(layer, FusionLayer):
            for name, block in layer.fusion.items():
                counts[name] = 0
                original = block.compute_kv

                def counted(vision, name=name, original=original):
                    counts[name] += 1
                    return original(vision)

                block.compute_kv = counted
    return counts


def train_two_steps(model, groups: list[str], tokens: torch.Tensor, media: dict) -> dict[str, torch.Tensor]:
    """Train `groups` of `model` for two AdamW steps on next-token loss over `tokens`; returns the state
    dict from before (cloned), so a test can say what changed."""

    model.set_trainable(groups)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    vocab = model.text_cfg.vocab_size
    model.train()
    for _ in range(2):
        logits = model(tokens, media=media)
        loss = F.cross_entropy(logits[0, :-1], tokens[0, 1:].clamp(max=vocab - 1))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return before

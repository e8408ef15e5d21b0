"""`MultimodalLlama`: a frozen Llama 3 decoder that reads the modalities it is composed with.

Deep-fusion modalities (image; video) reach the LM through gated cross-attention blocks before chosen
decoder layers; early-fusion ones (speech) replace the embeddings of a placeholder token span. Each
modality is a named module (`mm_llama.modalities`); the model wires it in without editing the decoder
it is given, keys its state by the modality's name and derives the trainable groups from it.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any, Iterable, Sequence

import torch
from torch import nn

from mm_llama.config import LlamaConfig
from mm_llama.cross_attention_mask import attention_masks
from mm_llama.fusion import CROSS_ATTENTION_KEY, CrossAttentionInputs, FusionEmbedding, FusionLayer, fusion_schedule
from mm_llama.kv_cache import KVCache
from mm_llama.modalities import ImageInputs, ImageModality, Modality, SpanEmbeddings
from mm_llama.model import LlamaDecoder
from mm_llama.trainable import split_lora_group, train_only

DECODER_GROUP = "decoder"
N_FUSION_TOKENS = 8  # media ids past the LM's vocabulary (Meta's 8 learnable rows; row 0 is <|image|>)


@dataclass(frozen=True)
class MultimodalConfig:
    """A text trunk, an image encoder and where they meet (what image checkpoints and runs record).

    `fusion_layers` are indices of decoder layers that get a cross-attention block *before* them (empty:
    Meta's every-4th schedule); `encoder` names the image encoder family (`"mllama"`: Llama 3.2 Vision's
    tiled ViT, `"timm"`: a timm ViT with taps and gated layers) and `vision` is that encoder's config.
    """

    text: LlamaConfig
    vision: Any
    encoder: str = "mllama"
    fusion_layers: tuple[int, ...] = ()
    n_fusion_tokens: int = N_FUSION_TOKENS

    def __post_init__(self) -> None:
        if not self.fusion_layers:
            schedule = fusion_schedule(self.text.n_layers, max(1, self.text.n_layers // 4))
            object.__setattr__(self, "fusion_layers", tuple(schedule))
        bad = [i for i in self.fusion_layers if not 0 <= i < self.text.n_layers]
        if bad:
            raise ValueError(f"fusion layer indices {bad} are outside the decoder's 0..{self.text.n_layers - 1}")
        if self.encoder not in ("mllama", "timm"):
            raise ValueError(f"unknown image encoder {self.encoder!r}; use 'mllama' or 'timm'")

    @property
    def image_token_id(self) -> int:
        """`<|image|>` as a model input: the first id past the LM's vocabulary (128256 for Llama 3)."""
        return self.text.vocab_size

    @property
    def vocab_size(self) -> int:
        """Input ids the model accepts (the output head keeps the LM's vocabulary)."""
        return self.text.vocab_size + self.n_fusion_tokens

    @property
    def max_seq_len(self) -> int:
        return self.text.max_seq_len


def fused_decoder(decoder: LlamaDecoder, modalities: Sequence[Modality]) -> LlamaDecoder:
    """A copy of `decoder` (sharing its frozen weights, the caller's object untouched) whose layers carry
    the modalities' cross-attention blocks (by `fusion_rank`, then in the order given) and whose embedding has
    their media rows."""
    fused = copy.copy(decoder)
    for slot in ("_modules", "_parameters", "_buffers"):
        setattr(fused, slot, dict(getattr(decoder, slot)))
    layers = list(decoder.layers)
    in_order = sorted(modalities, key=lambda m: m.fusion_rank)  # stable: equal ranks keep the given order
    for i, layer in enumerate(layers):
        blocks = {m.name: m.new_block() for m in in_order if i in m.fusion_layers}
        if blocks:
            layers[i] = FusionLayer(layer, blocks)
    fused.layers = nn.ModuleList(layers)
    fused.tok_embeddings = FusionEmbedding(decoder.tok_embeddings, {m.name: m.token_ids() for m in modalities})
    fused.tie_weights()
    return fused


class MultimodalLlama(nn.Module):
    """Frozen LM + modalities (Llama 3 paper §7, §8).

    `decoder` keeps the plain Llama checkpoint keys; each modality's own weights are under its name
    (`image.encoder.*`, `image.projector.*`), its blocks under `decoder.layers.i.fusion.<name>.*` and its
    embedding rows under `decoder.tok_embeddings.media.<name>.weight`. Trainable groups are
    `<name>.<group>` per modality plus `decoder`; a stage declares what trains with `set_trainable`.
    """

    def __init__(self, decoder: LlamaDecoder, modalities: Sequence[Modality], *,
                 n_media_tokens: int = N_FUSION_TOKENS) -> None:
        super().__init__()
        names = [m.name for m in modalities]
        if not names or len(set(names)) != len(names):
            raise ValueError(f"a MultimodalLlama needs one or more modalities with distinct names, got {names}")
        ids = [i for m in modalities for i in m.token_ids()]
        limit = decoder.cfg.vocab_size + n_media_tokens
        if len(set(ids)) != len(ids) or any(not decoder.cfg.vocab_size <= i < limit for i in ids):
            raise ValueError(f"the modalities' media ids {dict(zip(names, (m.token_ids() for m in modalities)))} "
                             f"must be distinct and within {decoder.cfg.vocab_size}..{limit - 1}")
        self.n_media_tokens = n_media_tokens
        self.decoder = fused_decoder(decoder, modalities)
        self.modality_names = tuple(names)
        self.loaded_modalities: set[str] = set()  # modalities whose weights an earlier run supplied (init_from)
        for modality in modalities:
            self.add_module(modality.name, modality)

    @classmethod
    def from_config(cls, cfg: MultimodalConfig, decoder: LlamaDecoder | None = None,
                    encoder: nn.Module | None = None) -> "MultimodalLlama":
        """The image model `cfg` describes, on `decoder` (a new one when None)."""
        decoder = decoder if decoder is not None else LlamaDecoder(cfg.text)
        image = ImageModality(cfg.text, cfg.vision, encoder=cfg.encoder, fusion_layers=tuple(cfg.fusion_layers),
                              encoder_module=encoder)
        return cls(decoder, [image], n_media_tokens=cfg.n_fusion_tokens)

    @property
    def text_cfg(self) -> LlamaConfig:
        return self.decoder.cfg

    @property
    def vocab_size(self) -> int:
        """Input ids the model accepts (the output head keeps the LM's vocabulary)."""
        return self.text_cfg.vocab_size + self.n_media_tokens

    @property
    def max_seq_len(self) -> int:
        return self.text_cfg.max_seq_len

    @property
    def modalities(self) -> dict[str, Modality]:
        return {name: getattr(self, name) for name in self.modality_names}

    def tie_weights(self) -> None:
        self.decoder.tie_weights()

    # ------------------------------------------------------------------ trainable groups
    def _adapter_parts(self, name: str) -> Iterable[nn.Module]:
        """The parts the model added for modality `name`: its blocks and its embedding rows."""
        for layer in self.decoder.layers:
            if isinstance(layer, FusionLayer) and name in layer.fusion:
                yield layer.fusion[name]
        yield self.decoder.tok_embeddings.media[name]

    def parameter_groups(self) -> dict[str, dict[str, nn.Parameter]]:
        """`{group: {parameter name: parameter}}`, every parameter in exactly one group: `<modality>.<group>`
        for each modality's `groups()` (its blocks and embedding rows in `<modality>.<adapter_group>`),
        `decoder` (the LM) and, when LoRA is applied (`mm_llama.adapters.lora`), `lora` (its factors)."""
        owner: dict[int, str] = {}
        for name, modality in self.modalities.items():
            parts = [(group, [module]) for group, module in modality.groups().items()]
            parts.append((modality.adapter_group, list(self._adapter_parts(name))))
            for group, modules in parts:
                for module in modules:
                    for p in module.parameters():
                        owner.setdefault(id(p), f"{name}.{group}")
            stray = [n for n, p in modality.named_parameters() if id(p) not in owner]
            if stray:
                raise ValueError(f"{type(modality).__name__}.groups() leaves out {stray[:5]}; every parameter of a "
                                 "modality must be in one of its groups")
        groups: dict[str, dict[str, nn.Parameter]] = {g: {} for g in dict.fromkeys(owner.values())}
        groups[DECODER_GROUP] = {}
        for n, p in self.named_parameters():
            groups[owner.get(id(p), DECODER_GROUP)][n] = p
        return split_lora_group(groups, DECODER_GROUP)  # LoRA factors in the LM's layers: group `lora`

    def group_names(self) -> tuple[str, ...]:
        return tuple(self.parameter_groups())

    def set_trainable(self, groups: Iterable[str]) -> None:
        """Train exactly `groups` (names from `group_names()`, e.g. `["image.encoder", "image.fusion"]`)."""
        train_only(self.parameter_groups(), groups)

    # ------------------------------------------------------------------ forward
    def new_cache(self, batch_size: int, max_len: int | None = None) -> KVCache:
        return self.decoder.new_cache(batch_size, max_len)

    def _media(self, media: dict[str, Any] | None, images: ImageInputs | None) -> dict[str, Any]:
        media = dict(media or {})
        if images is not None:
            if "image" in media:
                raise ValueError("pass images either as images= or as media['image'], not both")
            media["image"] = images
        unknown = sorted(set(media) - set(self.modality_names))
        if unknown:
            raise ValueError(f"media for {unknown}, which this model has no modality for; its modalities are "
                             f"{list(self.modality_names)}")
        return media

    def _no_media_tokens(self, tokens: torch.Tensor, modality: Modality) -> None:
        hits = torch.isin(tokens, torch.tensor(modality.token_ids(), device=tokens.device))
        if bool(hits.any()):
            b = int(hits.any(dim=1).nonzero()[0])
            raise ValueError(f"sample {b} has {int(hits[b].sum())} {modality.name} token(s) but no {modality.name} "
                             f"input was given; pass media={{'{modality.name}': ...}} or remove the tokens")

    @staticmethod
    def _decode_inputs(state: dict[str, Any], batch: int, length: int) -> CrossAttentionInputs:
        """Cross-attention inputs of `length` decoded tokens per row from a modality's prefill `state`
        (its K/V and `decode_keys [B, S]`, the keys the last prompt token saw)."""
        key_rows = state["decode_keys"][:, None, :].expand(batch, length, -1)  # [B, T, S]
        key_mask, row_mask = attention_masks(key_rows)
        return CrossAttentionInputs(None, key_mask, row_mask, kv=state["kv"])

    def decode_extras(self, cache: KVCache, batch: int) -> dict[str, Any]:
        """The `extras` of a one-token decode step after prefill, built once for the static decode loop:
        every modality with prefill state in `cache` gets its cross-attention inputs; none → `{}`."""
        cross = {
            name: self._decode_inputs(state, batch, 1)
            for name in self.modality_names
            if (state := cache.fusion_state.get(f"{CROSS_ATTENTION_KEY}.{name}")) is not None
        }
        return {CROSS_ATTENTION_KEY: cross} if cross else {}

    def forward(
        self,
        tokens: torch.Tensor,
        *,
        media: dict[str, Any] | None = None,
        images: ImageInputs | None = None,
        attention_mask: torch.Tensor | None = None,
        cache: KVCache | None = None,
        extras: dict[str, Any] | None = None,
        last_only: bool = False,
        logits_at: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Logits `[B, T, V]` for `tokens [B, T]`; `media` maps modality names to their collated inputs
        (`images=` is shorthand for `media={"image": images}`); `logits_at [B, T]` (bool) keeps only
        those positions, `[N, V]` (see `LlamaDecoder.forward`).

        Text rows before a sample's first image, padding rows and text-only samples get no image signal;
        a batch without media runs exactly as the plain LM. With a `cache`, the first call (prefill)
        computes each block's keys/values once per modality; later calls reuse them and need no media.
        """
        media = self._media(media, images)
        decoding = cache is not None and cache.length > 0
        cross: dict[str, CrossAttentionInputs] = {}
        spans: list[SpanEmbeddings] = []
        for name, modality in self.modalities.items():
            state_key = f"{CROSS_ATTENTION_KEY}.{name}"
            state = cache.fusion_state.get(state_key) if decoding else None
            if state is not None:  # every new token sees what the last prompt token saw
                cross[name] = self._decode_inputs(state, tokens.shape[0], tokens.shape[1])
                continue
            prepared = modality.prepare(tokens, media.get(name), attention_mask)
            if prepared is None:
                self._no_media_tokens(tokens, modality)
            elif isinstance(prepared, SpanEmbeddings):
                spans.append(prepared)
            else:
                cross[name] = prepared
                if cache is not None:
                    cache.fusion_state[state_key] = {"kv": prepared.kv, "decode_keys": prepared.decode_keys}
        extras = dict(extras or {})
        if cross:
            extras[CROSS_ATTENTION_KEY] = cross
        if not spans:
            return self.decoder(tokens, attention_mask=attention_mask, cache=cache, extras=extras, last_only=last_only,
                                logits_at=logits_at)
        embeds = self.decoder.tok_embeddings(tokens)
        for span in spans:
            embeds = embeds.index_put((span.positions,), span.embeds.to(embeds.dtype))
        return self.decoder(embeds=embeds, attention_mask=attention_mask, cache=cache, extras=extras,
                            last_only=last_only, logits_at=logits_at)


__all__ = ["DECODER_GROUP", "MultimodalConfig", "MultimodalLlama", "N_FUSION_TOKENS", "fused_decoder"]

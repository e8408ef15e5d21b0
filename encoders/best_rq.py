"""BEST-RQ self-supervised pretraining of the Conformer (Chiu et al. 2022; Llama 3 paper §8.1,
REFERENCE.md §4).

    log-mel → normalise → stack 4 (40 ms, 320-d) ──► random-projection quantizer ──► targets [B, S, 16]
                                   │   (frozen 320×16 projection, L2-normalise, nearest of 8192
                                   │    L2-normalised random codes by cosine; 16 codebooks)
                                   └─► masked: 32-step spans start with probability 2.5 %, their frames
                                       replaced by N(0, 0.1) noise ─► Linear ─► Conformer ─► 16 softmax heads

Cross-entropy per codebook on the masked real steps only (averaged over codebooks). Projections and codes
are buffers drawn from their own seeded generator: never trained, the same in every process and after a
resume, whatever the global RNG did. Targets come from the unmasked input, so they do not depend on the mask.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from mm_llama.encoders.conformer import ConformerEncoder
from mm_llama.trainable import train_only

__all__ = ["BestRqConfig", "BestRqModel", "RandomProjectionQuantizer", "span_mask"]


@dataclass(frozen=True)
class BestRqConfig:
    """Quantizer and masking settings (the paper's by default)."""

    n_codebooks: int = 16
    codebook_size: int = 8192
    code_dim: int = 16
    mask_prob: float = 0.025
    mask_span: int = 32
    noise_std: float = 0.1
    seed: int = 0

    def __post_init__(self) -> None:
        if not 0.0 < self.mask_prob < 1.0:
            raise ValueError(f"mask_prob must lie in (0, 1), got {self.mask_prob}")
        for name in ("n_codebooks", "codebook_size", "code_dim", "mask_span"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")

    @property
    def masked_fraction(self) -> float:
        """The expected fraction of masked steps away from the edges: 1 − (1 − p)^span (≈ 55 %)."""
        return 1.0 - (1.0 - self.mask_prob) ** self.mask_span


class RandomProjectionQuantizer(nn.Module):
    """`x [B, S, in_dim]` → code indices `[B, S, n_codebooks]`; all state is seeded buffers."""

    def __init__(self, in_dim: int, cfg: BestRqConfig) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(cfg.seed)
        projection = torch.randn(cfg.n_codebooks, in_dim, cfg.code_dim, generator=g) * math.sqrt(2.0 / (in_dim + cfg.code_dim))
        codes = F.normalize(torch.randn(cfg.n_codebooks, cfg.codebook_size, cfg.code_dim, generator=g), dim=-1)
        self.register_buffer("projection", projection)
        self.register_buffer("codes", codes)

    @torch.no_grad()
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        projected = F.normalize(torch.einsum("bsi,cid->bscd", x.float(), self.projection), dim=-1)  # [B, S, C, d]
        return torch.einsum("bscd,ckd->bsck", projected, self.codes).argmax(dim=-1)  # nearest by cosine


def span_mask(real: torch.Tensor, prob: float, span: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """`real [B, S]` (True = real step) → mask `[B, S]`: each real step starts a `span`-step masked run with
    probability `prob`; runs are cut at the row's end."""
    starts = (torch.rand(real.shape, generator=generator, device=real.device) < prob) & real
    # step t is masked when a run started at one of the `span` steps up to t
    covered = F.max_pool1d(F.pad(starts[:, None].float(), (span - 1, 0)), kernel_size=span, stride=1)[:, 0]
    return covered.bool() & real


class BestRqModel(nn.Module):
    """A `ConformerEncoder` with the quantizer and one prediction head per codebook.

    `forward(features [B, F, 80], lengths [B])` → `{"loss_sum", "masked", "accuracy", "perplexity"}`:
    the cross-entropy summed over masked real steps (averaged over codebooks), the number of those steps,
    the top-1 accuracy there, and the mean over codebooks of the targets' code perplexity (usage).
    """

    def __init__(self, encoder: ConformerEncoder, cfg: BestRqConfig = BestRqConfig()) -> None:
        super().__init__()
        self.cfg = cfg
        self.encoder = encoder
        self.quantizer = RandomProjectionQuantizer(encoder.cfg.stack * encoder.cfg.n_mels, cfg)
        self.heads = nn.Linear(encoder.out_dim, cfg.n_codebooks * cfg.codebook_size)

    def parameter_groups(self) -> dict[str, dict[str, nn.Parameter]]:
        """`speech.encoder` (the Conformer, named as in the speech stages that start from it) and
        `best_rq.heads` (the prediction heads); the quantizer has no parameters."""
        groups: dict[str, dict[str, nn.Parameter]] = {"speech.encoder": {}, "best_rq.heads": {}}
        for name, p in self.named_parameters():
            groups["speech.encoder" if name.startswith("encoder.") else "best_rq.heads"][name] = p
        return groups

    def group_names(self) -> tuple[str, ...]:
        return tuple(self.parameter_groups())

    def set_trainable(self, groups: Iterable[str]) -> None:
        """Train exactly `groups` (of `group_names()`); everything else is frozen."""
        train_only(self.parameter_groups(), groups)

    def targets(self, features: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """Code indices `[B, S, n_codebooks]` of the unmasked, normalised, stacked features."""
        stacked, _ = self.encoder.stacked(features, lengths)
        return self.quantizer(stacked)

    def forward(self, features: torch.Tensor, lengths: torch.Tensor,
                generator: torch.Generator | None = None) -> dict[str, torch.Tensor]:
        stacked, steps = self.encoder.stacked(features, lengths)
        targets = self.quantizer(stacked)  # [B, S, C]
        real = torch.arange(stacked.shape[1], device=stacked.device)[None] < steps[:, None]
        mask = span_mask(real, self.cfg.mask_prob, self.cfg.mask_span, generator)
        noise = torch.randn(stacked.shape, generator=generator, device=stacked.device) * self.cfg.noise_std
        masked_input = torch.where(mask[..., None], noise.to(stacked.dtype), stacked)
        states, _ = self.encoder(features, lengths, embedded=self.encoder.input(masked_input))
        picked = states[mask]  # [M, D]
        logits = self.heads(picked).unflatten(-1, (self.cfg.n_codebooks, self.cfg.codebook_size)).float()  # [M, C, K]
        goal = targets[mask]  # [M, C]
        loss_sum = F.cross_entropy(logits.flatten(0, 1), goal.flatten(), reduction="sum") / self.cfg.n_codebooks
        with torch.no_grad():
            accuracy = (logits.argmax(-1) == goal).float().mean() if goal.numel() else torch.zeros(())
            counts = F.one_hot(targets[real], self.cfg.codebook_size).sum(0).float()  # [C, K]
            p = counts / counts.sum(-1, keepdim=True).clamp(min=1)
            perplexity = torch.exp(-(p * p.clamp(min=1e-12).log()).sum(-1)).mean()
        return {"loss_sum": loss_sum, "masked": mask.sum(), "accuracy": accuracy, "perplexity": perplexity,
                "mask": mask, "targets": targets}

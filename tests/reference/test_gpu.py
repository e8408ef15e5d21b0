"""bf16 on CUDA against fp32 on CPU (runs only where a GPU is lent)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from mm_llama.checkpoints import load_llama
from tests.reference.hf_llama import tiny_hf_llama


@pytest.mark.gpu
def test_bf16_cuda_logits_track_fp32_cpu_as_closely_as_transformers(tmp_path: Path) -> None:
    """bf16 rounding error is the oracle's own: transformers' bf16 CUDA logits set the bar for ours.

    A fixed tolerance is a guess: 3 % of the logit scale failed on an H200 (ours 4.3 %), and transformers' bf16 is
    off by 4.3 % on CPU too. The same model in transformers at bf16 on the same device is an independent expectation.
    """
    hf = tiny_hf_llama("gqa-llama3-rope")
    hf.save_pretrained(tmp_path)
    cpu = load_llama(tmp_path)
    gpu = load_llama(tmp_path, dtype="bfloat16", device="cuda")
    tokens = torch.randint(3, 384, (4, 64), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = cpu(tokens)
        got = gpu(tokens.cuda()).float().cpu()
        oracle = hf.to(device="cuda", dtype=torch.bfloat16)(tokens.cuda()).logits.float().cpu()
    ours_err, hf_err = (got - ref).abs(), (oracle - ref).abs()
    print(f"bf16 CUDA vs fp32 CPU |logit gap|: ours max {ours_err.max():.4f} mean {ours_err.mean():.5f}; "
          f"transformers max {hf_err.max():.4f} mean {hf_err.mean():.5f} (logit scale {ref.abs().max():.2f})")
    assert ours_err.mean() <= 1.25 * hf_err.mean()
    assert ours_err.max() <= 1.5 * hf_err.max()
    agree = (got.argmax(-1) == ref.argmax(-1)).float().mean().item()
    assert agree >= (oracle.argmax(-1) == ref.argmax(-1)).float().mean().item() - 0.02


@pytest.mark.gpu
def test_mllama_bf16_cuda_tracks_fp32_cpu(tmp_path: Path) -> None:
    from mm_llama.checkpoints.multimodal_loading import load_multimodal
    from tests.reference.hf_mllama import IMAGE, make_images, save_hf_mllama, tiny_hf_mllama

    save_hf_mllama(tiny_hf_mllama(), tmp_path)
    cpu = load_multimodal(tmp_path)
    gpu = load_multimodal(tmp_path, dtype="bfloat16", device="cuda")
    tokens = torch.tensor([[1, IMAGE] + list(range(10, 40))])
    images = make_images([[(2, 2)]])
    with torch.no_grad():
        ref = cpu(tokens, images=images)
        got = gpu(tokens.cuda(), images=images.__class__(images.pixels.cuda().bfloat16(), images.aspect_ratio_ids.cuda(),
                                                         images.tile_mask.cuda(), images.num_tiles)).float().cpu()
    gap = (got - ref).abs().max().item()
    print(f"Mllama bf16 CUDA vs fp32 CPU: max |logit gap| {gap:.4f} (logit scale {ref.abs().max().item():.2f})")
    assert gap <= 0.05 * ref.abs().max().item()
    assert (got.argmax(-1) == ref.argmax(-1)).float().mean().item() >= 0.9

"""BEST-RQ: targets are a fixed function of the input (seeded buffers: the same in another process, after
a rebuild and whatever the mask), spans mask ≈ 1 − (1 − 0.025)^32 of the steps, and the loss sees the
masked steps only."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import torch

from mm_llama.encoders.best_rq import BestRqConfig, BestRqModel, span_mask
from mm_llama.encoders.conformer import CONFORMER_PRESETS, ConformerEncoder

CFG = BestRqConfig(codebook_size=256)


def _model(global_seed: int) -> BestRqModel:
    torch.manual_seed(global_seed)  # the encoder's weights differ; the quantizer must not
    return BestRqModel(ConformerEncoder(CONFORMER_PRESETS["tiny"]), CFG)


def test_targets_are_the_same_in_another_process_and_after_a_rebuild(tmp_path: Path) -> None:
    features = torch.randn(2, 200, 80, generator=torch.Generator().manual_seed(5))
    lengths = torch.tensor([200, 150])
    torch.save({"features": features, "lengths": lengths}, tmp_path / "in.pt")
    here = _model(0).targets(features, lengths)
    assert torch.equal(here, _model(123).targets(features, lengths))
    script = (
        "import sys, torch\n"
        "from mm_llama.encoders.best_rq import BestRqConfig, BestRqModel\n"
        "from mm_llama.encoders.conformer import CONFORMER_PRESETS, ConformerEncoder\n"
        f"torch.manual_seed(77)\nx = torch.load(sys.argv[1])\n"
        "m = BestRqModel(ConformerEncoder(CONFORMER_PRESETS['tiny']), BestRqConfig(codebook_size=256))\n"
        "torch.save(m.targets(x['features'], x['lengths']), sys.argv[2])\n"
    )
    subprocess.run([sys.executable, "-c", script, str(tmp_path / "in.pt"), str(tmp_path / "out.pt")], check=True)
    assert torch.equal(here, torch.load(tmp_path / "out.pt"))
    assert here.shape == (2, 50, 16) and int(here.max()) < 256
    assert len(torch.unique(here[0, :, 0])) > 10  # the codes are used, not one collapsed code


def test_targets_do_not_depend_on_the_mask() -> None:
    model = _model(0)
    features, lengths = torch.randn(2, 320, 80), torch.tensor([320, 250])
    a = model(features, lengths, generator=torch.Generator().manual_seed(1))
    b = model(features, lengths, generator=torch.Generator().manual_seed(2))
    assert not torch.equal(a["mask"], b["mask"]) and torch.equal(a["targets"], b["targets"])
    assert not bool(a["mask"][1, 63:].any())  # padded steps (250 frames → 63 steps) are never masked


def test_spans_mask_the_expected_fraction() -> None:
    real = torch.ones(64, 4000, dtype=torch.bool)
    mask = span_mask(real, 0.025, 32, torch.Generator().manual_seed(0))
    fraction = float(mask[:, 31:].float().mean())  # past the first span, every step has 32 chances
    assert abs(fraction - CFG.masked_fraction) < 0.02, fraction
    assert abs(CFG.masked_fraction - 0.5552) < 1e-4  # 1 − 0.975^32


def test_the_loss_sees_the_masked_steps_only() -> None:
    model = _model(0).eval()
    features, lengths = torch.randn(2, 320, 80), torch.tensor([320, 250])
    clean = model(features, lengths, generator=torch.Generator().manual_seed(3))

    def perturb_unmasked(module, inputs, output):
        states, out_lengths = output
        keep = clean["mask"][..., None]
        return torch.where(keep, states, states + 100.0 * torch.randn_like(states)), out_lengths

    handle = model.encoder.register_forward_hook(perturb_unmasked)
    try:
        noisy = model(features, lengths, generator=torch.Generator().manual_seed(3))
    finally:
        handle.remove()
    assert torch.equal(noisy["mask"], clean["mask"]) and int(clean["masked"]) > 0
    assert torch.equal(noisy["loss_sum"], clean["loss_sum"])

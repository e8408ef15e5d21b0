"""Parity with `transformers.MllamaForConditionalGeneration` (HF and Meta layouts of the same weights).

Known divergence (transformers issue 39379, DESIGN.md): for text rows that see no image, Meta zeroes the
cross-attention output *and* the FFN; transformers zeroes only the FFN, so its rows before the first image
carry a uniform average over all image tokens — and, through self-attention, so does every later row.
mm-llama follows Meta. Prompts that start with `<|image|>` (Meta's base-model format) have no such rows,
so plain transformers is the oracle there; for text before the image the oracle is transformers with the
Meta row mask put back by a forward hook, and the tests show that plain transformers differs.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from mm_llama.checkpoints.multimodal_loading import load_multimodal
from mm_llama.generation import GenerationConfig, generate
from tests.reference.hf_mllama import IMAGE, hf_cross_attention_mask, hf_logits, save_hf_mllama, make_images, tiny_hf_mllama, write_meta_mllama

TOL = 1e-4


@pytest.fixture(scope="module")
def hf_model():
    return tiny_hf_mllama()


@pytest.fixture(scope="module")
def hf_dir(hf_model, tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("mllama-hf")
    save_hf_mllama(hf_model, path)
    return path


@pytest.fixture(scope="module")
def ours(hf_dir: Path):
    return load_multimodal(hf_dir)


def _text(n: int, seed: int) -> list[int]:
    return torch.randint(3, 384, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def _ours_logits(model, tokens: torch.Tensor, images) -> torch.Tensor:
    with torch.no_grad():
        return model(tokens, images=images)


def _hf_text_only(hf_model, tokens: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return hf_model(input_ids=tokens).logits


CASES = {
    "one-tile": [[(1, 1)]],
    "four-tiles-2x2": [[(2, 2)]],
    "three-tiles-1x3": [[(1, 3)]],
    "two-images": [[(1, 2), (2, 1)]],
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_logits_match_transformers_from_the_image_on(case: str, hf_model, ours) -> None:
    grids = CASES[case]
    n_images = len(grids[0])
    prompt = [IMAGE, 1] + _text(5, 1) + ([IMAGE] + _text(6, 2) if n_images == 2 else _text(6, 2))
    tokens = torch.tensor([prompt])
    images = make_images(grids)
    expected = hf_logits(hf_model, tokens, images)
    got = _ours_logits(ours, tokens, images)
    first = prompt.index(IMAGE)
    assert (expected[:, first:] - got[:, first:]).abs().max().item() <= TOL
    # the image matters: the text-only logits are far away
    assert (_hf_text_only(hf_model, tokens)[:, first:] - got[:, first:]).abs().max().item() > 0.1


def test_consecutive_images_both_cover_the_following_text(hf_model, ours) -> None:
    prompt = [IMAGE, IMAGE, 1] + _text(8, 3)
    tokens, images = torch.tensor([prompt]), make_images([[(1, 1), (2, 1)]])
    expected, got = hf_logits(hf_model, tokens, images), _ours_logits(ours, tokens, images)
    assert (expected - got).abs().max().item() <= TOL


def test_mixed_batch_image_sample_and_text_only_sample(hf_model, ours) -> None:
    image_prompt = [IMAGE, 1] + _text(9, 4)
    text_prompt = [1] + _text(10, 5)
    tokens = torch.tensor([image_prompt, text_prompt])
    images = make_images([[(2, 2)], []])
    got = _ours_logits(ours, tokens, images)

    expected_image = hf_logits(hf_model, tokens[:1], make_images([[(2, 2)]]))
    assert (expected_image[0] - got[0]).abs().max().item() <= TOL
    # the text-only sample equals transformers' text-only path (no cross-attention at all)
    expected_text = _hf_text_only(hf_model, tokens[1:])
    assert (expected_text[0] - got[1]).abs().max().item() <= TOL


def test_text_before_the_image_follows_meta_not_transformers(hf_model, ours) -> None:
    prompt = [1] + _text(4, 6) + [IMAGE] + _text(6, 7)
    first = prompt.index(IMAGE)
    tokens, images = torch.tensor([prompt]), make_images([[(1, 2)]])
    got = _ours_logits(ours, tokens, images)
    hf_meta_rows = hf_logits(hf_model, tokens, images, meta_row_mask=True)
    hf_plain = hf_logits(hf_model, tokens, images)
    hf_text_only = _hf_text_only(hf_model, tokens)

    # transformers with Meta's row mask restored matches at every row
    assert (hf_meta_rows - got).abs().max().item() <= TOL
    # Meta semantics: rows before the first image are exactly the text-only LM's
    assert (hf_text_only[:, :first] - got[:, :first]).abs().max().item() <= TOL
    # plain transformers differs (issue 39379): its pre-image rows include an attention average, and the
    # later rows see those rows through self-attention
    assert (hf_plain[:, :first] - got[:, :first]).abs().max().item() > 1e-2
    assert (hf_plain[:, first:] - got[:, first:]).abs().max().item() > 1e-2


def test_meta_layout_of_the_same_weights_gives_the_same_logits(hf_model, ours, tmp_path: Path) -> None:
    meta = load_multimodal(write_meta_mllama(hf_model, tmp_path))
    prompt = [IMAGE, 1] + _text(5, 8) + [IMAGE] + _text(5, 9)
    tokens, images = torch.tensor([prompt]), make_images([[(2, 2), (1, 3)]])
    expected = hf_logits(hf_model, tokens, images)
    got = _ours_logits(meta, tokens, images)
    assert (expected - got).abs().max().item() <= TOL
    torch.testing.assert_close(got, _ours_logits(ours, tokens, images), atol=1e-5, rtol=0)


def test_legacy_hf_key_layout_loads(hf_model, ours, tmp_path: Path) -> None:
    from safetensors.torch import load_file, save_file

    save_hf_mllama(hf_model, tmp_path)
    tensors = load_file(tmp_path / "model.safetensors")
    legacy = {}
    for key, value in tensors.items():
        key = key.replace("model.language_model.", "language_model.model.").replace("model.vision_model.", "vision_model.")
        key = key.replace("model.multi_modal_projector.", "multi_modal_projector.")
        legacy[key.replace("lm_head.", "language_model.lm_head.") if key.startswith("lm_head.") else key] = value
    assert any(k.startswith("language_model.model.layers.") for k in legacy)
    save_file(legacy, tmp_path / "model.safetensors")
    model = load_multimodal(tmp_path)
    tokens, images = torch.tensor([[1, IMAGE] + _text(6, 10)]), make_images([[(1, 1)]])
    torch.testing.assert_close(_ours_logits(model, tokens, images), _ours_logits(ours, tokens, images), atol=0, rtol=0)


def test_greedy_generation_matches_transformers(hf_model, ours) -> None:
    prompt = [IMAGE, 1] + _text(6, 11)
    images = make_images([[(1, 2)]])
    tokens = torch.tensor([prompt])
    dense = hf_cross_attention_mask(tokens, images)
    with torch.no_grad():
        expected = hf_model.generate(
            input_ids=tokens, attention_mask=torch.ones_like(tokens), pixel_values=images.pixels,
            aspect_ratio_ids=images.aspect_ratio_ids, aspect_ratio_mask=images.tile_mask.long(),
            cross_attention_mask=dense, do_sample=False, max_new_tokens=16, min_new_tokens=16,
            eos_token_id=None, pad_token_id=0,
        )[0, len(prompt):].tolist()
    got = generate(ours, [prompt], GenerationConfig(max_new_tokens=16), prefill_inputs={"images": images})[0].tokens
    assert got == expected

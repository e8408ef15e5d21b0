"""MultimodalLlama semantics on its own: gates at 0, batch invariance, cached decoding, trainable sets,
plain LM keys, adapter round trip."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from mm_llama import LlamaDecoder, preset, save_hf
from mm_llama.checkpoints.multimodal_loading import load_multimodal, save_adapter
from mm_llama.encoders.mllama_vision import VisionConfig
from mm_llama.fusion import FusionLayer
from mm_llama.generation import GenerationConfig, generate
from mm_llama.multimodal import MultimodalConfig, MultimodalLlama
from tests.reference.hf_mllama import make_images

TEXT = preset("tiny", vocab_size=384)
IMAGE = TEXT.vocab_size


def _vision() -> VisionConfig:
    return VisionConfig(tile_size=28, patch_size=14, width=32, heads=4, mlp_dim=64, n_local_layers=3,
                        n_global_layers=1, max_tiles=4, taps=(1,))


def _model(gates: float | None = 0.6, seed: int = 0) -> MultimodalLlama:
    torch.manual_seed(seed)
    model = MultimodalLlama.from_config(MultimodalConfig(text=TEXT, vision=_vision(), fusion_layers=(0, 1))).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "gate" in name:
                p.fill_(0.0 if gates is None else gates)
            elif p.dim() >= 2:
                p.normal_(0, 0.2)
    return model


def _prompt(n_images: int, n_text: int = 6, seed: int = 0) -> list[int]:
    text = torch.randint(3, 384, (n_text * (n_images + 1),), generator=torch.Generator().manual_seed(seed)).tolist()
    out = [1] + text[:n_text]
    for i in range(n_images):
        out += [IMAGE] + text[(i + 1) * n_text:(i + 2) * n_text]
    return out


def test_zero_gates_equal_the_text_model_exactly() -> None:
    model = _model(gates=None)
    tokens = torch.tensor([_prompt(2)])
    with torch.no_grad():
        with_images = model(tokens, images=make_images([[(2, 2), (1, 3)]]))
        text_only = model.decoder(tokens)
    assert torch.equal(with_images, text_only)


def test_nonzero_gates_change_rows_after_the_image_only() -> None:
    model = _model()
    prompt = _prompt(1)
    tokens = torch.tensor([prompt])
    first = prompt.index(IMAGE)
    with torch.no_grad():
        with_image = model(tokens, images=make_images([[(1, 2)]]))
        text_only = model.decoder(tokens)
    assert torch.equal(with_image[:, :first], text_only[:, :first])
    assert (with_image[:, first:] - text_only[:, first:]).abs().max() > 1e-2


def test_sample_logits_do_not_depend_on_the_batch_or_padding() -> None:
    model = _model()
    alone_prompt = _prompt(1, n_text=5, seed=1)
    with torch.no_grad():
        alone = model(torch.tensor([alone_prompt]), images=make_images([[(1, 1)]], seed=5))
        # batched with a sample holding more images and tiles (so padding images and tiles) and a text-only one
        other = _prompt(2, n_text=3, seed=2)
        assert len(other) == len(alone_prompt)
        text = [1] + [7] * (len(alone_prompt) - 1)
        images = make_images([[(1, 1)], [(2, 2), (3, 1)], []], seed=5)
        batch = model(torch.tensor([alone_prompt, other, text]), images=images)
        text_alone = model(torch.tensor([text]))
    torch.testing.assert_close(batch[0], alone[0], atol=1e-5, rtol=0)
    torch.testing.assert_close(batch[2], text_alone[0], atol=1e-5, rtol=0)


def test_cached_generation_equals_full_forward_and_reuses_image_kv() -> None:
    model = _model()
    prompts = [_prompt(1, seed=3), _prompt(2, n_text=2, seed=4)]
    images = make_images([[(2, 1)], [(1, 1), (1, 4)]], seed=6)
    calls = []
    handle = model.image.encoder.register_forward_hook(lambda *a: calls.append(1))
    out = generate(model, prompts, GenerationConfig(max_new_tokens=8), prefill_inputs={"images": images})
    handle.remove()
    assert len(calls) == 1  # the encoder ran once, at prefill

    for row, (prompt, result) in enumerate(zip(prompts, out)):
        one = _select(images, row)
        seq = list(prompt)
        for token in result.tokens:
            with torch.no_grad():
                logits = model(torch.tensor([seq]), images=one)
            assert logits[0, -1].argmax().item() == token
            seq.append(token)


def _select(images, row: int):
    """Sample `row` of an image batch alone, without the padding images the batch gave it."""
    n = len(images.num_tiles[row])
    return type(images)(images.pixels[row:row + 1, :n], images.aspect_ratio_ids[row:row + 1, :n],
                        images.tile_mask[row:row + 1, :n], images.num_tiles[row:row + 1])


def test_parameter_groups_partition_and_declared_freezing() -> None:
    model = _model()
    groups = model.parameter_groups()
    names = [n for g in groups.values() for n in g]
    assert sorted(names) == sorted(n for n, _ in model.named_parameters())
    assert list(groups) == ["image.encoder", "image.fusion", "decoder"]
    assert all(n.startswith("image.encoder.") for n in groups["image.encoder"])
    assert "decoder.tok_embeddings.media.image.weight" in groups["image.fusion"]
    assert any(n.startswith("image.projector.") for n in groups["image.fusion"])
    assert all(".fusion.image." in n or n.startswith("image.projector.") or ".media.image." in n
               for n in groups["image.fusion"])
    model.set_trainable(["image.encoder", "image.fusion"])
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == set(groups["image.encoder"]) | set(groups["image.fusion"])
    with pytest.raises(ValueError, match=r"unknown trainable group\(s\) \['encoder'\]; this model's groups are "
                                         r"\['image.encoder', 'image.fusion', 'decoder'\]"):
        model.set_trainable(["encoder"])


def test_plain_llama_checkpoint_keys_load_into_the_fused_decoder(tmp_path: Path) -> None:
    torch.manual_seed(0)
    lm = LlamaDecoder(TEXT)
    model = MultimodalLlama.from_config(MultimodalConfig(text=TEXT, vision=_vision(), fusion_layers=(1,)))
    decoder_keys = set(model.decoder.state_dict())
    assert set(lm.state_dict()) <= decoder_keys
    assert decoder_keys - set(lm.state_dict()) == {k for k in decoder_keys if ".fusion.image." in k or ".media.image." in k}
    missing, unexpected = model.decoder.load_state_dict(lm.state_dict(), strict=False)
    assert not unexpected and all(".fusion.image." in k or ".media.image." in k for k in missing)
    assert isinstance(model.decoder.layers[1], FusionLayer)
    assert torch.equal(model.decoder.layers[1].layer.attention.wq.weight, lm.layers[1].attention.wq.weight)


def test_adapter_checkpoint_holds_only_trained_weights_and_round_trips(tmp_path: Path) -> None:
    from safetensors import safe_open

    model = _model()
    save_hf(_plain_copy(model), tmp_path / "base")
    save_adapter(model, tmp_path / "run", base_lm=tmp_path / "base")
    with safe_open(str(tmp_path / "run" / "adapter.safetensors"), framework="pt") as f:
        keys = set(f.keys())
    assert keys and all(k.startswith(("image.encoder.", "image.projector.", "decoder.tok_embeddings.media.image."))
                        or ".fusion.image." in k for k in keys)
    assert not any(k.startswith("decoder.layers.") and ".fusion.image." not in k for k in keys)

    again = load_multimodal(tmp_path / "run")
    tokens, images = torch.tensor([_prompt(1)]), make_images([[(2, 2)]])
    with torch.no_grad():
        torch.testing.assert_close(again(tokens, images=images), model(tokens, images=images), atol=1e-6, rtol=0)


def _plain_copy(model: MultimodalLlama) -> LlamaDecoder:
    lm = LlamaDecoder(TEXT)
    lm.load_state_dict({k: v for k, v in model.decoder.state_dict().items() if ".fusion." not in k and ".media." not in k})
    return lm


def test_image_tokens_without_images_is_a_clear_error() -> None:
    with pytest.raises(ValueError, match="1 <\\|image\\|> token\\(s\\) but 0 image\\(s\\)"):
        _model()(torch.tensor([_prompt(1)]))


def test_timm_encoder_plugs_into_the_same_model_and_adapter_round_trip(tmp_path: Path) -> None:
    from mm_llama.encoders.timm_vit import TimmEncoderConfig

    vision = TimmEncoderConfig(model_name="vit_tiny_patch16_224", timm_kwargs=dict(embed_dim=32, depth=3, num_heads=4,
                               patch_size=16), tile_size=32, max_tiles=4, taps=(1, 2), n_gated_layers=1)
    torch.manual_seed(0)
    model = MultimodalLlama.from_config(MultimodalConfig(text=TEXT, vision=vision, encoder="timm", fusion_layers=(1,))).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.rsplit(".", 1)[-1] in ("gate", "gate_attn", "gate_ffn", "gate_ffwd"):
                p.fill_(0.5)
    tokens = torch.tensor([[IMAGE, 1, 5, 6, 7]])
    pixels = torch.randn(1, 1, 4, 3, 32, 32)
    images = type(make_images([[(1, 1)]]))(pixels, torch.tensor([[6]]), torch.tensor([[[True] * 4]]), [[4]])
    with torch.no_grad():
        logits = model(tokens, images=images)
        text_only = model.decoder(tokens)
    assert model.image.encoder.out_dim == 32 * 3 and logits.shape == (1, 5, TEXT.vocab_size)
    assert (logits - text_only).abs().max() > 1e-3

    save_hf(_plain_copy(model), tmp_path / "base")
    save_adapter(model, tmp_path / "run", base_lm=tmp_path / "base")
    again = load_multimodal(tmp_path / "run")
    with torch.no_grad():
        torch.testing.assert_close(again(tokens, images=images), logits, atol=1e-6, rtol=0)

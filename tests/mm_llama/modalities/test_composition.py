"""Modalities compose on one frozen LM: blocks of two cross-attention modalities at the same layer run in
the declared order with their own keys/values, cache state, embedding rows and trainable groups; an
early-fusion modality fills its placeholder span; the caller's decoder is never edited."""

from __future__ import annotations

import pytest
import torch

from mm_llama import LlamaDecoder, preset
from mm_llama.encoders.mllama_vision import VisionConfig
from mm_llama.generation import GenerationConfig, generate
from mm_llama.layers import DecoderLayer
from mm_llama.modalities import ImageModality
from mm_llama.multimodal import MultimodalLlama
from tests.mm_llama.modalities.stand_ins import ProbeModality, SketchModality, count_kv_computations, train_two_steps
from tests.reference.hf_mllama import make_images

TEXT = preset("tiny", vocab_size=384, n_layers=4)
IMAGE, SKETCH, SPEECH = TEXT.vocab_size, TEXT.vocab_size + 1, TEXT.vocab_size + 4


def _vision() -> VisionConfig:
    return VisionConfig(tile_size=28, patch_size=14, width=32, heads=4, mlp_dim=64, n_local_layers=2,
                        n_global_layers=1, max_tiles=4, taps=(1,))


def _randomise(model: torch.nn.Module, seed: int) -> None:
    torch.manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "gate" in name:
                p.fill_(0.6)
            elif p.dim() >= 2:
                p.normal_(0, 0.2)


def _modalities(order: tuple[str, ...] = ("sketch", "image"), seed: int = 0) -> dict[str, torch.nn.Module]:
    torch.manual_seed(seed)
    made = {"image": lambda: ImageModality(TEXT, _vision(), fusion_layers=(1, 3)),
            "sketch": lambda: SketchModality(TEXT, _vision(), fusion_layers=(1,)),
            "probe": lambda: ProbeModality(TEXT)}
    return {name: made[name]() for name in order}


def _model(order: tuple[str, ...] = ("sketch", "image"), seed: int = 0) -> tuple[MultimodalLlama, LlamaDecoder]:
    torch.manual_seed(seed)
    lm = LlamaDecoder(TEXT).eval()
    model = MultimodalLlama(lm, list(_modalities(order, seed).values())).eval()
    _randomise(model, seed + 1)
    return model, lm


def _tokens(*media: int, n_text: int = 5, seed: int = 0) -> torch.Tensor:
    text = torch.randint(3, 384, (n_text * (len(media) + 1),), generator=torch.Generator().manual_seed(seed)).tolist()
    out = [1] + text[:n_text]
    for i, m in enumerate(media):
        out += [m] + text[(i + 1) * n_text:(i + 2) * n_text]
    return torch.tensor([out])


def test_the_callers_decoder_is_not_edited_and_text_only_equals_it() -> None:
    model, lm = _model()
    assert all(isinstance(layer, DecoderLayer) for layer in lm.layers)
    assert isinstance(lm.tok_embeddings, torch.nn.Embedding) and set(lm.state_dict()) == set(LlamaDecoder(TEXT).state_dict())
    assert model.decoder.layers[1].layer is lm.layers[1]  # the frozen weights are shared, not copied
    tokens = _tokens()
    with torch.no_grad():
        assert torch.equal(model(tokens), lm(tokens))


def test_blocks_at_one_layer_run_in_the_declared_order() -> None:
    for order in (("sketch", "image"), ("image", "sketch")):
        model, _ = _model(order)
        assert list(model.decoder.layers[1].fusion) == list(order)
        assert list(model.decoder.layers[3].fusion) == ["image"]
        ran: list[str] = []
        hooks = [block.register_forward_hook(lambda *a, name=name: ran.append(name))
                 for name, block in model.decoder.layers[1].fusion.items()]
        with torch.no_grad():
            model(_tokens(SKETCH, IMAGE), media={"image": make_images([[(1, 1)]], seed=1),
                                                 "sketch": make_images([[(2, 1)]], seed=2)})
        for hook in hooks:
            hook.remove()
        assert ran == list(order)


def test_each_modality_reads_only_its_own_media() -> None:
    model, _ = _model()
    images, sketches = make_images([[(1, 1)]], seed=1), make_images([[(2, 2)]], seed=2)
    with torch.no_grad():
        both = model(_tokens(SKETCH, IMAGE), media={"image": images, "sketch": sketches})
        other_sketch = model(_tokens(SKETCH, IMAGE), media={"image": images, "sketch": make_images([[(1, 2)]], seed=9)})
        image_only = model(_tokens(IMAGE), images=images)
    n = _tokens(SKETCH).shape[1] - 6  # rows before the <|video|> token see neither
    assert torch.equal(both[:, :n], other_sketch[:, :n])
    assert not torch.allclose(both[:, n:], other_sketch[:, n:])  # the sketch changes what follows it
    with pytest.raises(ValueError, match=r"sample 0 has 1 <\|image\|> token\(s\) but 0 image\(s\)"):
        model(_tokens(SKETCH, IMAGE), media={"sketch": sketches})
    with pytest.raises(ValueError, match=r"media for \['speech'\], which this model has no modality for"):
        model(_tokens(IMAGE), media={"image": images, "speech": sketches})
    assert image_only.shape == (1, 12, TEXT.vocab_size)


def test_each_modalitys_keys_and_values_are_computed_once_per_generation() -> None:
    model, _ = _model()
    counts = count_kv_computations(model)
    prompt = _tokens(SKETCH, IMAGE, seed=3)[0].tolist()
    media = {"image": make_images([[(1, 1)]], seed=1), "sketch": make_images([[(2, 1)]], seed=2)}
    out = generate(model, [prompt], GenerationConfig(max_new_tokens=6), prefill_inputs={"media": media})[0]
    assert counts == {"sketch": 1, "image": 2}  # one block of sketch, two of image, each once at prefill
    seq = list(prompt)
    for token in out.tokens:  # cached decoding equals the full forward pass at every step
        with torch.no_grad():
            assert model(torch.tensor([seq]), media=media)[0, -1].argmax().item() == token
        seq.append(token)


def test_training_one_modality_leaves_the_other_bit_identical() -> None:
    model, lm = _model()
    before = train_two_steps(model, ["sketch.encoder", "sketch.fusion"], _tokens(SKETCH, IMAGE, seed=4), {"image": make_images([[(1, 1)]], seed=1), "sketch": make_images([[(1, 2)]], seed=2)})
    after = model.state_dict()
    groups = model.parameter_groups()
    assert list(groups) == ["sketch.encoder", "sketch.fusion", "image.encoder", "image.fusion", "decoder"]
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed and changed <= set(groups["sketch.encoder"]) | set(groups["sketch.fusion"])
    assert "decoder.tok_embeddings.media.sketch.weight" in changed
    assert any(k.startswith("decoder.layers.1.fusion.sketch.") for k in changed)


def test_state_dict_round_trips_with_both_key_sets() -> None:
    model, _ = _model(seed=0)
    keys = set(model.state_dict())
    for prefix in ("sketch.encoder.", "sketch.projector.", "image.encoder.", "image.projector.",
                   "decoder.layers.1.fusion.sketch.", "decoder.layers.1.fusion.image.", "decoder.layers.3.fusion.image."):
        assert any(k.startswith(prefix) for k in keys), prefix
    assert {"decoder.tok_embeddings.media.sketch.weight", "decoder.tok_embeddings.media.image.weight"} <= keys
    assert not any(k.startswith("decoder.layers.3.fusion.sketch.") for k in keys)
    other, _ = _model(seed=5)
    other.load_state_dict(model.state_dict(), strict=True)
    tokens = _tokens(SKETCH, IMAGE)
    media = {"image": make_images([[(1, 1)]], seed=1), "sketch": make_images([[(2, 1)]], seed=2)}
    with torch.no_grad():
        assert torch.equal(other(tokens, media=media), model(tokens, media=media))


def test_an_early_fusion_modality_fills_its_placeholder_span() -> None:
    model, lm = _model(("probe", "image"))
    assert list(model.parameter_groups()) == ["probe.adapter", "image.encoder", "image.fusion", "decoder"]
    assert "decoder.tok_embeddings.media.probe.weight" in model.parameter_groups()["probe.adapter"]
    tokens = torch.tensor([[1, 7, SPEECH, SPEECH, SPEECH, 9, 11]])
    features = torch.randn(3, 6)
    with torch.no_grad():
        got = model(tokens, media={"probe": features})
        embeds = lm.tok_embeddings(tokens.clamp(max=TEXT.vocab_size - 1)).clone()
        embeds[0, 2:5] = model.probe.adapter(features)
        assert torch.equal(got, lm(embeds=embeds))
    with pytest.raises(ValueError, match=r"sample 0 has 3 probe token\(s\) but no probe input was given"):
        model(tokens)


def test_media_ids_no_modality_owns_are_an_error() -> None:
    model, _ = _model(("image",))
    with pytest.raises(ValueError, match=r"token id 385 \(sample 0, position 2\) .* no modality of this model owns it"):
        model(torch.tensor([[1, 5, SKETCH, 6]]))
    with pytest.raises(ValueError, match=r"distinct names"):
        MultimodalLlama(LlamaDecoder(TEXT), [ImageModality(TEXT, _vision(), fusion_layers=(1,))] * 2)

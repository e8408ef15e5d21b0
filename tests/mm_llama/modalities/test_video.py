"""The video modality: frames through the image modality's encoder and projector, a perceiver over time,
its own gated blocks before the image blocks; which rows see a clip, padding, time order, frame chunks,
K/V once per generation, training that leaves the image adapter and the LM untouched, adapter files."""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch

from mm_llama import LlamaDecoder, preset
from mm_llama.adapters.perceiver import PerceiverConfig
from mm_llama.checkpoints.multimodal_loading import load_adapter_run, save_adapter
from mm_llama.checkpoints.hf import save_hf
from mm_llama.encoders.mllama_vision import VisionConfig
from mm_llama.generation import GenerationConfig, generate
from mm_llama.modalities import ImageModality, VideoModality
from mm_llama.modalities.video import video_fusion_layers
from mm_llama.multimodal import MultimodalLlama
from tests.mm_llama.modalities.stand_ins import count_kv_computations, train_two_steps
from tests.reference.hf_mllama import Images, make_images

TEXT = preset("tiny", vocab_size=384, n_layers=4)
IMAGE, VIDEO = TEXT.vocab_size, TEXT.vocab_size + 1
AGGREGATOR = PerceiverConfig(depth=1, n_heads=2, head_dim=16, n_latents=4, ffn_mult=2, group_size=4)


@dataclass
class Clips:
    frames: Images
    frame_mask: torch.Tensor


def _vision() -> VisionConfig:
    return VisionConfig(tile_size=28, patch_size=14, width=32, heads=4, mlp_dim=64, n_local_layers=2,
                        n_global_layers=1, max_tiles=4, taps=(1,))


def _model(seed: int = 0, order: tuple[str, ...] = ("image", "video"), frame_chunk: int = 3,
           lm: LlamaDecoder | None = None) -> MultimodalLlama:
    torch.manual_seed(seed)
    lm = lm if lm is not None else LlamaDecoder(TEXT)
    image = ImageModality(TEXT, _vision(), fusion_layers=(1, 3))
    video = VideoModality(TEXT, image, AGGREGATOR, frame_chunk=frame_chunk)
    made = {"image": image, "video": video}
    model = MultimodalLlama(lm, [made[n] for n in order]).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "gate" in name:
                p.fill_(0.6)
    return model


def _clips(lengths: list[int], seed: int = 0, tiles: tuple[int, int] = (1, 1)) -> Clips:
    frames = make_images([[tiles] * n for n in lengths], seed=seed)
    return Clips(frames, frames.aspect_ratio_ids > 0)


def _tokens(*media: int, n_text: int = 4, seed: int = 0) -> torch.Tensor:
    text = torch.randint(3, 384, (n_text * (len(media) + 1),), generator=torch.Generator().manual_seed(seed)).tolist()
    out = [1] + text[:n_text]
    for i, m in enumerate(media):
        out += [m] + text[(i + 1) * n_text:(i + 2) * n_text]
    return torch.tensor([out])


def _reversed(clips: Clips, n: int) -> Clips:
    f = clips.frames
    order = list(range(n))[::-1] + list(range(n, f.pixels.shape[1]))
    return Clips(Images(f.pixels[:, order], f.aspect_ratio_ids[:, order], f.tile_mask[:, order], f.num_tiles),
                 clips.frame_mask[:, order])


def test_video_layers_are_every_fourth_image_layer_from_the_top() -> None:
    assert video_fusion_layers([3, 7, 11, 15, 19, 23, 27, 31]) == (15, 31)
    assert video_fusion_layers([1, 3]) == (3,)
    assert video_fusion_layers(list(range(3, 40, 4))) == (7, 23, 39)


def test_the_video_block_runs_before_the_image_block_whatever_the_order_given() -> None:
    for order in (("image", "video"), ("video", "image")):
        model = _model(order=order)
        assert list(model.decoder.layers[3].fusion) == ["video", "image"]
        assert list(model.decoder.layers[1].fusion) == ["image"]
        ran: list[str] = []
        hooks = [block.register_forward_hook(lambda *a, name=name: ran.append(name))
                 for name, block in model.decoder.layers[3].fusion.items()]
        with torch.no_grad():
            model(_tokens(IMAGE, VIDEO), media={"image": make_images([[(1, 1)]], seed=1), "video": _clips([6])})
        for hook in hooks:
            hook.remove()
        assert ran == ["video", "image"]


def test_the_video_borrows_the_image_encoder_and_owns_only_its_own_groups() -> None:
    model = _model()
    assert model.video.image is model.image
    groups = model.parameter_groups()
    assert list(groups) == ["image.encoder", "image.fusion", "video.aggregator", "video.fusion", "decoder"]
    assert not any(k.startswith("video.image") or k.startswith("video.encoder") for k in model.state_dict())
    assert "decoder.tok_embeddings.media.video.weight" in groups["video.fusion"]
    assert any(k.startswith("decoder.layers.3.fusion.video.") for k in groups["video.fusion"])


def test_rows_see_the_clip_from_its_token_on_and_never_its_padding() -> None:
    model = _model()
    tokens = _tokens(VIDEO)
    clips = _clips([6], seed=1)
    with torch.no_grad():
        base = model(tokens, media={"video": clips})
        text_only = model.decoder(tokens.clamp(max=TEXT.vocab_size - 1))
        other = model(tokens, media={"video": _clips([6], seed=2)})
        # the same clip padded to 9 frames, padding frames full of noise
        padded = _clips([6, 9], seed=1)
        padded = Clips(Images(padded.frames.pixels[:1].clone(), padded.frames.aspect_ratio_ids[:1].clone(),
                              padded.frames.tile_mask[:1].clone(), padded.frames.num_tiles[:1]), padded.frame_mask[:1].clone())
        padded.frames.pixels[0, :6] = clips.frames.pixels[0, :6]
        padded.frames.pixels[0, 6:] = torch.randn_like(padded.frames.pixels[0, 6:]) * 50
        padded.frames.aspect_ratio_ids[0, 6:] = 0
        padded.frame_mask[0, 6:] = False
        with_padding = model(tokens, media={"video": padded})
    n = 5  # rows before <|video|>
    assert torch.equal(base[:, :n], other[:, :n])
    assert torch.allclose(base[:, :n], text_only[:, :n], atol=1e-6)
    assert not torch.allclose(base[:, n:], other[:, n:])
    assert torch.allclose(with_padding, base, atol=1e-5)


def test_reversing_the_frames_changes_what_the_model_reads() -> None:
    model = _model()
    clips = _clips([6], seed=3)
    with torch.no_grad():
        forward = model(_tokens(VIDEO), media={"video": clips})
        backward = model(_tokens(VIDEO), media={"video": _reversed(clips, 6)})
    assert (forward[:, 5:] - backward[:, 5:]).abs().max() > 1e-3


def test_frame_chunks_change_memory_not_results() -> None:
    calls: list[int] = []
    outs = []
    for chunk in (1, 4, 16):
        model = _model(frame_chunk=chunk)
        hook = model.image.encoder.register_forward_hook(lambda m, args, out: calls.append(int(args[0].shape[0])))
        model.requires_grad_(False)
        with torch.no_grad():
            outs.append(model(_tokens(VIDEO), media={"video": _clips([9], seed=4)}))
        hook.remove()
        assert len(calls) == -(-9 // chunk)
        calls.clear()
    assert torch.allclose(outs[0], outs[1], atol=1e-5) and torch.allclose(outs[0], outs[2], atol=1e-5)


def test_video_keys_and_values_are_computed_once_per_generation() -> None:
    model = _model()
    counts = count_kv_computations(model)
    prompt = _tokens(IMAGE, VIDEO, seed=5)[0].tolist()
    media = {"image": make_images([[(1, 1)]], seed=1), "video": _clips([5], seed=2)}
    out = generate(model, [prompt], GenerationConfig(max_new_tokens=5), prefill_inputs={"media": media})[0]
    assert counts == {"video": 1, "image": 2}
    seq = list(prompt)
    for token in out.tokens:
        with torch.no_grad():
            assert model(torch.tensor([seq]), media=media)[0, -1].argmax().item() == token
        seq.append(token)


def test_training_video_leaves_the_image_adapter_and_the_lm_bit_identical() -> None:
    model = _model()
    before = train_two_steps(model, ["video.aggregator", "video.fusion"], _tokens(IMAGE, VIDEO, seed=6), {"image": make_images([[(1, 1)]], seed=1), "video": _clips([7], seed=2)})
    groups = model.parameter_groups()
    changed = {k for k, v in model.state_dict().items() if not torch.equal(before[k], v)}
    video = set(groups["video.aggregator"]) | set(groups["video.fusion"])
    assert changed and changed <= video
    assert {"video.aggregator.latents", "decoder.tok_embeddings.media.video.weight"} <= changed
    assert any(k.startswith("decoder.layers.3.fusion.video.") for k in changed)


def test_an_adapter_run_with_video_reloads_to_the_same_logits(tmp_path) -> None:
    lm = LlamaDecoder(TEXT)
    save_hf(lm, tmp_path / "lm")
    model = _model(seed=7, lm=lm)
    with torch.no_grad():
        for p in model.video.parameters():
            p.add_(0.01 * torch.randn_like(p))
    save_adapter(model, tmp_path / "run", base_lm=tmp_path / "lm")
    loaded = load_adapter_run(tmp_path / "run")
    assert loaded.modality_names == ("image", "video")
    assert loaded.video.fusion_layers == (3,) and loaded.video.aggregator_cfg == AGGREGATOR
    tokens = _tokens(IMAGE, VIDEO, seed=8)
    media = {"image": make_images([[(1, 1)]], seed=1), "video": _clips([5], seed=2)}
    with torch.no_grad():
        assert torch.allclose(loaded(tokens, media=media), model(tokens, media=media), atol=1e-6)


def test_video_tokens_without_clips_and_video_without_image_are_errors() -> None:
    model = _model()
    with pytest.raises(ValueError, match=r"sample 0 has 1 <\|image\|> token\(s\) but 0 image\(s\)"):
        model(_tokens(VIDEO))
    from mm_llama.checkpoints.multimodal_loading import modalities_from_fields

    with pytest.raises(ValueError, match=r"name image too"):
        modalities_from_fields(TEXT, {"modalities": ["video"]})


def test_the_perceiver_reads_only_the_tiles_a_frame_has() -> None:
    model = _model()
    clips = _clips([5], seed=9)  # one tile per frame, padded to the encoder's 4
    per_tile = model.image.encoder.tokens_per_tile
    with torch.no_grad():
        latents, group_mask = model.video.aggregate(clips)
        tokens = model.video.encode_frames(clips.frames, clips.frame_mask)
        assert tokens.shape[2] == 4 * per_tile
        noisy = tokens.clone()
        noisy[:, :, per_tile:] = torch.randn_like(noisy[:, :, per_tile:]) * 10
        first_tile = torch.zeros(tokens.shape[:3], dtype=torch.bool)
        first_tile[:, :, :per_tile] = True
        expected, _ = model.video.aggregator(noisy, clips.frame_mask, first_tile & clips.frame_mask[..., None])
        everything, _ = model.video.aggregator(tokens, clips.frame_mask)
    assert torch.allclose(latents, expected, atol=1e-5)
    assert not torch.allclose(latents, everything, atol=1e-3)  # the padding tiles' tokens are not zero
    assert group_mask.tolist() == [[True, True]]


@pytest.mark.parametrize("shape, paper_billions", [("llama3-8b", 0.6), ("llama3.1-70b", 4.6)])
def test_the_paper_preset_has_the_papers_video_parameter_count(shape: str, paper_billions: float) -> None:
    from mm_llama.adapters.perceiver import PERCEIVER_PRESETS
    from mm_llama.fusion import fusion_schedule

    text = preset(shape)
    with torch.device("meta"):
        image = ImageModality(text, _vision(), fusion_layers=tuple(fusion_schedule(text.n_layers, text.n_layers // 4)))
        model = MultimodalLlama(LlamaDecoder(text), [image, VideoModality(text, image, PERCEIVER_PRESETS["paper"])])
    groups = model.parameter_groups()
    n = sum(p.numel() for g in ("video.aggregator", "video.fusion") for p in groups[g].values())
    assert abs(n / 1e9 - paper_billions) / paper_billions < 0.1, n


def test_the_order_of_aggregated_frames_reaches_the_lm() -> None:
    """Two groups of 4 frames swapped: cross-attention over their latents cannot tell the order apart (keys
    are a set) unless each group's latents carry where it stands: `group_embed`, zero at the start."""
    model = _model()
    clips = _clips([8], seed=11)
    f = clips.frames
    order = [4, 5, 6, 7, 0, 1, 2, 3]
    swapped = Clips(Images(f.pixels[:, order], f.aspect_ratio_ids[:, order], f.tile_mask[:, order], f.num_tiles),
                    clips.frame_mask[:, order])
    tokens = _tokens(VIDEO)
    with torch.no_grad():
        assert torch.count_nonzero(model.video.aggregator.group_embed) == 0
        assert torch.allclose(model(tokens, media={"video": clips}), model(tokens, media={"video": swapped}), atol=1e-5)
        model.video.aggregator.group_embed.normal_()
        assert not torch.allclose(model(tokens, media={"video": clips}), model(tokens, media={"video": swapped}),
                                  atol=1e-3)
    too_long = _clips([4 * 16 + 1], seed=1)  # 65 frames > the paper's 64: 17 groups of 4
    with pytest.raises(ValueError, match=r"a clip of 65 frames makes more than max_groups=16 groups of 4"):
        model.video.aggregate(too_long)

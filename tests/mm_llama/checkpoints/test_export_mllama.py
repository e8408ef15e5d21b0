"""`mm-llama export --format hf-mllama`, with transformers as the oracle.

A tiny Mllama saved as the released checkpoints are goes through our loader and back out through the
exporter: the exported tensors are the original ones, and transformers' logits on the export equal ours
exactly where transformers follows Meta. Its two known differences are shown one by one: the vision taps
(transformers 5.x reads them one layer later: only rows from the image on change) and the rows before the
first image (issue 39379: those rows change, and the later ones through self-attention).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from transformers import AutoProcessor, AutoTokenizer, GenerationConfig, MllamaForConditionalGeneration

from mm_llama.checkpoints.mllama_export import save_hf_mllama
from mm_llama.checkpoints.multimodal_loading import load_multimodal
from mm_llama.checkpoints.state_dict import CheckpointError
from mm_llama.cli import main as cli
from mm_llama.image_chat import image_prompt
from tests.mm_llama.checkpoints.mllama_serving import max_diff, served_logits, write_published_mllama
from tests.reference.hf_mllama import make_images, tiny_hf_mllama

TOL = 1e-4


@pytest.fixture(scope="module")
def published(tmp_path_factory: pytest.TempPathFactory):
    return write_published_mllama(tmp_path_factory.mktemp("published"))


@pytest.fixture(scope="module")
def ours(published):
    return load_multimodal(published[0])


def _export(source: Path, out: Path, *extra: str) -> Path:
    assert cli(["export", str(source), str(out), "--format", "hf-mllama", "--dtype", "float32", *extra]) == 0
    return out


@pytest.fixture(scope="module")
def exported(published, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _export(published[0], tmp_path_factory.mktemp("export") / "out")


@pytest.fixture(scope="module")
def served(exported: Path):
    return MllamaForConditionalGeneration.from_pretrained(exported).eval()


def _chat_prompt(tok, seed: int = 0) -> list[int]:
    """Our vqa prompt: BOS + user header (text before the image), `<|image|>`, the question, assistant header."""
    return image_prompt(tok, "what is the gold star on the left?", tok.vocab_size) + tok.encode(" a red")


def test_export_holds_the_published_tensors(published, exported: Path) -> None:
    from safetensors.torch import load_file

    original = tiny_hf_mllama(0, vocab=published[1].vocab_size).state_dict()
    legacy = load_file(exported / "model.safetensors")
    assert any(k.startswith("language_model.model.layers.") for k in legacy)  # the published key layout
    served_state = MllamaForConditionalGeneration.from_pretrained(exported).state_dict()
    vocab = published[1].vocab_size
    for key, tensor in original.items():
        if key.endswith("embed_tokens.weight"):  # rows 1..7 past the vocabulary are reserved: written as zeros
            torch.testing.assert_close(served_state[key][: vocab + 1], tensor[: vocab + 1], atol=0, rtol=0)
            assert not served_state[key][vocab + 1:].any()
        else:
            torch.testing.assert_close(served_state[key], tensor, atol=0, rtol=0, msg=key)
    config = json.loads((exported / "config.json").read_text())
    assert config["vision_config"]["intermediate_layers_indices"] == [1, 2]  # Meta's meaning, as published
    assert config["image_token_index"] == vocab


def test_logits_differ_only_where_transformers_differs_from_meta(published, ours, served) -> None:
    tok = published[1]
    prompt = _chat_prompt(tok)
    first = prompt.index(tok.image_id)
    assert first > 0  # the chat format puts the user header before the image
    tokens, images = torch.tensor([prompt]), make_images([[(1, 2)]])
    with torch.no_grad():
        got = ours(tokens, images=images)

    def served_with(meta_taps: bool, meta_rows: bool) -> torch.Tensor:
        return served_logits(served, tokens, images, tok.image_id, meta_taps=meta_taps, meta_rows=meta_rows)

    # both of Meta's conventions put back: transformers equals ours at every position
    assert max_diff(served_with(True, True)[0], got[0]) <= TOL
    # taps as transformers 5.x reads them: rows before the image are untouched, every row from it on changes
    taps_only = served_with(False, True)
    assert max_diff(taps_only[0, :first], got[0, :first]) <= TOL
    assert (taps_only[0, first:] - got[0, first:]).abs().amax(-1).min().item() > 1e-3
    # transformers' rows before the image (issue 39379): they change, and the later rows see them
    rows_only = served_with(True, False)
    assert max_diff(rows_only[0, :first], got[0, :first]) > 1e-2
    assert max_diff(rows_only[0, first:], got[0, first:]) > 1e-3
    # plain transformers on the export differs both ways
    assert max_diff(served_with(False, False)[0], got[0]) > 1e-2


def test_a_prompt_starting_with_the_image_needs_only_the_tap_convention(published, ours, served) -> None:
    tok = published[1]
    prompt = [tok.image_id, tok.bos_id] + tok.encode("a red star on the left")
    tokens, images = torch.tensor([prompt]), make_images([[(2, 2)]])
    with torch.no_grad():
        got = ours(tokens, images=images)
    hf = served_logits(served, tokens, images, tok.image_id, meta_taps=True, meta_rows=False)
    assert max_diff(hf[0], got[0]) <= TOL


def test_taps_for_transformers5_make_plain_transformers_match(published, ours, tmp_path: Path) -> None:
    tok = published[1]
    out = _export(published[0], tmp_path / "t5", "--vision-taps", "transformers5")
    config = json.loads((out / "config.json").read_text())["vision_config"]
    assert config["intermediate_layers_indices"] == [0, 1] and config["mm_llama_tap_convention"] == "leaving"
    served5 = MllamaForConditionalGeneration.from_pretrained(out).eval()
    prompt = [tok.image_id, tok.bos_id] + tok.encode("a gold circle on the top")
    tokens, images = torch.tensor([prompt]), make_images([[(1, 3)]])
    with torch.no_grad():
        got = ours(tokens, images=images)
        again = load_multimodal(out)(tokens, images=images)  # mm-llama reads the shifted indices back
    assert max_diff(served_logits(served5, tokens, images, tok.image_id, meta_taps=False, meta_rows=False)[0],
                    got[0]) <= TOL
    assert max_diff(again, got) <= 1e-5


def test_tokenizer_chat_template_and_generation_config(published, exported: Path) -> None:
    tok = published[1]
    hf_tok = AutoTokenizer.from_pretrained(exported)
    assert hf_tok.convert_tokens_to_ids("<|image|>") == tok.vocab_size
    text = "a blue square on the right."
    assert hf_tok(text, add_special_tokens=False)["input_ids"] == tok.encode(text)
    processor = AutoProcessor.from_pretrained(exported)
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": " what is on the left? "}]}]
    rendered = processor.apply_chat_template(messages, add_generation_prompt=True)
    ids = hf_tok(rendered, add_special_tokens=False)["input_ids"]
    assert ids == image_prompt(tok, "what is on the left?", tok.vocab_size)
    gen = GenerationConfig.from_pretrained(exported)
    assert gen.bos_token_id == tok.bos_id and sorted(gen.eos_token_id) == sorted(tok.stop_ids)
    assert gen.do_sample is False


def test_image_processor_settings_tile_as_we_do(published, exported: Path) -> None:
    from PIL import Image

    from mm_llama.data.image_transform import ImageTransform

    processor = AutoProcessor.from_pretrained(exported)
    image = Image.fromarray((torch.rand(30, 70, 3) * 255).to(torch.uint8).numpy())
    hf = processor.image_processor(images=[[image]], return_tensors="pt")
    ours = ImageTransform(tile_size=28, max_tiles=4)(image)
    tiles = ours.tiles.shape[0]
    assert hf["num_tiles"] == [[tiles]] and hf["aspect_ratio_ids"][0, 0].item() == ours.aspect_ratio_id
    torch.testing.assert_close(hf["pixel_values"][0, 0, :tiles], ours.tiles, atol=0.05, rtol=0)


def test_a_timm_encoder_cannot_be_written_as_mllama(tmp_path: Path) -> None:
    from mm_llama import preset
    from mm_llama.encoders.timm_vit import TimmEncoderConfig
    from mm_llama.multimodal import MultimodalConfig, MultimodalLlama

    vision = TimmEncoderConfig(model_name="vit_tiny_patch16_224", tile_size=32, max_tiles=1, taps=(1,), n_gated_layers=1,
                               timm_kwargs={"embed_dim": 32, "depth": 2, "num_heads": 2, "patch_size": 16})
    model = MultimodalLlama.from_config(MultimodalConfig(text=preset("tiny"), vision=vision, encoder="timm"))
    with pytest.raises(CheckpointError, match="timm ViT .* only vision tower transformers' Mllama has"):
        save_hf_mllama(model, tmp_path / "out", source="run")
    assert not (tmp_path / "out").exists()


def test_wrong_format_and_busy_out_dir_are_refused(published, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "x").write_text("")
    assert cli(["export", str(published[0]), str(tmp_path / "busy"), "--format", "hf-mllama"]) == 2
    assert "already holds files" in capsys.readouterr().err
    assert cli(["export", str(published[0]), str(tmp_path / "o"), "--format", "hf"]) == 2
    assert "is an image model; export it with --format hf-mllama" in capsys.readouterr().err

"""A Llama 3.2 Vision directory's preprocessor_config.json sets the image transform mm-llama uses for it;
transformers' MllamaImageProcessor built from the same file is the oracle for the pixels."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from mm_llama.checkpoints.image_processor import read_image_processing
from mm_llama.checkpoints.state_dict import CheckpointError
from mm_llama.data.image_transform import CLIP_MEAN, CLIP_STD, collate_images
from mm_llama.image_chat import image_transform, load_image_model
from mm_llama.tiny_checkpoint import sample_sentences
from mm_llama.tokenizer import Tokenizer
from mm_llama.tokenizer_training import train_llama3_tokenizer
from tests.reference.hf_mllama import save_hf_mllama, tiny_hf_mllama

hf_image = pytest.importorskip("transformers.models.mllama.image_processing_mllama")

MEAN, STD = [0.5, 0.25, 0.125], [0.2, 0.4, 0.3]  # far from CLIP's, so using the wrong ones shows


@pytest.fixture(scope="module")
def mllama_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("mllama")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        train_llama3_tokenizer(sample_sentences(), 300, path)
    save_hf_mllama(tiny_hf_mllama(vocab=Tokenizer.from_dir(path).vocab_size), path)
    return path


def _vision(directory: Path) -> tuple[int, int]:
    vision = json.loads((directory / "config.json").read_text())["vision_config"]
    return vision["image_size"], vision["max_num_tiles"]


def _preprocessor(directory: Path, **changes: object) -> dict:
    tile, tiles = _vision(directory)
    config = {"image_processor_type": "MllamaImageProcessor", "do_convert_rgb": True, "do_normalize": True,
              "do_pad": True, "do_rescale": True, "do_resize": True, "image_mean": MEAN, "image_std": STD,
              "max_image_tiles": tiles, "resample": 2, "rescale_factor": 1 / 255,
              "size": {"height": tile, "width": tile}, **changes}
    (directory / "preprocessor_config.json").write_text(json.dumps(config))
    return config


def _image(seed: int, width: int, height: int) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))


def test_the_checkpoints_mean_and_std_give_the_pixels_transformers_gives(mllama_dir: Path) -> None:
    config = _preprocessor(mllama_dir)
    try:
        model, _ = load_image_model(mllama_dir, dtype=torch.float32, device="cpu")
    finally:
        (mllama_dir / "preprocessor_config.json").unlink()
    transform = image_transform(model)
    assert transform.mean == tuple(MEAN) and transform.std == tuple(STD)
    tile, tiles = _vision(mllama_dir)
    images = [_image(0, 3 * tile // 2, tile), _image(1, tile // 3, 2 * tile)]
    ours = collate_images([[transform(im)] for im in images], max_tiles=tiles)
    oracle = hf_image.MllamaImageProcessor(**{k: v for k, v in config.items() if k != "image_processor_type"})
    theirs = oracle([[im] for im in images], return_tensors="pt")
    torch.testing.assert_close(ours.pixels, theirs["pixel_values"], rtol=0, atol=1e-6)
    assert torch.equal(ours.aspect_ratio_ids, theirs["aspect_ratio_ids"])
    # without the file the built-in CLIP normalisation applies, and the pixels differ
    default, _ = load_image_model(mllama_dir, dtype=torch.float32, device="cpu")
    plain = image_transform(default)
    assert plain.mean == CLIP_MEAN and plain.std == CLIP_STD
    assert not torch.allclose(plain(images[0]).tiles, transform(images[0]).tiles, atol=1e-2)


def test_a_rescale_factor_and_no_normalisation_are_applied(mllama_dir: Path, tmp_path: Path) -> None:
    tile, tiles = _vision(mllama_dir)
    (tmp_path / "config.json").write_text((mllama_dir / "config.json").read_text())
    _preprocessor(tmp_path, rescale_factor=1 / 127.5)
    processing = read_image_processing(tmp_path, tile_size=tile, max_tiles=tiles)
    assert processing is not None
    pixels = torch.full((3, tile, tile), 200, dtype=torch.uint8)
    got = processing.transform().tile_tensor(pixels).tiles[0, :, 0, 0]
    expected = torch.tensor([(200 / 127.5 - m) / s for m, s in zip(MEAN, STD)], dtype=torch.float32)
    torch.testing.assert_close(got, expected, rtol=1e-6, atol=1e-6)
    _preprocessor(tmp_path, do_normalize=False)
    plain = read_image_processing(tmp_path, tile_size=tile, max_tiles=tiles)
    assert plain is not None
    torch.testing.assert_close(plain.transform().tile_tensor(pixels).tiles[0, :, 0, 0],
                               torch.full((3,), 200 / 255), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("changes, message", [
    ({"size": {"height": 999, "width": 999}}, r"tiles of 999 px but the model's vision config has image_size \d+"),
    ({"max_image_tiles": 9}, r"max_image_tiles=9 but the model's vision config has max_num_tiles=\d+"),
    ({"size": {"height": 32, "width": 64}}, r"not square"),
    ({"image_std": [0.2, 0.0, 0.3]}, r"image_std must be > 0"),
    ({"image_mean": [0.5, 0.5]}, r"image_mean must be 3 finite numbers"),
    ({"resample": 3}, r"resample is 3 \(mm-llama resizes bilinear"),
    ({"do_pad": False}, r"do_pad is false"),
    ({"image_processor_type": "CLIPImageProcessor"}, r"not MllamaImageProcessor"),
])
def test_contradictions_and_unsupported_settings_are_errors_naming_the_file(mllama_dir: Path, changes: dict,
                                                                             message: str) -> None:
    _preprocessor(mllama_dir, **changes)
    try:
        with pytest.raises(CheckpointError, match=r"preprocessor_config\.json.*" + message):
            load_image_model(mllama_dir, dtype=torch.float32, device="cpu")
    finally:
        (mllama_dir / "preprocessor_config.json").unlink()


def test_an_export_passes_the_checkpoints_normalisation_on(tmp_path: Path) -> None:
    from mm_llama.checkpoints.serving_files import write_preprocessor_config

    write_preprocessor_config(tmp_path, tile_size=32, max_tiles=2, mean=MEAN, std=STD)
    processing = read_image_processing(tmp_path, tile_size=32, max_tiles=2)
    assert processing is not None and processing.mean == tuple(MEAN) and processing.std == tuple(STD)
    write_preprocessor_config(tmp_path, tile_size=32, max_tiles=2)
    default = read_image_processing(tmp_path, tile_size=32, max_tiles=2)
    assert default is not None and default.mean == CLIP_MEAN and default.std == CLIP_STD

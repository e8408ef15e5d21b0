"""The README's Python examples run as written. The first: its placeholders pointing at tiny files (a text
checkpoint, a Llama 3.2 Vision-layout checkpoint, a PNG) and CUDA / bf16 swapped for CPU / fp32."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
from PIL import Image

from mm_llama.tiny_checkpoint import sample_sentences, write_tiny_checkpoint
from mm_llama.tokenizer import Tokenizer
from mm_llama.tokenizer_training import train_llama3_tokenizer
from tests.reference.hf_mllama import save_hf_mllama, tiny_hf_mllama

README = Path(__file__).resolve().parents[1] / "README.md"


def test_the_first_python_example_runs(tmp_path: Path) -> None:
    block = re.findall(r"```python\n(.*?)```", README.read_text(), re.S)[0]
    text_dir = write_tiny_checkpoint(tmp_path / "llama")
    mllama = tmp_path / "mllama"
    train_llama3_tokenizer(sample_sentences(), 300, mllama)
    save_hf_mllama(tiny_hf_mllama(vocab=Tokenizer.from_dir(mllama).vocab_size), mllama)
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (30, 40, 3), dtype=np.uint8)).save(tmp_path / "cat.png")
    places = {'"DIR"': text_dir, '"MLLAMA_DIR"': mllama, '"OUT"': tmp_path / "out", '"cat.jpg"': tmp_path / "cat.png"}
    for placeholder, path in places.items():
        assert placeholder in block, f"the README example no longer uses {placeholder}"
        block = block.replace(placeholder, repr(str(path)))
    block = block.replace('device="cuda"', 'device="cpu"').replace('dtype="bfloat16"', 'dtype="float32"')
    scope: dict[str, object] = {}
    exec(compile(block, str(README), "exec"), scope)  # noqa: S102
    assert (tmp_path / "out" / "config.json").is_file()
    answers = scope["answers"]
    assert len(answers) == 1  # type: ignore[arg-type]


def test_the_composition_example_runs(tmp_path: Path) -> None:
    """The README's second Python example (one modality wired onto a frozen LM), its free names (`vision_cfg`,
    `tokens`, `image_batch`) given tiny values and `LLAMA_DIR` a 16-layer tiny LM (it fuses before layer 15)."""
    import torch

    from mm_llama import LlamaDecoder, preset
    from mm_llama.checkpoints.hf import save_hf
    from mm_llama.data.image_transform import ImageTransform, collate_images
    from mm_llama.encoders.timm_vit import TimmEncoderConfig
    from mm_llama.media_tokens import MediaTokens

    block = re.findall(r"```python\n(.*?)```", README.read_text(), re.S)[1]
    assert '"LLAMA_DIR"' in block
    lm_dir = tmp_path / "llama"
    save_hf(LlamaDecoder(preset("tiny", n_layers=16)), lm_dir)
    vocab = preset("tiny").vocab_size
    vision_cfg = TimmEncoderConfig(model_name="vit_tiny_patch16_224", timm_kwargs={"embed_dim": 32, "depth": 2,
                                   "num_heads": 2, "patch_size": 16}, tile_size=32, max_tiles=1, taps=(1,),
                                   n_gated_layers=1)
    pixels = np.random.default_rng(0).integers(0, 255, (40, 30, 3), dtype=np.uint8)
    image_batch = collate_images([[ImageTransform(tile_size=32, max_tiles=1)(Image.fromarray(pixels))]], max_tiles=1)
    tokens = torch.tensor([[1, MediaTokens(vocab).image, 5, 9, 7]])
    scope: dict[str, object] = {"vision_cfg": vision_cfg, "tokens": tokens, "image_batch": image_batch}
    exec(compile(block.replace('"LLAMA_DIR"', repr(str(lm_dir))), str(README), "exec"), scope)  # noqa: S102
    model, logits = scope["model"], scope["logits"]
    assert logits.shape[:2] == tokens.shape  # type: ignore[union-attr]
    trainable = {name.split(".")[0] for name, p in model.named_parameters() if p.requires_grad}  # type: ignore[union-attr]
    assert trainable == {"image", "decoder"}  # the image groups (their fusion blocks live under decoder.layers)
    assert not any(p.requires_grad for n, p in model.named_parameters()  # type: ignore[union-attr]
                   if n.startswith("decoder.") and ".fusion." not in n and ".media." not in n)

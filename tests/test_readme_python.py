"""The README's first Python example runs as written, its placeholders pointing at tiny files (a text
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

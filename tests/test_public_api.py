"""`from mm_llama import …` gives the model classes, loaders and answer functions the commands use, and the
installed version; the multimodal names load lazily and are the very objects their modules define."""

from __future__ import annotations

import subprocess
import sys
import tomllib
from pathlib import Path

import mm_llama

ROOT = Path(__file__).resolve().parents[1]


def test_version_is_the_installed_projects() -> None:
    assert mm_llama.__version__ == tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]


def test_every_public_name_resolves_to_its_defining_object() -> None:
    from mm_llama.checkpoints.multimodal_loading import load_multimodal, save_adapter
    from mm_llama.image_chat import answer_images, load_image_model
    from mm_llama.multimodal import MultimodalLlama

    from mm_llama import MultimodalLlama as M, answer_images as A, load_image_model as L, load_multimodal as LM, save_adapter as S

    assert (M, A, L, LM, S) == (MultimodalLlama, answer_images, load_image_model, load_multimodal, save_adapter)
    for name in mm_llama.__all__:
        assert getattr(mm_llama, name) is not None, name
    assert set(mm_llama.__all__) <= set(dir(mm_llama))


def test_an_unknown_name_is_an_attribute_error_and_text_import_stays_light() -> None:
    try:
        mm_llama.not_a_name  # noqa: B018
    except AttributeError as e:
        assert "not_a_name" in str(e)
    else:
        raise AssertionError("expected AttributeError")
    code = "import sys, mm_llama; print('timm' in sys.modules, 'mm_llama.multimodal' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert out == ["False", "False"]

"""Tiny Llama 3.2 Vision checkpoints (HF and Meta layout) shared by the bad-checkpoint tests."""

from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture(scope="module")
def mllama_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from tests.reference.hf_mllama import save_hf_mllama, tiny_hf_mllama

    return save_hf_mllama(tiny_hf_mllama(), tmp_path_factory.mktemp("mllama"))


@pytest.fixture(scope="module")
def meta_mllama_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from tests.reference.hf_mllama import tiny_hf_mllama, write_meta_mllama

    return write_meta_mllama(tiny_hf_mllama(), tmp_path_factory.mktemp("meta-mllama"))

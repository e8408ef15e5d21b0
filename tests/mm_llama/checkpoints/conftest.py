"""Tiny valid checkpoints (text and Llama 3.2 Vision, HF and Meta layout) that the bad-checkpoint tests break."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.mm_llama.checkpoints.broken import write_hf, write_meta


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_hf(tmp_path_factory.mktemp("hf"))


@pytest.fixture(scope="module")
def meta_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_meta(tmp_path_factory.mktemp("meta"))


@pytest.fixture(scope="module")
def mllama_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from tests.reference.hf_mllama import save_hf_mllama, tiny_hf_mllama

    return save_hf_mllama(tiny_hf_mllama(), tmp_path_factory.mktemp("mllama"))


@pytest.fixture(scope="module")
def meta_mllama_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from tests.reference.hf_mllama import tiny_hf_mllama, write_meta_mllama

    return write_meta_mllama(tiny_hf_mllama(), tmp_path_factory.mktemp("meta-mllama"))

from __future__ import annotations

import pytest
import torch

from mm_llama.devices import pick_device


def test_auto_and_none_pick_cpu_float32_without_cuda(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert pick_device() == (torch.device("cpu"), torch.float32)
    assert pick_device("auto") == (torch.device("cpu"), torch.float32)
    assert pick_device("cpu", "bfloat16") == (torch.device("cpu"), torch.bfloat16)


def test_cuda_defaults_to_bfloat16(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert pick_device() == (torch.device("cuda"), torch.bfloat16)
    assert pick_device("cuda:1", "float32") == (torch.device("cuda:1"), torch.float32)


def test_cuda_without_a_device_names_the_fix(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ValueError, match="device cuda asked for CUDA.*use cpu"):
        pick_device("cuda")


@pytest.mark.parametrize("device", ["tpu", "gpu", "cuda:", "meta", ""])
def test_unknown_devices_are_named(device: str) -> None:
    with pytest.raises(ValueError, match="unknown device .*use cpu, cuda, cuda:N or mps"):
        pick_device(device)


def test_a_cuda_index_past_the_last_device_is_named(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    with pytest.raises(ValueError, match=r"cuda:5: there are only 2 CUDA device\(s\)"):
        pick_device("cuda:5")


def test_unknown_dtype_is_named() -> None:
    with pytest.raises(ValueError, match="unknown dtype 'float8'"):
        pick_device("cpu", "float8")

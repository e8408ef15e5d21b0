"""`mm-llama generate --checkpoint BROKEN` prints one line `mm-llama generate: error: …` and exits 2, naming the
file, the field or tensor and the bad value; never a traceback."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Callable

import pytest
import torch
from safetensors import safe_open

from mm_llama.checkpoints import load_llama
from mm_llama.cli import main
from mm_llama.tiny_checkpoint import write_tiny_checkpoint
from tests.mm_llama.checkpoints.broken import edit_json, edit_pth, edit_safetensors


def _set(file: str, key: str, value: object) -> Callable[[Path], None]:
    return lambda d: edit_json(d / file, lambda cfg: cfg.__setitem__(key, value))


def _poison(d: Path) -> None:
    def change(t: dict[str, torch.Tensor]) -> None:
        t["model.norm.weight"] = t["model.norm.weight"].clone()
        t["model.norm.weight"][0] = float("nan")
    edit_safetensors(d / "model.safetensors", change)


def _outside_index(d: Path) -> None:
    outside = d.parent / "x.safetensors"
    (d / "model.safetensors").rename(outside)
    with safe_open(str(outside), framework="pt") as f:
        index = {"weight_map": {key: "../x.safetensors" for key in f.keys()}}
    (d / "model.safetensors.index.json").write_text(json.dumps(index))


# id -> (layout, how to break it, substrings the one error line must contain)
CASES: dict[str, tuple[str, Callable[[Path], None], list[str]]] = {
    "1-config-list": ("hf", lambda d: (d / "config.json").write_text("[1, 2]"),
                      ["config.json holds [1, 2] (list); expected a JSON object"]),
    "1-rope_scaling-list": ("hf", _set("config.json", "rope_scaling", [8.0]),
                            ["config.json: 'rope_scaling' is [8.0] (list); expected a JSON object"]),
    "2-hidden_size-negative": ("hf", _set("config.json", "hidden_size", -4),
                               ["config.json: 'hidden_size' is -4 (int); expected a positive integer"]),
    "2-n_heads-zero": ("meta", _set("params.json", "n_heads", 0),
                       ["params.json: 'n_heads' is 0 (int); expected a positive integer"]),
    "3-hidden_size-str": ("hf", _set("config.json", "hidden_size", "64"),
                          ["config.json: 'hidden_size' is \"64\" (str); expected a positive integer"]),
    "3-dim-float": ("meta", _set("params.json", "dim", 64.0),
                    ["params.json: 'dim' is 64.0 (float); expected a positive integer"]),
    "3-rope_theta-inf": ("hf", _set("config.json", "rope_theta", float("inf")),
                         ["config.json: 'rope_theta' is Infinity (float); expected a finite number > 0"]),
    "json-malformed": ("hf", lambda d: (d / "config.json").write_text('{"hidden_size": 64,\n'),
                       ["config.json is not valid JSON", "line 2, column 1"]),
    "4-safetensors-empty": ("hf", lambda d: (d / "model.safetensors").write_bytes(b""),
                            ["model.safetensors: not a readable safetensors file", "header too small"]),
    "4-safetensors-truncated": ("hf", lambda d: (d / "model.safetensors").write_bytes(
        (d / "model.safetensors").read_bytes()[:5000]), ["model.safetensors: not a readable safetensors file"]),
    "5-pth-truncated": ("meta", lambda d: (d / "consolidated.00.pth").write_bytes(
        (d / "consolidated.00.pth").read_bytes()[:-200]), ["consolidated.00.pth: not a readable PyTorch checkpoint"]),
    "5-pth-garbage": ("meta", lambda d: (d / "consolidated.00.pth").write_bytes(b"garbage" * 100),
                      ["consolidated.00.pth: not a readable PyTorch checkpoint"]),
    "6-wq-rows": ("hf", lambda d: edit_safetensors(d / "model.safetensors", lambda t: t.__setitem__(
        "model.layers.0.self_attn.q_proj.weight", torch.zeros(12, 64))),
        ["tensor 'model.layers.0.self_attn.q_proj.weight' has shape (12, 64)", "4 heads", "expects (64, 64)"]),
    "7-int-weights": ("meta", lambda d: edit_pth(d / "consolidated.00.pth", lambda t: t.__setitem__(
        "norm.weight", t["norm.weight"].to(torch.int32))), ["tensor 'norm.weight' has dtype int32"]),
    "8-index-dotdot": ("hf", _outside_index, ["model.safetensors.index.json: weight_map entry",
                                              "'../x.safetensors', outside the checkpoint"]),
    "9-nan": ("hf", _poison, ["1 tensor(s) hold NaN or Inf values: norm.weight"]),
}


@pytest.fixture(scope="module")
def layouts(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    hf = write_tiny_checkpoint(tmp_path_factory.mktemp("hf"))
    meta = tmp_path_factory.mktemp("meta")
    model = load_llama(hf)
    torch.save(model.state_dict(), meta / "consolidated.00.pth")
    (meta / "params.json").write_text(json.dumps(model.cfg.to_meta_params()))
    for name in ("tokenizer.json", "tokenizer.model"):
        shutil.copy(hf / name, meta / name)
    return {"hf": hf, "meta": meta}


def broken_checkpoint(case: str, layouts: dict[str, Path], where: Path) -> Path:
    layout, hurt, _ = CASES[case]
    path = where / "ckpt"
    shutil.copytree(layouts[layout], path)
    hurt(path)
    return path


@pytest.mark.parametrize("case", CASES)
def test_broken_checkpoint_is_one_error_line(
    case: str, layouts: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = broken_checkpoint(case, layouts, tmp_path)
    code = main(["generate", "--checkpoint", str(path), "--prompt", "hi", "--max-new-tokens", "2"])
    err = capsys.readouterr().err
    assert code == 2
    lines = err.splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("mm-llama generate: error: ")
    for part in CASES[case][2]:
        assert part in lines[0]

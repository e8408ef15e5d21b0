"""`mm-llama bench train` at the tiny shape on CPU: every promised figure is there and consistent (never a
speed), and both models started from the same weights on the same batch (equal first loss: the gates start
at 0 in transformers' initialisation, so that loss is the shared frozen LM's on the shared tokens)."""

from __future__ import annotations

import json

import pytest

from mm_llama.cli import main


def test_bench_train_tiny_prints_every_figure_against_transformers(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["bench", "train", "--shape", "tiny", "--batch", "2", "--text-len", "32", "--steps", "2",
                 "--device", "cpu", "--json"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    report = json.loads(lines[-1])
    assert report["device"].startswith("cpu") and (report["batch"], report["text_len"]) == (2, 32)
    assert [c["name"] for c in report["candidates"]] == ["ours", "transformers"]
    n_lm, n_fusion, n_enc = report["params_frozen_lm"], report["params_fusion"], report["params_encoder"]
    assert min(n_lm, n_fusion, n_enc) > 0
    image_tokens = 4 * ((56 // 14) ** 2 + 1)
    assert report["flops_per_token"] == pytest.approx(4 * n_lm + 6 * n_fusion + 6 * n_enc * image_tokens / 32)
    for c in report["candidates"]:
        assert c["tokens_per_s"] == pytest.approx(2 * 32 / c["step_s"])
        assert c["mfu"] is None and c["peak_memory_gb"] is None  # no peak FLOP/s or allocator on CPU
    ours, theirs = report["candidates"]
    assert report["ratios"]["transformers"] == pytest.approx(ours["tokens_per_s"] / theirs["tokens_per_s"])
    assert ours["loss"] == pytest.approx(theirs["loss"], abs=1e-4)
    assert any(line.startswith("  ours/transformers: tok/s") for line in lines)
    assert "4·N_frozen_LM + 6·N_fusion" in "\n".join(lines)


def test_bad_sizes_are_refused(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["bench", "train", "--steps", "0", "--device", "cpu"]) == 2
    assert "steps must be >= 1, got 0" in capsys.readouterr().err


@pytest.mark.slow
def test_bench_train_compile_adds_both_compiled_rows(capsys: pytest.CaptureFixture[str]) -> None:
    """~40 s on 2 CPU cores (inductor compiles both models' blocks). Compiled rows start from the same weights."""
    assert main(["bench", "train", "--shape", "tiny", "--batch", "2", "--text-len", "32", "--steps", "1",
                 "--device", "cpu", "--compile", "--json"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    report = json.loads(lines[-1])
    by_name = {c["name"]: c for c in report["candidates"]}
    assert list(by_name) == ["ours", "transformers", "ours+compile", "transformers+compile"]
    for name in ("ours+compile", "transformers+compile"):
        assert by_name[name]["loss"] == pytest.approx(by_name["ours"]["loss"], abs=1e-4)
    for baseline in ("transformers", "transformers+compile"):
        assert report["ratios"][f"ours+compile/{baseline}"] == pytest.approx(
            by_name["ours+compile"]["tokens_per_s"] / by_name[baseline]["tokens_per_s"])
        assert any(line.startswith(f"  ours+compile/{baseline}: tok/s") for line in lines)

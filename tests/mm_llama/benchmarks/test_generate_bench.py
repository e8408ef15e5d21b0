"""`mm-llama bench generate` at the tiny shape on CPU: the figures it promises are there and consistent with
each other (never a speed), and both decoders chose the same greedy tokens on the same weights."""

from __future__ import annotations

import json

import pytest
import torch

from mm_llama.benchmarks.bandwidth import spec_bandwidth
from mm_llama.benchmarks.generate import build_pair, shape_config, weight_bytes_per_step
from mm_llama.cli import main


def test_bench_generate_tiny_prints_every_figure_against_transformers(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["bench", "generate", "--shape", "tiny", "--prompt-len", "8", "--new", "6", "--repeats", "2",
                 "--device", "cpu", "--json"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    report = json.loads(lines[-1])
    assert report["device"].startswith("cpu") and report["dtype"] == "float32"
    assert (report["shape"], report["batch"], report["prompt_len"], report["new_tokens"]) == ("tiny", 1, 8, 6)
    names = [c["name"] for c in report["candidates"]]
    assert names == ["ours", "transformers eager"]  # no static+compile baseline without CUDA
    for c in report["candidates"]:
        assert c["decode_tok_per_s"] > 0 and c["prefill_plus_first_s"] > 0
        # weight bytes/s and the roofline fraction follow from the step rate and the weight size
        steps_per_s = c["decode_tok_per_s"] / report["batch"]
        assert c["weight_gb_per_s"] == pytest.approx(steps_per_s * report["weight_gb"])
        assert c["roofline_fraction"] == pytest.approx(c["weight_gb_per_s"] / report["roofline_gb_per_s"])
    ours = report["candidates"][0]["decode_tok_per_s"]
    assert report["ratios"]["transformers eager"] == pytest.approx(ours / report["candidates"][1]["decode_tok_per_s"])
    assert report["same_greedy_tokens"] == {"transformers eager": 1.0}
    assert report["compiled_ratios"] == {}  # the compiled row is opt-in (--compile) without CUDA
    assert report["roofline_source"] == "measured copy"
    assert any(line.startswith("  ours") and "% of roofline" in line for line in lines)


def test_compile_adds_the_row_ours_compiled(capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    """The row's plumbing, with the static step run uncompiled (the compile itself is tested in
    tests/mm_llama/test_static_decode.py)."""
    import mm_llama.generation as generation
    from mm_llama.static_decode import decode_step

    monkeypatch.setattr(generation, "compiled_step", lambda device_type: decode_step)
    assert main(["bench", "generate", "--shape", "tiny", "--prompt-len", "8", "--new", "6", "--repeats", "1",
                 "--device", "cpu", "--compile", "--json"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    report = json.loads(lines[-1])
    speed = {c["name"]: c["decode_tok_per_s"] for c in report["candidates"]}
    assert list(speed) == ["ours", "ours compiled", "transformers eager"]
    assert report["ratios"] == {"transformers eager": pytest.approx(speed["ours"] / speed["transformers eager"])}
    assert report["compiled_ratios"] == {
        "transformers eager": pytest.approx(speed["ours compiled"] / speed["transformers eager"])}
    assert report["same_greedy_tokens"] == {"ours compiled": 1.0, "transformers eager": 1.0}
    assert any(line.startswith("  transformers eager") and "compiled/this" in line for line in lines)


def test_weight_bytes_count_the_head_once_and_skip_the_untied_embedding() -> None:
    for shape, tied in (("tiny", False), ("1b", True)):
        cfg = shape_config(shape, 32)
        assert cfg.tie_embeddings is tied
    cfg = shape_config("tiny", 32)
    ours, theirs = build_pair(cfg, torch.device("cpu"), torch.float32, seed=0)
    hd, v, d = cfg.head_dim, cfg.vocab_size, cfg.dim
    per_layer = d * hd * (2 * cfg.n_heads + 2 * cfg.n_kv_heads) + 3 * d * cfg.ffn_dim + 2 * d
    assert weight_bytes_per_step(ours) == 4 * (cfg.n_layers * per_layer + d + v * d)
    tied = shape_config("tiny", 32).replace(tie_embeddings=True)
    ours_tied, _ = build_pair(tied, torch.device("cpu"), torch.float32, seed=0)
    assert weight_bytes_per_step(ours_tied) == 4 * (cfg.n_layers * per_layer + d + v * d)
    # both models hold the same tensors: equal logits
    ids = torch.randint(0, v, (2, 12))
    with torch.no_grad():
        torch.testing.assert_close(ours(ids), theirs(ids).logits, rtol=1e-5, atol=1e-5)


def test_known_gpus_use_their_spec_bandwidth() -> None:
    assert spec_bandwidth("NVIDIA H200") == 4.8e12
    assert spec_bandwidth("NVIDIA H100 80GB HBM3 SXM") == 3.35e12
    assert spec_bandwidth("NVIDIA A100-SXM4-80GB") == 2.039e12
    assert spec_bandwidth("Some Future GPU") is None


def test_bad_sizes_are_refused_with_the_value(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as e:
        main(["bench", "generate", "--shape", "13b"])
    assert e.value.code == 2
    assert main(["bench", "generate", "--new", "1", "--device", "cpu"]) == 2
    assert "new must be >= 2, got 1" in capsys.readouterr().err

"""The static-shape decode step (and its compiled form) against the eager decode path as the oracle: same
greedy tokens, stop reasons and sampled tokens, for text models with left padding and for an image model."""

from __future__ import annotations

import pytest
import torch

from mm_llama.generation import GenerationConfig, generate
from mm_llama.kv_cache import KVCache
from tests.mm_llama.test_generation import prompt, tiny_model
from tests.mm_llama.test_multimodal import _model as image_model
from tests.mm_llama.test_multimodal import _prompt as image_prompt
from tests.reference.hf_mllama import make_images

EAGER = dict(compile=False, static_cache=False)
STATIC = dict(compile=False, static_cache=True)


def _both(model, prompts, n: int, **kw):
    """(eager results, static results, eager per-step logits, static per-step logits)."""
    logits: dict[str, list[torch.Tensor]] = {"eager": [], "static": []}
    out = {}
    for name, mode in (("eager", EAGER), ("static", STATIC)):
        gen = GenerationConfig(max_new_tokens=n, **mode, **kw)
        out[name] = generate(model, prompts, gen, on_step=lambda s, lg, t, name=name: logits[name].append(lg.clone()))
    return out["eager"], out["static"], logits["eager"], logits["static"]


@pytest.mark.parametrize("name", ["tiny", "tiny-tied"])
def test_static_greedy_equals_eager_with_left_padding(name: str) -> None:
    model = tiny_model(name)
    prompts = [prompt(9, seed=1), prompt(4, seed=2)]  # row 1 carries 5 padding slots
    eager, static, eager_logits, static_logits = _both(model, prompts, 24)
    assert [len(r.tokens) for r in static] == [24, 24]
    assert static == eager
    assert len(static_logits) == len(eager_logits) == 24
    for a, b in zip(static_logits, eager_logits):  # masked full-length attention vs sliced: fp32 rounding only
        torch.testing.assert_close(a, b, atol=1e-4 * max(1.0, b.abs().max().item()), rtol=0)


def test_static_stops_like_eager_when_rows_stop_between_host_checks() -> None:
    """Stop ids are read on the host every 8 tokens; rows stopping at other steps still end exactly there,
    rows that keep going are unchanged, and a prompt near max_seq_len ends with stop_reason max_seq_len."""
    model = tiny_model()
    prompts = [prompt(6, seed=70), prompt(11, seed=71), prompt(3, seed=72)]
    full = generate(model, prompts, GenerationConfig(max_new_tokens=30, **EAGER))
    stop = next(t for k, t in enumerate(full[0].tokens) if k % 8 not in (0, 7) and t not in full[0].tokens[:k]
                and t not in full[2].tokens)
    for kw in (dict(stop_ids={stop}), dict(stop_ids={stop}, max_new_tokens=13)):
        settings = {"max_new_tokens": 30, **kw}
        eager = generate(model, prompts, GenerationConfig(**settings, **EAGER))
        static = generate(model, prompts, GenerationConfig(**settings, **STATIC))
        assert static == eager and eager[0].stop_reason == "stop_token"
    near_end = [prompt(model.cfg.max_seq_len - 5, seed=73), prompt(5, seed=74)]
    eager = generate(model, near_end, GenerationConfig(max_new_tokens=12, **EAGER))
    assert generate(model, near_end, GenerationConfig(max_new_tokens=12, **STATIC)) == eager
    assert eager[0].stop_reason == "max_seq_len" and len(eager[0].tokens) == 5


def test_static_sampling_draws_the_eager_tokens() -> None:
    model = tiny_model()
    prompts = [prompt(5, seed=80), prompt(8, seed=81)]
    settings = dict(max_new_tokens=16, temperature=0.8, top_p=0.9, seed=3)
    eager = generate(model, prompts, GenerationConfig(**settings, **EAGER))
    assert generate(model, prompts, GenerationConfig(**settings, **STATIC)) == eager


def test_static_decoding_with_images_equals_eager_and_encodes_once() -> None:
    model = image_model()
    prompts = [image_prompt(1, seed=3), image_prompt(2, n_text=2, seed=4)]  # different lengths: left padding
    images = make_images([[(2, 1)], [(1, 1), (1, 4)]], seed=6)
    calls: list[int] = []
    handle = model.image.encoder.register_forward_hook(lambda *a: calls.append(1))
    try:
        eager = generate(model, prompts, GenerationConfig(max_new_tokens=12, **EAGER), prefill_inputs={"images": images})
        static = generate(model, prompts, GenerationConfig(max_new_tokens=12, **STATIC),
                          prefill_inputs={"images": images})
    finally:
        handle.remove()
    assert static == eager and all(len(r.tokens) == 12 for r in static)
    assert len(calls) == 2  # once per generate call, at prefill
    # other pixels change what the static step generates: the image K/V really reach it
    other = generate(model, prompts, GenerationConfig(max_new_tokens=12, **STATIC),
                     prefill_inputs={"images": make_images([[(2, 1)], [(1, 1), (1, 4)]], seed=7)})
    assert [r.tokens for r in other] != [r.tokens for r in static]


def test_tensor_slot_write_returns_every_slot() -> None:
    cache = KVCache(1, 2, 5, 1, 3, dtype=torch.float32, device="cpu")
    k, v = torch.randn(2, 1, 1, 3), torch.randn(2, 1, 1, 3)
    keys, values = cache.write(0, torch.tensor([3]), k, v)
    assert keys.shape == values.shape == (2, 1, 5, 3)
    assert torch.equal(keys[:, :, 3:4], k) and torch.equal(values[:, :, 3:4], v)
    assert keys[:, :, [0, 1, 2, 4]].abs().sum() == 0


def test_static_path_choices_and_refusals() -> None:
    model = tiny_model()
    with pytest.raises(ValueError, match="extras_fn"):
        generate(model, [prompt(3, seed=1)], GenerationConfig(max_new_tokens=2, **STATIC), extras_fn=lambda s: {})
    # automatic choice on CPU: eager, and with extras_fn too
    seen: list[int] = []
    generate(model, [prompt(3, seed=1)], GenerationConfig(max_new_tokens=3), extras_fn=lambda s: seen.append(s))
    assert seen == [0, 1, 2]
    with pytest.raises(ValueError, match="compile=True needs the static cache"):
        GenerationConfig(compile=True, static_cache=False)
    with pytest.raises(ValueError, match="compile must be True, False or None"):
        GenerationConfig(compile="yes")  # type: ignore[arg-type]


@pytest.mark.slow
def test_compiled_step_gives_the_eager_tokens_without_graph_breaks_or_recompiles() -> None:
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    model = tiny_model()
    prompts = [prompt(7, seed=90), prompt(3, seed=91)]
    eager = generate(model, prompts, GenerationConfig(max_new_tokens=20, **EAGER))
    compiled = GenerationConfig(max_new_tokens=20, compile=True)
    assert generate(model, prompts, compiled) == eager
    # a second call with other prompts of the same rounded cache size reuses the graph
    others = [prompt(5, seed=92), prompt(6, seed=93)]
    assert generate(model, others, compiled) == generate(model, others, GenerationConfig(max_new_tokens=20, **EAGER))
    assert sum(counters["graph_break"].values()) == 0
    assert counters["stats"]["unique_graphs"] == 1


@pytest.mark.slow
def test_compiled_step_with_image_cross_attention_gives_the_eager_tokens() -> None:
    """~15 s: the cross-attention inputs (image K/V from prefill) pass through the compiled graph unbroken."""
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    model = image_model()
    prompts = [image_prompt(1, seed=3), image_prompt(2, n_text=2, seed=4)]
    images = make_images([[(2, 1)], [(1, 1), (1, 4)]], seed=6)
    eager = generate(model, prompts, GenerationConfig(max_new_tokens=12, **EAGER), prefill_inputs={"images": images})
    compiled = generate(model, prompts, GenerationConfig(max_new_tokens=12, compile=True),
                        prefill_inputs={"images": images})
    assert compiled == eager
    assert sum(counters["graph_break"].values()) == 0 and counters["stats"]["unique_graphs"] == 1

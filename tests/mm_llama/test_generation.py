"""Generation: KV-cached decoding against full forwards, ragged batches, sampling, stopping, errors."""

from __future__ import annotations

import functools

import pytest
import torch
from torch import nn

from mm_llama.config import preset
from mm_llama.generation import (
    GenerationConfig,
    GenerationResult,
    generate,
    make_generator,
    sample_next,
    top_p_filter,
)
from mm_llama.model import LlamaDecoder

VOCAB = preset("tiny").vocab_size
MAX_SEQ_LEN = preset("tiny").max_seq_len


@functools.lru_cache(maxsize=None)
def tiny_model(name: str = "tiny", seed: int = 0, dtype: torch.dtype = torch.float32) -> LlamaDecoder:
    """A random tiny decoder with large weights (std 0.5), so logits are far from ties; norms stay 1."""
    torch.manual_seed(seed)
    model = LlamaDecoder(preset(name))
    for module in model.modules():
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, std=0.5)
    return model.to(dtype).eval()


def prompt(length: int, seed: int) -> list[int]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, VOCAB, (length,), generator=g).tolist()


def greedy(max_new_tokens: int, **kw) -> GenerationConfig:
    return GenerationConfig(max_new_tokens=max_new_tokens, temperature=0.0, **kw)


# ---------------------------------------------------------------------------------------- cache parity


def _record_steps(model, prompts, gen):
    steps: list[torch.Tensor] = []
    results = generate(model, prompts, gen, on_step=lambda step, logits, tokens: steps.append(logits.clone()))
    return results, steps


def _assert_logits_match(cached: torch.Tensor, full: torch.Tensor) -> None:
    """fp64: equal to 1e-10. fp32: within 1e-5 of the logit scale (|logits| reach ~15 with std-0.5
    weights, and fp32 rounding of differently shaped matmuls then differs by ~3e-5 absolute)."""
    if full.dtype == torch.float64:
        torch.testing.assert_close(cached, full, atol=1e-10, rtol=0)
    else:
        torch.testing.assert_close(cached, full, atol=1e-5 * max(1.0, full.abs().max().item()), rtol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
@pytest.mark.parametrize("name", ["tiny", "tiny-tied"])
def test_cached_decoding_matches_full_forward_every_step(name, dtype):
    model = tiny_model(name, dtype=dtype)
    p = prompt(9, seed=1)
    (res,), steps = _record_steps(model, [p], greedy(20))
    assert len(res.tokens) == 20 and len(steps) == 20
    for k, cached in enumerate(steps):
        full = model(torch.tensor([p + res.tokens[:k]]))[0, -1]  # no cache, no padding
        _assert_logits_match(cached[0], full)
        assert int(full.argmax()) == res.tokens[k]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
def test_cached_decoding_matches_full_forward_for_left_padded_rows(dtype):
    """Rows carrying left padding in the cache still reproduce the unpadded full forward."""
    model = tiny_model(dtype=dtype)
    prompts = [prompt(3, seed=2), prompt(11, seed=3)]
    results, steps = _record_steps(model, prompts, greedy(12))
    for row, (p, res) in enumerate(zip(prompts, results)):
        for k in range(len(res.tokens)):
            full = model(torch.tensor([p + res.tokens[:k]]))[0, -1]
            _assert_logits_match(steps[k][row], full)
            assert int(full.argmax()) == res.tokens[k]


# ---------------------------------------------------------------------------------------- batching


@pytest.mark.parametrize("name", ["tiny", "tiny-tied"])
def test_ragged_batch_equals_each_prompt_alone(name):
    model = tiny_model(name)
    prompts = [prompt(n, seed=10 + n) for n in (3, 7, 12)]
    gen = greedy(24)
    batched = generate(model, prompts, gen)
    alone = [generate(model, [p], gen)[0] for p in prompts]
    assert batched == alone
    assert all(len(r.tokens) == 24 and r.stop_reason == "max_new_tokens" for r in batched)
    assert len({tuple(r.tokens) for r in batched}) == 3  # the rows really differ


def test_batch_order_does_not_matter():
    model = tiny_model()
    prompts = [prompt(n, seed=20 + n) for n in (5, 2, 9, 6)]
    gen = greedy(10)
    base = generate(model, prompts, gen)
    perm = [2, 0, 3, 1]
    permuted = generate(model, [prompts[i] for i in perm], gen)
    assert permuted == [base[i] for i in perm]


def test_pad_id_does_not_change_results():
    model = tiny_model()
    prompts = [prompt(4, seed=30), prompt(10, seed=31)]
    assert generate(model, prompts, greedy(8, pad_id=0)) == generate(model, prompts, greedy(8, pad_id=7))


# ---------------------------------------------------------------------------------------- sampling


def test_top_p_filter_by_hand():
    probs = torch.tensor([[0.5, 0.3, 0.15, 0.05], [0.05, 0.15, 0.3, 0.5]])
    out = top_p_filter(probs, 0.7)
    torch.testing.assert_close(out, torch.tensor([[0.625, 0.375, 0.0, 0.0], [0.0, 0.0, 0.375, 0.625]]))
    # top_p reached exactly by the first token alone: the nucleus is just that token
    torch.testing.assert_close(top_p_filter(probs, 0.5)[0], torch.tensor([1.0, 0.0, 0.0, 0.0]))
    # tiny top_p keeps the most likely token; top_p = 1 keeps everything
    torch.testing.assert_close(top_p_filter(probs, 1e-6)[1], torch.tensor([0.0, 0.0, 0.0, 1.0]))
    torch.testing.assert_close(top_p_filter(probs, 1.0), probs)


def test_top_p_sampling_draws_only_the_nucleus_in_the_right_ratio():
    logits = torch.tensor([0.5, 0.3, 0.15, 0.05]).log().expand(20_000, 4)  # 20k independent draws
    gen = GenerationConfig(temperature=1.0, top_p=0.7, seed=0)
    draws = sample_next(logits, gen, make_generator(gen, "cpu"))
    counts = torch.bincount(draws, minlength=4)
    assert counts[2] == 0 and counts[3] == 0
    ratio = counts[0].item() / counts[1].item()
    assert abs(ratio - 5 / 3) < 0.1, counts  # std of the ratio is about 0.03 here


def test_sample_next_greedy_is_argmax_and_rejects_bad_shapes():
    logits = torch.randn(3, 17, generator=torch.Generator().manual_seed(0))
    assert torch.equal(sample_next(logits, GenerationConfig()), logits.argmax(-1))
    with pytest.raises(ValueError, match=r"\[B, V\].*\(17,\)"):
        sample_next(logits[0], GenerationConfig())


def test_same_seed_same_tokens_different_seeds_differ():
    model = tiny_model()
    prompts = [prompt(5, seed=40), prompt(8, seed=41)]

    def run(seed):
        return generate(model, prompts, GenerationConfig(max_new_tokens=16, temperature=3.0, seed=seed))

    assert run(123) == run(123)
    outputs = {tuple(tuple(r.tokens) for r in run(seed)) for seed in range(4)}
    assert len(outputs) > 1
    # no seed: a fresh random seed each call, whatever torch's global seed is
    torch.manual_seed(0)
    first = run(None)
    torch.manual_seed(0)
    assert run(None) != first


def test_tiny_top_p_equals_greedy():
    model = tiny_model()
    prompts = [prompt(6, seed=50), prompt(3, seed=51)]
    nucleus_of_one = GenerationConfig(max_new_tokens=16, temperature=1.0, top_p=1e-6, seed=1)
    assert generate(model, prompts, nucleus_of_one) == generate(model, prompts, greedy(16))


def test_temperature_to_zero_equals_greedy():
    model = tiny_model()
    prompts = [prompt(6, seed=52), prompt(9, seed=53)]
    cold = generate(model, prompts, GenerationConfig(max_new_tokens=16, temperature=1e-4, seed=2))
    assert cold == generate(model, prompts, greedy(16))


def test_greedy_ignores_seed():
    model = tiny_model()
    p = [prompt(6, seed=54)]
    assert generate(model, p, greedy(8, seed=1)) == generate(model, p, greedy(8, seed=2))


# ---------------------------------------------------------------------------------------- stopping


def _first_new_token_position(tokens: list[int], start: int) -> int:
    """The first index >= start whose token did not occur before it."""
    return next(k for k in range(start, len(tokens)) if tokens[k] not in tokens[:k])


def test_stop_token_truncates_before_it():
    model = tiny_model()
    p = [prompt(7, seed=60)]
    (full,) = generate(model, p, greedy(20))
    k = _first_new_token_position(full.tokens, 5)
    stop = full.tokens[k]
    (res,) = generate(model, p, greedy(20, stop_ids={stop}))
    assert res == GenerationResult(tokens=full.tokens[:k], stop_reason="stop_token", stop_token=stop)
    # a stop id that is the very first token gives an empty output
    (first,) = generate(model, p, greedy(20, stop_ids={full.tokens[0], 999_999}))
    assert first.tokens == [] and first.stop_reason == "stop_token" and first.stop_token == full.tokens[0]


@pytest.mark.parametrize("lengths", [(6, 6, 6), (4, 9, 6)])
def test_one_row_stopping_early_leaves_the_others_unchanged(lengths):
    model = tiny_model()
    prompts = [prompt(n, seed=70 + i) for i, n in enumerate(lengths)]
    full = generate(model, prompts, greedy(20))
    others = set(full[1].tokens) | set(full[2].tokens)
    k = next(k for k in range(3, 20) if full[0].tokens[k] not in full[0].tokens[:k] + list(others))
    stop = full[0].tokens[k]
    res = generate(model, prompts, greedy(20, stop_ids={stop}))
    assert res[0].tokens == full[0].tokens[:k] and res[0].stop_reason == "stop_token"
    assert res[1:] == full[1:]


def test_max_new_tokens_respected():
    model = tiny_model()
    for n in (1, 5):
        res = generate(model, [prompt(4, seed=80), prompt(2, seed=81)], greedy(n))
        assert [len(r.tokens) for r in res] == [n, n]
        assert all(r.stop_reason == "max_new_tokens" and r.stop_token is None for r in res)


def test_generation_stops_at_max_seq_len_per_row():
    model = tiny_model()
    long_p, short_p = prompt(MAX_SEQ_LEN - 6, seed=90), prompt(5, seed=91)
    res = generate(model, [long_p, short_p], greedy(20))
    assert len(res[0].tokens) == 6 and res[0].stop_reason == "max_seq_len"
    # the short row is not cut short by the long row's padding, and matches its solo run
    assert res[1] == generate(model, [short_p], greedy(20))[0]
    assert res[1].stop_reason == "max_new_tokens" and len(res[1].tokens) == 20
    # the long row's tokens equal the start of its own unlimited-budget continuation
    assert res[0].tokens == generate(model, [long_p], greedy(6))[0].tokens
    # one token of room left: exactly one token; exactly filling max_seq_len counts as max_new_tokens
    (one,) = generate(model, [prompt(MAX_SEQ_LEN - 1, seed=92)], greedy(4))
    assert len(one.tokens) == 1 and one.stop_reason == "max_seq_len"
    (exact,) = generate(model, [prompt(MAX_SEQ_LEN - 4, seed=93)], greedy(4))
    assert len(exact.tokens) == 4 and exact.stop_reason == "max_new_tokens"


def test_extras_fn_is_called_once_per_step():
    model = tiny_model()
    seen: list[int] = []

    def extras_fn(step: int) -> dict:
        seen.append(step)
        return {}

    generate(model, [prompt(3, seed=95)], greedy(5), extras_fn=extras_fn)
    assert seen == [0, 1, 2, 3, 4]


# ---------------------------------------------------------------------------------------- errors


def test_prompt_too_long_names_both_lengths():
    model = tiny_model()
    with pytest.raises(ValueError, match=rf"prompt 1 has 300 tokens.*max_seq_len is {MAX_SEQ_LEN}.*shorten"):
        generate(model, [prompt(3, seed=0), prompt(300, seed=1)], greedy(4))
    with pytest.raises(ValueError, match=rf"has {MAX_SEQ_LEN} tokens.*max_seq_len is {MAX_SEQ_LEN}"):
        generate(model, [prompt(MAX_SEQ_LEN, seed=1)], greedy(4))


@pytest.mark.parametrize("bad", [-1, VOCAB, 10_000])
def test_bad_token_id(bad):
    with pytest.raises(ValueError, match=rf"token id {bad} at position 2.*\[0, {VOCAB}\)"):
        generate(tiny_model(), [[1, 2, bad, 3]], greedy(4))


def test_empty_prompts_and_bad_pad_id():
    model = tiny_model()
    with pytest.raises(ValueError, match="empty list of prompts"):
        generate(model, [], greedy(4))
    with pytest.raises(ValueError, match="prompt 1 is empty"):
        generate(model, [[1, 2], []], greedy(4))
    with pytest.raises(ValueError, match=rf"pad_id {VOCAB} is outside"):
        generate(model, [[1, 2]], greedy(4, pad_id=VOCAB))
    with pytest.raises(ValueError, match=r"non-integer token 1\.5"):
        generate(model, [[1, 1.5]], greedy(4))


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(temperature=-0.5), r"temperature .* got -0\.5"),
        (dict(temperature=float("nan")), r"temperature .* got nan"),
        (dict(top_p=0.0), r"top_p .* got 0\.0"),
        (dict(top_p=1.5), r"top_p .* got 1\.5"),
        (dict(max_new_tokens=0), r"max_new_tokens .* got 0"),
        (dict(max_new_tokens=-3), r"max_new_tokens .* got -3"),
        (dict(pad_id=-1), r"pad_id .* got -1"),
        (dict(seed=1.5), r"seed .* got 1\.5"),
        (dict(stop_ids={"a"}), r"stop_ids"),
    ],
)
def test_bad_generation_config(kwargs, match):
    with pytest.raises(ValueError, match=match):
        GenerationConfig(**kwargs)


def test_generation_config_normalises_stop_ids():
    assert GenerationConfig(stop_ids={1, 2}).stop_ids == frozenset({1, 2})
    assert GenerationConfig(stop_ids=[3]).stop_ids == frozenset({3})

"""Batched autoregressive generation with a KV cache: greedy decoding and temperature / top-p sampling.

Prompts of different lengths share one batch: they are left-padded to the longest, prefilled once, and
then decoded one token per step for every row. Padding never advances a row's RoPE positions (see
`KVCache`), so each row yields exactly the tokens it would yield alone. Tokenization is not done here;
prompts and results are token ids.
"""

from __future__ import annotations

import math
import operator
from dataclasses import dataclass, field
from typing import Any, Callable, Literal, Protocol

import torch

from mm_llama.kv_cache import KVCache
from mm_llama.model import LlamaDecoder
from mm_llama.static_decode import cache_length, compiled_step, decode_step, pin_for_cuda_graphs, prepare, text_decoder

StopReason = Literal["stop_token", "max_new_tokens", "max_seq_len"]

ExtrasFn = Callable[[int], "dict[str, Any] | None"]
"""`extras_fn(step)` → the `extras` for the model call of `step` (0 = prefill, k = k-th decode step)."""

STOP_CHECK_EVERY = 8
"""Static decoding reads the done flags on the host once every this many tokens (not every token)."""

StepFn = Callable[[int, torch.Tensor, torch.Tensor], None]
"""`on_step(step, logits [B, V], tokens [B])`: the last-position logits of `step` and the tokens drawn."""


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


class CausalLM(Protocol):
    """What `generate` needs from a model: `LlamaDecoder` and the fusion models built on it."""

    cfg: Any  # has vocab_size and max_seq_len

    def new_cache(self, batch_size: int, max_len: int | None = None) -> KVCache: ...

    def __call__(
        self,
        tokens: torch.Tensor,
        *,
        attention_mask: torch.Tensor | None = None,
        cache: KVCache | None = None,
        extras: dict[str, Any] | None = None,
        last_only: bool = False,
    ) -> torch.Tensor: ...


@dataclass
class GenerationConfig:
    """How to pick tokens and when to stop.

    `temperature` 0 means greedy (argmax); otherwise logits are divided by it, softmaxed, restricted to
    the `top_p` nucleus and sampled with a generator seeded from `seed` (None: a fresh random seed).
    Generation of a row ends at the first id in `stop_ids` (not included in the output), after
    `max_new_tokens` tokens, or when prompt plus output reach the model's `max_seq_len`. `pad_id` fills
    the left padding of shorter prompts and the inputs of rows that already finished.

    `static_cache` decodes with the static-shape step of `mm_llama.static_decode` (stop checks every
    `STOP_CHECK_EVERY` tokens, same tokens as the eager path); `compile` runs that step through
    `torch.compile` (CUDA graphs on GPU) and implies the static cache. None: compile on CUDA only (the first
    CPU compile takes long), static cache exactly when compiling.
    """

    max_new_tokens: int = 64
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = None
    stop_ids: frozenset[int] | set[int] = frozenset()
    pad_id: int = 0
    compile: bool | None = None
    static_cache: bool | None = None

    def __post_init__(self) -> None:
        if not _is_int(self.max_new_tokens) or self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be an integer >= 1, got {self.max_new_tokens!r}")
        temperature_ok = isinstance(self.temperature, (int, float)) and math.isfinite(self.temperature)
        if not temperature_ok or self.temperature < 0:
            raise ValueError(
                f"temperature must be a finite number >= 0 (0 = greedy), got {self.temperature!r}"
            )
        if not (isinstance(self.top_p, (int, float)) and 0 < self.top_p <= 1):
            raise ValueError(f"top_p must be in (0, 1] (1 = no nucleus filtering), got {self.top_p!r}")
        if self.seed is not None and not _is_int(self.seed):
            raise ValueError(f"seed must be an integer or None, got {self.seed!r}")
        if not _is_int(self.pad_id) or self.pad_id < 0:
            raise ValueError(f"pad_id must be a non-negative token id, got {self.pad_id!r}")
        for name in ("compile", "static_cache"):
            if getattr(self, name) not in (None, True, False):
                raise ValueError(f"{name} must be True, False or None (automatic), got {getattr(self, name)!r}")
        if self.compile and self.static_cache is False:
            raise ValueError("compile=True needs the static cache; leave static_cache at None or True")
        try:
            self.stop_ids = frozenset(operator.index(t) for t in self.stop_ids)
        except TypeError:
            raise ValueError(f"stop_ids must be a set of integer token ids, got {self.stop_ids!r}") from None

    @classmethod
    def for_tokenizer(cls, tokenizer: Any, **settings: Any) -> "GenerationConfig":
        """Settings that stop at the tokenizer's stop tokens and pad with its pad id (0 if it has none)."""
        pad_id = tokenizer.pad_id if tokenizer.pad_id is not None else 0
        return cls(stop_ids=tokenizer.stop_ids, pad_id=pad_id, **settings)

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


@dataclass
class GenerationResult:
    """The output for one prompt: generated ids (without the stop token) and why generation ended."""

    tokens: list[int] = field(default_factory=list)
    stop_reason: StopReason = "max_new_tokens"
    stop_token: int | None = None  # the stop id that ended generation, when stop_reason == "stop_token"


def top_p_filter(probs: torch.Tensor, top_p: float) -> torch.Tensor:
    """Keep the smallest set of tokens whose probability sums to at least `top_p`, renormalised.

    `probs [B, V]` (rows sum to 1) → `[B, V]` with the tokens outside the nucleus set to 0. The most
    likely token is always kept; ties at the boundary are broken by the sort order.
    """
    if top_p >= 1.0:
        return probs
    sorted_probs, order = probs.sort(dim=-1, descending=True)
    mass_before = sorted_probs.cumsum(dim=-1) - sorted_probs  # probability of all more likely tokens
    keep_sorted = mass_before < top_p
    keep_sorted[..., 0] = True
    keep = torch.zeros_like(keep_sorted).scatter(-1, order, keep_sorted)
    kept = probs.masked_fill(~keep, 0.0)
    return kept / kept.sum(dim=-1, keepdim=True)


def sample_next(
    logits: torch.Tensor, gen: GenerationConfig, generator: torch.Generator | None = None
) -> torch.Tensor:
    """Pick the next token of each row: `logits [B, V]` → ids `[B]` (long, on the logits' device).

    Greedy (`gen.temperature == 0`) takes the argmax; otherwise samples from the temperature-scaled,
    top-p filtered distribution with `generator` (None uses torch's global generator).
    """
    if logits.dim() != 2:
        raise ValueError(f"sample_next expects logits [B, V], got shape {tuple(logits.shape)}")
    if gen.greedy:
        return logits.argmax(dim=-1)
    probs = torch.softmax(logits.float() / gen.temperature, dim=-1)
    probs = top_p_filter(probs, gen.top_p)
    return torch.multinomial(probs, num_samples=1, generator=generator).squeeze(-1)


def make_generator(gen: GenerationConfig, device: torch.device | str) -> torch.Generator | None:
    """The sampling generator on `device`, seeded from `gen.seed` (random without one); None if greedy."""
    if gen.greedy:
        return None
    generator = torch.Generator(device=device)
    if gen.seed is None:
        generator.seed()
    else:
        generator.manual_seed(gen.seed)
    return generator


def _validate_prompts(prompts: list[list[int]], vocab_size: int, max_seq_len: int) -> list[list[int]]:
    if len(prompts) == 0:
        raise ValueError("generate() got an empty list of prompts; pass at least one prompt of token ids")
    checked: list[list[int]] = []
    for i, prompt in enumerate(prompts):
        if len(prompt) == 0:
            raise ValueError(
                f"prompt {i} is empty; every prompt needs at least one token (e.g. the BOS token)"
            )
        if len(prompt) >= max_seq_len:
            raise ValueError(
                f"prompt {i} has {len(prompt)} tokens but the model's max_seq_len is {max_seq_len}, "
                f"leaving no room to generate; shorten the prompt to at most {max_seq_len - 1} tokens"
            )
        ids: list[int] = []
        for j, tok in enumerate(prompt):
            try:
                tok = operator.index(tok)
            except TypeError:
                raise ValueError(f"prompt {i} has a non-integer token {tok!r} at position {j}") from None
            if not 0 <= tok < vocab_size:
                raise ValueError(
                    f"prompt {i} has token id {tok} at position {j}, outside the model's vocabulary "
                    f"[0, {vocab_size}); check the tokenizer matches the model"
                )
            ids.append(tok)
        checked.append(ids)
    return checked


def _left_pad(
    prompts: list[list[int]], pad_id: int, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-pad to the longest prompt: tokens `[B, L]` (long) and attention mask `[B, L]` (True = real)."""
    longest = max(len(p) for p in prompts)
    tokens = torch.full((len(prompts), longest), pad_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), longest), dtype=torch.bool)
    for row, prompt in enumerate(prompts):
        tokens[row, longest - len(prompt):] = torch.tensor(prompt, dtype=torch.long)
        mask[row, longest - len(prompt):] = True
    return tokens.to(device), mask.to(device)


@torch.inference_mode()
def generate(
    model: CausalLM,
    prompts: list[list[int]],
    gen: GenerationConfig,
    *,
    extras_fn: ExtrasFn | None = None,
    on_step: StepFn | None = None,
    prefill_inputs: dict[str, Any] | None = None,
) -> list[GenerationResult]:
    """Continue each prompt (a list of token ids) and return one `GenerationResult` per prompt, in order.

    The batch is left-padded with `gen.pad_id`, prefilled once into a KV cache, then decoded one token
    per step for all rows. A finished row keeps being fed `pad_id` but its output is frozen; the loop
    ends when every row has finished. Row `i` may generate at most
    `min(max_new_tokens, max_seq_len - len(prompts[i]))` tokens; hitting the second bound ends it with
    `stop_reason == "max_seq_len"`.

    `extras_fn(step)` returns the `extras` passed to the model at `step` (0 = prefill); `on_step(step,
    logits [B, V], tokens [B])` observes every step's last-position logits and chosen tokens (including
    rows that already finished, whose tokens are ignored). `prefill_inputs` are extra keyword arguments
    for the prefill call only (e.g. `images=` for `MultimodalLlama`, which caches what it derives from them).

    Prefill is always eager; decode steps run eagerly through the model or, with `gen.static_cache` /
    `gen.compile` (the default on CUDA), through the static-shape step of `mm_llama.static_decode`, which
    yields the same tokens.
    """
    # a MultimodalLlama states the ids it accepts (media ids included); a LlamaDecoder its config's
    vocab_size = getattr(model, "vocab_size", None) or model.cfg.vocab_size
    max_seq_len = getattr(model, "max_seq_len", None) or model.cfg.max_seq_len
    prompts = _validate_prompts(prompts, vocab_size, max_seq_len)
    if gen.pad_id >= vocab_size:
        raise ValueError(
            f"pad_id {gen.pad_id} is outside the model's vocabulary [0, {vocab_size}); "
            "choose a pad id the embedding table has"
        )
    batch = len(prompts)
    lengths = [len(p) for p in prompts]
    longest = max(lengths)
    # Row budgets count each row's own tokens, so a short prompt next to a long one is not cut short by
    # the padding it carries; the cache holds the padded prompt plus the inputs of every decode step.
    budgets = [min(gen.max_new_tokens, max_seq_len - n) for n in lengths]
    steps = max(budgets)
    decoder = text_decoder(model)  # type: ignore[arg-type]
    use_compile, static = _decode_mode(gen, decoder, extras_fn)
    cache = model.new_cache(batch, cache_length(longest + steps - 1, use_compile))
    device = cache.valid.device
    generator = make_generator(gen, device)

    tokens, attention_mask = _left_pad(prompts, gen.pad_id, device)
    results = [GenerationResult() for _ in prompts]
    finished = [False] * batch

    def extras(step: int) -> dict[str, Any] | None:
        return extras_fn(step) if extras_fn is not None else None

    logits = model(
        tokens, attention_mask=attention_mask, cache=cache, extras=extras(0), last_only=True,
        **(prefill_inputs or {}),
    )[:, -1]  # [B, V]
    if static:
        assert decoder is not None  # _decode_mode allows the static path only with one
        drawn = _decode_static(model, decoder, cache, logits, budgets, gen, generator, on_step, use_compile)
        for step_tokens in drawn:
            _record(step_tokens, results, finished, budgets, gen)
            if all(finished):
                break
        return results

    pad = torch.tensor(gen.pad_id, dtype=torch.long, device=device)
    for step in range(steps):
        if step > 0:
            # Finished rows are fed pad as a real token: harmless (their output is frozen) and it keeps
            # the cache free of new padding slots, so unpadded batches stay on the mask-free fast path.
            logits = model(feed[:, None], cache=cache, extras=extras(step), last_only=True)[:, -1]
        next_tokens = sample_next(logits, gen, generator)  # [B]
        if on_step is not None:
            on_step(step, logits, next_tokens)
        _record(next_tokens.tolist(), results, finished, budgets, gen)
        if all(finished):
            break
        done = torch.tensor(finished, device=device)
        feed = torch.where(done, pad, next_tokens)  # [B]
    return results


def _record(
    step_tokens: list[int], results: list[GenerationResult], finished: list[bool], budgets: list[int],
    gen: GenerationConfig,
) -> None:
    """Append one step's token of every unfinished row to its result, finishing rows that stop or reach
    their budget (`results` and `finished` are updated in place)."""
    for row, tok in enumerate(step_tokens):
        if finished[row]:
            continue
        result = results[row]
        if tok in gen.stop_ids:
            result.stop_reason, result.stop_token = "stop_token", tok
            finished[row] = True
            continue
        result.tokens.append(tok)
        if len(result.tokens) >= gen.max_new_tokens:
            result.stop_reason, finished[row] = "max_new_tokens", True
        elif len(result.tokens) >= budgets[row]:
            result.stop_reason, finished[row] = "max_seq_len", True


def _decode_mode(
    gen: GenerationConfig, decoder: LlamaDecoder | None, extras_fn: ExtrasFn | None
) -> tuple[bool, bool]:
    """`(compile, static)` for this call: `gen`'s choices, automatic ones resolved (compile on CUDA).

    The static step needs a `LlamaDecoder` inside the model, constant extras (no `extras_fn`) and a pad id
    inside the LM vocabulary (decode inputs skip the media embedding); without them an automatic choice
    falls back to the eager path and an explicit one is an error naming the reason.
    """
    reason = None
    if decoder is None:
        reason = "the model has no LlamaDecoder to decode with"
    elif extras_fn is not None:
        reason = "extras_fn gives every step its own extras"
    elif gen.pad_id >= decoder.cfg.vocab_size:
        reason = f"pad_id {gen.pad_id} is a media id, past the LM vocabulary of {decoder.cfg.vocab_size}"
    explicit = bool(gen.compile) or bool(gen.static_cache)
    if reason is not None:
        if explicit:
            raise ValueError(f"static-cache / compiled decoding is not possible here: {reason}; "
                             "pass compile=False and static_cache=False (--no-compile) to decode eagerly")
        return False, False
    assert decoder is not None
    use_compile = gen.compile if gen.compile is not None else decoder.output.weight.device.type == "cuda"
    static = gen.static_cache if gen.static_cache is not None else use_compile
    return use_compile, static or use_compile


def _decode_static(
    model: CausalLM, decoder: LlamaDecoder, cache: KVCache, logits: torch.Tensor, budgets: list[int],
    gen: GenerationConfig, generator: torch.Generator | None, on_step: StepFn | None, use_compile: bool,
) -> list[list[int]]:
    """Decode after prefill with the static-shape step; returns every step's tokens `[steps][B]`.

    `logits [B, V]` are the prefill's last-position logits. Which rows are done (stop id, budget) is
    tracked on the device and read on the host only every `STOP_CHECK_EVERY` steps (every step with an
    `on_step` observer, so it sees exactly the eager path's steps); done rows are fed `pad_id` as in the
    eager path. Tokens drawn after a row finished are dropped by `_record`, so outputs are the eager ones.
    """
    device = logits.device
    state = prepare(model, decoder, cache)  # type: ignore[arg-type]
    slot = torch.tensor([cache.length], dtype=torch.long, device=device)
    step_fn = compiled_step(device.type) if use_compile else decode_step
    cuda_graphs = use_compile and device.type == "cuda"
    if cuda_graphs:
        pin_for_cuda_graphs(state, cache, slot)
    pad = torch.tensor(gen.pad_id, dtype=torch.long, device=device)
    stop_ids = torch.tensor(sorted(gen.stop_ids), dtype=torch.long, device=device)
    budget = torch.tensor(budgets, dtype=torch.long, device=device)
    done = torch.zeros(len(budgets), dtype=torch.bool, device=device)
    check_every = 1 if on_step is not None else STOP_CHECK_EVERY
    drawn: list[torch.Tensor] = []
    for step in range(max(budgets)):
        if step > 0:
            if cuda_graphs:
                torch.compiler.cudagraph_mark_step_begin()
            logits = step_fn(state, cache, torch.where(done, pad, drawn[-1]), slot)
            cache.length += 1
            slot += 1
            if cuda_graphs:
                logits = logits.clone()  # the graph's output buffer is overwritten by the next replay
        next_tokens = sample_next(logits, gen, generator)  # [B]
        if on_step is not None:
            on_step(step, logits, next_tokens)
        drawn.append(next_tokens)
        done = done | torch.isin(next_tokens, stop_ids) | (budget <= step + 1)
        if (step + 1) % check_every == 0 and bool(done.all()):
            break
    return torch.stack(drawn).tolist()

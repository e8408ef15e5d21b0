"""Decode speed of our `generate` against transformers' on the same random weights, in one process.

Both models hold the same tensors (ours converted to the HF layout with `hf_state_dict`), decode the same
random prompts greedily for exactly `new` tokens (no stop id), and are timed alternately. Decode speed is
separated from prefill by timing each candidate twice, for `new` tokens and for 1:
`decode tok/s = batch · (new − 1) / (t_new − t_1)`. A decode step reads every weight once (the embedding
table only for the rows it looks up), so `weight bytes/s = steps/s · weight bytes`, set against the
device's memory bandwidth (its spec, or a measured copy where the device is unknown).

transformers is imported here only, as the baseline; the package needs it for nothing else.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Callable

import torch

from mm_llama.benchmarks.bandwidth import roofline
from mm_llama.benchmarks.timing import Timings, device_label, time_alternating
from mm_llama.checkpoints.hf import hf_state_dict
from mm_llama.config import LlamaConfig, preset
from mm_llama.generation import GenerationConfig, generate
from mm_llama.model import LlamaDecoder

SHAPES: dict[str, str] = {"8b": "llama3.1-8b", "3b": "llama3.2-3b", "1b": "llama3.2-1b", "tiny": "tiny"}


def shape_config(shape: str, max_len: int) -> LlamaConfig:
    """The text config of a bench shape, its context cut to `max_len` (the benchmark needs no more)."""
    if shape not in SHAPES:
        raise ValueError(f"unknown shape {shape!r}; choose one of {', '.join(SHAPES)}")
    cfg = preset(SHAPES[shape])
    return cfg.replace(max_seq_len=max(max_len, 16))


def import_transformers() -> Any:
    try:
        import transformers
    except ImportError:
        raise SystemExit(
            "mm-llama bench compares against transformers, which is not installed; "
            "install it with `pip install 'mm-llama[bench]'` (or `pip install transformers`)"
        ) from None
    return transformers


def build_pair(cfg: LlamaConfig, device: torch.device, dtype: torch.dtype, seed: int) -> tuple[LlamaDecoder, Any]:
    """Our decoder with random weights, and transformers' LlamaForCausalLM holding the same tensors."""
    transformers = import_transformers()
    torch.manual_seed(seed)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            ours = LlamaDecoder(cfg).eval()
            hf_cfg = transformers.LlamaConfig(**cfg.to_hf_dict())
            hf_cfg._attn_implementation = "sdpa"
            theirs = transformers.LlamaForCausalLM(hf_cfg).eval()
    finally:
        torch.set_default_dtype(previous)
    theirs.load_state_dict(hf_state_dict(ours, cfg), strict=False)  # rotary buffers are not in the file
    return ours, theirs


def weight_bytes_per_step(model: LlamaDecoder) -> int:
    """Bytes of weights one decode step reads: every parameter once, the embedding table only when tied
    (then it is the output head, read whole)."""
    seen: set[int] = set()
    total = 0
    for name, p in model.named_parameters():
        if id(p) in seen:
            continue
        seen.add(id(p))
        if name == "tok_embeddings.weight" and not model.cfg.tie_embeddings:
            continue
        total += p.numel() * p.element_size()
    return total


@dataclass
class DecodeFigures:
    name: str
    decode_tok_per_s: float
    prefill_plus_first_s: float
    weight_gb_per_s: float
    roofline_fraction: float
    spread: float  # (max − min) / median of the timed runs of `new` tokens


@dataclass
class GenerateReport:
    device: str
    dtype: str
    shape: str
    batch: int
    prompt_len: int
    new_tokens: int
    repeats: int
    weight_gb: float
    roofline_gb_per_s: float
    roofline_source: str
    roofline_tok_per_s: float
    candidates: list[DecodeFigures]
    ratios: dict[str, float]  # ours (eager) / each transformers baseline, decode tok/s
    compiled_ratios: dict[str, float]  # ours compiled / each transformers baseline ({} without that row)
    same_greedy_tokens: dict[str, float]  # fraction of each baseline's rows whose tokens equal ours

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def _ours(model: LlamaDecoder, prompts: list[list[int]], new: int, compiled: bool) -> Callable[[], list[list[int]]]:
    """Our generate: the eager decode path, or the compiled static-cache step."""
    mode = dict(compile=True) if compiled else dict(compile=False, static_cache=False)
    gen = GenerationConfig(max_new_tokens=new, **mode)
    return lambda: [r.tokens for r in generate(model, prompts, gen)]


def _theirs(model: Any, ids: torch.Tensor, new: int, static: bool) -> Callable[[], list[list[int]]]:
    transformers = import_transformers()
    settings: dict[str, Any] = dict(
        max_new_tokens=new, min_new_tokens=new, do_sample=False, pad_token_id=0, eos_token_id=None,
        bos_token_id=None,
    )
    if static:  # transformers compiles the decoding forward when the cache is static
        settings["cache_implementation"] = "static"
    else:
        settings["disable_compile"] = True
    config = transformers.GenerationConfig(**settings)
    mask = torch.ones_like(ids)

    @torch.inference_mode()
    def run() -> list[list[int]]:
        out = model.generate(ids, attention_mask=mask, generation_config=config)
        return out[:, ids.shape[1]:].tolist()

    return run


def bench_generate(
    shape: str, *, batch: int = 1, prompt_len: int = 64, new: int = 64, repeats: int = 5, warmup: int = 1,
    device: torch.device, dtype: torch.dtype, seed: int = 0, static_baseline: bool | None = None,
    compiled: bool | None = None,
) -> GenerateReport:
    """Measure greedy decode of ours (eager, and compiled: by default where CUDA is) against transformers
    eager (and its static cache + compile path, by default where CUDA is)."""
    for name, value, low in (("batch", batch, 1), ("prompt_len", prompt_len, 1), ("new", new, 2)):
        if value < low:
            raise ValueError(f"{name} must be >= {low}, got {value}")
    cfg = shape_config(shape, prompt_len + new)
    ours, theirs = build_pair(cfg, device, dtype, seed)
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, cfg.vocab_size, (batch, prompt_len), generator=generator)
    prompts = ids.tolist()
    ids = ids.to(device)
    if static_baseline is None:
        static_baseline = device.type == "cuda"
    if compiled is None:
        compiled = device.type == "cuda"
    runs: dict[str, dict[int, Callable[[], list[list[int]]]]] = {
        "ours": {n: _ours(ours, prompts, n, compiled=False) for n in (new, 1)},
    }
    if compiled:
        runs["ours compiled"] = {n: _ours(ours, prompts, n, compiled=True) for n in (new, 1)}
    runs["transformers eager"] = {n: _theirs(theirs, ids, n, static=False) for n in (new, 1)}
    if static_baseline:
        runs["transformers static+compile"] = {n: _theirs(theirs, ids, n, static=True) for n in (new, 1)}
    tokens = {name: fns[new]() for name, fns in runs.items()}
    flat = {f"{name}|{n}": fn for name, fns in runs.items() for n, fn in fns.items()}
    timed = time_alternating(flat, repeats=repeats, warmup=warmup, device=device)

    bytes_per_step = weight_bytes_per_step(ours)
    line = roofline(device)
    candidates = [_figures(name, timed[f"{name}|{new}"], timed[f"{name}|1"], batch, new, bytes_per_step,
                           line.bytes_per_s) for name in runs]
    speed = {c.name: c.decode_tok_per_s for c in candidates}
    baselines = [c.name for c in candidates if not c.name.startswith("ours")]
    return GenerateReport(
        device=device_label(device), dtype=str(dtype).removeprefix("torch."), shape=shape, batch=batch,
        prompt_len=prompt_len, new_tokens=new, repeats=repeats, weight_gb=bytes_per_step / 1e9,
        roofline_gb_per_s=line.bytes_per_s / 1e9, roofline_source=line.source,
        roofline_tok_per_s=batch * line.bytes_per_s / bytes_per_step, candidates=candidates,
        ratios={name: speed["ours"] / speed[name] for name in baselines},
        compiled_ratios={name: speed["ours compiled"] / speed[name] for name in baselines if compiled},
        same_greedy_tokens={name: _same_rows(tokens["ours"], rows) for name, rows in tokens.items() if name != "ours"},
    )


def _figures(name: str, full: Timings, first: Timings, batch: int, new: int, bytes_per_step: int,
             bandwidth: float) -> DecodeFigures:
    decode_s = max(full.median - first.median, 1e-9)
    steps_per_s = (new - 1) / decode_s
    return DecodeFigures(
        name=name, decode_tok_per_s=batch * steps_per_s, prefill_plus_first_s=first.median,
        weight_gb_per_s=steps_per_s * bytes_per_step / 1e9,
        roofline_fraction=steps_per_s * bytes_per_step / bandwidth, spread=full.spread,
    )


def _same_rows(ours: list[list[int]], theirs: list[list[int]]) -> float:
    return sum(a == b for a, b in zip(ours, theirs)) / len(ours)

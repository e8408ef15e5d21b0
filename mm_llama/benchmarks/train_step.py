"""The image-adapter training step, ours against transformers' Mllama on the same weights and batch.

transformers builds `MllamaForConditionalGeneration` with random weights at the shape and saves it; our
`load_multimodal` reads that directory, so both hold the same tensors. Each model then trains what the
paper's image stages train — the vision encoder, the projector and the cross-attention layers, the LM
frozen — on one batch of `batch` samples, each a 4-tile image and `text_len` tokens (the image token
first), with AdamW (fused, transformers' Trainer default); bf16 autocast over fp32 weights on CUDA, fp32 on
CPU. Both train the same tensors: transformers' embedding table is frozen whole, so our `<|image|>` row
(trained by the recipes' `image.fusion`, Meta's learnable rows) is frozen here too; training it costs the
backward of the frozen LM layers below the first cross-attention layer. Our loss is the trainer's
(`ImageTextTask`: logits only at labelled positions). On CUDA the models run one
after the other (two 11B models and their optimizer states do not fit together); on CPU their steps
alternate. `warmup` untimed steps, then the median of `steps` timed ones.

Model FLOPs per text token, the formula printed with the figures:
`4·N_frozen_LM + 6·N_fusion + 6·N_encoder·(image tokens per sample / text tokens per sample)`
(forward 2 FLOPs per weight, backward 2 more for activations of every layer the gradient passes and 2 for
weight gradients of trained ones). MFU divides that rate by the device's dense bf16 peak (none on CPU).
"""

from __future__ import annotations

import copy
import gc
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable

import torch

from mm_llama.benchmarks.bandwidth import peak_bf16_flops
from mm_llama.benchmarks.generate import import_transformers
from mm_llama.benchmarks.timing import Timings, device_label, synchronize, time_alternating
from mm_llama.checkpoints.multimodal_loading import load_multimodal
from mm_llama.data.image_transform import ImageBatch
from mm_llama.train.model_options import compile_blocks
from mm_llama.train.tasks import predicting_positions, selected_cross_entropy

FLOPS_FORMULA = "4·N_frozen_LM + 6·N_fusion + 6·N_encoder·(image tokens / text tokens) per text token"

_VISION_11B = dict(hidden_size=1280, num_hidden_layers=32, num_global_layers=8, attention_heads=16,
                   intermediate_size=5120, image_size=560, patch_size=14, max_num_tiles=4,
                   intermediate_layers_indices=[3, 7, 15, 23, 30], vision_output_dim=7680, norm_eps=1e-5)
_TEXT_11B = dict(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=40,
                 num_attention_heads=32, num_key_value_heads=8, cross_attention_layers=[3, 8, 13, 18, 23, 28, 33, 38],
                 rope_parameters={"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0,
                                  "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                  "original_max_position_embeddings": 8192},
                 rms_norm_eps=1e-5, max_position_embeddings=131072, tie_word_embeddings=False)
_VISION_TINY = dict(hidden_size=64, num_hidden_layers=4, num_global_layers=2, attention_heads=4, intermediate_size=128,
                    image_size=56, patch_size=14, max_num_tiles=4, intermediate_layers_indices=[1, 2],
                    vision_output_dim=64 * 3, norm_eps=1e-5)
_TEXT_TINY = dict(vocab_size=512, hidden_size=128, intermediate_size=384, num_hidden_layers=6, num_attention_heads=4,
                  num_key_value_heads=2, cross_attention_layers=[1, 4], rope_parameters={"rope_type": "default",
                  "rope_theta": 500000.0}, rms_norm_eps=1e-5, max_position_embeddings=1024, tie_word_embeddings=False,
                  bos_token_id=1, eos_token_id=2, pad_token_id=0)
TRAIN_SHAPES: dict[str, tuple[dict[str, Any], dict[str, Any]]] = {
    "11b-vision": (_VISION_11B, _TEXT_11B), "tiny": (_VISION_TINY, _TEXT_TINY),
}
_TILE_GRID = (2, 2)  # 4 tiles: aspect-ratio id 6 among Mllama's [(1,1), (1,2), (1,3), (1,4), (2,1), (2,2), …]
_ASPECT_ID = 6


@dataclass
class StepFigures:
    name: str
    step_s: float
    tokens_per_s: float
    mfu: float | None
    peak_memory_gb: float | None
    spread: float
    loss: float


@dataclass
class TrainReport:
    device: str
    shape: str
    batch: int
    text_len: int
    steps: int
    params_frozen_lm: int
    params_fusion: int
    params_encoder: int
    flops_per_token: float
    flops_formula: str
    candidates: list[StepFigures]
    ratios: dict[str, float]  # tok/s: "transformers" ours over theirs (eager), "A/B" A over B; memory: ours over theirs
    memory_ratio: float | None

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def hf_mllama(shape: str, device: torch.device, seed: int) -> Any:
    transformers = import_transformers()
    if shape not in TRAIN_SHAPES:
        raise ValueError(f"unknown shape {shape!r}; choose one of {', '.join(TRAIN_SHAPES)}")
    vision, text = TRAIN_SHAPES[shape]
    cfg = transformers.MllamaConfig(vision_config=vision, text_config=text, image_token_index=text["vocab_size"])
    torch.manual_seed(seed)
    with torch.device(device):
        return transformers.MllamaForConditionalGeneration(cfg)


@dataclass
class Batch:
    tokens: torch.Tensor  # [B, L], <|image|> at position 1
    pixels: torch.Tensor  # [B, 1, 4, 3, H, W]
    hf_cross_mask: torch.Tensor  # [B, L, 1, 4]

    def ours(self) -> ImageBatch:
        b = self.tokens.shape[0]
        device = self.tokens.device
        return ImageBatch(
            pixels=self.pixels, aspect_ratio_ids=torch.full((b, 1), _ASPECT_ID, device=device),
            grids=torch.tensor([[_TILE_GRID]] * b, device=device), tile_mask=torch.ones(b, 1, 4, dtype=torch.bool, device=device),
            num_tiles=[[4]] * b,
        )


def make_batch(batch: int, text_len: int, vocab: int, tile: int, device: torch.device, seed: int) -> Batch:
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, vocab, (batch, text_len), generator=g)
    tokens[:, 1] = vocab  # <|image|>
    pixels = torch.randn(batch, 1, 4, 3, tile, tile, generator=g)
    mask = torch.zeros(batch, text_len, 1, 4, dtype=torch.long)
    mask[:, 1:] = 1  # text sees the image from its token on
    return Batch(tokens.to(device), pixels.to(device), mask.to(device))


def _hf_trainable(model: Any) -> list[torch.nn.Parameter]:
    for p in model.parameters():
        p.requires_grad_(False)
    trained = [model.model.vision_model, model.model.multi_modal_projector]
    trained += [layer for layer in model.model.language_model.layers if hasattr(layer, "cross_attn")]
    params = [p for module in trained for p in module.parameters()]
    for p in params:
        p.requires_grad_(True)
    return params


def _optimizer(params: list[torch.nn.Parameter]) -> torch.optim.Optimizer:
    return torch.optim.AdamW(params, lr=1e-5, fused=True)  # CUDA and CPU alike (transformers' Trainer default)


def _step_fn(loss_fn: Callable[[], torch.Tensor], optimizer: torch.optim.Optimizer,
             device: torch.device, losses: list[float]) -> Callable[[], None]:
    def step() -> None:
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.type == "cuda"):
            loss = loss_fn()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(float(loss.detach()))

    return step


def _measure(name: str, step: Callable[[], None], *, steps: int, warmup: int,
             device: torch.device) -> tuple[Timings, float | None]:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    timed = time_alternating({name: step}, repeats=steps, warmup=warmup, device=device)[name]
    synchronize(device)
    peak = torch.cuda.max_memory_allocated(device) / 1e9 if device.type == "cuda" else None
    return timed, peak


def _hf_step(theirs: Any, data: Batch, labels: torch.Tensor, device: torch.device,
             losses: list[float]) -> Callable[[], None]:
    """One transformers training step on `data` (its own loss: labels shifted inside the model)."""
    batch = data.tokens.shape[0]
    opt = _optimizer(_hf_trainable(theirs))
    inputs = dict(input_ids=data.tokens, pixel_values=data.pixels, cross_attention_mask=data.hf_cross_mask,
                  aspect_ratio_ids=torch.full((batch, 1), _ASPECT_ID, device=device),
                  aspect_ratio_mask=torch.ones(batch, 1, 4, dtype=torch.long, device=device), labels=labels)
    return _step_fn(lambda: theirs(**inputs).loss, opt, device, losses)


def _our_step(ours: Any, data: Batch, labels: torch.Tensor, device: torch.device,
              losses: list[float]) -> Callable[[], None]:
    """One training step of ours on `data` with the trainer's loss (logits only at labelled positions)."""
    ours.set_trainable(["image.encoder", "image.fusion"])
    ours.decoder.tok_embeddings.media["image"].weight.requires_grad_(False)  # as transformers' frozen table
    opt = _optimizer([p for p in ours.parameters() if p.requires_grad])
    images = data.ours()
    logits_at = predicting_positions(labels)

    def our_loss() -> torch.Tensor:
        loss, units = selected_cross_entropy(ours(data.tokens, images=images, logits_at=logits_at), labels)
        return loss / units

    return _step_fn(our_loss, opt, device, losses)


def _load_ours(models: dict[str, Any], device: torch.device) -> Any:
    """Our model holding the tensors of `models["transformers"]`, through its saved HF directory; on CUDA
    transformers' model is dropped from `models` and freed before ours is loaded."""
    with tempfile.TemporaryDirectory(prefix="mm-llama-bench-mllama-") as tmp:
        import_transformers().utils.logging.disable_progress_bar()
        models["transformers"].save_pretrained(tmp)
        if device.type == "cuda":
            del models["transformers"]
            gc.collect()
            torch.cuda.empty_cache()
        return load_multimodal(Path(tmp), dtype=torch.float32, device=device)


def compile_hf_layers(model: Any) -> int:
    """`torch.compile` each of transformers' Mllama layers in place, as `train.compile` does ours: the
    same per-block compilation on both sides. Returns the number compiled."""
    kinds = ("MllamaSelfAttentionDecoderLayer", "MllamaCrossAttentionDecoderLayer", "MllamaVisionEncoderLayer")
    layers = [m for m in model.modules() if type(m).__name__ in kinds]
    for layer in layers:
        layer.compile()
    return len(layers)


def _compiled(model: Any, compile_fn: Callable[[Any], int]) -> Any:
    compile_fn(model)
    return model


def bench_train(shape: str, *, batch: int, text_len: int, steps: int = 5, warmup: int = 1,
                device: torch.device, seed: int = 0, compile: bool = False) -> TrainReport:
    """Candidates `ours` and `transformers`, with `compile` also `ours+compile` (the trainer's
    `train.compile`) and `transformers+compile` (its layers compiled the same way).

    On CPU all models are built first and their steps alternate (drift in a shared CPU's load then falls on
    all alike); on CUDA transformers' model runs eager then compiled, is freed, then ours does the same
    (two 11B models do not fit). Compiling happens in the warmup steps.
    """
    for label, value, low in (("batch", batch, 1), ("text_len", text_len, 4), ("steps", steps, 1)):
        if value < low:
            raise ValueError(f"{label} must be >= {low}, got {value}")
    if compile and warmup < 1:
        raise ValueError("--compile needs at least one warmup step (it compiles)")
    theirs = hf_mllama(shape, device, seed)
    vocab = theirs.config.text_config.vocab_size
    tile, patch = theirs.config.vision_config.image_size, theirs.config.vision_config.patch_size
    data = make_batch(batch, text_len, vocab, tile, device, seed)
    labels = data.tokens.masked_fill(data.tokens == vocab, -100)
    names = ["ours", "transformers"] + (["ours+compile", "transformers+compile"] if compile else [])
    losses: dict[str, list[float]] = {name: [] for name in names}
    results: dict[str, tuple[Timings, float | None, list[float]]] = {}

    def hf(name: str, model: Any) -> Callable[[], None]:
        return _hf_step(model, data, labels, device, losses[name])

    def ours_step(name: str, model: Any) -> Callable[[], None]:
        return _our_step(model, data, labels, device, losses[name])

    models = {"transformers": theirs}
    del theirs  # `models` holds the only reference, so _load_ours can free it on CUDA
    if device.type == "cpu":
        ours = _load_ours(models, device)
        step_fns = {"ours": ours_step("ours", ours), "transformers": hf("transformers", models["transformers"])}
        if compile:
            step_fns["ours+compile"] = ours_step("ours+compile", _compiled(copy.deepcopy(ours), compile_blocks))
            step_fns["transformers+compile"] = hf("transformers+compile",
                                                  _compiled(copy.deepcopy(models["transformers"]), compile_hf_layers))
        timed_all = time_alternating(step_fns, repeats=steps, warmup=warmup, device=device)
        results = {name: (timed, None, losses[name]) for name, timed in timed_all.items()}
    else:
        def run(name: str, step: Callable[[], None]) -> None:
            timed, peak = _measure(name, step, steps=steps, warmup=warmup, device=device)
            results[name] = (timed, peak, losses[name])

        run("transformers", hf("transformers", models["transformers"]))
        if compile:
            run("transformers+compile", hf("transformers+compile", _compiled(models["transformers"], compile_hf_layers)))
        ours = _load_ours(models, device)
        run("ours", ours_step("ours", ours))
        if compile:
            run("ours+compile", ours_step("ours+compile", _compiled(ours, compile_blocks)))
    groups = ours.parameter_groups()

    count = {name: sum(p.numel() for p in params.values()) for name, params in groups.items()}
    n_lm, n_fusion, n_encoder = count.get("decoder", 0), count.get("image.fusion", 0), count.get("image.encoder", 0)
    image_tokens = 4 * ((tile // patch) ** 2 + 1)  # 4 tiles of patches + a class token each
    flops_per_token = 4 * n_lm + 6 * n_fusion + 6 * n_encoder * image_tokens / text_len
    peak_flops = peak_bf16_flops(device)
    figures = {}
    for name in names:
        timed, peak, run_losses = results[name]
        tok_s = batch * text_len / timed.median
        figures[name] = StepFigures(
            name=name, step_s=timed.median, tokens_per_s=tok_s,
            mfu=tok_s * flops_per_token / peak_flops if peak_flops else None, peak_memory_gb=peak,
            spread=timed.spread, loss=run_losses[0],
        )
    ours_f, theirs_f = figures["ours"], figures["transformers"]
    ratios = {"transformers": ours_f.tokens_per_s / theirs_f.tokens_per_s}
    if compile:
        for baseline in ("transformers", "transformers+compile"):
            ratios[f"ours+compile/{baseline}"] = figures["ours+compile"].tokens_per_s / figures[baseline].tokens_per_s
    return TrainReport(
        device=device_label(device), shape=shape, batch=batch, text_len=text_len, steps=steps,
        params_frozen_lm=n_lm, params_fusion=n_fusion, params_encoder=n_encoder, flops_per_token=flops_per_token,
        flops_formula=FLOPS_FORMULA, candidates=list(figures.values()), ratios=ratios,
        memory_ratio=(ours_f.peak_memory_gb / theirs_f.peak_memory_gb
                      if ours_f.peak_memory_gb and theirs_f.peak_memory_gb else None),
    )

"""Captioning and visual question answering over a `MultimodalLlama` (what `caption` / `vqa` run)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Sequence

from tqdm import tqdm

from mm_llama.data.image_transform import ImageInput, ImageTransform, TiledImage, collate_images
from mm_llama.data.prompts import DEFAULT_CAPTION_PROMPT, prompt_ids
from mm_llama.data.records import IMAGE_MARKER, IMAGE_SLOT
from mm_llama.generation import GenerationConfig, generate
from mm_llama.media_tokens import MediaTokens
from mm_llama.multimodal import MultimodalLlama
from mm_llama.tokenizer import Tokenizer

__all__ = ["DEFAULT_CAPTION_PROMPT", "ImageAnswer", "answer_images", "image_batch", "image_prompt", "image_transform",
           "load_image_model"]



def image_prompt(tokenizer: Tokenizer, text: str, image_token_id: int, *, chat: bool = True) -> list[int]:
    """Token ids for one image followed by `text`.

    Chat (instruct models): `<|begin_of_text|>` + user header + `<|image|>` + text + `<|eot_id|>` + assistant
    header. Plain (base models, Meta's completion style): `<|image|><|begin_of_text|>` + text. One
    `<image>` in `text` puts `<|image|>` there instead (text before it, the image, text after it).
    `<|image|>` is inserted as an id, so tokenizers that do not list it work too.
    """
    markers = text.count(IMAGE_MARKER)
    if markers > 1:
        raise ValueError(f"the prompt {text!r:.80} holds {markers} {IMAGE_MARKER} markers; one image goes in one "
                         f"place: keep one {IMAGE_MARKER} (or none, to put the image first)")
    if not chat:
        if markers:
            before, _, after = text.partition(IMAGE_MARKER)
            return tokenizer.encode(before.strip(), bos=True) + [image_token_id] + tokenizer.encode(after.strip())
        return [image_token_id] + tokenizer.encode(text, bos=True)
    # the same template training uses (data/prompts.py), so training and inference prompts are identical; a
    # <image> marker places the image as in a LLaVA / chat-messages record the model was trained on
    return prompt_ids(tokenizer, MediaTokens(image_token_id), "vqa", {"question": text.replace(IMAGE_MARKER, IMAGE_SLOT)})


def image_transform(model: MultimodalLlama) -> ImageTransform:
    """The tiling and normalisation the model's image encoder expects: the checkpoint's own
    ``preprocessor_config.json`` when `load_multimodal` found one (``model.image.processing``), else the
    vision config's tile size and tile count with the built-in CLIP mean / std."""
    processing = getattr(model.image, "processing", None)
    if processing is not None:
        return processing.transform()
    vision = model.image.vision_cfg
    return ImageTransform(tile_size=vision.tile_size, max_tiles=vision.max_tiles)


def image_batch(model: MultimodalLlama, tiled: Sequence[TiledImage]):
    """One image per sample → a batch on the image modality's device and dtype."""
    dtype = next(model.image.projector.parameters()).dtype
    device = next(model.parameters()).device
    return collate_images([[t] for t in tiled], max_tiles=model.image.vision_cfg.max_tiles).to(device, dtype=dtype)


@dataclass
class ImageAnswer:
    """One image's result: the generated text, or the reason the image could not be used."""

    source: str
    text: str | None = None
    error: str | None = None


def answer_images(
    model: MultimodalLlama,
    tokenizer: Tokenizer,
    images: Sequence[ImageInput],
    prompts: Sequence[str] | str,
    gen: GenerationConfig,
    *,
    chat: bool = True,
    batch_size: int = 8,
    progress: bool | None = None,
    names: Sequence[str] | None = None,
) -> list[ImageAnswer]:
    """Generate one answer per image (same prompt for all, or one prompt per image).

    Images that cannot be read are reported in their `ImageAnswer.error` and the rest still run.
    The progress bar shows by default when there are more than a handful of images.
    """
    if isinstance(prompts, str):
        prompts = [prompts] * len(images)
    if len(prompts) != len(images):
        raise ValueError(f"got {len(prompts)} prompts for {len(images)} images; give one prompt or one per image")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    names = list(names) if names is not None else [str(i) if not isinstance(i, (str, Path)) else str(i) for i in images]
    if "image" not in getattr(model, "modality_names", ()):
        raise ValueError(f"this model reads {list(getattr(model, 'modality_names', []))}, not images; caption and vqa "
                         "need a model with an image modality (for speech use transcribe / translate)")
    for prompt in dict.fromkeys(prompts):  # a bad prompt fails before any image is read or answered
        image_prompt(tokenizer, prompt, model.image.token_id, chat=chat)
    transform = image_transform(model)
    results = [ImageAnswer(source=name) for name in names]
    bar = tqdm(total=len(images), unit="image", disable=not (progress if progress is not None else len(images) > 4))
    for start in range(0, len(images), batch_size):
        rows: list[int] = []
        tiled: list[TiledImage] = []
        for i in range(start, min(start + batch_size, len(images))):
            try:
                tiled.append(transform(images[i], source=names[i]))
                rows.append(i)
            except ValueError as e:
                results[i].error = str(e)
        if rows:
            batch = image_batch(model, tiled)
            token_prompts = [image_prompt(tokenizer, prompts[i], model.image.token_id, chat=chat) for i in rows]
            outputs = generate(model, token_prompts, gen, prefill_inputs={"images": batch})
            for i, out in zip(rows, outputs):
                results[i].text = tokenizer.decode(out.tokens).strip()
        bar.update(min(batch_size, len(images) - start))
    bar.close()
    return results


def load_image_model(path: str | Path, *, dtype, device) -> tuple[MultimodalLlama, Tokenizer]:
    """The model and its tokenizer (from the model directory, or the base LM an adapter run names)."""
    from mm_llama.checkpoints.chat_template import check_chat_template
    from mm_llama.checkpoints.multimodal_loading import RUN_CONFIG, adapter_run_base_lm, load_multimodal

    directory = Path(path)
    model = load_multimodal(directory, dtype=dtype, device=device)
    candidates: Iterable[Path] = [directory]
    if (directory / RUN_CONFIG).is_file():
        candidates = [directory, adapter_run_base_lm(directory)]
    for candidate in candidates:
        if (candidate / "tokenizer.model").is_file() or (candidate / "tokenizer.json").is_file():
            check_chat_template(candidate)  # warns when its own template is not the Llama 3 format we prompt in
            return model, Tokenizer.from_dir(candidate)
    raise FileNotFoundError(
        f"no tokenizer.model or tokenizer.json in {', '.join(str(c) for c in candidates)}; copy the tokenizer "
        "of the base Llama next to the model"
    )

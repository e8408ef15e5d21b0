"""`mm-llama export`: write a model or run as a Hugging Face directory that serving stacks load.

* `--format hf-mllama` — an image model (a run of ours trained with Llama 3.2 Vision's encoder, an HF Mllama
  or a Meta Llama 3.2 Vision directory) as `MllamaForConditionalGeneration`: the base with the trained
  weights merged, `config.json`, tokenizer files with `<|image|>`, `preprocessor_config.json`,
  `generation_config.json` and the chat template (see `checkpoints.mllama_export` for what transformers
  computes differently from Meta's reference, and `--vision-taps`).
* `--format hf` — a text LM (HF / Meta checkpoint or an `lm_pretrain` run) as `LlamaForCausalLM`, with the
  tokenizer files and `generation_config.json`.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from mm_llama.checkpoints.loading import DTYPES, lm_checkpoint_dir, parse_dtype
from mm_llama.commands.help_format import HelpFormatter

FORMATS = ("hf", "hf-mllama")


EPILOG = """\
Exit status: 0 when written; 2 on bad input (a missing SOURCE, an OUT that holds files without --overwrite, a
text LM given --format hf-mllama or an image model --format hf, a damaged checkpoint), named in one line on
stderr; 1 on an unexpected error.

Examples (an image run fine-tuned from Llama 3.2 Vision; the demo's text LM):
  mm-llama export runs/sft served/ --format hf-mllama
  mm-llama export runs/demo/lm served-lm/ --format hf
"""


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "export",
        help="write a model or run as a Hugging Face directory (LlamaForCausalLM or MllamaForConditionalGeneration)",
        description="Write SOURCE (a run directory of ours, an HF or Meta checkpoint) to OUT in Hugging Face's "
        "layout with everything a server needs: weights (the base with the trained weights merged), config.json, "
        "tokenizer files and chat template, generation_config.json, and for --format hf-mllama the image "
        "processor's preprocessor_config.json.",
        epilog=EPILOG, formatter_class=HelpFormatter,
    )
    p.add_argument("source", type=Path, metavar="SOURCE",
                   help="a run directory (config.yaml + adapter.safetensors, or an lm_pretrain run), an HF "
                   "directory (Llama or Mllama) or a Meta directory (params.json + consolidated.00.pth)")
    p.add_argument("out", type=Path, metavar="OUT", help="the directory to write (must be new or empty)")
    p.add_argument("--format", required=True, choices=FORMATS,
                   help="hf-mllama: an image model for transformers' MllamaForConditionalGeneration; hf: a text LM "
                   "for LlamaForCausalLM")
    p.add_argument("--dtype", default="bfloat16", choices=sorted(DTYPES),
                   help="dtype of the written weights (default bfloat16, as the published checkpoints)")
    p.add_argument("--vision-taps", default="meta", choices=["meta", "transformers5"],
                   help="hf-mllama only: how vision_config.intermediate_layers_indices are written. meta (default): "
                   "as the published checkpoints (hidden states entering those layers); transformers 5.x then takes "
                   "the states one layer later than the model was trained with. transformers5: indices shifted so "
                   "transformers >= 5 computes exactly the trained features (mm-llama reads it back correctly; other "
                   "readers of the published convention would be one layer early)")
    p.add_argument("--max-shard-gb", type=float, default=5.0,
                   help="split the weights into safetensors shards of at most this many GB (default 5)")
    p.add_argument("--overwrite", action="store_true", help="write into OUT even if it holds files")
    p.set_defaults(run=run)


def check_out_dir(source: Path, out: Path, overwrite: bool) -> None:
    """OUT must not be SOURCE, nor a non-empty directory unless `overwrite`."""
    if out.exists() and source.exists() and out.resolve() == source.resolve():
        raise ValueError(f"OUT {out} is SOURCE itself; write the export to another directory")
    if out.exists() and not out.is_dir():
        raise ValueError(f"OUT {out} is a file; name a directory to write")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise ValueError(f"OUT {out} already holds files; choose a new directory or pass --overwrite")


def _is_image_source(source: Path) -> bool:
    from mm_llama.checkpoints.multimodal_loading import RUN_CONFIG, read_adapter_run_config
    from mm_llama.checkpoints.vision_checkpoint import is_vision_checkpoint

    if (source / RUN_CONFIG).is_file() and not (source / "model" / "config.json").is_file():
        read_adapter_run_config(source)  # an lm_pretrain run is refused here with its own message
        return True
    return is_vision_checkpoint(source)


def tokenizer_source(source: Path) -> Path:
    """Where the tokenizer of an image SOURCE is: beside it, else beside the base LM a run names."""
    from mm_llama.checkpoints.multimodal_loading import RUN_CONFIG, adapter_run_base_lm

    candidates = [source] + ([adapter_run_base_lm(source)] if (source / RUN_CONFIG).is_file() else [])
    for candidate in candidates:
        if (candidate / "tokenizer.json").is_file() or (candidate / "tokenizer.model").is_file():
            return candidate
    raise FileNotFoundError(f"no tokenizer.json or tokenizer.model in {', '.join(map(str, candidates))}; copy the "
                            "tokenizer of the base model next to SOURCE")


def export_hf_mllama(source: Path, out: Path, *, dtype: str, taps: str, max_shard_bytes: int) -> Path:
    """`--format hf-mllama`: load SOURCE as mm-llama does, merge LoRA if any, write it (weights, config and the
    serving files)."""
    from mm_llama.adapters.lora import merge_lora
    from mm_llama.checkpoints.mllama_export import check_mllama_exportable, save_hf_mllama
    from mm_llama.checkpoints.multimodal_loading import load_multimodal
    from mm_llama.checkpoints.serving_files import (
        tokenizer_generation_ids, write_generation_config, write_preprocessor_config, write_tokenizer_files,
    )

    model = load_multimodal(source, dtype=parse_dtype(dtype))
    check_mllama_exportable(model, str(source))
    tok_dir = tokenizer_source(source)
    merge_lora(model)
    out.mkdir(parents=True, exist_ok=True)
    tok = write_tokenizer_files(tok_dir, out, image_id=model.image.token_id, chat=True, max_len=model.max_seq_len)
    save_hf_mllama(model, out, taps=taps, pad_id=tok.pad_id, max_shard_bytes=max_shard_bytes, source=str(source))
    write_generation_config(out, **tokenizer_generation_ids(tok))
    vision = model.image.vision_cfg
    processing = getattr(model.image, "processing", None)  # the source's own preprocessor_config.json, if any
    norm = {"mean": processing.mean, "std": processing.std} if processing is not None else {}
    write_preprocessor_config(out, tile_size=vision.tile_size, max_tiles=vision.max_tiles, **norm)
    return out


def export_hf(source: Path, out: Path, *, dtype: str, max_shard_bytes: int) -> Path:
    """`--format hf`: a text LM (or an lm_pretrain run's model) with its tokenizer and generation config."""
    from mm_llama.checkpoints import load_llama, save_hf

    directory = lm_checkpoint_dir(source)
    model = load_llama(directory, dtype=parse_dtype(dtype))
    return save_hf(model, out, max_shard_bytes=max_shard_bytes, tokenizer_dir=directory)


def run(args: argparse.Namespace) -> int:
    source, out = Path(args.source), Path(args.out)
    if not source.exists():
        raise FileNotFoundError(f"SOURCE {source} does not exist")
    check_out_dir(source, out, args.overwrite)
    if not args.max_shard_gb > 0:
        raise ValueError(f"--max-shard-gb must be > 0, got {args.max_shard_gb}")
    shard = int(args.max_shard_gb * 1e9)
    image = _is_image_source(source)
    if args.format == "hf-mllama":
        if not image:
            raise ValueError(f"{source} is a text-only LM; --format hf-mllama writes image models, use --format hf")
        export_hf_mllama(source, out, dtype=args.dtype, taps=args.vision_taps, max_shard_bytes=shard)
        note = ("transformers >= 5 reads the vision taps one layer later than trained; re-export with "
                "--vision-taps transformers5 to serve with it" if args.vision_taps == "meta" else
                "vision taps written for transformers >= 5")
        print(f"wrote {out} (MllamaForConditionalGeneration, {args.dtype}); {note}")
        return 0
    if image:
        raise ValueError(f"{source} is an image model; export it with --format hf-mllama (--format hf writes text LMs)")
    export_hf(source, out, dtype=args.dtype, max_shard_bytes=shard)
    print(f"wrote {out} (LlamaForCausalLM, {args.dtype})")
    return 0

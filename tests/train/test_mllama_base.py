"""Training from a published Llama 3.2 Vision checkpoint (`mm-llama train vision_sft model.base_lm=MLLAMA_DIR`),
then serving the run: our commands load it, and its `--format hf-mllama` export gives transformers' logits
equal to ours once transformers' two known differences from Meta are put back (shown one by one).

The base is a tiny random HF Mllama saved as the released checkpoints are, with a trained tokenizer that
lists `<|image|>` at the text vocabulary size; the data is image-qa conversation shards (`turns`).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from mm_llama.checkpoints.multimodal_loading import load_multimodal
from mm_llama.cli import main as cli
from mm_llama.commands import train
from tests.mm_llama.checkpoints.mllama_serving import max_diff, served_logits, write_published_mllama
from tests.reference.hf_mllama import make_images

TOL = 1e-4
QA = [("what shape is it?", "a star"), ("what colour?", "red"), ("where is it?", "on the left"),
      ("how many?", "one")]


def _write_shards(root: Path) -> Path:
    from PIL import Image

    from mm_llama.data.manifest import write_shards

    lines = []
    g = torch.Generator().manual_seed(0)
    for i, size in enumerate([(40, 30), (30, 60), (50, 50), (20, 70)]):
        path = root / f"img{i}.png"
        Image.fromarray((torch.rand(size[1], size[0], 3, generator=g) * 255).to(torch.uint8).numpy()).save(path)
        turns = [{"question": q, "answer": a} for q, a in QA[i:] + QA[:i]][:2]
        lines.append(json.dumps({"image": str(path), "turns": turns}))
    (root / "manifest.jsonl").write_text("\n".join(lines) + "\n")
    write_shards(root / "manifest.jsonl", root / "shards", samples_per_shard=2, progress=False)
    return root / "shards"


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory):
    root = tmp_path_factory.mktemp("mllama-base")
    base, tok = write_published_mllama(root / "base")
    return base, tok, _write_shards(root)


def _overrides(base: Path, shards: Path, run: Path, **more: object) -> list[str]:
    values: dict[str, object] = {
        "model.base_lm": str(base), "model.init_from": None, "model.train": ["image.fusion"],
        "data.shards": [str(shards / "shard-*.tar")], "data.batch_size": 2, "data.shuffle_buffer": 4,
        "data.max_seq_len": 64, "data.num_workers": 0, "train.steps": 3, "train.device": "cpu", "train.eval_every": 0,
        "train.activation_checkpointing": False, "optim.lr": 1e-2, "optim.accumulation_steps": 1,
        "schedule.warmup_steps": 1, "checkpoint.every": 100, "logging.every": 1, "logging.progress": False,
        "logging.tensorboard": False,
    }
    values.update({k.replace("__", "."): v for k, v in more.items()})
    return [f"{k}={json.dumps(v)}" for k, v in values.items()] + ["--out", str(run)]


@pytest.fixture(scope="module")
def run(setup, tmp_path_factory: pytest.TempPathFactory) -> Path:
    base, _, shards = setup
    run_dir = tmp_path_factory.mktemp("runs") / "sft"
    with pytest.warns(UserWarning, match="replace the recipe's timm encoder settings"):
        assert train.main(["vision_sft", *_overrides(base, shards, run_dir)]) == 0
    return run_dir


def test_the_run_records_the_checkpoint_and_exports_only_what_trained(setup, run: Path) -> None:
    base, _, _ = setup
    model = yaml.safe_load((run / "config.yaml").read_text())["model"]
    hf_vision = json.loads((base / "config.json").read_text())["vision_config"]
    assert model["base_lm"] == str(base.resolve()) and model["encoder"] == "mllama"
    assert model["fusion_layers"] == [1, 3]  # HF's merged [1, 4]
    assert model["vision"]["tile_size"] == hf_vision["image_size"] and list(model["vision"]["taps"]) == [1, 2]
    adapter = load_file(run / "adapter.safetensors")
    assert adapter and all(k.startswith("image.projector.") or ".fusion.image." in k or ".media.image." in k
                           for k in adapter), sorted(adapter)[:5]  # no encoder (frozen: in the base), no LM
    loaded, published = load_multimodal(run).state_dict(), load_multimodal(base).state_dict()
    changed = [k for k in adapter if not torch.equal(loaded[k], published[k])]
    assert changed and all(torch.equal(loaded[k], adapter[k]) for k in adapter)
    assert all(torch.equal(loaded[k], published[k]) for k in published if k not in adapter)


def test_our_commands_answer_from_the_run(setup, run: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    _, _, shards = setup
    image = shards.parent / "img0.png"
    assert cli(["vqa", "--model", str(run), "--image", str(image), "--question", "what shape?",
                "--max-new-tokens", "3"]) == 0
    assert cli(["eval", "--model", str(run), "--task", "vqa", "--shards", str(shards / "shard-*.tar"),
                "--max-new-tokens", "3", "--no-progress", "--out", str(tmp_path / "eval.json")]) == 0
    assert (tmp_path / "eval.json").is_file()


def test_the_export_serves_in_transformers_as_trained(setup, run: Path, tmp_path: Path) -> None:
    from transformers import MllamaForConditionalGeneration

    from mm_llama.image_chat import image_prompt

    _, tok, _ = setup
    out = tmp_path / "served"
    assert cli(["export", str(run), str(out), "--format", "hf-mllama", "--dtype", "float32"]) == 0
    served = MllamaForConditionalGeneration.from_pretrained(out).eval()
    ours = load_multimodal(run)
    prompt = image_prompt(tok, "what shape is it?", tok.vocab_size) + tok.encode("a star")
    first = prompt.index(tok.image_id)
    tokens, images = torch.tensor([prompt]), make_images([[(2, 1)]])
    with torch.no_grad():
        got = ours(tokens, images=images)[0]

    def hf(meta_taps: bool, meta_rows: bool) -> torch.Tensor:
        return served_logits(served, tokens, images, tok.image_id, meta_taps=meta_taps, meta_rows=meta_rows)[0]

    assert max_diff(hf(True, True), got) <= TOL  # Meta's conventions put back: equal everywhere
    taps_only = hf(False, True)  # transformers 5.x's taps: only rows from the image on move
    assert max_diff(taps_only[:first], got[:first]) <= TOL and max_diff(taps_only[first:], got[first:]) > 1e-3
    rows_only = hf(True, False)  # issue 39379: the rows before the image move, and later rows with them
    assert max_diff(rows_only[:first], got[:first]) > 1e-2


def test_recipe_settings_that_contradict_the_checkpoint_are_refused(setup, tmp_path: Path,
                                                                    capsys: pytest.CaptureFixture) -> None:
    base, _, shards = setup
    cases = {
        "model.vision.tile_size=56 but the Llama 3.2 Vision checkpoint": dict(model__encoder="mllama",
                                                                               model__vision={"tile_size": 56}),
        "model.fusion_layers=[0, 2] but": dict(model__encoder="mllama", model__vision={}, model__fusion_layers=[0, 2]),
        "model.encoder_checkpoint=enc.safetensors would replace": dict(model__encoder_checkpoint="enc.safetensors"),
        "model.init_from=runs/vision_anneal does not exist": dict(model__init_from="runs/vision_anneal"),
    }
    for i, (message, more) in enumerate(cases.items()):
        assert train.main(["vision_sft", *_overrides(base, shards, tmp_path / f"r{i}", **more)]) == 2
        err = capsys.readouterr().err
        assert message in err, err


def test_a_later_stage_continues_from_the_run(setup, run: Path, tmp_path: Path) -> None:
    base, _, shards = setup
    later = tmp_path / "later"
    assert train.main(["vision_sft", *_overrides(base, shards, later, model__init_from=str(run),
                                                 model__train=["image.encoder", "image.fusion"], train__steps=1)]) == 0
    adapter = load_file(later / "adapter.safetensors")
    assert any(k.startswith("image.encoder.") for k in adapter)  # trained now, so exported
    earlier = load_file(run / "adapter.safetensors")
    assert set(earlier) <= set(adapter)
    assert load_multimodal(later).state_dict().keys() == load_multimodal(base).state_dict().keys()


def test_a_meta_layout_base_builds_the_model_load_multimodal_gives(tmp_path: Path) -> None:
    import dataclasses

    from mm_llama.checkpoints.multimodal_loading import base_modalities, modalities_from_fields
    from mm_llama.multimodal import MultimodalLlama
    from mm_llama.train.vision_base import assign_image_weights, load_vision_base_decoder
    from tests.reference.hf_mllama import tiny_hf_mllama, write_meta_mllama

    meta = write_meta_mllama(tiny_hf_mllama(), tmp_path / "meta")
    decoder, cfg, image = load_vision_base_decoder(meta)
    fields = {"modalities": ["image"], "encoder": "mllama", "vision": dataclasses.asdict(cfg.vision),
              "fusion_layers": list(cfg.fusion_layers)}
    model = MultimodalLlama(decoder, modalities_from_fields(cfg.text, fields))
    assign_image_weights(model, image, meta)
    reference = load_multimodal(meta).state_dict()
    state = model.state_dict()
    assert state.keys() == reference.keys() and all(torch.equal(state[k], reference[k]) for k in state)
    assert base_modalities(model) == {"image"}

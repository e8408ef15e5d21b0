"""The trainer end to end on tiny models (in-process, CPU): LM pretraining, adapter training with a
frozen LM, exports that load back, accumulation, evaluation, stop signals and continuing a stage."""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from mm_llama.checkpoints.loading import load_llama
from mm_llama.checkpoints.multimodal_loading import (
    ADAPTER_FILE, adapter_run_base_lm, load_multimodal, read_adapter_run_config, save_adapter,
)
from mm_llama.checkpoints.state_dict import CheckpointError
from mm_llama.data.prompts import IGNORE_INDEX
from mm_llama.train.checkpointing import list_checkpoints
from mm_llama.train.metrics import read_metrics
from mm_llama.train.recipe import load_recipe
from mm_llama.train.trainer import TrainingError, make_source, run_training
from tests.train.test_trainer_setup import VISION, Assets, assets, lm_overrides, mm_overrides  # noqa: F401


def _first_batch(cfg, result):
    from mm_llama.train.build import load_recipe_tokenizer
    from mm_llama.train.stages import Built

    tok, tok_dir = load_recipe_tokenizer(cfg)
    built = Built(result.model, tok, tok_dir, "adapter")
    return next(make_source(cfg, built, list(cfg.data.shards), rank=0, world_size=1, evaluation=True).iter_epoch(0, 0))


@pytest.fixture(scope="module")
def mm_run(assets: Assets, tmp_path_factory: pytest.TempPathFactory):  # noqa: F811
    """A finished 4-step adapter run, the frozen LM's weights before it, and its recipe."""
    cfg = load_recipe("tiny_vision_pretrain", mm_overrides(assets, steps=4, logging__tensorboard=True))
    before = load_llama(assets.base_lm).state_dict()
    run_dir = tmp_path_factory.mktemp("mm-run")
    return run_training(cfg, run_dir), before, cfg


def test_lm_pretraining_reduces_loss_and_exports_an_hf_checkpoint(assets: Assets, tmp_path: Path) -> None:  # noqa: F811
    cfg = load_recipe("tiny_lm_pretrain", lm_overrides(assets, steps=24))
    result = run_training(cfg, tmp_path)
    first, last = sum(result.history[:3]) / 3, sum(result.history[-3:]) / 3
    assert last < 0.8 * first, result.history
    export = tmp_path / "model"
    assert result.export == export and (export / "config.json").is_file()
    assert (export / "tokenizer.json").is_file() and (export / "tokenizer.model").is_file()
    loaded = load_llama(export)
    tokens = torch.tensor([[1, 5, 9, 7, 3]])
    with torch.no_grad():
        torch.testing.assert_close(loaded(tokens), result.model.eval()(tokens), rtol=0, atol=1e-5)
    records = read_metrics(tmp_path)
    assert [r["step"] for r in records] == list(range(1, 25))
    assert {"loss", "lr", "grad_norm", "tokens_per_s", "samples_per_s", "skipped_samples", "nonfinite_steps"} <= set(records[-1])
    assert list(records[-1]["lr"]) == ["decoder"]


def test_without_a_progress_bar_every_log_step_prints_a_line_with_time_and_memory(
        assets: Assets, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:  # noqa: F811
    run_training(load_recipe("tiny_lm_pretrain", lm_overrides(assets, steps=6, logging__every=2)), tmp_path)
    lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith("step ")]
    assert [line.split()[1] for line in lines] == ["2/6", "4/6", "6/6"]
    assert all("tok/s" in line and "elapsed " in line and "eta " in line and "peak rss " in line for line in lines)
    assert lines[-1].split("eta ")[1].startswith("0m00s")
    records = read_metrics(tmp_path)
    assert [r["step"] for r in records] == [2, 4, 6]
    elapsed = [r["elapsed_s"] for r in records]
    assert elapsed == sorted(elapsed) and elapsed[0] > 0
    # the time left is the mean step time so far times the steps left
    assert records[0]["eta_s"] == pytest.approx(records[0]["elapsed_s"] / 2 * 4)
    assert records[-1]["eta_s"] == 0.0
    assert all(r["peak_rss_mb"] > 50 for r in records) and "cuda_peak_mb" not in records[-1]


def test_adapter_training_keeps_the_lm_bit_identical(mm_run) -> None:
    result, before, _ = mm_run
    after = result.model.decoder.state_dict()
    changed_frozen = [k for k, v in before.items() if not torch.equal(after[k], v)]
    assert not changed_frozen
    groups = result.model.parameter_groups()
    assert all(not p.requires_grad for p in groups["decoder"].values())
    assert all(p.requires_grad for g in ("image.encoder", "image.fusion") for p in groups[g].values())


def test_finished_adapter_run_loads_with_load_multimodal(mm_run) -> None:
    result, _, cfg = mm_run
    run_dir = result.run_dir
    assert result.export == run_dir / ADAPTER_FILE and not result.stopped and result.steps == 4
    recipe = yaml.safe_load((run_dir / "config.yaml").read_text())
    assert recipe["model"]["fusion_layers"] == [1]
    assert Path(recipe["model"]["base_lm"]).is_absolute()
    assert recipe["model"]["vision"]["max_tiles"] == 1
    adapter = load_file(str(run_dir / ADAPTER_FILE))
    assert adapter and all(k.startswith(("image.encoder.", "image.projector.", "decoder.layers.1.fusion.image.",
                                         "decoder.tok_embeddings.media.image.")) for k in adapter)
    loaded = load_multimodal(run_dir)
    batch = _first_batch(cfg, result)
    model = result.model.eval()
    with torch.no_grad():
        text = batch.text
        expected = model(text.input_ids, images=batch.images, attention_mask=text.attention_mask)
        got = loaded(text.input_ids, images=batch.images, attention_mask=text.attention_mask)
    assert torch.equal(got, expected)
    assert (run_dir / "tokenizer.json").is_file()
    assert adapter_run_base_lm(run_dir) == Path(recipe["model"]["base_lm"])


def test_adapter_run_config_reads_both_schemas(mm_run, tmp_path: Path) -> None:
    result, _, _ = mm_run
    from_recipe = read_adapter_run_config(result.run_dir)
    save_adapter(result.model, tmp_path / "export", base_lm=from_recipe["base_lm"])
    from_export = read_adapter_run_config(tmp_path / "export")
    for key in ("encoder", "fusion_layers", "n_fusion_tokens"):
        assert from_recipe[key] == from_export[key]
    assert from_export["vision"]["tile_size"] == from_recipe["vision"]["tile_size"] == 32
    tokens = torch.tensor([[1, 5, 9]])
    with torch.no_grad():
        assert torch.equal(load_multimodal(tmp_path / "export")(tokens), load_multimodal(result.run_dir)(tokens))


def test_non_adapter_runs_are_named_when_loaded_as_image_models(assets: Assets, tmp_path: Path) -> None:  # noqa: F811
    cfg = load_recipe("tiny_lm_pretrain", lm_overrides(assets, steps=1, schedule__warmup_steps=0))
    run_training(cfg, tmp_path)
    with pytest.raises(CheckpointError, match="LM pretraining run"):
        load_multimodal(tmp_path)


def test_metrics_and_checkpoints_of_an_adapter_run(mm_run) -> None:
    result, _, _ = mm_run
    records = read_metrics(result.run_dir)
    assert [r["step"] for r in records] == [1, 2, 3, 4]
    assert set(records[0]["lr"]) == {"image.encoder", "image.fusion"}
    assert [s for s, _ in list_checkpoints(result.run_dir)] == [2, 4]
    assert list((result.run_dir / "tensorboard").glob("events.out.tfevents.*"))
    state = json.loads((result.run_dir / "ckpt-000004" / "state.json").read_text())
    assert state["data_position"] == {"epoch": 0, "batches_in_epoch": 4}


def test_gradient_accumulation_equals_one_large_batch(assets: Assets, tmp_path: Path) -> None:  # noqa: F811
    big = run_training(load_recipe("tiny_vision_pretrain", mm_overrides(assets, steps=3, data__batch_size=4)), tmp_path / "a")
    acc = run_training(load_recipe("tiny_vision_pretrain", mm_overrides(
        assets, steps=3, data__batch_size=2, optim__accumulation_steps=2)), tmp_path / "b")
    assert acc.history == pytest.approx(big.history, rel=1e-5)
    a, b = dict(big.model.named_parameters()), dict(acc.model.named_parameters())
    # Adam divides by |g|: on elements whose gradient is near its eps (1e-8), float summation-order noise
    # moves the update by about 1 % of lr (measured: 4e-5 at lr 3e-3 on patch_embed; 6e-7 with gates at 0,
    # which block every gradient behind them). A wrong accumulation shows in the loss history above.
    assert max(float((a[k] - b[k]).detach().abs().max()) for k in a if a[k].requires_grad) < 0.05 * 3e-3


def test_an_existing_run_needs_resume(mm_run) -> None:
    result, _, cfg = mm_run
    with pytest.raises(TrainingError, match="--resume"):
        run_training(cfg, result.run_dir)


def test_resume_of_a_finished_run_only_exports_again(mm_run) -> None:
    result, _, cfg = mm_run
    again = run_training(cfg, result.run_dir, resume=True)
    assert again.steps == 4 and again.history == []
    assert torch.equal(load_file(str(result.run_dir / ADAPTER_FILE))["image.projector.weight"],
                       result.model.image.projector.weight.detach())


def test_sigterm_checkpoints_and_stops_then_resume_finishes(assets: Assets, tmp_path: Path) -> None:  # noqa: F811
    cfg = load_recipe("tiny_vision_pretrain", mm_overrides(assets, steps=5, checkpoint__every=100))

    def stop_at_3(step: int, info: dict) -> None:
        if step == 3:
            os.kill(os.getpid(), signal.SIGTERM)

    first = run_training(cfg, tmp_path, on_step_end=stop_at_3)
    assert first.stopped and first.steps == 3 and first.export is None
    assert [s for s, _ in list_checkpoints(tmp_path)] == [3]
    assert not (tmp_path / ADAPTER_FILE).exists()
    rest = run_training(cfg, tmp_path, resume=True)
    assert rest.steps == 5 and not rest.stopped and len(rest.history) == 2
    assert (tmp_path / ADAPTER_FILE).is_file()


def test_periodic_evaluation_logs_the_eval_loss(assets: Assets, tmp_path: Path) -> None:  # noqa: F811
    cfg = load_recipe("tiny_vision_pretrain", mm_overrides(
        assets, steps=2, train__eval_every=1, train__eval_batches=1, data__eval_shards=[assets.eval_captions]))
    result = run_training(cfg, tmp_path)
    evals = [r["eval"] for r in read_metrics(tmp_path) if "eval" in r]
    assert len(evals) == 2 and all(e["batches"] == 1 and e["loss"] > 0 for e in evals)
    assert result.last_eval == evals[-1]


def test_next_stage_starts_from_the_previous_adapter_at_a_higher_resolution(mm_run, assets: Assets,  # noqa: F811
                                                                            tmp_path: Path) -> None:
    result, _, _ = mm_run
    vision = {**VISION, "tile_size": 48}
    cfg = load_recipe("tiny_vision_pretrain", mm_overrides(assets, steps=1, model__vision=vision,
                                                           model__init_from=str(result.run_dir), optim__lr=1e-12))
    anneal = run_training(cfg, tmp_path)
    from mm_llama.checkpoints.multimodal_loading import adapter_state_dict

    old, new = adapter_state_dict(result.model), adapter_state_dict(anneal.model)
    assert old.keys() == new.keys()
    assert new["image.encoder.backbone.pos_embed"].shape[1] == 1 + 9 and old["image.encoder.backbone.pos_embed"].shape[1] == 1 + 4
    differ = [k for k in old if k != "image.encoder.backbone.pos_embed" and not torch.allclose(old[k], new[k], atol=1e-8)]
    assert not differ  # lr 1e-12: what the stage started from is what it ends with
    assert anneal.model.image.encoder.tile_size == 48


def test_labels_in_image_batches_cover_only_the_response(mm_run) -> None:
    result, _, cfg = mm_run
    batch = _first_batch(cfg, result)
    labels = batch.text.labels
    assert (labels != IGNORE_INDEX).any() and (labels[:, :3] == IGNORE_INDEX).all()


def test_activation_checkpointing_gives_the_same_steps(assets: Assets, tmp_path: Path) -> None:  # noqa: F811
    plain = run_training(load_recipe("tiny_vision_pretrain", mm_overrides(assets, steps=2)), tmp_path / "a")
    cfg = load_recipe("tiny_vision_pretrain", mm_overrides(assets, steps=2, train__activation_checkpointing=True))
    checkpointed = run_training(cfg, tmp_path / "b")
    assert checkpointed.history == plain.history
    import functools

    assert isinstance(checkpointed.model.decoder.layers[0].forward, functools.partial)  # recomputed in backward
    assert checkpointed.model.image.encoder.backbone.grad_checkpointing


@pytest.mark.gpu
def test_cuda_bf16_autocast_compile_and_checkpointing(assets: Assets, tmp_path: Path) -> None:  # noqa: F811
    cfg = load_recipe("tiny_vision_pretrain", mm_overrides(assets, steps=3, train__device="cuda", train__compile=True,
                                                           train__activation_checkpointing=True))
    before = load_llama(assets.base_lm).state_dict()
    result = run_training(cfg, tmp_path)
    assert all(torch.isfinite(torch.tensor(result.history)))
    after = result.model.decoder.state_dict()
    assert all(torch.equal(after[k].cpu(), v) for k, v in before.items())
    assert next(result.model.parameters()).dtype == torch.float32  # fp32 master weights, bf16 only in autocast
    assert load_multimodal(tmp_path) is not None


def test_mllama_encoder_checkpoint_is_loaded(assets: Assets, tmp_path: Path) -> None:  # noqa: F811
    from safetensors.torch import save_file

    from mm_llama.encoders.mllama_vision import MllamaVisionEncoder, VisionConfig
    from mm_llama.train.stages import build

    vision = {"tile_size": 28, "patch_size": 14, "width": 32, "heads": 4, "mlp_dim": 64, "n_local_layers": 2,
              "n_global_layers": 1, "max_tiles": 1, "taps": [1]}
    torch.manual_seed(5)
    pretrained = MllamaVisionEncoder(VisionConfig(**{**vision, "taps": (1,)}))
    save_file({f"vision_model.{k}": v.contiguous() for k, v in pretrained.state_dict().items()}, str(tmp_path / "vit.safetensors"))
    cfg = load_recipe("tiny_vision_pretrain", mm_overrides(assets, model__encoder="mllama", model__vision=vision,
                                                           model__encoder_checkpoint=str(tmp_path / "vit.safetensors")))
    model = build(cfg).model
    assert all(torch.equal(v, pretrained.state_dict()[k]) for k, v in model.image.encoder.state_dict().items())


def test_too_many_non_finite_steps_stop_the_run(assets: Assets, tmp_path: Path) -> None:  # noqa: F811
    from mm_llama.train.nonfinite import NonFiniteLossError

    cfg = load_recipe("tiny_lm_pretrain", lm_overrides(assets, steps=6, optim__lr=1e30, optim__grad_clip=None,
                                                       schedule__warmup_steps=0, train__max_nonfinite_in_a_row=2))
    with pytest.raises(NonFiniteLossError, match="2 optimizer steps in a row"):
        run_training(cfg, tmp_path)
    records = read_metrics(tmp_path)
    assert records and records[-1]["nonfinite_steps"] >= 1

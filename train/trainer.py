"""The training loop: one code path for one CPU, one GPU and `torchrun --nproc_per_node N`.

    result = run_training(load_recipe("tiny_vision_pretrain", overrides), "runs/demo/vision", resume=False)

What a run does, in order:

1. Seeds Python / NumPy / torch with `train.seed`; sets up the process group under torchrun
   (`DistributedContext.from_env`; device `train.device`, `auto` = CUDA when available).
2. Resolves the recipe (absolute base LM path, fusion layer indices) and writes it to
   `RUN/config.yaml` — that file plus the exported weights is what loading a run needs.
3. Builds the model (the recipe's stage, `train.stages`), moves it to the device, optionally enables activation
   checkpointing (`train.activation_checkpointing`: every decoder layer, the timm backbone's blocks)
   and `torch.compile` per block (`train.compile`), FSDP2-shards the frozen LM
   (`distributed.fsdp_frozen_lm`) and wraps what trains in DDP.
4. AdamW over exactly the trainable parameters (checked) + warm-up / cosine schedule.
5. Data: `loader_for_task` for image tasks (the contrastive stage reads the caption layout), packed text
   (`data.packed_text`) for `lm`; a stream that crosses epochs and knows its position
   `{epoch, batches_in_epoch}`.
6. `resume`: from the newest checkpoint that reads completely (newer unreadable ones are named in a
   warning line and passed over), under the recipe that checkpoint was trained with (any other
   difference is refused, except the settings `train.resume_check` lets change, which are logged);
   restores trained weights, optimizer, scheduler, the non-finite counters, fast-forwards the
   data to the saved position and then restores the RNG states, so on CPU the continuation is bit
   for bit the uninterrupted run.
7. The loop: per optimizer step `optim.accumulation_steps` micro-batches; the loss of each is summed
   over its labelled tokens (samples for contrastive) and divided by the count over all micro-batches
   and ranks, so accumulation and data parallelism give the gradient of one large batch, accumulated
   in fp32 (parameters stay fp32; bf16 autocast only on CUDA). Gradient clipping, a non-finite loss or
   gradient skips the step (too many in a row stop the run), the scheduler steps every step.
   `metrics.jsonl` + TensorBoard every `logging.every` steps (loss, lr per group, grad norm,
   tokens/s, samples/s, skipped samples, non-finite steps), a progress bar with loss, throughput and
   ETA, evaluation (mean loss on `data.eval_shards`, and with `train.eval_metric_samples` N the task metric —
   CIDEr, VQA accuracy, WER, BLEU — of `mm-llama eval` on its first N samples, which leaves the training
   RNG and modes untouched: `train.task_evaluation`) every `train.eval_every` steps, checkpoints every
   `checkpoint.every` steps keeping `checkpoint.keep_last`. SIGTERM / SIGINT: checkpoint and return
   (a signal that arrives while the data loader is busy is acted on once it returns a batch; an error
   it raises ends the run). Weights holding NaN / inf are never checkpointed or exported (an error
   names them), and a run whose last step had a non-finite loss ends with an error, not an export.
8. Exports (each stage's product): `lm` → `RUN/model/` (HF layout + tokenizer files); `adapter` →
   `RUN/adapter.safetensors` (+ tokenizer files), so `load_multimodal(RUN)` works; the contrastive
   stage → `RUN/encoder.safetensors` (a timm backbone state dict); `best_rq` →
   `RUN/speech_encoder.safetensors` (the Conformer, which `model.speech.encoder_checkpoint` loads).
"""

from __future__ import annotations

import contextlib
import math
import random
import sys
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from mm_llama.train.checkpointing import (
    Checkpoint, CheckpointingError, capture_rng, checkpoint_name, latest_checkpoint, load_resumable_checkpoint,
    restore_rng, restore_training_state, save_checkpoint, trainable_state_dict,
)
from mm_llama.train.model_options import compile_blocks, enable_activation_checkpointing
from mm_llama.train.distributed import DistributedContext, all_reduce_mean, any_true, barrier, shard_frozen_lm, wrap_trainable
from mm_llama.train.metrics import MetricsLogger, ProgressBar, RunClock, Throughput, peak_memory, progress_line
from mm_llama.train.nonfinite import NonFiniteGuard, NonFiniteLossError, check_finite_weights, guarded_step
from mm_llama.train.optim import build_optimizer, build_scheduler, current_lrs, unwrap
from mm_llama.train.recipe import RecipeConfig, RecipeError, recipe_to_dict, save_config
from mm_llama.train.resume_check import recipe_changes_on_resume
from mm_llama.train.run_dir import prepare_run_dir
from mm_llama.train.signals import StopOnSignal
from mm_llama.train.speech_ctc import SpeechCtc, speech_ctc_from
from mm_llama.train.sources import EpochSource
from mm_llama.train.stages import STAGES, Built, build, resolve_recipe, stage_for
from mm_llama.train.task_evaluation import MetricEvaluation
from mm_llama.train.tasks import Task, task_for

StepCallback = Callable[[int, dict[str, Any]], None]


class TrainingError(ValueError):
    """A run that cannot start or continue as asked (e.g. an existing run without --resume)."""


@dataclass
class TrainResult:
    """What `run_training` returns.

    run_dir: the run directory. steps: optimizer steps done (the global step). final_loss: the last
    step's loss (None if no step ran in this call). stopped: a signal ended the run early (a
    checkpoint was written; continue with `resume=True`). export: the exported model (`model/`,
    `adapter.safetensors` or `encoder.safetensors`; None when stopped). model: the trained model
    (unwrapped) in memory. last_eval: the last evaluation's metrics. history: per-step losses of this call.
    """

    run_dir: Path
    steps: int
    final_loss: float | None
    stopped: bool
    export: Path | None
    model: nn.Module
    nonfinite_steps: int = 0
    last_eval: dict[str, float] = field(default_factory=dict)
    history: list[float] = field(default_factory=list)


# ------------------------------------------------------------------------------------------ data
class DataStream:
    """Batches across epochs with a resumable position: the next batch drawn is batch
    `batches_in_epoch` of epoch `epoch`."""

    def __init__(self, source: EpochSource, epoch: int = 0, batches_in_epoch: int = 0) -> None:
        self.source = source
        self.epoch = int(epoch)
        self.batches_in_epoch = int(batches_in_epoch)
        self._it: Iterator[Any] | None = None

    @property
    def position(self) -> dict[str, int]:
        return {"epoch": self.epoch, "batches_in_epoch": self.batches_in_epoch}

    def open(self) -> None:
        """Start (or fast-forward into) the current epoch now rather than at the next batch."""
        self._it = self.source.iter_epoch(self.epoch, self.batches_in_epoch)

    def __iter__(self) -> DataStream:
        return self

    def __next__(self) -> Any:
        for _ in range(2):
            if self._it is None:
                self.open()
            assert self._it is not None
            try:
                batch = next(self._it)
            except StopIteration:
                if self.batches_in_epoch == 0:
                    raise TrainingError(f"epoch {self.epoch} of the training data yields no batch; check data.shards "
                                        "(and, in distributed runs, that every rank gets shards)") from None
                self.epoch, self.batches_in_epoch, self._it = self.epoch + 1, 0, None
                continue
            self.batches_in_epoch += 1
            return batch
        raise TrainingError(f"epoch {self.epoch} of the training data yields no batch")


def make_source(cfg: RecipeConfig, built: Built, shards: list[str], *, rank: int, world_size: int,
                evaluation: bool = False) -> EpochSource:
    """The training (or evaluation: in order, every sample, the same on every rank) data of a recipe."""
    return STAGES[built.kind].source(cfg, built, shards, rank=rank, world_size=world_size, evaluation=evaluation)


# ------------------------------------------------------------------------------------------ helpers
def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)


def _global_sum(values: list[float]) -> list[float]:
    """Element-wise sum over ranks (float64)."""
    if not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
        return [float(v) for v in values]
    out = all_reduce_mean(torch.tensor(values, dtype=torch.float64))
    return [float(v) * dist.get_world_size() for v in out.tolist()]


def _gather_rng(ctx: DistributedContext) -> dict[str, Any]:
    """This process' RNG states; in distributed runs every rank's, keyed `rank0`, `rank1`, …"""
    state = capture_rng()
    if not ctx.is_distributed:
        return state
    states: list[Any] = [None] * ctx.world_size
    dist.all_gather_object(states, state)
    return {f"rank{r}": s for r, s in enumerate(states)}


def _own_rng(rng: dict[str, Any], rank: int) -> dict[str, Any]:
    if "torch" in rng:
        return rng
    return rng.get(f"rank{rank}", rng.get("rank0", {}))


class _Window:
    """Sums over the steps between two log lines."""

    def __init__(self) -> None:
        self.loss, self.finite, self.steps, self.tokens, self.samples = 0.0, 0, 0, 0, 0
        self.metrics: dict[str, float] = {}

    def add(self, step: dict[str, Any]) -> None:
        self.steps += 1
        if math.isfinite(step["loss"]):
            self.loss += step["loss"]
            self.finite += 1
        self.tokens += step["tokens"]
        self.samples += step["samples"]
        for key, value in step["metrics"].items():
            self.metrics[key] = self.metrics.get(key, 0.0) + value

    def mean_loss(self) -> float:
        return self.loss / self.finite if self.finite else math.nan

    def mean_metrics(self) -> dict[str, float]:
        return {k: v / max(self.steps, 1) for k, v in self.metrics.items()}


# ------------------------------------------------------------------------------------------ trainer
class Trainer:
    """One training run (see the module docstring); `run()` does it. Use `run_training`."""

    def __init__(self, cfg: RecipeConfig, run_dir: str | Path, ctx: DistributedContext, *, resume: bool = False,
                 on_step_end: StepCallback | None = None) -> None:
        self.cfg = cfg
        self.run_dir = Path(run_dir)
        self.ctx = ctx
        self.resume = resume
        self.on_step_end = on_step_end
        self.device = ctx.device
        self.stage = stage_for(cfg)

    # ---------------------------------------------------------------- set-up
    def _print(self, message: str) -> None:
        if self.ctx.is_main:
            print(message, file=sys.stderr, flush=True)

    def _existing_checkpoint(self) -> Path | None:
        latest = latest_checkpoint(self.run_dir, clean=self.ctx.is_main) if self.ctx.is_main else None
        barrier()
        if not self.ctx.is_main:
            latest = latest_checkpoint(self.run_dir, clean=False)
        if latest is not None and not self.resume:
            raise TrainingError(f"{self.run_dir} already holds training checkpoints (newest {latest.name}); pass --resume "
                                "to continue that run, or choose a new run directory with --out")
        return latest

    def _speech_ctc(self) -> SpeechCtc | None:
        """`model.speech.ctc` of a speech stage, its blank looked up in the stage's tokenizer."""
        fields = self.cfg.model.speech.get("ctc") if self.cfg.model.kind == "multimodal" else None
        if fields is None or self.built.tokenizer is None:
            return None
        try:
            return speech_ctc_from(fields, self.built.tokenizer)
        except ValueError as err:
            raise RecipeError(str(err)) from err

    def _resume_checkpoint(self) -> Checkpoint | None:
        """The checkpoint to continue from: the newest one that reads completely. Newer unreadable ones
        are passed over with a warning line each (naming the file and why)."""
        if self._existing_checkpoint() is None:
            return None
        ckpt, corrupt = load_resumable_checkpoint(self.run_dir, map_location=self.device)
        assert ckpt is not None  # there are checkpoints; none readable raises NoIntactCheckpointError
        for path, why in corrupt:
            self._print(f"warning: checkpoint {path} cannot be resumed ({why}); falling back to the older "
                        f"{ckpt.path.name}")
        return ckpt

    def _check_recipe(self, ckpt: Checkpoint) -> None:
        """Refuse a resume under a recipe that differs from the checkpoint's (except settings that are safe
        to change: those are applied and logged)."""
        changes = recipe_changes_on_resume(recipe_to_dict(self.cfg), ckpt, self.run_dir)
        if changes.refused:
            listed = ", ".join(changes.refused)
            raise TrainingError(
                f"--resume: the recipe differs from the one {ckpt.path} was trained with: {listed}. A resumed run "
                "continues with the checkpoint's settings (its optimizer and schedule state hold them), so it cannot "
                f"take these changes: rerun without them to continue the run, or start a new run with another --out "
                f"to train with them"
            )
        if changes.applied:
            self._print(f"--resume: applying changed settings: {', '.join(changes.applied)}")
        if changes.unchecked:
            self._print(f"warning: {changes.unchecked}")

    def setup(self) -> None:
        cfg = self.cfg
        seed_everything(cfg.train.seed)
        if not cfg.data.shards:
            raise RecipeError("data.shards is empty: name the training shards (paths, globs, brace patterns or directories)")
        self.cfg = cfg = resolve_recipe(cfg)
        if self.ctx.is_main:
            prepare_run_dir(self.run_dir)
        barrier()
        ckpt = self._resume_checkpoint()
        self.latest = ckpt.path if ckpt is not None else None
        if ckpt is not None:
            self._check_recipe(ckpt)  # before config.yaml is rewritten: it must describe what runs
        if self.ctx.is_main:
            save_config(cfg, self.run_dir)
        self.built = build(cfg)
        model = self.built.model.to(self.device)
        self.model = model
        if cfg.train.activation_checkpointing:
            enable_activation_checkpointing(model)
        if cfg.train.compile:
            compile_blocks(model)
        if cfg.distributed.fsdp_frozen_lm and self.ctx.is_distributed:
            if self.stage.frozen_lm is None:
                raise RecipeError(f"distributed.fsdp_frozen_lm shards a frozen LM, but the {self.stage.name} stage has "
                                  "none (it trains its LM, or has no LM); set distributed.fsdp_frozen_lm=false")
            shard_frozen_lm(self.stage.frozen_lm(model), self.ctx)
        self.wrapped = wrap_trainable(model, self.ctx, find_unused_parameters=cfg.distributed.find_unused_parameters)
        self.optimizer = build_optimizer(model, cfg.optim)
        self.scheduler = build_scheduler(self.optimizer, cfg.schedule, cfg.total_steps)
        self.trainable = [p for p in model.parameters() if p.requires_grad]
        self.guard = NonFiniteGuard(cfg.train.max_nonfinite_in_a_row)
        self.task: Task = task_for(cfg.data.task, self.device, cfg.train.precision, speech_ctc=self._speech_ctc())
        source = make_source(cfg, self.built, list(cfg.data.shards), rank=self.ctx.rank, world_size=self.ctx.world_size)
        self.eval_source: EpochSource | None = None
        if cfg.train.eval_every and cfg.data.eval_shards:
            self.eval_source = make_source(cfg, self.built, list(cfg.data.eval_shards), rank=0, world_size=1,
                                           evaluation=True)
        self.metric_eval: MetricEvaluation | None = None
        if self.eval_source is not None and cfg.train.eval_metric_samples > 0:
            assert self.built.tokenizer is not None  # every METRIC_TASKS task is prompted
            self.metric_eval = MetricEvaluation(cfg, self.built.tokenizer, self.run_dir, write=self.ctx.is_main)
        self.step = 0
        position = {"epoch": 0, "batches_in_epoch": 0}
        rng = None
        if ckpt is not None:
            try:
                restore_training_state(ckpt, model, self.optimizer, self.scheduler, rng=False)
            except CheckpointingError as err:
                raise TrainingError(f"cannot resume from {ckpt.path}: {err}") from err
            self.step = ckpt.step
            position = {"epoch": 0, "batches_in_epoch": 0, **ckpt.data_position}
            self.guard.load_state_dict(ckpt.extra.get("guard", {}))
            saved_world = ckpt.extra.get("world_size", self.ctx.world_size)
            if saved_world != self.ctx.world_size:
                warnings.warn(f"{ckpt.path} was written by {saved_world} rank(s), this run has {self.ctx.world_size}: "
                              "the data continues from the same epoch and batch index, but not exactly the same samples",
                              stacklevel=2)
            rng = ckpt.rng
            self._print(f"resuming {self.run_dir} from {ckpt.path.name} (step {self.step}, epoch {position['epoch']}, "
                        f"batch {position['batches_in_epoch']})")
        elif self.resume:
            self._print(f"--resume: {self.run_dir} has no checkpoint yet; starting from step 0")
        self.stream = DataStream(source, position["epoch"], position["batches_in_epoch"])
        if rng is not None:
            self.stream.open()  # fast-forward first: opening an epoch may draw from the RNG
            restore_rng(_own_rng(rng, self.ctx.rank))

    # ---------------------------------------------------------------- one step
    def _micro_context(self, last: bool) -> contextlib.AbstractContextManager[Any]:
        if not last and isinstance(self.wrapped, nn.parallel.DistributedDataParallel):
            return self.wrapped.no_sync()
        return contextlib.nullcontext()

    def train_step(self) -> dict[str, Any]:
        """One optimizer step over `optim.accumulation_steps` micro-batches; returns its numbers."""
        host = [next(self.stream) for _ in range(self.cfg.optim.accumulation_steps)]
        local_units = sum(self.task.units(b) for b in host)  # counted on the CPU copy: no device sync
        micro = [self.task.to_device(b) for b in host]
        (global_units,) = _global_sum([local_units])
        scale = self.ctx.world_size / max(global_units, 1.0)
        loss_sum = torch.zeros((), dtype=torch.float64, device=self.device)
        tokens = samples = 0
        extra: dict[str, float] = {}
        for i, batch in enumerate(micro):
            with self._micro_context(last=i == len(micro) - 1):
                result = self.task(self.wrapped, batch)
                (result.loss_sum * scale).backward()
            loss_sum += result.loss_sum.detach().to(torch.float64)
            tokens += result.tokens
            samples += result.samples
            for key, value in result.metrics.items():
                extra[key] = extra.get(key, 0.0) + value / len(micro)
        (total_loss,) = _global_sum([float(loss_sum)])
        loss = total_loss / global_units if global_units > 0 else math.nan
        outcome = guarded_step(self.optimizer, self.trainable, loss=loss, step=self.step, guard=self.guard,
                               grad_clip=self.cfg.optim.grad_clip)
        self.scheduler.step()
        self.step += 1
        return {"loss": loss, "grad_norm": outcome.grad_norm, "applied": outcome.applied, "tokens": tokens,
                "samples": samples, "metrics": extra}

    # ---------------------------------------------------------------- evaluation
    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        """Mean loss over `data.eval_shards` (every rank evaluates the same batches; at most `train.eval_batches`)."""
        assert self.eval_source is not None
        model = self.model
        model.eval()
        loss_sum, units, n = 0.0, 0, 0
        extra: dict[str, float] = {}
        try:
            for batch in self.eval_source.iter_epoch(0, 0):
                if self.cfg.train.eval_batches is not None and n >= self.cfg.train.eval_batches:
                    break
                result = self.task(model, self.task.to_device(batch))
                loss_sum += float(result.loss_sum)
                units += result.units
                n += 1
                for key, value in result.metrics.items():
                    extra[key] = extra.get(key, 0.0) + value
        finally:
            model.train()
        out = {"loss": loss_sum / units if units else math.nan, "batches": float(n)}
        out.update({k: v / max(n, 1) for k, v in extra.items()})
        if self.metric_eval is not None:
            out.update(self._task_metrics())
        return out

    def _task_metrics(self) -> dict[str, float]:
        """`train.eval_metric_samples`: the task metric of the model now (every rank evaluates the same samples,
        as for the loss, so that a sharded LM runs its collectives on all of them). Data that gives no usable
        sample is reported in a line, not raised: it should not end a long run."""
        assert self.metric_eval is not None
        try:
            return self.metric_eval(self.model, self.step)
        except ValueError as err:
            self._print(f"warning: step {self.step}: no {self.metric_eval.task} metric on data.eval_shards "
                        f"({err}); check the shards' layout against data.task")
            return {}

    def _eval_line(self, metrics: dict[str, float]) -> str:
        """`step N: eval loss L` and, when computed, the task's headline metric."""
        line = f"step {self.step}: eval loss {metrics['loss']:.4f}"
        if self.metric_eval is not None and self.metric_eval.headline in metrics:
            name = self.metric_eval.headline
            line += f", {name} {metrics[name]:.4f} ({int(metrics['metric_samples'])} samples)"
        return line

    # ---------------------------------------------------------------- checkpoints and export
    def _nan_advice(self) -> str:
        newest = latest_checkpoint(self.run_dir, clean=False)
        kept = (f"the newest checkpoint, {newest.name}, keeps the last finite weights" if newest
                else "no checkpoint was kept")
        return (f"{kept}. The updates blew the weights up: lower optim.lr (now {self.cfg.optim.lr}) or clip gradients "
                "(optim.grad_clip), then start a new run with another --out")

    def save(self) -> Path | None:
        """Checkpoint the run; weights that are not finite are refused (every rank checks its own replica,
        so all of them raise together) and the older checkpoints are kept."""
        trainable = trainable_state_dict(self.model)
        check_finite_weights(trainable, f"the trained weights at step {self.step}", self._nan_advice())
        rng = _gather_rng(self.ctx)
        path = None
        if self.ctx.is_main:
            path = save_checkpoint(
                self.run_dir, self.step, trainable_state=trainable, optimizer=self.optimizer,
                scheduler=self.scheduler, rng=rng, data_position=self.stream.position,
                extra={"guard": self.guard.state_dict(), "world_size": self.ctx.world_size,
                       "recipe": self.cfg.name, "config": recipe_to_dict(self.cfg)},
                keep_last=self.cfg.checkpoint.keep_last,
            )
        barrier()
        return path

    def export(self) -> Path | None:
        """Write the stage's product (see the module docstring); main rank only. Tensors that are not
        finite are an error naming them (checked on every rank), and nothing is written."""
        model = unwrap(self.model)
        check_finite_weights(self.stage.export_state(model), f"the weights to export to {self.run_dir / self.stage.product}",
                             self._nan_advice())
        export = self.stage.export(model, self.run_dir, self.built, self.step) if self.ctx.is_main else None
        barrier()
        return export

    def _check_final_steps(self, history: list[float]) -> None:
        """A run that ends on skipped (non-finite) steps has not succeeded: say so instead of exporting."""
        if not history or self.guard.in_a_row == 0:
            return
        last = (f"the last finite loss was {self.guard.last_finite_loss:.6g} at step {self.guard.last_finite_step}"
                if self.guard.last_finite_loss is not None else "no step had a finite loss")
        raise NonFiniteLossError(
            f"the run ended at step {self.step} after {self.guard.in_a_row} step(s) in a row with a non-finite loss or "
            f"gradient (last loss {history[-1]}; those updates were skipped); {last}. Nothing was exported; the "
            f"checkpoint {checkpoint_name(self.step)} holds the weights. Lower optim.lr, check the data, or use "
            "train.precision=fp32, then start a new run with another --out"
        )

    # ---------------------------------------------------------------- the loop
    def run(self) -> TrainResult:
        self.setup()
        cfg, ctx = self.cfg, self.ctx
        total = cfg.train.steps
        logger = MetricsLogger(self.run_dir, tensorboard=cfg.logging.tensorboard, resume_step=self.step,
                               enabled=ctx.is_main)
        bar = ProgressBar(total, initial=min(self.step, total), enabled=ctx.is_main and cfg.logging.progress,
                          desc=cfg.name or self.stage.name)
        throughput = Throughput()
        clock = RunClock(self.step, total)
        window = _Window()
        rates: dict[str, float] = {}
        history: list[float] = []
        last_eval: dict[str, float] = {}
        stopped = False
        saved_at = None
        last: dict[str, Any] = {}
        try:
            with StopOnSignal() as stop:
                while self.step < total:
                    last = self.train_step()
                    history.append(last["loss"])
                    window.add(last)
                    record: dict[str, Any] = {}
                    if self.step % cfg.logging.every == 0 or self.step == total:
                        tokens, samples = _global_sum([window.tokens, window.samples])
                        throughput.add(int(samples), int(tokens))
                        rates = throughput.rates()
                        record = {
                            "loss": window.mean_loss(), "lr": current_lrs(self.optimizer),
                            "grad_norm": last["grad_norm"], **rates,
                            "skipped_samples": self.stream.source.skipped_samples,
                            "nonfinite_steps": self.guard.total, "epoch": self.stream.epoch, **window.mean_metrics(),
                            **clock.readings(self.step), **peak_memory(ctx.device),
                        }
                        logger.log(self.step, record)
                        if not cfg.logging.progress:
                            self._print(progress_line(self.step, total, record))
                        window = _Window()
                    bar.update(1, loss=last["loss"], tokens_per_s=rates.get("tokens_per_s"),
                               samples_per_s=rates.get("samples_per_s"))
                    if self.eval_source is not None and (self.step % cfg.train.eval_every == 0 or self.step == total):
                        last_eval = self.evaluate()
                        logger.log(self.step, {"eval": last_eval})
                        bar.write(self._eval_line(last_eval))
                    if self.step % cfg.checkpoint.every == 0:
                        self.save()
                        saved_at = self.step
                    if self.on_step_end is not None:
                        self.on_step_end(self.step, {**last, **record})
                    if any_true(stop.stop_requested):
                        stopped = True
                        why = stop.received.name if stop.received is not None else "a stop request"
                        if saved_at != self.step:
                            self.save()
                            saved_at = self.step
                        bar.write(f"stopped by {why} at step {self.step}; checkpoint written — continue with --resume")
                        break
            if not stopped and saved_at != self.step:
                self.save()
            if not stopped:
                self._check_final_steps(history)
            export = None if stopped else self.export()
        finally:
            bar.close()
            logger.close()
        final = history[-1] if history else None  # the last step's own loss (finite unless stopped by a signal)
        return TrainResult(self.run_dir, self.step, final, stopped, export, unwrap(self.model),
                           nonfinite_steps=self.guard.total, last_eval=last_eval, history=history)


def run_training(cfg: RecipeConfig, run_dir: str | Path, *, resume: bool = False,
                 on_step_end: StepCallback | None = None) -> TrainResult:
    """Run (or with `resume`, continue) the recipe `cfg` in `run_dir`; see the module docstring.

    `on_step_end(step, info)` is called on every rank after each optimizer step with the step's loss,
    grad norm and (on logging steps) the logged record. Under torchrun the process group is set up
    here and torn down at the end.
    """
    ctx = DistributedContext.from_env(cfg.train.device)
    try:
        return Trainer(cfg, run_dir, ctx, resume=resume, on_step_end=on_step_end).run()
    finally:
        ctx.close()


__all__ = [
    "DataStream", "TrainResult", "Trainer", "TrainingError", "make_source", "run_training", "seed_everything",
]

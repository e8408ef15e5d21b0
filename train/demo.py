"""The built-in default (`mm-llama demo`): synthetic data → tokenizer → one tiny frozen LM → per modality
its encoder and adapter stages → held-out evaluation, each with its control → one report, all through the
library's public pieces.

    result = run_demo(DemoSettings(), "runs/demo")                      # image, video and speech
    result = run_demo(DemoSettings.quick(), "/tmp/smoke", modalities=["speech"])

Stages, in order (those a modality does not need are left out; shared ones run once):

=================  ==========================  ==========================================================
stage              for                         what
=================  ==========================  ==========================================================
``data-text``      all                         text documents (chat form) + ASR exchanges of the speech
                                               training transcripts (`demo_data.write_asr_text`)
``tokenizer``      all                         BPE on the text (`demo_data.tokenizer_documents`)
``lm``             all                         ``tiny_lm_pretrain`` on the text shards (then frozen)
``data-image``     image, video                shapes train + test, objects train (for the encoder)
``encoder``        image, video                ``tiny_image_encoder_pretrain`` (contrastive ViT) on objects
adapter stages     image, video                ``tiny_vision_pretrain`` runs (`AdapterStage`): ``shape``
                                               (shape questions), then ``vision`` (conversations)
``eval-vqa`` …     image                       VQA and captions, each also with blank images
``data-video``     video                       moving-shapes train + test
``video``          video                       ``tiny_video_pretrain`` from the last adapter stage
``eval-video_qa``  video                       clip questions, also with frozen frames (``-blank``)
``data-speech``    speech                      espeak utterances train + test (held-out voices), silent
                                               training clips (`demo_data.write_silence`)
``speech-encoder`` speech (if speech_pretrain) ``tiny_speech_bestrq``
``speech``         speech                      ``tiny_speech_sft`` (Conformer + adapter, LM frozen)
``eval-asr``       speech                      ASR WER, also with silence (``-blank``)
=================  ==========================  ==========================================================

The video stage borrows the image run's encoder and projector (frozen), so ``video`` needs the image
training stages (not their evaluation). Every number lives in `DemoSettings`. Folder layout of ``OUT``:
``data/`` (shards), ``tokenizer/``, one folder per training stage, ``eval/eval-TASK[-blank].json`` (the names
`mm-llama eval` gives), ``metrics.json``, ``report.html``, ``loss-STAGE.png`` and ``demo-state.json``
(settings and finished stages with their wall times, for ``resume``).

``resume=True`` skips the stages whose outputs are complete, continues an interrupted training stage
from its newest checkpoint (`run_training(resume=True)`) and always rewrites the report.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mm_llama.atomic_file import atomic_write
from mm_llama.train.demo_data import (
    ASR_TEXT_LAYOUT, SILENCE_LAYOUT, SPECIAL_TOKEN_TEXT, available_cores, synth_shards, tokenizer_documents,
    train_shards, write_asr_text, write_kind, write_silence,
)
from mm_llama.train.demo_settings import (
    DATA_DIR, ENCODER_RUN, EVAL_DIR, LM_RUN, MODALITIES, SPEECH_ENCODER_RUN, SPEECH_RUN, TOKENIZER_DIR, VIDEO_RUN,
    AdapterStage, DemoError, DemoSettings, Overrides, check_modalities, override_args,
)
from mm_llama.train.report import (
    LOSS_PLOT_GLOB, METRICS_JSON, REPORT_FILE, ImageEvals, SpeechEvals, VideoEvals, format_table, write_report,
)

__all__ = ["MODALITIES", "AdapterStage", "DemoError", "DemoResult", "DemoSettings", "DemoStopped",
           "SPECIAL_TOKEN_TEXT", "available_cores", "override_args", "run_demo"]

STATE_FILE = "demo-state.json"


class DemoStopped(RuntimeError):
    """A training stage was stopped by a signal; its checkpoint is written (continue with ``resume``)."""


@dataclass
class DemoResult:
    """What `run_demo` returns: the folder, the metrics (metrics.json's content), the report, the table."""

    out: Path
    metrics: dict[str, Any]
    report: Path
    metrics_file: Path
    table: str
    stage_seconds: dict[str, float]


@dataclass(frozen=True)
class _Stage:
    """One step of the demo: ``work`` runs it (returns a note for its end line); it counts as done when
    the state file lists it and every path of ``outputs`` exists."""

    name: str
    what: str
    outputs: tuple[Path, ...]
    work: Callable[[], str | None]


# ------------------------------------------------------------------------------------------ state
class _State:
    """``OUT/demo-state.json``: the settings and each finished stage's wall time."""

    def __init__(self, path: Path, settings: dict[str, Any], stages: dict[str, float] | None = None) -> None:
        self.path, self.settings, self.stages = path, settings, dict(stages or {})

    @classmethod
    def read(cls, path: Path) -> _State | None:
        if not path.is_file():
            return None
        try:
            data = json.loads(path.read_text())
            return cls(path, data["settings"], {k: float(v) for k, v in data["stages"].items()})
        except (ValueError, KeyError, TypeError, AttributeError) as err:
            raise DemoError(f"cannot read {path}: {err}; start over with --overwrite, or choose another --out") from err

    def write(self) -> None:
        atomic_write(self.path, json.dumps({"settings": self.settings, "stages": self.stages}, indent=1) + "\n")

    def done(self, name: str, seconds: float) -> None:
        self.stages[name] = seconds
        self.write()


def _differences(old: Any, new: Any, prefix: str = "") -> list[str]:
    if isinstance(old, dict) and isinstance(new, dict):
        out = []
        for key in sorted(set(old) | set(new), key=str):
            out += _differences(old.get(key), new.get(key), f"{prefix}.{key}" if prefix else str(key))
        return out
    return [] if old == new else [f"{prefix or 'settings'}: {old!r} -> {new!r}"]


def _run_folders(adapter_names: Iterable[str]) -> list[str]:
    return [LM_RUN, ENCODER_RUN, *adapter_names, VIDEO_RUN, SPEECH_ENCODER_RUN, SPEECH_RUN]


def _demo_entries(out: Path, adapter_names: list[str]) -> list[Path]:
    """Everything the demo writes directly under ``out`` (what --overwrite removes)."""
    names = [DATA_DIR, TOKENIZER_DIR, *_run_folders(adapter_names), EVAL_DIR, METRICS_JSON, REPORT_FILE, STATE_FILE]
    paths = [out / n for n in dict.fromkeys(names)]
    return [p for p in paths if p.exists()] + sorted(out.glob(LOSS_PLOT_GLOB))


# ------------------------------------------------------------------------------------------ the run
class _Demo:
    """One demo run (see the module docstring); `run()` does it."""

    def __init__(self, settings: DemoSettings, out: Path, modalities: tuple[str, ...], *, resume: bool, device: str,
                 progress: bool, log: Callable[[str], None]) -> None:
        self.settings, self.out, self.modalities = settings, out, modalities
        self.resume, self.device, self.progress, self.log = resume, device, progress, log
        self.data = out / DATA_DIR
        self.state = _State(out / STATE_FILE, settings.to_dict())
        self._models: dict[str, tuple[Any, Any]] = {}

    # ---------------------------------------------------------------- helpers
    def run_stage(self, stage: _Stage) -> None:
        """Run ``stage`` (one line at the start, one with the wall time at the end), or skip it when resuming
        and it finished before and its outputs exist."""
        if self.resume and stage.name in self.state.stages and all(p.exists() for p in stage.outputs):
            self.log(f"[demo] {stage.name}: already complete ({self.state.stages[stage.name]:.1f} s), skipped")
            return
        self.log(f"[demo] {stage.name}: {stage.what}")
        start = time.perf_counter()
        note = stage.work()
        seconds = time.perf_counter() - start
        self.state.done(stage.name, seconds)
        self.log(f"[demo] {stage.name}: done in {seconds:.1f} s{f' ({note})' if note else ''}")

    def shards(self, layout: str, split: str, kind: str | None = None) -> list[str]:
        try:
            return synth_shards(self.data, layout, split, kind)
        except FileNotFoundError as err:
            raise DemoError(f"{err}; rerun with --resume or --overwrite") from err

    def train(self, name: str, recipe: str, demo_overrides: Overrides, overrides: Overrides) -> str:
        """One training stage: ``recipe`` + the demo's overrides (paths, task) + the settings' ``overrides``
        (+ device and progress) through `load_recipe` / `run_training`, in ``OUT/<name>``."""
        from mm_llama.train.recipe import load_recipe
        from mm_llama.train.trainer import run_training

        final: Overrides = {**demo_overrides, **overrides, "train.device": self.device}
        if not self.progress:
            final["logging.progress"] = False
        cfg = load_recipe(recipe, override_args(final))
        run_dir = self.out / name
        result = run_training(cfg, run_dir, resume=self.resume and run_dir.exists())
        if result.stopped:
            raise DemoStopped(f"stage {name} stopped at step {result.steps}; its checkpoint is in {result.run_dir}; "
                              f"continue with: mm-llama demo --out {self.out} --resume")
        loss = f"{result.final_loss:.4f}" if result.final_loss is not None else "n/a"
        return f"{result.steps} steps, final loss {loss}"

    def model(self, run: str) -> tuple[Any, Any]:
        """The model and tokenizer of run folder ``run`` (loaded once)."""
        if run not in self._models:
            from mm_llama.devices import pick_device
            from mm_llama.image_chat import load_image_model

            device, dtype = pick_device(self.device)
            self._models[run] = load_image_model(self.out / run, dtype=dtype, device=device)
        return self._models[run]

    def evaluate(self, run: str, task: str, shards: list[str], limit: int | None, blank: bool, target: Path) -> str:
        from mm_llama.train.evaluation import write_result
        from mm_llama.train.task_evaluation import evaluate_task

        model, tokenizer = self.model(run)
        result = evaluate_task(model, tokenizer, shards, task, model_dir=self.out / run,
                               batch_size=self.settings.eval_batch_size, max_samples=limit, blank=blank,
                               progress=self.progress)
        write_result(result, target, settings={"model": str(self.out / run)})
        main = next(iter(result.metrics))
        return f"{result.counts['samples']} samples, {main} {result.metrics[main]:.4f}"

    def eval_stages(self, run: str, task: str, layout: str, limit: int | None, control: str) -> list[_Stage]:
        """The evaluation of ``run`` on the test split of ``layout``, and again with the task's control."""
        stages = []
        for blank in (False, True):
            target = self.eval_path(task, blank)
            what = f"evaluating {task} on the test split{f' with {control}' if blank else ''}"
            stages.append(_Stage(target.stem, what, (target,), lambda blank=blank, target=target: self.evaluate(
                run, task, self.shards(layout, "test"), limit, blank, target)))
        return stages

    def eval_path(self, task: str, blank: bool = False) -> Path:
        """Where the evaluation of ``task`` (``blank``: with its control) goes: the name `mm-llama eval` gives."""
        return self.out / EVAL_DIR / f"eval-{task}{'-blank' if blank else ''}.json"

    # ---------------------------------------------------------------- data and shared stages
    def write(self, kind: str, splits: Sequence[tuple[str, int]], **options: Any) -> str:
        s = self.settings
        return "; ".join(write_kind(self.data, kind, split, n, seed=s.seed, samples_per_shard=s.samples_per_shard,
                                    progress=self.progress, **options) for split, n in splits)

    def write_text(self) -> str:
        s = self.settings
        text = self.write("text", [("train", s.text_documents)], chat=True)
        asr = write_asr_text(self.data, s.speech_train_utterances, seed=s.seed, samples_per_shard=s.samples_per_shard,
                             copies=s.asr_text_copies, silent=s.speech_silent_clips)
        return f"{text}; {asr}"

    def lm_text_shards(self) -> list[str]:
        """What the tokenizer and the LM read: the chat documents and the ASR exchanges."""
        return self.shards("text", "train") + train_shards(self.data, ASR_TEXT_LAYOUT)

    def train_tokenizer(self) -> str:
        from mm_llama.data.synth.text import corpus_path
        from mm_llama.tokenizer import Tokenizer
        from mm_llama.tokenizer_training import train_llama3_tokenizer

        documents = tokenizer_documents(self.lm_text_shards(), corpus_path(self.data, "train"))
        target = train_llama3_tokenizer(documents, self.settings.vocab_size, self.out / TOKENIZER_DIR, min_frequency=1)
        return f"{len(documents)} documents, vocabulary {Tokenizer.from_dir(target).vocab_size}"

    def shared_stages(self) -> list[_Stage]:
        s, out, tok = self.settings, self.out, self.out / TOKENIZER_DIR
        return [
            _Stage("data-text", f"writing text documents and ASR exchanges to {self.data}",
                   (self.data / "synth-text-train.json", self.data / ASR_TEXT_LAYOUT / "train-000000.tar"),
                   self.write_text),
            _Stage(TOKENIZER_DIR, f"training a {s.vocab_size}-token BPE tokenizer",
                   (tok / "tokenizer.json", tok / "tokenizer.model"), self.train_tokenizer),
            _Stage(LM_RUN, "training the tiny LM (tiny_lm_pretrain) on chat-formatted text",
                   (out / LM_RUN / "model" / "config.json",),
                   lambda: self.train(LM_RUN, "tiny_lm_pretrain", {
                       "data.shards": self.lm_text_shards(),
                       "data.tokenizer": str(tok), "data.options.allow_special": True}, s.lm)),
        ]

    # ---------------------------------------------------------------- image
    def image_training_stages(self) -> list[_Stage]:
        s, out = self.settings, self.out
        square = {"square": True} if s.square_images else {}
        stages = [
            _Stage("data-image", f"writing shapes and objects images to {self.data}",
                   (self.data / "synth-shapes-train.json", self.data / "synth-shapes-test.json",
                    self.data / "synth-objects-train.json"),
                   lambda: "; ".join([self.write("shapes", [("train", s.train_images), ("test", s.test_images)],
                                                 **square),
                                      "objects: " + self.write("objects", [("train", s.encoder_images)])])),
            _Stage(ENCODER_RUN, "contrastive ViT pretraining on objects captions (tiny_image_encoder_pretrain)",
                   (out / ENCODER_RUN / "encoder.safetensors",),
                   lambda: self.train(ENCODER_RUN, "tiny_image_encoder_pretrain", {
                       **s.vision, "model.base_lm": str(out / LM_RUN),
                       "data.shards": self.shards("image-caption", "train", "objects")}, s.encoder)),
        ]
        for stage in s.adapter_stages:
            stages.append(_Stage(stage.name, f"training the image adapter ({stage.recipe}, task {stage.task})",
                                 (out / stage.name / "adapter.safetensors",),
                                 lambda stage=stage: self.train(stage.name, stage.recipe, self.adapter_paths(stage),
                                                                stage.overrides)))
        return stages

    def adapter_paths(self, stage: AdapterStage) -> Overrides:
        out = self.out
        paths: Overrides = {**self.settings.vision, "model.base_lm": str(out / LM_RUN),
                            "model.encoder_checkpoint": str(out / ENCODER_RUN),
                            "data.task": stage.task,
                            "data.shards": [shard for layout in stage.train_layouts()
                                            for shard in self.shards(layout, "train")]}
        if stage.init_from is not None:
            paths["model.init_from"] = str(out / stage.init_from)
        return paths

    def image_eval_stages(self) -> list[_Stage]:
        s = self.settings
        run = s.adapter_stages[-1].name
        return (self.eval_stages(run, "vqa", "image-qa", s.eval_vqa_samples, "blank images")
                + self.eval_stages(run, "caption", "image-caption", s.eval_caption_samples, "blank images"))

    # ---------------------------------------------------------------- video
    def video_stages(self) -> list[_Stage]:
        s, out = self.settings, self.out
        return [
            _Stage("data-video", f"writing moving-shapes clips to {self.data}",
                   (self.data / "synth-moving-shapes-train.json", self.data / "synth-moving-shapes-test.json"),
                   lambda: self.write("moving-shapes", [("train", s.video_train_clips), ("test", s.video_test_clips)])),
            _Stage(VIDEO_RUN, "training the video adapter (tiny_video_pretrain; the image run frozen)",
                   (out / VIDEO_RUN / "adapter.safetensors",),
                   lambda: self.train(VIDEO_RUN, "tiny_video_pretrain", {
                       **s.vision, "model.base_lm": str(out / LM_RUN), "model.init_from": str(out / s.adapter_stages[-1].name),
                       "data.shards": self.shards("video-chat", "train")}, s.video)),
            *self.eval_stages(VIDEO_RUN, "video_qa", "video-qa", s.eval_video_samples, "frozen frames"),
        ]

    # ---------------------------------------------------------------- speech
    def speech_stages(self) -> list[_Stage]:
        s, out = self.settings, self.out
        stages = [_Stage("data-speech", f"writing espeak-ng utterances and silent clips to {self.data}",
                         (self.data / "synth-speech-train.json", self.data / "synth-speech-test.json",
                          *([self.data / SILENCE_LAYOUT / "train-000000.tar"] if s.speech_silent_clips else [])),
                         self.write_speech)]
        if s.speech_pretrain is not None:
            stages.append(_Stage(SPEECH_ENCODER_RUN, "BEST-RQ pretraining of the Conformer (tiny_speech_bestrq)",
                                 (out / SPEECH_ENCODER_RUN / "speech_encoder.safetensors",),
                                 lambda: self.train(SPEECH_ENCODER_RUN, "tiny_speech_bestrq", {
                                     "data.shards": self.shards("speech", "train")}, s.speech_pretrain or {})))
        stages.append(_Stage(SPEECH_RUN, "training the speech encoder and adapter (tiny_speech_sft; the LM frozen)",
                             (out / SPEECH_RUN / "adapter.safetensors",), self.train_speech))
        return stages + self.eval_stages(SPEECH_RUN, "asr", "speech", s.eval_speech_samples, "silence")

    def write_speech(self) -> str:
        s = self.settings
        spoken = self.write("speech", [("train", s.speech_train_utterances), ("test", s.speech_test_utterances)])
        if not s.speech_silent_clips:
            return spoken
        silent = write_silence(self.data, s.speech_silent_clips, seed=s.seed, samples_per_shard=s.samples_per_shard)
        return f"{spoken}; {silent}"

    def train_speech(self) -> str:
        s, out = self.settings, self.out
        silent = train_shards(self.data, SILENCE_LAYOUT) if s.speech_silent_clips else []
        shards = self.shards("speech", "train") + silent
        paths: Overrides = {"model.base_lm": str(out / LM_RUN), "data.shards": shards}
        if s.speech_pretrain is not None:
            paths["model.speech.encoder_checkpoint"] = str(out / SPEECH_ENCODER_RUN)
        return self.train(SPEECH_RUN, "tiny_speech_sft", paths, s.speech)

    # ---------------------------------------------------------------- the whole run
    def stages(self) -> list[_Stage]:
        m = self.modalities
        stages = self.shared_stages()
        if "image" in m or "video" in m:
            stages += self.image_training_stages()
        if "image" in m:
            stages += self.image_eval_stages()
        if "video" in m:
            stages += self.video_stages()
        if "speech" in m:
            stages += self.speech_stages()
        return stages

    def training_runs(self, stages: list[_Stage]) -> dict[str, Path]:
        names = [st.name for st in stages if st.name in _run_folders(a.name for a in self.settings.adapter_stages)]
        return {name: self.out / name for name in names}

    def run(self) -> DemoResult:
        out, m = self.out, self.modalities
        self.state.write()
        stages = self.stages()
        for stage in stages:
            self.run_stage(stage)
        seconds = {st.name: self.state.stages[st.name] for st in stages if st.name in self.state.stages}
        self.log("[demo] report: writing metrics.json, report.html and the loss curves")
        report_start = time.perf_counter()
        image = (ImageEvals(vqa=self.eval_path("vqa"), vqa_blank=self.eval_path("vqa", True),
                            caption=self.eval_path("caption"), caption_blank=self.eval_path("caption", True))
                 if "image" in m else None)
        video = (VideoEvals(qa=self.eval_path("video_qa"), qa_frozen=self.eval_path("video_qa", True))
                 if "video" in m else None)
        speech = (SpeechEvals(asr=self.eval_path("asr"), asr_silence=self.eval_path("asr", True))
                  if "speech" in m else None)
        metrics = write_report(out, image=image, video=video, speech=speech, runs=self.training_runs(stages),
                               stage_seconds=seconds, settings={**self.settings.to_dict(), "modalities": list(m)},
                               report_samples=self.settings.report_samples)
        self.log(f"[demo] report: done in {time.perf_counter() - report_start:.1f} s")
        return DemoResult(out, metrics, out / REPORT_FILE, out / METRICS_JSON, format_table(metrics), seconds)


def _prepare_out(out: Path, settings: DemoSettings, *, resume: bool, overwrite: bool) -> _State | None:
    """Check ``out`` against the flags; remove an earlier run for ``overwrite``; the earlier state to resume.

    Only a folder with the demo's state file counts as a demo run: anything the demo would write into a
    folder without one (e.g. an unrelated ``data/``) is never removed nor written over."""
    if out.exists() and not out.is_dir():
        raise DemoError(f"--out {str(out)!r} exists and is not a directory; choose a folder")
    if not out.is_dir():
        return None
    state_file = out / STATE_FILE
    old_names: list[str] = []
    if state_file.is_file():
        try:
            old = json.loads(state_file.read_text())
            old_names = [a["name"] for a in old["settings"]["adapter_stages"]]
        except (ValueError, KeyError, TypeError):
            old_names = []  # unreadable: `_State.read` below says so unless the run is deleted anyway
    names = [a.name for a in settings.adapter_stages] + [n for n in old_names if isinstance(n, str)]
    entries = _demo_entries(out, names)
    if not entries:
        return None
    if not state_file.is_file():
        raise DemoError(f"{out} holds {', '.join(p.name for p in entries[:4])} but no {STATE_FILE}, so it is not a "
                        "demo run folder (or its state was deleted); choose another --out, or remove those paths")
    if overwrite:
        for path in entries:
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path)
            else:
                path.unlink()
        return None
    if not resume:
        raise DemoError(f"{out} already holds a demo run; pass --resume to continue it, --overwrite to start over, "
                        "or choose another --out")
    state = _State.read(state_file)
    if state is None:  # removed since the check above
        raise DemoError(f"{state_file} disappeared; start over with --overwrite")
    changed = _differences(state.settings, settings.to_dict())
    if changed:
        raise DemoError(f"the settings changed since the demo run in {out} was started, so its finished stages no "
                        "longer match them: " + "; ".join(changed[:6]) + ("; ..." if len(changed) > 6 else "")
                        + ". Start over with --overwrite, or choose another --out")
    return state


def run_demo(settings: DemoSettings | None = None, out: str | os.PathLike[str] = "runs/demo", *,
             modalities: Iterable[str] = MODALITIES, resume: bool = False, overwrite: bool = False,
             device: str = "auto", progress: bool = True, log: Callable[[str], None] | None = None) -> DemoResult:
    """Run the demo into ``out`` (see the module docstring) and return its metrics and report.

    Args:
        settings: the demo's numbers (default `DemoSettings()`; `DemoSettings.quick()` for a smoke run).
        out: output folder; an earlier demo run there needs ``resume`` or ``overwrite``.
        modalities: any of ``image``, ``video``, ``speech`` (video also runs the image training stages).
        resume: skip finished stages, continue an interrupted training stage from its checkpoint (another
            ``modalities`` choice runs the stages the earlier run left out, and reuses the shared ones).
        overwrite: delete the demo's earlier outputs in ``out`` first (nothing else in ``out``).
        device: ``auto`` (CUDA when available), ``cpu`` or ``cuda`` — training and evaluation.
        progress: progress bars (training, synthesis, evaluation).
        log: where the one-line stage messages go (default: print to stdout).

    Raises `DemoError` for bad settings or a conflicting ``out``, `DemoStopped` when a signal stopped a
    training stage, and the trainer's errors (non-finite losses, unreadable data).
    """
    settings = (settings if settings is not None else DemoSettings()).validate()
    chosen = check_modalities(modalities)
    if resume and overwrite:
        raise DemoError("resume and overwrite exclude each other: resume continues the run in --out, overwrite "
                        "deletes it")
    if device not in ("auto", "cpu", "cuda"):
        raise DemoError(f"device must be auto, cpu or cuda, got {device!r}")
    out = Path(out).resolve()
    state = _prepare_out(out, settings, resume=resume, overwrite=overwrite)
    out.mkdir(parents=True, exist_ok=True)
    printer = log if log is not None else (lambda line: print(line, flush=True))
    demo = _Demo(settings, out, chosen, resume=resume, device=device, progress=progress, log=printer)
    if state is not None:
        demo.state.stages = state.stages
    result = demo.run()
    printer(result.table)
    printer(f"[demo] report: {result.report}\n[demo] metrics: {result.metrics_file}")
    return result

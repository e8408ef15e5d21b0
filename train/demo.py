"""The built-in default (`mm-llama demo`): synthetic data → tokenizer → tiny LM → contrastive ViT →
image adapter → held-out evaluation (with the blank-image control) → report, all through the
library's public pieces.

    result = run_demo(DemoSettings(), "runs/demo")          # or DemoSettings.quick() for a smoke run

Every number the demo uses lives in `DemoSettings`: data sizes, the tokenizer's vocabulary, per-stage
recipe overrides (dotted keys → values, applied on top of the built-in ``tiny_*`` recipes and of the
paths the demo fills in), evaluation sizes. Folder layout of ``OUT``::

    OUT/data/                 synthetic shards (`mm_llama.data.synth.write_synth`): shapes train + test
                              (image-caption, image-qa), text train (chat-formatted shards + plain corpus)
    OUT/tokenizer/            tokenizer.json + tokenizer.model trained on the plain text corpus
    OUT/lm/                   tiny_lm_pretrain run (exports OUT/lm/model/)
    OUT/encoder/              tiny_image_encoder_pretrain run (exports OUT/encoder/encoder.safetensors)
    OUT/<adapter stage>/      one tiny_vision_pretrain run per `AdapterStage` (adapter.safetensors)
    OUT/eval/eval-{vqa,caption}[-blank].json   `mm_llama.train.evaluation` results of the last adapter run
    OUT/metrics.json, OUT/report.html, OUT/loss-<stage>.png   (`mm_llama.train.report`)
    OUT/demo-state.json       settings and finished stages with their wall times (for `resume`)

``resume=True`` skips the stages whose outputs are complete, continues an interrupted training stage
from its newest checkpoint (`run_training(resume=True)`) and always rewrites the report.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mm_llama.atomic_file import atomic_write
from mm_llama.data.synth.shapes import LAYOUTS as SHAPES_LAYOUTS
from mm_llama.data.tasks import TASKS, task_names
from mm_llama.train.report import LOSS_PLOT_GLOB, METRICS_JSON, REPORT_FILE, format_table, write_report

__all__ = ["AdapterStage", "DemoError", "DemoResult", "DemoSettings", "DemoStopped", "run_demo"]

DATA_DIR = "data"
TOKENIZER_DIR = "tokenizer"
LM_RUN = "lm"
ENCODER_RUN = "encoder"
EVAL_DIR = "eval"
STATE_FILE = "demo-state.json"
TASK_LAYOUTS: dict[str, tuple[str, ...]] = {name: TASKS[name].layouts for name in task_names("image_text")}
"""The shapes layouts whose train shards an adapter stage of each ``data.task`` reads (the registry's)."""
DEMO_KINDS: tuple[str, ...] = ("shapes", "text")
"""The synthetic kinds the demo writes (other kinds share some of their layout folders)."""
RESERVED_NAMES = frozenset({DATA_DIR, TOKENIZER_DIR, LM_RUN, ENCODER_RUN, EVAL_DIR, "report"})
"""Folder names the demo uses itself (an adapter stage may not take one)."""

def available_cores() -> int:
    """CPU cores this process may run on (its affinity mask where the OS has one)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


SPECIAL_TOKEN_TEXT = re.compile(r"<\|[a-z_]+\|>")
"""Special-token text (``<|eot_id|>``) in the chat-formatted text shards."""

Overrides = dict[str, Any]
"""Recipe overrides: dotted key → value (``{"train.steps": 100, "optim.lr": 3e-4}``)."""


class DemoError(ValueError):
    """A demo that cannot run as asked (bad settings, an existing output folder, changed settings)."""


class DemoStopped(RuntimeError):
    """A training stage was stopped by a signal; its checkpoint is written (continue with ``resume``)."""


# ------------------------------------------------------------------------------------------ settings
@dataclass
class AdapterStage:
    """One image-adapter training run of the demo.

    name: its run folder ``OUT/<name>`` (and its stage name). task: ``data.task`` (``vqa``, ``caption``
    or ``caption_vqa``), which also picks the shapes layouts it trains on (`TASK_LAYOUTS`). overrides:
    recipe overrides on top of the demo's (paths, task). init_from: the name of an earlier adapter stage
    whose trained weights start this one (``model.init_from=OUT/<that stage>``). recipe: the built-in
    recipe (or a YAML path) it runs. layouts: the shapes layouts it trains on, when not the task's
    (``("image-chat",)``: each image's questions and caption as one conversation, task ``vqa``).
    """

    name: str
    task: str = "vqa"
    overrides: Overrides = field(default_factory=dict)
    init_from: str | None = None
    recipe: str = "tiny_vision_pretrain"
    layouts: tuple[str, ...] | None = None

    def train_layouts(self) -> tuple[str, ...]:
        """The shapes layouts it trains on: `layouts`, else the task's (`TASK_LAYOUTS`)."""
        return self.layouts if self.layouts is not None else TASK_LAYOUTS[self.task]


def _default_adapter_stages() -> list[AdapterStage]:
    # image-chat: one conversation per image (its ~6 questions shuffled, then its caption), task vqa. With one
    # question per sample (caption_vqa over image-qa + image-caption) the easy global questions won the early
    # steps: position stayed at its prior (23.5 % against 19.9 % blank at 800 steps); as conversations 400
    # steps reach position 58.4 % (blank 20.5 %) and CIDEr 1.48 (was 1.30) in 231 s (issue 12's notes)
    return [AdapterStage("vision", task="vqa", layouts=("image-chat",),
                         overrides={"data.batch_size": 32, "train.steps": 400})]


@dataclass
class DemoSettings:
    """Everything the demo's stages use (the one place to tune it).

    seed: synthetic data seed. train_images / test_images: shapes images of the train / test split (the
    image-qa layout holds about 6 questions per image). square_images: render them all square (the shapes
    kind's ``square`` option): the tiny ViT sees one tile, and mixed aspect ratios would letterbox it and
    move every grid position to other pixels per image size. text_documents: text documents for the LM.
    samples_per_shard: records per shard file. vocab_size: the tokenizer's base BPE vocabulary (the 256
    Llama 3 special tokens come on top). lm / encoder: recipe overrides of the ``tiny_lm_pretrain`` /
    ``tiny_image_encoder_pretrain`` stages. adapter_stages: the image-adapter runs, in order (evaluation
    uses the last). eval_vqa_samples / eval_caption_samples: test questions / captions scored (None: the
    whole test split). eval_batch_size: generation batch. report_images: test images shown in the report.
    """

    seed: int = 0
    train_images: int = 4000
    test_images: int = 200
    square_images: bool = True
    text_documents: int = 5000
    samples_per_shard: int = 1000
    vocab_size: int = 1024
    lm: Overrides = field(default_factory=dict)
    # 100 contrastive steps: on this budget the stage buys nothing measurable (an adapter from a random ViT
    # scores the same); it runs to show the recipe, and the time goes to the adapter
    encoder: Overrides = field(default_factory=lambda: {"train.steps": 100, "checkpoint.every": 100})
    adapter_stages: list[AdapterStage] = field(default_factory=_default_adapter_stages)
    eval_vqa_samples: int | None = 1000
    eval_caption_samples: int | None = 200
    eval_batch_size: int = 16
    report_images: int = 12

    @classmethod
    def quick(cls) -> DemoSettings:
        """A smoke-test configuration: a few images and documents, a handful of steps per stage (seconds
        on one CPU thread; the numbers it reports mean nothing)."""
        small = {"train.steps": 3, "checkpoint.every": 3, "logging.every": 1, "schedule.warmup_steps": 1,
                 "data.batch_size": 4, "data.shuffle_buffer": 8}
        return cls(
            train_images=8, test_images=4, text_documents=40, samples_per_shard=32, vocab_size=300,
            lm={**small, "data.max_seq_len": 64},
            encoder={**small},
            adapter_stages=[AdapterStage("vision", task="vqa", layouts=("image-chat",), overrides={**small})],
            eval_vqa_samples=8, eval_caption_samples=4, eval_batch_size=4, report_images=2,
        )

    def problems(self) -> list[str]:
        """What is wrong with these settings (empty when they can run)."""
        out = []
        for name in ("train_images", "test_images", "text_documents", "samples_per_shard", "eval_batch_size",
                     "report_images"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                out.append(f"{name} must be a positive integer, got {value!r}")
        for name in ("eval_vqa_samples", "eval_caption_samples"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                out.append(f"{name} must be a positive integer or None (the whole test split), got {value!r}")
        if not isinstance(self.square_images, bool):
            out.append(f"square_images must be true or false, got {self.square_images!r}")
        if isinstance(self.vocab_size, bool) or not isinstance(self.vocab_size, int) or self.vocab_size < 257:
            out.append(f"vocab_size must be an integer >= 257 (256 bytes + merges), got {self.vocab_size!r}")
        for name in ("lm", "encoder"):
            out += _override_problems(name, getattr(self, name))
        if not self.adapter_stages:
            out.append("adapter_stages is empty: add at least one AdapterStage (evaluation uses the last)")
        seen: list[str] = []
        for i, stage in enumerate(self.adapter_stages):
            where = f"adapter_stages[{i}] ({stage.name!r})"
            if not isinstance(stage.name, str) or not stage.name or "/" in stage.name or stage.name.startswith("."):
                out.append(f"{where}: name must be a plain folder name")
            elif stage.name in RESERVED_NAMES or stage.name in seen:
                out.append(f"{where}: name is taken (by the demo: {sorted(RESERVED_NAMES)}, or an earlier stage)")
            if stage.task not in TASK_LAYOUTS:
                out.append(f"{where}: task must be one of {list(TASK_LAYOUTS)}, got {stage.task!r}")
            if stage.layouts is not None and (not stage.layouts or not set(stage.layouts) <= set(SHAPES_LAYOUTS)):
                out.append(f"{where}: layouts must be shapes layouts {list(SHAPES_LAYOUTS)}, got {stage.layouts!r}")
            if stage.init_from is not None and stage.init_from not in seen:
                out.append(f"{where}: init_from {stage.init_from!r} is not an earlier adapter stage ({seen or 'none'})")
            out += _override_problems(f"{where}.overrides", stage.overrides)
            seen.append(stage.name)
        return out

    def validate(self) -> DemoSettings:
        """Raise `DemoError` listing every problem; return self."""
        issues = self.problems()
        if issues:
            raise DemoError("invalid demo settings:\n  " + "\n  ".join(issues))
        return self

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form (stored in the state file and metrics.json)."""
        return json.loads(json.dumps(dataclasses.asdict(self)))

    @property
    def training_stages(self) -> list[str]:
        """Names (= run folders) of the training stages, in order."""
        return [LM_RUN, ENCODER_RUN, *(s.name for s in self.adapter_stages)]


def _override_problems(where: str, overrides: Any) -> list[str]:
    if not isinstance(overrides, dict):
        return [f"{where} must be a dict of dotted recipe keys to values, got {overrides!r:.80}"]
    out = [f"{where}: key {k!r} is not a dotted recipe key such as 'train.steps'"
           for k in overrides if not isinstance(k, str) or not k or "=" in k]
    for key, value in overrides.items():
        try:
            json.dumps(value, allow_nan=False)
        except (TypeError, ValueError):
            out.append(f"{where}: the value of {key!r} ({value!r:.80}) is not plain data (numbers, strings, bools, "
                       "None, lists, dicts)")
    return out


def override_args(overrides: Overrides) -> list[str]:
    """``{"train.steps": 3, "data.shards": ["a.tar"]}`` → ``["train.steps=3", 'data.shards=["a.tar"]']``
    for `load_recipe` (values as JSON, which its YAML reader reads back unchanged)."""
    return [f"{key}={json.dumps(value)}" for key, value in overrides.items()]


# ------------------------------------------------------------------------------------------ state
@dataclass
class DemoResult:
    """What `run_demo` returns: the folder, the metrics (metrics.json's content), the report, the table."""

    out: Path
    metrics: dict[str, Any]
    report: Path
    metrics_file: Path
    table: str
    stage_seconds: dict[str, float]


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


def _demo_entries(out: Path, stage_names: list[str]) -> list[Path]:
    """Everything the demo writes directly under ``out`` (what --overwrite removes)."""
    names = [DATA_DIR, TOKENIZER_DIR, *stage_names, EVAL_DIR, METRICS_JSON, REPORT_FILE, STATE_FILE]
    paths = [out / n for n in dict.fromkeys(names)]
    return [p for p in paths if p.exists()] + sorted(out.glob(LOSS_PLOT_GLOB))


# ------------------------------------------------------------------------------------------ the run
class _Demo:
    """One demo run (see the module docstring); `run()` does it."""

    def __init__(self, settings: DemoSettings, out: Path, *, resume: bool, device: str, progress: bool,
                 log: Callable[[str], None]) -> None:
        self.settings, self.out, self.resume, self.device, self.progress = settings, out, resume, device, progress
        self.log = log
        self.data = out / DATA_DIR
        self.state = _State(out / STATE_FILE, settings.to_dict())
        self._eval_model: Any = None

    # ---------------------------------------------------------------- stage bookkeeping
    def stage(self, name: str, what: str, outputs: list[Path], work: Callable[[], str | None]) -> None:
        """Run ``work`` as stage ``name`` (one line at the start, one with the wall time at the end), or skip
        it when resuming and it finished before and its ``outputs`` exist."""
        if self.resume and name in self.state.stages and all(p.exists() for p in outputs):
            self.log(f"[demo] {name}: already complete ({self.state.stages[name]:.1f} s), skipped")
            return
        self.log(f"[demo] {name}: {what}")
        start = time.perf_counter()
        note = work()
        seconds = time.perf_counter() - start
        self.state.done(name, seconds)
        self.log(f"[demo] {name}: done in {seconds:.1f} s{f' ({note})' if note else ''}")

    def shards(self, layout: str, split: str) -> list[str]:
        """The shard files `write_synth` wrote for ``layout`` / ``split`` (from its manifest)."""
        from mm_llama.data.synth import summary_path
        from mm_llama.data.synth.write import KINDS

        kind = next(k for k in DEMO_KINDS if layout in KINDS[k].layouts)
        manifest = summary_path(self.data, kind, split)
        if not manifest.is_file():
            raise DemoError(f"{manifest} is missing: the data stage did not finish; rerun with --resume or --overwrite")
        names = json.loads(manifest.read_text())["layouts"][layout]["shards"]
        return [str(self.data / layout / name) for name in names]

    # ---------------------------------------------------------------- stages
    def write_data(self) -> str:
        from tqdm import tqdm

        from mm_llama.data.synth import write_synth

        s = self.settings
        square = {"square": True} if s.square_images else {}
        jobs = [("shapes", "train", s.train_images, square), ("shapes", "test", s.test_images, square),
                ("text", "train", s.text_documents, {"chat": True})]
        counts = []
        for kind, split, n, options in jobs:
            with tqdm(total=n, desc=f"synth {kind} {split}", unit="sample", disable=not self.progress,
                      dynamic_ncols=True) as bar:
                summary = write_synth(kind, self.data, n=n, seed=s.seed, split=split,
                                      samples_per_shard=s.samples_per_shard, overwrite=True,
                                      workers=min(4, available_cores()),
                                      progress=lambda done, bar=bar: bar.update(done - bar.n), **options)
            counts += [f"{layout.samples} {name} {split}" for name, layout in summary.layouts.items()]
        return ", ".join(counts)

    def train_tokenizer(self) -> str:
        from mm_llama.data.synth import read_corpus
        from mm_llama.data.synth.text import corpus_path
        from mm_llama.tokenizer import Tokenizer
        from mm_llama.tokenizer_training import train_llama3_tokenizer

        from mm_llama.data.packed_text import read_documents

        documents = list(read_corpus(corpus_path(self.data, "train")))
        # The chat shards with their special-token text cut out: answers then also occur right after a line
        # break, as they do after the assistant header, so BPE learns them as whole words ("red", not "r"+"ed")
        # and the one-word answers the image stage trains on are single tokens.
        for shard in self.shards("text", "train"):
            documents += [SPECIAL_TOKEN_TEXT.sub("\n", text) for text in read_documents(shard)]
        target = train_llama3_tokenizer(documents, self.settings.vocab_size, self.out / TOKENIZER_DIR, min_frequency=1)
        return f"{len(documents)} documents, vocabulary {Tokenizer.from_dir(target).vocab_size}"

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

    def eval_model(self) -> tuple[Any, Any]:
        """The last adapter run's model and tokenizer (loaded once)."""
        if self._eval_model is None:
            from mm_llama.devices import pick_device
            from mm_llama.image_chat import load_image_model

            device, dtype = pick_device(self.device)
            self._eval_model = load_image_model(self.out / self.settings.adapter_stages[-1].name, dtype=dtype,
                                                device=device)
        return self._eval_model

    def evaluate(self, task: str, blank: bool, target: Path) -> str:
        from mm_llama.train.evaluation import evaluate, write_result

        model, tokenizer = self.eval_model()
        (layout,) = TASK_LAYOUTS[task]
        limit = self.settings.eval_vqa_samples if task == "vqa" else self.settings.eval_caption_samples
        result = evaluate(model, tokenizer, self.shards(layout, "test"), task, batch_size=self.settings.eval_batch_size,
                          max_samples=limit, blank_images=blank, progress=self.progress)
        write_result(result, target, settings={"model": str(self.out / self.settings.adapter_stages[-1].name)})
        main = "vqa_accuracy" if task == "vqa" else "cider"
        return f"{result.counts['samples']} samples, {main} {result.metrics[main]:.4f}"

    # ---------------------------------------------------------------- the whole run
    def run(self) -> DemoResult:
        s, out = self.settings, self.out
        self.state.write()
        data_outputs = [self.data / f"synth-{k}-{split}.json" for k, split in
                        (("shapes", "train"), ("shapes", "test"), ("text", "train"))]
        self.stage(DATA_DIR, f"writing synthetic data to {self.data}", data_outputs, self.write_data)
        tok_dir = out / TOKENIZER_DIR
        self.stage(TOKENIZER_DIR, f"training a {s.vocab_size}-token BPE tokenizer",
                   [tok_dir / "tokenizer.json", tok_dir / "tokenizer.model"], self.train_tokenizer)
        self.stage(LM_RUN, "training the tiny LM (tiny_lm_pretrain) on chat-formatted text",
                   [out / LM_RUN / "model" / "config.json"],
                   lambda: self.train(LM_RUN, "tiny_lm_pretrain", {
                       "data.shards": self.shards("text", "train"), "data.tokenizer": str(tok_dir),
                       "data.options.allow_special": True}, s.lm))
        self.stage(ENCODER_RUN, "contrastive ViT pretraining (tiny_image_encoder_pretrain)",
                   [out / ENCODER_RUN / "encoder.safetensors"],
                   lambda: self.train(ENCODER_RUN, "tiny_image_encoder_pretrain", {
                       "model.base_lm": str(out / LM_RUN), "data.shards": self.shards("image-caption", "train")},
                       s.encoder))
        for stage in s.adapter_stages:
            paths: Overrides = {"model.base_lm": str(out / LM_RUN), "model.encoder_checkpoint": str(out / ENCODER_RUN),
                                "data.task": stage.task,
                                "data.shards": [shard for layout in stage.train_layouts()
                                               for shard in self.shards(layout, "train")]}
            if stage.init_from is not None:
                paths["model.init_from"] = str(out / stage.init_from)
            self.stage(stage.name, f"training the image adapter ({stage.recipe}, task {stage.task})",
                       [out / stage.name / "adapter.safetensors"],
                       lambda stage=stage, paths=paths: self.train(stage.name, stage.recipe, paths, stage.overrides))
        evals: dict[str, Path] = {}
        for task in ("vqa", "caption"):
            for blank in (False, True):
                # the names `mm-llama eval` gives its results by default
                target = out / EVAL_DIR / f"eval-{task}{'-blank' if blank else ''}.json"
                evals[f"{task}_blank" if blank else task] = target
                self.stage(target.stem, f"evaluating {task} on the test split{' with blank images' if blank else ''}",
                           [target], lambda task=task, blank=blank, target=target: self.evaluate(task, blank, target))
        order = [DATA_DIR, TOKENIZER_DIR, *s.training_stages, *(path.stem for path in evals.values())]
        seconds = {name: self.state.stages[name] for name in order if name in self.state.stages}
        self.log("[demo] report: writing metrics.json, report.html and the loss curves")
        report_start = time.perf_counter()
        metrics = write_report(out, **evals, runs={name: out / name for name in s.training_stages},
                               stage_seconds=seconds, settings=s.to_dict(), report_images=s.report_images)
        self.log(f"[demo] report: done in {time.perf_counter() - report_start:.1f} s")
        table = format_table(metrics)
        return DemoResult(out, metrics, out / REPORT_FILE, out / METRICS_JSON, table, seconds)


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
    entries = _demo_entries(out, settings.training_stages + [n for n in old_names if isinstance(n, str)])
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
             resume: bool = False, overwrite: bool = False, device: str = "auto", progress: bool = True,
             log: Callable[[str], None] | None = None) -> DemoResult:
    """Run the whole demo into ``out`` (see the module docstring) and return its metrics and report.

    Args:
        settings: the demo's numbers (default `DemoSettings()`; `DemoSettings.quick()` for a smoke run).
        out: output folder; an earlier demo run there needs ``resume`` or ``overwrite``.
        resume: skip finished stages, continue an interrupted training stage from its checkpoint.
        overwrite: delete the demo's earlier outputs in ``out`` first (nothing else in ``out``).
        device: ``auto`` (CUDA when available), ``cpu`` or ``cuda`` — training and evaluation.
        progress: progress bars (training, synthesis, evaluation).
        log: where the one-line stage messages go (default: print to stdout).

    Raises `DemoError` for bad settings or a conflicting ``out``, `DemoStopped` when a signal stopped a
    training stage, and the trainer's errors (non-finite losses, unreadable data).
    """
    settings = (settings if settings is not None else DemoSettings()).validate()
    if resume and overwrite:
        raise DemoError("resume and overwrite exclude each other: resume continues the run in --out, overwrite "
                        "deletes it")
    if device not in ("auto", "cpu", "cuda"):
        raise DemoError(f"device must be auto, cpu or cuda, got {device!r}")
    out = Path(out).resolve()
    state = _prepare_out(out, settings, resume=resume, overwrite=overwrite)
    out.mkdir(parents=True, exist_ok=True)
    printer = log if log is not None else (lambda line: print(line, flush=True))
    demo = _Demo(settings, out, resume=resume, device=device, progress=progress, log=printer)
    if state is not None:
        demo.state.stages = state.stages
    result = demo.run()
    printer(result.table)
    printer(f"[demo] report: {result.report}\n[demo] metrics: {result.metrics_file}")
    return result


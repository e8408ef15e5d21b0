"""Every command README.md shows runs as written.

`COVERAGE` maps each command of README.md (fenced `bash` blocks, and inline `mm-llama ...` / `make ...` spans
with a flag or an override) to the test that runs it; `BLOCKS` maps every other fenced block. A command or
block added to the README without an entry here fails `test_every_readme_command_has_a_test`, and an entry
whose README command changed or went away fails too, so the table and the README move together.

The tests here run the README's own text through the CLI entry point in-process, in one temporary working
directory, so relative paths (`runs/demo/...`, `data/`, `probe/`) must be created by an earlier README step
or by the stand-in for `make demo` below. What is changed, and only that: placeholders (`DIR`, `LM`,
`/path/to/...`, `/ckpt/...`) become tiny checkpoints; optional `[--flag]` parts are given (the first
alternative of `a|b`); counts that set the run time (`--n`, `train.steps`, `data.batch_size`, `--repeats`,
`--new`) get small values; flags and overrides the README does not give are only ever added (CPU, fewer
samples), never removed. The GPU-scale `vision_pretrain` command is loaded as a recipe as written and trained
as its tiny twin with the same overrides.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import warnings
from pathlib import Path

import numpy as np
import pytest
import soundfile
import torch
import yaml
from PIL import Image

from mm_llama.cli import main

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
FENCE = re.compile(r"^```(\w*)\n(.*?)^```", re.S | re.M)
INLINE = re.compile(r"`((?:mm-llama|make) [^`]+)`")
OPTIONAL = re.compile(r"\[(--[^\[\]]*)\]")

HERE = "tests/test_readme_commands.py"
PY = "tests/test_readme_python.py"
HELP = "tests/test_readme_help.py"

# README command → the test that runs it (or, for the few that cannot run in a test, checks it).
COVERAGE: dict[str, str] = {
    # Set-up
    "make demo": f"{HERE}::test_make_targets_and_the_demo_synopsis + tests/train/test_demo.py (the quick demo)",
    "make test": f"{HERE}::test_make_targets_and_the_demo_synopsis (the suite itself)",
    "make lock": f"{HERE}::test_make_lock_is_the_command_the_readme_names + tests/test_lock.py",
    "make install PYTHON=python3.11": f"{HERE}::test_make_targets_and_the_demo_synopsis",
    "make demo PYTHON=python3.11": f"{HERE}::test_make_targets_and_the_demo_synopsis",
    "mm-llama --help": f"{HELP}::test_every_command_of_the_package_is_checked + tests/mm_llama/test_cli.py",
    "mm-llama COMMAND --help": f"{HELP}::test_help_states_exit_status_and_an_example (every command)",
    "mm-llama bench generate --help": f"{HELP}::test_help_states_exit_status_and_an_example",
    "mm-llama demo [--out runs/demo] [--modality image,video,speech] [--resume | --overwrite] "
    "[--device auto|cpu|cuda] [--threads N]":
        f"{HERE}::test_make_targets_and_the_demo_synopsis + tests/train/test_demo.py::"
        "test_resume_after_a_finished_run_retrains_nothing_and_rewrites_the_report",
    # inline, in the demo section and the status line
    "mm-llama demo --modality image": "tests/train/test_demo.py::test_the_modality_option_reads_a_comma_list + "
                                      "test_a_subset_runs_only_its_stages_and_a_resume_adds_the_others",
    'mm-llama vqa --model runs/demo/vision --image shape.png --question "What colour is the circle?"':
        f"{HERE}::test_the_demo_run_answers_with_the_other_commands",
    "mm-llama eval --model runs/demo/vision ...": f"{HERE}::test_the_demo_run_answers_with_the_other_commands",
    "mm-llama train RECIPE key.sub=value …": f"{HELP}::test_every_help_example_parses (a synopsis)",
    # Use
    'mm-llama generate --model /path/to/Meta-Llama-3.1-8B-Instruct --prompt "Why is the sky blue?" --chat':
        f"{HERE}::test_generate",
    'mm-llama generate --model DIR --prompt "Once upon" --prompt "A list:" --temperature 0.7 --top-p 0.9 --seed 1':
        f"{HERE}::test_generate",
    "mm-llama generate --help": f"{HERE}::test_generate + {HELP}",
    "mm-llama caption --model /path/to/Llama-3.2-11B-Vision-Instruct photo1.jpg photo2.png --json":
        f"{HERE}::test_caption_and_vqa",
    'mm-llama vqa --model /path/to/Llama-3.2-11B-Vision-Instruct --image chart.png --question "What is the trend?"':
        f"{HERE}::test_caption_and_vqa",
    # Speech
    'mm-llama train tiny_speech_sft model.base_lm=LM "data.shards=[data/speech/train-*.tar]"':
        f"{HERE}::speech_runs (fixture of test_transcribe_and_translate)",
    'mm-llama train tiny_speech_bestrq "data.shards=[data/speech/train-*.tar]" --out runs/bestrq':
        f"{HERE}::test_best_rq_and_the_speech_eval",
    "mm-llama eval --task asr --shards data/speech/test-*.tar --model runs/speech [--blank-audio]":
        f"{HERE}::test_best_rq_and_the_speech_eval",
    "mm-llama transcribe --model runs/speech a.wav b.flac --language en [--json]":
        f"{HERE}::test_transcribe_and_translate",
    "mm-llama translate --model runs/speech talk.wav --to fr": f"{HERE}::test_transcribe_and_translate",
    'mm-llama train tiny_speech_sft model.base_lm=LM "model.modalities=[image,speech]" '
    '"model.init_from=[runs/image,runs/speech]" model.encoder=timm "model.fusion_layers=[1,3]" '
    '"model.vision={...as in runs/image/config.yaml}" "model.train=[speech.adapter]" "data.shards=[...]" '
    "--out runs/both": f"{HERE}::test_one_model_with_both_adapters",
    'mm-llama ask --model runs/both --image photo.png --audio question.wav [--question "typed text"] [--json]':
        f"{HERE}::test_one_model_with_both_adapters",
    # Video
    "mm-llama video-qa --model runs/video --video clip.mp4 [--video more.mp4] [--json]": f"{HERE}::test_video",
    'mm-llama video-qa --model runs/video --video clip.mp4 --question "Which way does the circle move?" '
    "[--style short|choice|plain] [--num-frames 16]": f"{HERE}::test_video",
    'mm-llama ask --model runs/video --image photo.png --video clip.mp4 --question "Is the object in the photo '
    'the one that moves in the clip?"': f"{HERE}::test_video",
    'mm-llama eval --model runs/video --task video_qa --shards "data/video-qa/test-*.tar" '
    "[--question-style plain|short|choice] [--num-frames 16] [--blank-video]": f"{HERE}::test_video",
    # Data and training
    "mm-llama shards manifest.jsonl shards/ --samples-per-shard 1000": f"{HERE}::test_data_and_training",
    "mm-llama synth shapes data/ --n 2000 --seed 0 --split train": f"{HERE}::test_data_and_training",
    "mm-llama synth shapes data/ --n 200 --seed 0 --split test": f"{HERE}::test_data_and_training",
    "mm-llama synth text data/ --n 5000 --chat": f"{HERE}::test_data_and_training",
    "mm-llama bench data data/image-qa --task vqa --workers 2": f"{HERE}::test_data_and_training",
    "mm-llama bench generate --shape tiny --new 64 --repeats 5": f"{HERE}::test_bench_generate",
    'mm-llama train vision_pretrain model.base_lm=/ckpt/Llama-3.1-8B "data.shards=[shards/shard-*.tar]" --out runs/vp': f"{HERE}::test_data_and_training (recipe as written; trained as tiny_vision_pretrain)",
    "mm-llama eval --model runs/vp --shards data/image-qa/test-*.tar --task vqa [--blank-images]":
        f"{HERE}::test_data_and_training",
    # Fine-tuning Llama 3.2 Vision
    "mm-llama train vision_sft model.base_lm=/ckpt/Llama-3.2-11B-Vision-Instruct model.init_from=null "
    '"data.shards=[sft/shard-{000000..000099}.tar]" --out runs/sft': f"{HERE}::test_fine_tune_and_export",
    'mm-llama vqa --model runs/sft --image chart.png --question "What is the trend?"':
        f"{HERE}::test_fine_tune_and_export",
    "mm-llama export runs/sft served/ --format hf-mllama": f"{HERE}::test_fine_tune_and_export",
    "mm-llama export runs/demo/lm served-lm/ --format hf": f"{HERE}::test_fine_tune_and_export",
    # The spatial probe
    "mm-llama synth glyphs probe/ --n 2000 --split train": f"{HERE}::test_glyph_probe",
    "mm-llama synth glyphs probe/ --n 300 --split test": f"{HERE}::test_glyph_probe",
    'mm-llama train tiny_lm_pretrain "data.shards=[runs/demo/data/text/train-*.tar, probe/text/glyphs-train-*.tar]" '
    "data.tokenizer=runs/demo/tokenizer data.options.allow_special=true --out runs/glyph-lm":
        f"{HERE}::test_glyph_probe",
    "mm-llama train tiny_glyph_encoder model.base_lm=runs/glyph-lm --out runs/glyph-encoder": f"{HERE}::test_glyph_probe",
    "mm-llama train tiny_glyph_probe model.base_lm=runs/glyph-lm --out runs/glyph-probe": f"{HERE}::test_glyph_probe",
    'mm-llama eval --model runs/glyph-probe --task vqa --shards "probe/image-qa/glyphs-test-*.tar" [--blank-images]':
        f"{HERE}::test_glyph_probe",
}

# Fenced blocks that hold no command (keyed by their first line) → the test that runs or checks them.
BLOCKS: dict[str, str] = {
    "from mm_llama import GenerationConfig, Tokenizer, generate, load_llama, save_hf":
        f"{PY}::test_the_first_python_example_runs",
    "from mm_llama.checkpoints import load_llama": f"{PY}::test_the_composition_example_runs",
}


def readme_blocks() -> list[tuple[str, str]]:
    """`(language, body)` of every fenced block."""
    return [(m.group(1), m.group(2)) for m in FENCE.finditer(README.read_text())]


def block_commands(body: str) -> list[str]:
    """The commands of a shell block: continuation lines joined, `# comments` dropped, `a && b` split."""
    out = []
    for line in body.replace("\\\n", " ").splitlines():
        line = re.sub(r"\s+#\s.*$", "", line)
        out += [" ".join(part.split()) for part in line.split(" && ") if part.strip()]
    return out


def readme_commands() -> list[str]:
    commands = [c for lang, body in readme_blocks() if lang in ("bash", "sh", "shell", "") for c in block_commands(body)]
    prose = FENCE.sub("", README.read_text())
    commands += [" ".join(m.split()) for m in INLINE.findall(prose) if "--" in m or "=" in m]
    return list(dict.fromkeys(commands))


def readme_command(start: str) -> str:
    """The one README command that starts with `start`."""
    found = [c for c in readme_commands() if c.startswith(start)]
    assert len(found) == 1, f"README commands starting with {start!r}: {found}"
    return found[0]


def test_every_readme_command_has_a_test() -> None:
    commands = readme_commands()
    assert len(commands) >= 40  # the parser finds the README's commands at all
    missing = [c for c in commands if c not in COVERAGE]
    assert not missing, f"README commands with no test in COVERAGE (add a test and an entry): {missing}"
    stale = [c for c in COVERAGE if c not in commands]
    assert not stale, f"COVERAGE entries the README no longer holds: {stale}"
    for lang, body in readme_blocks():
        if lang not in ("bash", "sh", "shell", ""):
            assert body.splitlines()[0] in BLOCKS, f"README {lang} block with no test: {body.splitlines()[0]!r}"
    for where in [*COVERAGE.values(), *BLOCKS.values()]:
        for ref in re.findall(r"(tests/\S+\.py)(?:::(\w+))?", where):
            path, name = ref
            assert (ROOT / path).is_file(), where
            if name:
                assert re.search(rf"^def {name}\b|^    def {name}\b|^def {name}\(", (ROOT / path).read_text(),
                                 re.M), f"{where}: no test {name} in {path}"


def test_readme_links_stay_inside_the_repository() -> None:
    text = README.read_text()
    assert not re.findall(r"https?://", text), "README.md links outside the repository"
    for target in re.findall(r"\]\(([^)#]+)", text):
        assert (ROOT / target).exists(), f"README.md links to {target}, which the repository does not hold"
        assert (ROOT / target).resolve().is_relative_to(ROOT), f"README.md links outside the repository: {target}"


# ------------------------------------------------------------------ running README commands


def run(command: str, subs: dict[str, str] | None = None, extra: list[str] | None = None, code: int = 0) -> None:
    """Run a README command through the CLI: `subs` replace placeholders (each must occur), optional
    `[--flag]` parts are given, `extra` arguments appended."""
    for old, new in (subs or {}).items():
        assert old in command, f"{old!r} is no longer in the README command {command!r}"
        command = command.replace(old, new)
    command = OPTIONAL.sub(lambda m: re.sub(r"(\S+?)\|\S+", r"\1", m.group(1).split(" | ")[0]), command)
    argv = shlex.split(command)
    assert argv[0] == "mm-llama"
    got = main([*argv[1:], *(extra or [])])
    assert got == code, f"exit status {got} from: {command} {' '.join(extra or [])}"


QUICK_TRAIN = ["train.device=cpu", "logging.progress=false", "logging.tensorboard=false", "checkpoint.every=100",
               "schedule.warmup_steps=1", "logging.every=1"]


def quick(command: str, steps: int = 2, batch: int = 2, **more: object) -> list[str]:
    """Overrides that make a README training command a seconds-long CPU run, for keys it does not give."""
    values = {"train.steps": steps, "data.batch_size": batch, "data.shuffle_buffer": 4, **more}
    given = set(re.findall(r"([\w.]+)=", command))
    return [o for o in QUICK_TRAIN if o.split("=")[0] not in given] + [
        f"{k}={json.dumps(v)}" for k, v in values.items() if k not in given]


@pytest.fixture(scope="module")
def workspace(tmp_path_factory: pytest.TempPathFactory):
    """The working directory every README command runs in (one thread: tiny models lose to thread overhead)."""
    folder = tmp_path_factory.mktemp("readme")
    cwd, threads = Path.cwd(), torch.get_num_threads()
    os.chdir(folder)
    torch.set_num_threads(1)
    try:
        yield folder
    finally:
        os.chdir(cwd)
        torch.set_num_threads(threads)


def _png(path: Path, seed: int, size: tuple[int, int] = (40, 30)) -> Path:
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)).save(path)
    return path


def _tone(path: Path, seconds: float, rate: int, channels: int = 1) -> Path:
    t = np.arange(int(seconds * rate)) / rate
    wave = (0.3 * np.sin(2 * np.pi * 330 * t)).astype(np.float32)
    soundfile.write(path, np.stack([wave, wave], 1) if channels == 2 else wave, rate)
    return path


@pytest.fixture(scope="module")
def demo(workspace: Path) -> Path:
    """A stand-in for what `make demo` leaves in runs/demo, made the way the demo makes it at a tiny size:
    the chat-formatted text, the tokenizer, the LM (tiny_lm_pretrain), shapes and the adapter run."""
    from mm_llama.data.synth import read_corpus, write_synth
    from mm_llama.tokenizer_training import train_llama3_tokenizer

    data = workspace / "runs/demo/data"
    write_synth("text", data, n=40, seed=0, split="train", chat=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # a small corpus gives fewer merges than asked
        train_llama3_tokenizer(list(read_corpus(data / "text/train-corpus.txt")), 400, workspace / "runs/demo/tokenizer",
                               min_frequency=1)
    lm = ('mm-llama train tiny_lm_pretrain "data.shards=[runs/demo/data/text/train-*.tar]" '
          "data.options.allow_special=true data.tokenizer=runs/demo/tokenizer --out runs/demo/lm")
    run(lm, extra=quick(lm))
    write_synth("shapes", data, n=6, seed=0, split="train", square=True)
    write_synth("shapes", data, n=3, seed=0, split="test", square=True)
    vision = ('mm-llama train tiny_vision_pretrain model.base_lm=runs/demo/lm model.encoder_checkpoint=null '
              '"data.shards=[runs/demo/data/image-chat/train-*.tar]" data.task=vqa --out runs/demo/vision')
    run(vision, extra=quick(vision))
    return workspace / "runs/demo"


def test_make_targets_and_the_demo_synopsis() -> None:
    from mm_llama.cli import build_parser

    makefile = (ROOT / "Makefile").read_text()
    demo_recipe = re.search(r"^demo:.*\n\t\$\(BIN\)/(mm-llama .*)$", makefile, re.M)
    assert demo_recipe, "Makefile has no demo target running mm-llama"
    assert re.search(r"^test:.*\n\t\$\(BIN\)/python -m pytest", makefile, re.M)
    # `make install PYTHON=python3.11`: the interpreter that builds .venv is the PYTHON variable
    assert re.search(r"^PYTHON \?= ", makefile, re.M) and "$(PYTHON) -m venv $(VENV)" in makefile
    assert re.search(r"^install: \$\(STAMP\)", makefile, re.M) and re.search(r"^demo: \$\(STAMP\)", makefile, re.M)
    synopsis = readme_command("mm-llama demo [")
    choices = {"[--modality image,video,speech]": ["--modality image,video,speech"],
               "[--resume | --overwrite]": ["--resume", "--overwrite"], "[--device auto|cpu|cuda]":
               ["--device auto", "--device cpu", "--device cuda"], "[--out runs/demo]": ["--out runs/demo"],
               "[--threads N]": ["--threads 2"]}
    assert set(OPTIONAL.findall(synopsis)) == {k[1:-1] for k in choices}
    argvs = [shlex.split(demo_recipe.group(1))[1:]]
    for i in range(3):
        line = synopsis
        for part, options in choices.items():
            line = line.replace(part, options[i % len(options)])
        argvs.append(shlex.split(line)[1:])
    for argv in argvs:
        args = build_parser().parse_args(argv)
        assert args.command == "demo" and args.out == Path("runs/demo")


def test_make_lock_is_the_command_the_readme_names() -> None:
    block = next(body for lang, body in readme_blocks() if body.startswith("make lock"))
    named = block.split("#", 1)[1].split()
    recipe = re.search(r"^lock:\n((?:\t.*\n)+)", (ROOT / "Makefile").read_text(), re.M).group(1).replace("\\\n", " ")
    for word in named:
        assert word in recipe.split() or word == "uv", f"make lock does not run {word!r}"


def test_generate(workspace: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from mm_llama.tiny_checkpoint import write_tiny_checkpoint

    tiny = str(write_tiny_checkpoint(workspace / "tiny-llama"))
    run(readme_command("mm-llama generate --model /path/to"), {"/path/to/Meta-Llama-3.1-8B-Instruct": tiny},
        ["--max-new-tokens", "4"])
    run(readme_command("mm-llama generate --model DIR"), {"DIR": tiny}, ["--max-new-tokens", "4", "--json"])
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        run(readme_command("mm-llama generate --help"))
    assert exit_info.value.code == 0 and "Example" in capsys.readouterr().out


@pytest.fixture(scope="module")
def mllama(workspace: Path) -> str:
    from tests.mm_llama.checkpoints.mllama_serving import write_published_mllama

    return str(write_published_mllama(workspace / "mllama")[0])


def test_caption_and_vqa(workspace: Path, mllama: str, capsys: pytest.CaptureFixture[str]) -> None:
    _png(workspace / "photo1.jpg", 1)  # a PNG under a .jpg name: Pillow reads by content
    _png(workspace / "photo2.png", 2, (20, 50))
    _png(workspace / "chart.png", 3)
    capsys.readouterr()
    run(readme_command("mm-llama caption --model /path/to"), {"/path/to/Llama-3.2-11B-Vision-Instruct": mllama},
        ["--max-new-tokens", "3"])
    assert [json.loads(line)["image"] for line in capsys.readouterr().out.splitlines()] == ["photo1.jpg", "photo2.png"]
    run(readme_command("mm-llama vqa --model /path/to"), {"/path/to/Llama-3.2-11B-Vision-Instruct": mllama},
        ["--max-new-tokens", "3"])


def test_the_demo_run_answers_with_the_other_commands(demo: Path, workspace: Path) -> None:
    _png(workspace / "shape.png", 4, (224, 224))
    run(readme_command("mm-llama vqa --model runs/demo/vision"), extra=["--max-new-tokens", "3"])
    run(readme_command("mm-llama eval --model runs/demo/vision"),
        {"...": '--shards "runs/demo/data/image-qa/test-*.tar" --task vqa'}, ["--max-samples", "2", "--no-progress"])


@pytest.fixture(scope="module")
def speech_runs(demo: Path, workspace: Path) -> Path:
    """data/speech (espeak, train + test), runs/speech (the README's tiny_speech_sft command) and runs/image
    (an image adapter run on the same LM)."""
    from mm_llama.data.synth import write_synth

    write_synth("speech", workspace / "data", n=4, seed=0, split="train")
    write_synth("speech", workspace / "data", n=2, seed=0, split="test")
    sft = readme_command('mm-llama train tiny_speech_sft model.base_lm=LM "data.shards=[data/speech')
    run(sft, {"LM": "runs/demo/lm"}, ["--out", "runs/speech", *quick(sft)])
    image = ('mm-llama train tiny_vision_pretrain model.base_lm=runs/demo/lm model.encoder_checkpoint=null '
             '"data.shards=[runs/demo/data/image-caption/train-*.tar]" --out runs/image')
    run(image, extra=quick(image))
    return workspace / "runs/speech"


def test_transcribe_and_translate(speech_runs: Path, workspace: Path, capsys: pytest.CaptureFixture[str]) -> None:
    _tone(workspace / "a.wav", 1.0, 8000)
    _tone(workspace / "b.flac", 0.5, 44100, channels=2)
    _tone(workspace / "talk.wav", 0.8, 16000)
    capsys.readouterr()
    run(readme_command("mm-llama transcribe"), extra=["--max-new-tokens", "3"])
    assert [json.loads(line)["file"] for line in capsys.readouterr().out.splitlines()] == ["a.wav", "b.flac"]
    run(readme_command("mm-llama translate"), extra=["--max-new-tokens", "3"])


def test_best_rq_and_the_speech_eval(speech_runs: Path, workspace: Path) -> None:
    bestrq = readme_command("mm-llama train tiny_speech_bestrq")
    run(bestrq, extra=quick(bestrq))
    assert (workspace / "runs/bestrq/speech_encoder.safetensors").is_file()
    run(readme_command("mm-llama eval --task asr"), extra=["--max-new-tokens", "3", "--no-progress"])
    assert (workspace / "runs/speech/eval-asr-blank.json").is_file()


def test_one_model_with_both_adapters(speech_runs: Path, workspace: Path, capsys: pytest.CaptureFixture[str]) -> None:
    image_cfg = yaml.safe_load((workspace / "runs/image/config.yaml").read_text())["model"]
    both = readme_command('mm-llama train tiny_speech_sft model.base_lm=LM "model.modalities')
    assert f"model.encoder={image_cfg['encoder']}" in both
    assert f"model.fusion_layers={json.dumps(image_cfg['fusion_layers']).replace(' ', '')}" in both
    subs = {"LM": "runs/demo/lm", "{...as in runs/image/config.yaml}": json.dumps(image_cfg["vision"]),
            "data.shards=[...]": "data.shards=[data/speech/train-*.tar]"}
    run(both, subs, quick(both))
    from safetensors import safe_open

    with safe_open(str(workspace / "runs/both/adapter.safetensors"), "pt") as f:
        groups = {key.split(".")[0] for key in f.keys()}
    assert {"image", "speech"} <= groups  # both adapters exported: the one it loaded and the one it trained
    _png(workspace / "photo.png", 5)
    _tone(workspace / "question.wav", 0.6, 16000)
    capsys.readouterr()
    run(readme_command("mm-llama ask --model runs/both"), extra=["--max-new-tokens", "3"])
    answer = json.loads(capsys.readouterr().out)
    assert answer["image"] == "photo.png" and answer["audio"] == "question.wav" and answer["question"] == "typed text"


def test_video(workspace: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from mm_llama.data.synth import write_synth
    from mm_llama.data.synth.moving_shapes import make_moving_shapes_sample
    from tests.mm_llama.test_video_commands import write_tiny_run

    video_run = str(write_tiny_run(workspace / "video-model"))
    for i, name in enumerate(["clip.mp4", "more.mp4"]):
        (workspace / name).write_bytes(make_moving_shapes_sample(seed=3, split="test", index=i).mp4)
    _png(workspace / "photo.png", 5)
    write_synth("moving-shapes", workspace / "data", n=2, seed=0, split="test")
    fast = ["--max-new-tokens", "3"]
    capsys.readouterr()
    run(readme_command("mm-llama video-qa --model runs/video --video clip.mp4 ["), {"runs/video": video_run}, fast)
    assert [json.loads(line)["video"] for line in capsys.readouterr().out.splitlines()] == ["clip.mp4", "more.mp4"]
    run(readme_command("mm-llama video-qa --model runs/video --video clip.mp4 --question"), {"runs/video": video_run},
        fast)
    run(readme_command("mm-llama ask --model runs/video"), {"runs/video": video_run}, fast)
    run(readme_command("mm-llama eval --model runs/video"), {"runs/video": video_run},
        ["--max-samples", "2", "--no-progress"])


def test_bench_generate(workspace: Path) -> None:
    run(readme_command("mm-llama bench generate --shape"), {"--new 64": "--new 4", "--repeats 5": "--repeats 1"})


def test_data_and_training(demo: Path, workspace: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from mm_llama.train.recipe import load_recipe

    lines = [{"image": _png(workspace / f"img{i}.png", 10 + i).name, "caption": f"a picture number {i}"} for i in range(4)]
    (workspace / "manifest.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    run(readme_command("mm-llama shards manifest.jsonl"), extra=["--no-progress"])
    run(readme_command("mm-llama synth shapes data/ --n 2000"), {"--n 2000": "--n 6"}, ["--no-progress"])
    run(readme_command("mm-llama synth shapes data/ --n 200 "), {"--n 200": "--n 3"}, ["--no-progress"])
    run(readme_command("mm-llama synth text data/"), {"--n 5000": "--n 20"}, ["--no-progress"])
    run(readme_command("mm-llama bench data"), extra=["--batches", "1", "--batch-size", "2", "--tile-size", "64",
                                                      "--tokenizer", "runs/demo/tokenizer"])
    command = readme_command("mm-llama train vision_pretrain")
    subs = {"/ckpt/Llama-3.1-8B": "runs/demo/lm"}
    argv = shlex.split(command.replace("/ckpt/Llama-3.1-8B", "runs/demo/lm"))
    load_recipe("vision_pretrain", [a for a in argv[3:] if "=" in a])  # the GPU recipe takes these overrides
    run(command, {**subs, "train vision_pretrain": "train tiny_vision_pretrain"},
        ["model.encoder_checkpoint=null", *quick(command)])
    cfg = yaml.safe_load((workspace / "runs/vp/config.yaml").read_text())
    assert (workspace / "runs/vp/adapter.safetensors").is_file()
    assert cfg["data"]["shards"] == ["shards/shard-*.tar"]
    run(readme_command("mm-llama eval --model runs/vp"), extra=["--max-samples", "2", "--no-progress"])
    assert (workspace / "runs/vp/eval-vqa-blank.json").is_file()


def test_fine_tune_and_export(mllama: str, demo: Path, workspace: Path) -> None:
    from mm_llama.data.manifest import write_shards

    qa = [("what shape is it?", "a star"), ("what colour?", "red"), ("where is it?", "on the left")]
    lines = [{"image": _png(workspace / f"sft{i}.png", 20 + i).name,
              "turns": [{"question": q, "answer": a} for q, a in qa[i:] + qa[:i]][:2]} for i in range(3)]
    (workspace / "sft.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    write_shards(workspace / "sft.jsonl", workspace / "sft", samples_per_shard=2, progress=False)
    sft = readme_command("mm-llama train vision_sft")
    with pytest.warns(UserWarning, match="replace the recipe's timm encoder settings"):
        run(sft, {"/ckpt/Llama-3.2-11B-Vision-Instruct": mllama, "{000000..000099}": "{000000..000001}"},
            quick(sft, **{"data.max_seq_len": 64, "train.activation_checkpointing": False, "optim.accumulation_steps": 1,
                          "model.train": ["image.fusion"], "data.num_workers": 0}))
    assert (workspace / "runs/sft/adapter.safetensors").is_file()
    _png(workspace / "chart.png", 3)
    run(readme_command("mm-llama vqa --model runs/sft"), extra=["--max-new-tokens", "3"])
    run(readme_command("mm-llama export runs/sft"))
    assert (workspace / "served/preprocessor_config.json").is_file()
    run(readme_command("mm-llama export runs/demo/lm"))
    assert (workspace / "served-lm/config.json").is_file()


def test_glyph_probe(demo: Path, workspace: Path) -> None:
    run(readme_command("mm-llama synth glyphs probe/ --n 2000"), {"--n 2000": "--n 8"}, ["--no-progress"])
    run(readme_command("mm-llama synth glyphs probe/ --n 300"), {"--n 300": "--n 4"}, ["--no-progress"])
    lm = readme_command("mm-llama train tiny_lm_pretrain")
    run(lm, extra=quick(lm))
    encoder = readme_command("mm-llama train tiny_glyph_encoder")
    run(encoder, extra=quick(encoder))
    assert (workspace / "runs/glyph-encoder/encoder.safetensors").is_file()
    probe = readme_command("mm-llama train tiny_glyph_probe")
    run(probe, extra=quick(probe))
    cfg = yaml.safe_load((workspace / "runs/glyph-probe/config.yaml").read_text())["model"]
    assert cfg["fusion_layers"] == [0, 1, 2, 3] and cfg["vision"]["stem_strides"] == [2, 2, 2, 2, 1, 1]
    assert cfg["vision"]["stem_channels"] == [16, 32, 64, 96, 96, 96] and cfg["vision"]["timm_kwargs"]["depth"] == 2
    assert cfg["vision"]["stem_pixel_path"] is False and cfg["encoder_checkpoint"] == "runs/glyph-encoder"
    run(readme_command("mm-llama eval --model runs/glyph-probe"), extra=["--max-samples", "2", "--no-progress"])
    assert (workspace / "runs/glyph-probe/eval-vqa-blank.json").is_file()
    shutil.rmtree(workspace / "probe")

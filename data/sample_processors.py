"""Per-sample processing inside a loader worker: one webdataset sample (``KEY.*`` members as bytes) →
decoded media + tokenized prompt and labels, or a counted skip with its reason. One processor per
family (image, video, audio); the record fields come from the task registry's readers
(`mm_llama.data.tasks`)."""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from time import perf_counter
from typing import Any

from torchvision.transforms.v2 import functional as tvF

from mm_llama.data.decoders import decode_audio, decode_image, decode_video
from mm_llama.data.image_transform import ImageTransform, TiledImage
from mm_llama.data.json_limits import JSONLimitError, loads_limited
from mm_llama.data.loader_config import LoaderConfig
from mm_llama.data.loader_stats import StatsRecorder
from mm_llama.data.prompts import EmptyLabelsError, Example, build_example, speech_token_count
from mm_llama.data.records import Record, RecordError
from mm_llama.data.tasks import get_task
from mm_llama.encoders.audio_features import FRAMES_PER_SECOND, SAMPLE_RATE, log_mel
from mm_llama.media_tokens import MediaTokens
from mm_llama.tokenizer import Tokenizer

IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp", "bmp", "gif", "tif", "tiff")
VIDEO_EXTENSIONS = ("mp4", "webm", "mkv", "mov", "avi")
AUDIO_EXTENSIONS = ("flac", "wav", "mp3", "ogg", "opus")


class _Skip(Exception):
    """Internal: this sample cannot be used (`reason` is the stats tag)."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason
        self.message = message


@dataclass
class _Item:
    """A processed sample inside a worker: the collate pair, its `SHARD:KEY`, its audio seconds."""

    pair: tuple[Example, Any]
    source: str
    seconds: float = 0.0


def _describe(e: BaseException) -> str:
    text = str(e)
    return text if text.startswith("cannot decode") else f"{type(e).__name__}: {text}"


class _Timer:
    """Times one stage and turns any exception into a `_Skip` with `reason`."""

    def __init__(self, recorder: StatsRecorder, stage: str, reason: str) -> None:
        self.recorder, self.stage, self.reason = recorder, stage, reason

    def __enter__(self) -> None:
        self.t0 = perf_counter()

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: object) -> bool:
        self.recorder.time(self.stage, perf_counter() - self.t0)
        if exc is None or isinstance(exc, _Skip) or not isinstance(exc, Exception):
            return False
        reason = "empty_labels" if isinstance(exc, EmptyLabelsError) else self.reason
        raise _Skip(reason, _describe(exc)) from exc


def _member(sample: Mapping[str, Any], extensions: tuple[str, ...], what: str) -> tuple[str, bytes]:
    for ext in extensions:
        data = sample.get(ext)
        if data is not None:
            return ext, data
    members = sorted(k for k in sample if not k.startswith("__"))
    raise _Skip(
        f"missing_{what}",
        f"no {what} member (expected KEY.{{{','.join(extensions)}}}); the sample has {members}",
    )


def _metadata(sample: Mapping[str, Any]) -> tuple[str | None, dict[str, Any]]:
    """`(KEY.txt text or None, KEY.json object or {})`; `_Skip("bad_metadata")` if unreadable."""
    text = None
    if sample.get("txt") is not None:
        try:
            text = bytes(sample["txt"]).decode("utf-8")
        except UnicodeDecodeError as e:
            raise _Skip("bad_metadata", f"KEY.txt is not UTF-8 text ({e})") from None
    meta: Any = {}
    if sample.get("json") is not None:
        try:
            meta = loads_limited(sample["json"])  # depth limit, lone surrogates, huge integers
        except JSONLimitError as e:
            raise _Skip("bad_metadata", f"KEY.json cannot be used: {e}") from None
        if not isinstance(meta, dict):
            raise _Skip("bad_metadata", f"KEY.json must hold an object, got {type(meta).__name__}")
    return text, meta


class _LeftOut(Exception):
    """Internal: a usable record of a question type the loader was told to leave out (`question_types`);
    counted as `LoaderStats.left_out`, not as a skip."""

    def __init__(self, qtype: str | None) -> None:
        super().__init__(qtype)
        self.qtype = qtype


def _read(task: str, text: str | None, meta: Mapping[str, Any], **options: Any) -> tuple[str, Record]:
    """`(the task the record is, the record)`: the registry's record reader (a mixture picks its part);
    an unusable record is a `_Skip` with the reader's reason."""
    spec = get_task(task)
    try:
        return spec.resolve(meta).name, spec.read(text, meta, **options)
    except RecordError as e:
        raise _Skip(e.reason, str(e)) from None


QUESTION_SLOT = "{question}"


def check_prompt_for(task: str, prompt: str | None) -> None:
    """A `prompt` for a question-answering task must say where the question goes."""
    if prompt is not None and get_task(task).user_field == "question" and QUESTION_SLOT not in prompt:
        raise ValueError(f"prompt {prompt!r:.80} for task {task!r} has no {QUESTION_SLOT} slot: a question-answering "
                         f"prompt is a wording around each question, e.g. 'Answer briefly. {QUESTION_SLOT}'")


def check_question_types(question_types: Iterable[str] | None) -> frozenset[str] | None:
    """The question types a loader keeps (records whose KEY.json ``type`` / ``question_type`` is one of
    them; a curriculum stage on one kind of question), or None for every record; ValueError for an empty
    list or a value that is not a non-empty string."""
    if question_types is None:
        return None
    if isinstance(question_types, str):
        raise ValueError(f"question_types must be a list of type names, e.g. ['shape'], got the string "
                         f"{question_types!r}")
    types = list(question_types)
    bad = [t for t in types if not isinstance(t, str) or not t.strip()]
    if bad or not types:
        raise ValueError(f"question_types must be a non-empty list of type names (KEY.json 'type'), got {types!r:.120}")
    return frozenset(types)


class _Processor:
    """Base of the per-family sample processors: a pipeline stage `(samples, recorder) → _Item`s.

    `question_types`: keep only records whose KEY.json ``type`` (or ``question_type``) is one of these
    (None: every record); the others are left out before their media is decoded and counted apart from
    skips (`LoaderStats.left_out`)."""

    def __init__(self, task: str, tokenizer: Tokenizer, media: MediaTokens, config: LoaderConfig,
                 question_types: frozenset[str] | None = None) -> None:
        self.task = task
        self.tokenizer = tokenizer
        self.media = media
        self.config = config
        self.question_types = question_types

    def tokenize(self, recorder: StatsRecorder, fields: Mapping[str, Any], task: str | None = None) -> Example:
        """``fields`` as a prompt + response of ``task`` (default: the processor's)."""
        with _Timer(recorder, "tokenize", "bad_field"):
            return build_example(self.tokenizer, self.media, task or self.task, fields,
                                 max_len=self.config.max_seq_len)

    def read_fields(self, sample: Mapping[str, Any], recorder: StatsRecorder,
                    prompt: str | None = None) -> tuple[str, dict[str, Any]]:
        """`(the task the record is, its fields)` from KEY.txt / KEY.json; `prompt` replaces the default
        instruction of a task whose user turn is one (captions), and for question answering is a wording
        with `{question}` where each question goes (e.g. the paper's evaluation wording, so a model is
        trained as it will be asked: `short_answer_question`)."""
        with _Timer(recorder, "decode", "bad_metadata"):
            text, meta = _metadata(sample)
        task, record = _read(self.task, text, meta)
        if self.question_types is not None and record.qtype not in self.question_types:
            raise _LeftOut(record.qtype)
        fields = dict(record.fields)
        user_field = get_task(task).user_field
        if prompt is not None and user_field == "prompt":
            fields["prompt"] = prompt
        elif prompt is not None and user_field == "question" and QUESTION_SLOT in prompt:
            fields["question"] = prompt.replace(QUESTION_SLOT, fields["question"])
            if "turns" in fields:
                fields["turns"] = [(prompt.replace(QUESTION_SLOT, q), a) for q, a in fields["turns"]]
        return task, fields

    def augment(self, value: Any) -> Any:
        return value if self.config.augment is None else self.config.augment(value)

    def make(self, sample: Mapping[str, Any], source: str, recorder: StatsRecorder) -> _Item:
        raise NotImplementedError

    def __call__(self, src: Iterable[dict[str, Any]], recorder: StatsRecorder) -> Iterator[_Item]:
        it = iter(src)
        while True:
            t0 = perf_counter()
            try:
                sample = next(it)
            except StopIteration:
                break
            recorder.time("read", perf_counter() - t0)
            source = f"{sample.get('__url__', '<unknown shard>')}:{sample.get('__key__', '<no key>')}"
            try:
                item = self.make(sample, source, recorder)
            except _Skip as skip:
                recorder.skip(skip.reason, source, skip.message)
                if self.config.resampled:  # an endless stream must not spin over unusable data
                    recorder.check_stuck(self.config.min_samples_before_check)
                continue
            except _LeftOut as left:
                recorder.leave_out(left.qtype)
                if self.config.resampled:
                    recorder.check_types_met(self.question_types)
                continue
            recorder.sample(sum(len(v) for k, v in sample.items() if isinstance(v, (bytes, bytearray))))
            yield item
        recorder.check_types_met(self.question_types, finished=True)


class _ImageProcessor(_Processor):

    def __init__(self, *args: Any, prompt: str | None = None) -> None:
        super().__init__(*args)
        self.prompt = prompt
        self.transform = ImageTransform(self.config.tile_size, self.config.max_tiles)

    def make(self, sample: Mapping[str, Any], source: str, recorder: StatsRecorder) -> _Item:
        ext, data = _member(sample, IMAGE_EXTENSIONS, "image")
        task, fields = self.read_fields(sample, recorder, self.prompt)
        example = self.tokenize(recorder, fields, task)
        with _Timer(recorder, "decode", "decode_image"):
            image = decode_image(data, f"{source}.{ext}")
        with _Timer(recorder, "transform", "transform"):
            if self.config.augment is None:  # decode_image already gave RGB with EXIF applied
                tiled = self.transform.tile_tensor(tvF.pil_to_tensor(image))
            else:  # an augmentation may hand back any PIL mode: let the transform normalise it
                tiled = self.transform(self.augment(image), source=f"{source}.{ext}")
        return _Item(pair=(example, [tiled]), source=source)


class _VideoProcessor(_Processor):

    def __init__(self, *args: Any, num_frames: int, prompt: str | None = None) -> None:
        super().__init__(*args)
        self.num_frames = num_frames
        self.prompt = prompt
        self.transform = ImageTransform(self.config.tile_size, self.config.max_tiles)

    def make(self, sample: Mapping[str, Any], source: str, recorder: StatsRecorder) -> _Item:
        ext, data = _member(sample, VIDEO_EXTENSIONS, "video")
        _, fields = self.read_fields(sample, recorder, self.prompt)
        example = self.tokenize(recorder, fields)
        with _Timer(recorder, "decode", "decode_video"):
            frames = decode_video(data, f"{source}.{ext}", self.num_frames)
        with _Timer(recorder, "transform", "transform"):
            frames = self.augment(frames)
            clip: list[TiledImage] = [self.transform.tile_tensor(frame) for frame in frames]
        return _Item(pair=(example, clip), source=source)


class _AudioProcessor(_Processor):

    def __init__(
        self, *args: Any, max_batch_seconds: float, target_language: str | None, default_language: str | None
    ) -> None:
        super().__init__(*args)
        self.max_batch_seconds = max_batch_seconds
        self.target_language = target_language
        self.default_language = default_language

    def fields(self, meta: Mapping[str, Any]) -> dict[str, Any]:
        options = ({"default_language": self.default_language} if self.task == "asr"
                   else {"target_language": self.target_language})
        return dict(_read(self.task, None, meta, **options)[1].fields)

    def make(self, sample: Mapping[str, Any], source: str, recorder: StatsRecorder) -> _Item:
        ext, data = _member(sample, AUDIO_EXTENSIONS, "audio")
        prompted = get_task(self.task).prompted  # speech-encoder pretraining reads the audio only
        fields: dict[str, Any] = {}
        if prompted:
            with _Timer(recorder, "decode", "bad_metadata"):
                _, meta = _metadata(sample)
            if sample.get("json") is None:
                raise _Skip("missing_field", "audio samples need KEY.json (text, language, optional translation)")
            fields = self.fields(meta)
        with _Timer(recorder, "decode", "decode_audio"):
            wave = decode_audio(data, f"{source}.{ext}", SAMPLE_RATE)
        with _Timer(recorder, "transform", "transform"):
            features = log_mel(self.augment(wave))  # [F, 80]
        frames = int(features.shape[0])
        seconds = frames / FRAMES_PER_SECOND
        if seconds > self.max_batch_seconds:
            raise _Skip(
                "too_long",
                f"{seconds:.2f} s of audio is more than max_batch_seconds={self.max_batch_seconds:g}; "
                "raise the budget or cut long utterances",
            )
        if not prompted:
            return _Item(pair=(None, features), source=source, seconds=seconds)
        fields["n_speech_tokens"] = speech_token_count(frames)
        example = self.tokenize(recorder, fields)
        return _Item(pair=(example, features), source=source, seconds=seconds)

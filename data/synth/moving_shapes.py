"""`moving-shapes`: short mp4 clips of 1–2 shapes; one moves in a direction or turns another colour.

A clip is `FRAMES` frames at `FPS` fps, `WIDTH`×`HEIGHT`, encoded with PyAV (libx264 when the bundled
FFmpeg has it, else mpeg4; one encoder thread, so the bytes do not depend on the machine's core count).
The frame is split into two halves (top/bottom for a horizontal mover, left/right for a vertical
one, either for a colour change); the event object lives in one half and the optional still object in
the other, so they never overlap. A mover travels linearly from near one edge to near the other; a
turning shape switches colour at a frame between 6 and 9 (of 16) and stays in place.

Records per clip:

- ``video-caption`` layout: ``KEY.mp4`` + ``KEY.txt`` (caption) + ``KEY.json`` (caption, every QA pair
  under ``qa``, objects with start/end centres and colours, fps, frame count, codec);
- ``video-qa`` layout: one record per selected question (one per question type), key ``KEY-qJ``:
  ``KEY-qJ.mp4`` + ``KEY-qJ.json`` with ``question``, ``answer``, ``type`` and ``video_key``;
- ``video-chat`` layout: ``KEY.mp4`` + ``KEY.json`` whose ``turns`` ask the same questions in a shuffled
  order, then the caption (`MovingShapesSample.chat_record`): task ``video_qa`` trains them as one
  conversation about the clip.
"""

from __future__ import annotations

import io
import json
import random
from dataclasses import dataclass
from fractions import Fraction
from typing import Any

import numpy as np
from PIL import Image, ImageDraw

from mm_llama.data.synth import grammar
from mm_llama.data.tasks import DEFAULT_VIDEO_PROMPT
from mm_llama.data.synth.grammar import QA, Clip, ClipObject
from mm_llama.data.synth.shapes import draw_shape
from mm_llama.data.synth.splits import draw_in_split, sample_key, sample_rng

KIND = "moving-shapes"
WIDTH = 128
HEIGHT = 128
FRAMES = 16
FPS = 8
RADIUS: dict[str, tuple[int, int]] = {"small": (9, 11), "large": (16, 19)}
"""Radius range in pixels of each size."""
LAYOUTS: tuple[str, ...] = ("video-caption", "video-qa", "video-chat")
"""Sub-folders (webdataset layouts) that the ``moving-shapes`` kind writes."""

_MOVES: dict[str, tuple[int, int]] = {"left": (-1, 0), "right": (1, 0), "up": (0, -1), "down": (0, 1)}


def video_codec() -> str:
    """``"libx264"`` if this PyAV's FFmpeg can encode it, else ``"mpeg4"``."""
    import av

    return "libx264" if "libx264" in av.codecs_available else "mpeg4"


@dataclass(frozen=True)
class Track:
    """Pixel trajectory of one clip object: centre per frame and colour per frame."""

    obj: ClipObject
    r: int
    centres: tuple[tuple[int, int], ...]
    colours: tuple[str, ...]

    def to_dict(self) -> dict[str, Any]:
        o = self.obj
        return {
            "colour": o.colour, "shape": o.shape, "size": o.size, "event": o.event,
            "direction": o.direction, "end_colour": o.final_colour, "radius": self.r,
            "start_center": list(self.centres[0]), "end_center": list(self.centres[-1]),
            "rgb_start": list(grammar.COLOURS[self.colours[0]]), "rgb_end": list(grammar.COLOURS[self.colours[-1]]),
            "change_frame": next((t for t, c in enumerate(self.colours) if c != self.colours[0]), None),
        }


def _half_range(lo: int, hi: int, r: int) -> tuple[int, int]:
    """Centre range that keeps a radius-``r`` shape inside ``[lo, hi)`` with a 2-pixel margin."""
    return lo + r + 2, hi - r - 3


def plan_tracks(clip: Clip, rng: random.Random, frames: int = FRAMES) -> list[Track]:
    """Trajectories for every object of ``clip`` (event object and still object in separate halves)."""
    first = clip.objects[0]
    if first.event == "move":
        assert first.direction is not None
        horizontal_motion = _MOVES[first.direction][1] == 0
    else:
        horizontal_motion = rng.random() < 0.5
    # a horizontal mover occupies a horizontal band (top or bottom half); the other object the other half
    halves = [0, 1]
    rng.shuffle(halves)
    tracks = []
    for k, o in enumerate(clip.objects):
        r = rng.randint(*RADIUS[o.size])
        half = halves[k]
        if horizontal_motion:  # bands along y
            y_lo, y_hi = _half_range(half * HEIGHT // 2, (half + 1) * HEIGHT // 2, r)
            x_lo, x_hi = _half_range(0, WIDTH, r)
        else:  # bands along x
            x_lo, x_hi = _half_range(half * WIDTH // 2, (half + 1) * WIDTH // 2, r)
            y_lo, y_hi = _half_range(0, HEIGHT, r)
        if o.event == "move":
            assert o.direction is not None
            dx, dy = _MOVES[o.direction]
            slack = rng.randint(0, 6)
            if dx:
                xs = (x_lo + slack, x_hi - slack) if dx > 0 else (x_hi - slack, x_lo + slack)
                y = rng.randint(y_lo, y_hi)
                start, end = (xs[0], y), (xs[1], y)
            else:
                ys = (y_lo + slack, y_hi - slack) if dy > 0 else (y_hi - slack, y_lo + slack)
                x = rng.randint(x_lo, x_hi)
                start, end = (x, ys[0]), (x, ys[1])
            centres = tuple(
                (int(round(start[0] + (end[0] - start[0]) * t / (frames - 1))),
                 int(round(start[1] + (end[1] - start[1]) * t / (frames - 1))))
                for t in range(frames)
            )
        else:
            c = (rng.randint(x_lo, x_hi), rng.randint(y_lo, y_hi))
            centres = tuple(c for _ in range(frames))
        if o.event == "turn":
            change = rng.randint(6, 9) if frames >= 10 else frames // 2
            colours = tuple(o.colour if t < change else o.final_colour for t in range(frames))
        else:
            colours = tuple(o.colour for _ in range(frames))
        tracks.append(Track(o, r, centres, colours))
    return tracks


def render_frames(tracks: list[Track], background: tuple[int, int, int], frames: int = FRAMES) -> np.ndarray:
    """RGB frames ``[T, H, W, 3]`` uint8."""
    out = np.empty((frames, HEIGHT, WIDTH, 3), dtype=np.uint8)
    for t in range(frames):
        img = Image.new("RGB", (WIDTH, HEIGHT), background)
        draw = ImageDraw.Draw(img)
        for tr in tracks:
            cx, cy = tr.centres[t]
            draw_shape(draw, tr.obj.shape, cx, cy, tr.r, grammar.COLOURS[tr.colours[t]])
        out[t] = np.asarray(img)
    return out


def encode_mp4(frames: np.ndarray, fps: int = FPS, codec: str | None = None) -> bytes:
    """Encode ``[T, H, W, 3]`` uint8 RGB frames as an mp4 (yuv420p) in memory; deterministic bytes."""
    import av

    if frames.ndim != 4 or frames.shape[-1] != 3 or frames.dtype != np.uint8:
        raise ValueError(f"expected uint8 frames [T, H, W, 3], got {frames.dtype} {tuple(frames.shape)}")
    codec = codec or video_codec()
    buf = io.BytesIO()
    with av.open(buf, mode="w", format="mp4") as container:
        stream = container.add_stream(codec, rate=fps)
        stream.width, stream.height = int(frames.shape[2]), int(frames.shape[1])
        stream.pix_fmt = "yuv420p"
        stream.time_base = Fraction(1, fps)
        stream.codec_context.thread_count = 1
        if codec == "libx264":
            stream.codec_context.options = {"crf": "16", "preset": "medium", "threads": "1"}
        else:
            stream.codec_context.options = {"qscale": "2"}
            stream.codec_context.bit_rate = 2_000_000
        for t, arr in enumerate(frames):
            frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(arr), format="rgb24")
            frame.pts = t
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return buf.getvalue()


@dataclass
class MovingShapesSample:
    """One generated clip with its caption and questions."""

    key: str
    mp4: bytes
    codec: str
    background: str
    clip: Clip
    tracks: list[Track]
    caption: str
    qa: list[QA]
    selected_qa: list[QA]
    meta: dict[str, Any]

    def json_dict(self) -> dict[str, Any]:
        """The ``video-caption`` record's JSON."""
        return {
            "caption": self.caption, "qa": [q.to_dict() for q in self.qa], "width": WIDTH, "height": HEIGHT,
            "frames": FRAMES, "fps": FPS, "duration": FRAMES / FPS, "codec": self.codec,
            "background": self.background, "objects": [t.to_dict() for t in self.tracks], **self.meta,
        }

    def records(self) -> dict[str, list[tuple[str, dict[str, bytes]]]]:
        """Webdataset records per layout: ``{"video-caption": [...], "video-qa": [...], "video-chat": [...]}``."""
        cap = (self.key, {"mp4": self.mp4, "txt": self.caption.encode("utf-8"), "json": _dumps(self.json_dict())})
        qa_records = [
            (f"{self.key}-q{j}", {"mp4": self.mp4,
                                  "json": _dumps({**q.to_dict(), "video_key": self.key, **self.meta})})
            for j, q in enumerate(self.selected_qa)
        ]
        return {"video-caption": [cap], "video-qa": qa_records, "video-chat": [self.chat_record()]}

    def chat_record(self) -> tuple[str, dict[str, bytes]]:
        """The ``video-chat`` record: the selected questions in a per-sample shuffled order, then the caption
        asked with the video caption instruction, as ``turns`` of one conversation (task ``video_qa``
        trains every answer; the caption last, so it cannot answer the questions from the text)."""
        m = self.meta
        order = list(self.selected_qa)
        sample_rng(f"{KIND}-chat", int(m["seed"]), str(m["split"]), int(m["index"])).shuffle(order)
        turns = [q.to_dict() for q in order] + [{"question": DEFAULT_VIDEO_PROMPT, "answer": self.caption,
                                                 "type": "caption"}]
        return self.key, {"mp4": self.mp4, "json": _dumps({"turns": turns, "video_key": self.key, **m})}


def _dumps(obj: Any) -> bytes:
    return json.dumps(obj, sort_keys=True, ensure_ascii=False).encode("utf-8")


def make_moving_shapes_sample(seed: int, split: str, index: int, codec: str | None = None) -> MovingShapesSample:
    """Sample ``index`` of the ``moving-shapes`` kind for ``(seed, split)``."""
    rng = sample_rng(KIND, seed, split, index)
    clip = draw_in_split(grammar.random_clip, Clip.description, rng, split)
    background = rng.choice(sorted(grammar.BACKGROUNDS))
    tracks = plan_tracks(clip, rng)
    codec = codec or video_codec()
    mp4 = encode_mp4(render_frames(tracks, grammar.BACKGROUNDS[background]), codec=codec)
    caption = grammar.clip_caption(clip, rng)
    qa = grammar.clip_qa(clip)
    selected = grammar.select_qa(qa, rng, grammar.CLIP_QA_TYPES)
    meta = {"kind": KIND, "seed": seed, "split": split, "index": index}
    return MovingShapesSample(sample_key(split, index), mp4, codec, background, clip, tracks, caption, qa,
                              selected, meta)


def moving_shapes_records(seed: int, split: str, index: int) -> dict[str, list[tuple[str, dict[str, bytes]]]]:
    """Records of sample ``index`` per layout (what `write_kind` consumes)."""
    return make_moving_shapes_sample(seed, split, index).records()

"""`moving-shapes` clips decode with PyAV; movers move the stated way, turning shapes change colour."""

from __future__ import annotations

import io

import av
import numpy as np
import pytest

from mm_llama.data.synth import grammar
from mm_llama.data.synth.moving_shapes import FRAMES, HEIGHT, WIDTH, make_moving_shapes_sample, video_codec


def _decode(mp4: bytes) -> np.ndarray:
    with av.open(io.BytesIO(mp4)) as container:
        return np.stack([f.to_ndarray(format="rgb24") for f in container.decode(video=0)])


def _close(frames: np.ndarray, rgb: tuple[int, int, int], tol: int = 60) -> np.ndarray:
    return np.abs(frames.astype(int) - np.array(rgb)).max(-1) < tol


def _centroid(mask: np.ndarray) -> tuple[float, float]:
    ys, xs = np.nonzero(mask)
    assert xs.size > 20, "shape not found"
    return float(xs.mean()), float(ys.mean())


@pytest.mark.parametrize("codec", [video_codec(), "mpeg4"])
def test_clips_decode_and_show_the_event(codec: str) -> None:
    seen = set()
    for i in range(12):
        s = make_moving_shapes_sample(5, "train", i, codec=codec)
        frames = _decode(s.mp4)
        assert frames.shape == (FRAMES, HEIGHT, WIDTH, 3)
        first = s.clip.objects[0]
        seen.add(first.event)
        if first.event == "move":
            rgb = grammar.COLOURS[first.colour]
            close = _close(frames, rgb)
            moving = close & ~close.all(axis=0)  # drop pixels of a still shape of the same colour
            (x0, y0), (x1, y1) = _centroid(moving[0]), _centroid(moving[-1])
            dx, dy = x1 - x0, y1 - y0
            expected = {"right": (dx > 30 and abs(dy) < 5), "left": (dx < -30 and abs(dy) < 5),
                        "down": (dy > 30 and abs(dx) < 5), "up": (dy < -30 and abs(dx) < 5)}
            assert expected[first.direction or ""], (i, first, dx, dy)
            assert f"Which way does the {first.colour} {first.shape} move?" in {q.question for q in s.qa}
        else:
            track = s.tracks[0]
            cx, cy = track.centres[0]
            start = frames[0, cy, cx].astype(int)
            end = frames[-1, cy, cx].astype(int)
            assert np.abs(start - grammar.COLOURS[first.colour]).max() < 40, (i, start, first)
            assert np.abs(end - grammar.COLOURS[first.final_colour]).max() < 40, (i, end, first)
            answers = {q.question: q.answer for q in s.qa}
            assert answers[f"What colour does the {first.shape} turn?"] == first.final_colour
        for track in s.tracks[1:]:  # still shapes stay put
            cx, cy = track.centres[0]
            assert np.abs(frames[:, cy, cx].astype(int) - grammar.COLOURS[track.obj.colour]).max() < 40
    assert seen == {"move", "turn"}


def test_records_and_metadata() -> None:
    s = make_moving_shapes_sample(0, "val", 1)
    records = s.records()
    [(key, files)] = records["video-caption"]
    assert set(files) == {"mp4", "txt", "json"}
    import json

    meta = json.loads(files["json"])
    assert meta["frames"] == FRAMES and meta["fps"] == 8 and meta["caption"] == files["txt"].decode()
    assert meta["codec"] == s.codec
    for j, (qkey, qfiles) in enumerate(records["video-qa"]):
        q = json.loads(qfiles["json"])
        assert qkey == f"{key}-q{j}" and q["video_key"] == key and " " not in q["answer"]
        assert qfiles["mp4"] == files["mp4"]

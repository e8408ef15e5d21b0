"""`shapes`: PNG images of 1–3 coloured shapes on a plain background, with captions and QA.

Geometry: the image (one of `IMAGE_SIZES`, several aspect ratios; with ``square=True`` always
`SQUARE_SIZE`) is split into a 3×3 grid; a shape at position ``left`` has its centre in the left-middle
cell, ``top`` in the top-middle cell, ``middle`` in the centre cell, and so on. Each shape lies entirely
inside its cell (so shapes never overlap and the position word is exact). Radii: small 18–22 % and large
38–45 % of the smaller cell side. Shapes are drawn without antialiasing, so the pixel at every shape's
centre is exactly its colour's RGB.

One sample (see `make_shapes_sample`) gives records in three layouts:

- ``image-caption`` layout: ``KEY.png`` + ``KEY.txt`` (caption) + ``KEY.json`` (caption, all QA pairs
  under ``qa``, the scene with pixel centres and radii);
- ``image-qa`` layout: one record per selected question (one per question type, see
  `grammar.select_qa`), key ``KEY-qJ``: ``KEY-qJ.png`` (the same image) + ``KEY-qJ.json`` with
  ``question``, ``answer``, ``type`` and ``image_key``;
- ``image-chat`` layout: ``KEY.png`` + ``KEY.json`` whose ``turns`` ask the same questions in a shuffled
  order and then the caption (`ShapesSample.chat_record`): task ``vqa`` trains them as one conversation,
  every answer labelled, so each image's content-heavy questions train next to its easy ones.
"""

from __future__ import annotations

import io
import json
import math
import random
from dataclasses import dataclass, field
from typing import Any

from PIL import Image, ImageDraw

from mm_llama.data.synth import grammar
from mm_llama.data.synth.grammar import QA, Scene, SceneObject
from mm_llama.data.synth.splits import draw_in_split, sample_key, sample_rng
from mm_llama.data.tasks import DEFAULT_CAPTION_PROMPT

KIND = "shapes"
IMAGE_SIZES: tuple[tuple[int, int], ...] = ((224, 224), (320, 200), (200, 320), (256, 192), (192, 256))
"""(width, height) choices: square, landscape and portrait."""
SQUARE_SIZE: tuple[int, int] = IMAGE_SIZES[0]
"""The one (width, height) of ``square=True`` samples."""
RADIUS_FRACTION: dict[str, tuple[float, float]] = {"small": (0.18, 0.22), "large": (0.38, 0.45)}
"""Radius range of each size, as a fraction of the smaller side of a grid cell."""
POSITION_CELLS: dict[str, tuple[int, int]] = {
    "left": (0, 1), "right": (2, 1), "top": (1, 0), "bottom": (1, 2), "middle": (1, 1),
}
"""Position word → (column, row) of its cell in the 3×3 grid."""


@dataclass(frozen=True)
class PlacedShape:
    """A scene object with pixel geometry: centre ``(cx, cy)`` and radius ``r`` (circumradius)."""

    obj: SceneObject
    cx: int
    cy: int
    r: int

    def to_dict(self) -> dict[str, Any]:
        o = self.obj
        return {"colour": o.colour, "shape": o.shape, "size": o.size, "position": o.position,
                "rgb": list(grammar.COLOURS[o.colour]), "center": [self.cx, self.cy], "radius": self.r}


@dataclass
class ShapesSample:
    """One generated image with its caption and questions."""

    key: str
    png: bytes
    width: int
    height: int
    background: str
    scene: Scene
    placed: list[PlacedShape]
    caption: str
    qa: list[QA]
    selected_qa: list[QA]
    meta: dict[str, Any] = field(default_factory=dict)

    def json_dict(self) -> dict[str, Any]:
        """The ``image-caption`` record's JSON."""
        return {
            "caption": self.caption,
            "qa": [q.to_dict() for q in self.qa],
            "width": self.width,
            "height": self.height,
            "background": self.background,
            "objects": [p.to_dict() for p in self.placed],
            **self.meta,
        }

    def records(self) -> dict[str, list[tuple[str, dict[str, bytes]]]]:
        """Webdataset records per layout: ``{"image-caption", "image-qa", "image-chat"}`` → records."""
        cap = (self.key, {
            "png": self.png,
            "txt": self.caption.encode("utf-8"),
            "json": _dumps(self.json_dict()),
        })
        qa_records = []
        for j, q in enumerate(self.selected_qa):
            qa_records.append((f"{self.key}-q{j}", {
                "png": self.png,
                "json": _dumps({**q.to_dict(), "image_key": self.key, **self.meta}),
            }))
        return {"image-caption": [cap], "image-qa": qa_records, "image-chat": [self.chat_record()]}

    def chat_record(self) -> tuple[str, dict[str, bytes]]:
        """The ``image-chat`` record: the selected questions in a per-sample shuffled order, then the caption
        asked with the caption task's instruction, as ``turns`` of one conversation. The caption comes last
        because it names everything a question asks: earlier, it would answer the later questions from the
        text instead of the image."""
        m = self.meta
        order = list(self.selected_qa)
        sample_rng(f"{KIND}-chat", int(m["seed"]), str(m["split"]), int(m["index"])).shuffle(order)
        turns = [q.to_dict() for q in order] + [{"question": DEFAULT_CAPTION_PROMPT, "answer": self.caption,
                                                 "type": "caption"}]
        return self.key, {"png": self.png, "json": _dumps({"turns": turns, "image_key": self.key, **m})}


def _dumps(obj: Any) -> bytes:
    return json.dumps(obj, sort_keys=True, ensure_ascii=False).encode("utf-8")


def shape_polygon(shape: str, cx: float, cy: float, r: float) -> list[tuple[float, float]]:
    """Vertices of a polygonal shape centred on ``(cx, cy)`` inside a circle of radius ``r``."""
    def ring(n: int, radius: float, start: float = -90.0) -> list[tuple[float, float]]:
        return [(cx + radius * math.cos(math.radians(start + 360.0 * k / n)),
                 cy + radius * math.sin(math.radians(start + 360.0 * k / n))) for k in range(n)]

    if shape == "square":
        h = r * 0.8
        return [(cx - h, cy - h), (cx + h, cy - h), (cx + h, cy + h), (cx - h, cy + h)]
    if shape == "triangle":
        return ring(3, r)
    if shape == "diamond":
        return [(cx, cy - r), (cx + 0.75 * r, cy), (cx, cy + r), (cx - 0.75 * r, cy)]
    if shape == "hexagon":
        return ring(6, r, start=0.0)
    if shape == "star":
        outer, inner = ring(5, r), ring(5, 0.45 * r, start=-90.0 + 36.0)
        return [p for pair in zip(outer, inner) for p in pair]
    raise ValueError(f"no polygon for shape {shape!r}; polygons: square, triangle, diamond, hexagon, star")


def draw_shape(draw: ImageDraw.ImageDraw, shape: str, cx: float, cy: float, r: float,
               rgb: tuple[int, int, int]) -> None:
    """Draw one filled shape (no antialiasing: every covered pixel is exactly ``rgb``)."""
    if shape == "circle":
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=rgb)
    else:
        draw.polygon(shape_polygon(shape, cx, cy, r), fill=rgb)


def place_scene(scene: Scene, width: int, height: int, rng: random.Random) -> list[PlacedShape]:
    """Pixel centre and radius for each object, inside its position's grid cell."""
    cw, ch = width / 3.0, height / 3.0
    cell = min(cw, ch)
    placed = []
    for o in scene.objects:
        lo, hi = RADIUS_FRACTION[o.size]
        r = max(3, int(round(cell * rng.uniform(lo, hi))))
        col, row = POSITION_CELLS[o.position]
        x0, x1 = math.ceil(col * cw + r + 1), math.floor((col + 1) * cw - r - 2)
        y0, y1 = math.ceil(row * ch + r + 1), math.floor((row + 1) * ch - r - 2)
        if x0 > x1 or y0 > y1:
            raise ValueError(f"a {o.size} shape (radius {r}) does not fit a {width}x{height} image's cells")
        placed.append(PlacedShape(o, rng.randint(x0, x1), rng.randint(y0, y1), r))
    return placed


def render_png(placed: list[PlacedShape], width: int, height: int, background: tuple[int, int, int]) -> bytes:
    """Draw the shapes and encode a deterministic RGB PNG."""
    img = Image.new("RGB", (width, height), background)
    draw = ImageDraw.Draw(img)
    for p in placed:
        draw_shape(draw, p.obj.shape, p.cx, p.cy, p.r, grammar.COLOURS[p.obj.colour])
    return encode_png(img)


def encode_png(img: Image.Image) -> bytes:
    """PNG bytes with fixed encoder settings, so the same pixels always give the same file."""
    buf = io.BytesIO()
    img.save(buf, format="PNG", optimize=False, compress_level=6)
    return buf.getvalue()


def make_shapes_sample(seed: int, split: str, index: int, *, square: bool = False) -> ShapesSample:
    """Sample ``index`` of the ``shapes`` kind for ``(seed, split)`` (pure function of its arguments).

    ``square=True`` renders every image at `SQUARE_SIZE` instead of one of `IMAGE_SIZES`: a model that
    sees one square tile then gets no letterbox padding, and each grid position always falls on the same
    pixels. The scene, background, caption and questions are the same as with ``square=False``; only the
    pixel geometry (size, centres, radii) differs.
    """
    if not isinstance(square, bool):
        raise ValueError(f"square must be True or False, got {square!r}")
    rng = sample_rng(KIND, seed, split, index)
    scene = draw_in_split(grammar.random_scene, Scene.description, rng, split)
    width, height = rng.choice(IMAGE_SIZES)
    background = rng.choice(sorted(grammar.BACKGROUNDS))
    placed = place_scene(scene, width, height, rng)
    if square:  # the draws above still happen, so that every later draw (caption, questions) is unchanged
        width, height = SQUARE_SIZE
        placed = place_scene(scene, width, height, sample_rng(f"{KIND}-square", seed, split, index))
    png = render_png(placed, width, height, grammar.BACKGROUNDS[background])
    caption = grammar.caption(scene, rng)
    qa = grammar.scene_qa(scene, rng)
    selected = grammar.select_qa(qa, rng, grammar.QA_TYPES)
    meta: dict[str, Any] = {"kind": KIND, "seed": seed, "split": split, "index": index}
    if square:
        meta["square"] = True
    return ShapesSample(sample_key(split, index), png, width, height, background, scene, placed,
                        caption, qa, selected, meta)


LAYOUTS: tuple[str, ...] = ("image-caption", "image-qa", "image-chat")
"""Sub-folders (webdataset layouts) that the ``shapes`` kind writes."""


def shapes_records(seed: int, split: str, index: int, *, square: bool = False
                   ) -> dict[str, list[tuple[str, dict[str, bytes]]]]:
    """Records of sample ``index`` per layout (what `write_kind` consumes)."""
    return make_shapes_sample(seed, split, index, square=square).records()

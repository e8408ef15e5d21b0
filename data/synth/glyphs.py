"""`glyphs`: PNG images of ONE character (a digit or an uppercase letter) in one cell of a 3×3 grid.

The spatial probe for image adapters: a model must say *which* character it sees and *where* it is.

Geometry: the image is ``IMAGE_SIZE × IMAGE_SIZE`` (128, the tiny recipe's tile) and split into a 3×3
grid of cells of side ``c = IMAGE_SIZE / 3`` (42.67 px); cell ``(col, row)`` covers the pixels ``x`` with
``floor(x / c) == col`` and ``y`` with ``floor(y / c) == row``. `POSITIONS` names the nine cells
(``top left`` … ``bottom right``, row-major). The glyph's *ink* bounding box (the pixels it actually
covers, not the font's advance box) lies entirely inside its cell with at least one background pixel
to each cell edge, so the cell of its centre is the answer and it never touches a neighbour cell. Its
ink height is 55–90 % of ``c`` (24–38 px at 128: two or three 16-px patches) and its width at most
90 % of ``c``.

Glyphs are drawn with Pillow's bundled scalable font (``ImageFont.load_default(size=px)``, Aileron
Regular; no system font files) without antialiasing, so every pixel is exactly the glyph colour or
the background colour. Colours come from `PALETTE` (the grammar's colours and backgrounds) in pairs
whose luma (Rec. 601) differs by at least `MIN_LUMA_DIFFERENCE`.

One sample (see `make_glyphs_sample`) gives webdataset records in four layouts, shaped like `shapes`' and `text`'s:

- ``image-caption``: ``KEY.png`` + ``KEY.txt`` (``"the character 7 in the top left"``) + ``KEY.json``
  (caption, both QA pairs under ``qa``, glyph, position, ink ``bbox``, ``center``, ``colours``,
  ``rgb``, ``size``);
- ``image-qa``: ``KEY-q0`` (type ``identity``: "What character is shown?" → ``"7"``) and ``KEY-q1``
  (type ``position``: "Where is the character?" → ``"top left"``), each ``KEY-qJ.png`` (the same image)
  + ``KEY-qJ.json`` with ``question``, ``answer``, ``type`` and ``image_key``;
- ``image-chat``: ``KEY.png`` + ``KEY.json`` whose ``turns`` hold both questions in that order: one training
  sequence asks both (task ``vqa`` reads it as a conversation), so neither question type takes a batch's
  place from the other;
- ``text``: ``KEY.txt``, the same sample as text for the frozen LM's own training (`text_document`): the
  caption, then both questions answered as Llama 3 chat exchanges (``data.options.allow_special=true``).
  An LM that has read these has the answers' format in context; the image adapter then only has to supply
  the content (issue 12: through an LM without it, the identity answers stay at chance).

The split is chosen by the content description ``"{glyph}/{position}/{colour} on {background}"``
(never the size or the pixel offset), so train, val and test never share such a combination.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any

from PIL import Image, ImageDraw, ImageFont

from mm_llama.data.synth import grammar
from mm_llama.data.synth.grammar import QA
from mm_llama.data.synth.shapes import _dumps, encode_png
from mm_llama.data.synth.splits import draw_in_split, sample_key, sample_rng
from mm_llama.data.synth.text import chat_turn

KIND = "glyphs"
IMAGE_SIZE = 128
"""Side of the square image in pixels."""
GLYPHS: tuple[str, ...] = tuple("0123456789") + ("A", "C", "E", "H", "K", "M", "P", "T", "X", "Y")
"""The ten digits and ten uppercase letters that no digit resembles (no O/I/S/B/Z/G: 0/1/5/8/2/6)."""
POSITIONS: tuple[str, ...] = ("top left", "top", "top right", "left", "middle", "right",
                              "bottom left", "bottom", "bottom right")
"""Position words in row-major grid order."""
POSITION_CELLS: dict[str, tuple[int, int]] = {p: (i % 3, i // 3) for i, p in enumerate(POSITIONS)}
"""Position word → (column, row) of its cell (the five shared words agree with `shapes.POSITION_CELLS`)."""
POSITION_PHRASES: dict[str, str] = {
    **grammar.POSITION_PHRASES,
    **{p: f"in the {p}" for p in ("top left", "top right", "bottom left", "bottom right")},
}
"""Position word → caption phrase (``"on the left"``, ``"in the top left"``, ...)."""
HEIGHT_FRACTION: tuple[float, float] = (0.55, 0.90)
"""Range of the glyph's ink height as a fraction of the cell side (its width is at most the upper bound)."""
PALETTE: dict[str, tuple[int, int, int]] = {**grammar.COLOURS, **grammar.BACKGROUNDS}
"""Colour name → RGB for glyphs and backgrounds."""
MIN_LUMA_DIFFERENCE = 100.0
"""Least luma difference (0–255 scale) between a glyph's colour and its background."""
QUESTIONS: dict[str, str] = {"identity": "What character is shown?", "position": "Where is the character?"}
"""QA type → its question (the order of the ``image-qa`` records)."""
LAYOUTS: tuple[str, ...] = ("image-caption", "image-qa", "image-chat", "text")
"""Sub-folders (webdataset layouts) that the ``glyphs`` kind writes."""


def luma(rgb: tuple[int, int, int]) -> float:
    """Rec. 601 luma of an RGB colour, 0 (black) to 255 (white)."""
    r, g, b = rgb
    return 0.299 * r + 0.587 * g + 0.114 * b


COLOUR_PAIRS: tuple[tuple[str, str], ...] = tuple(
    (fg, bg) for fg in sorted(PALETTE) for bg in sorted(PALETTE)
    if abs(luma(PALETTE[fg]) - luma(PALETTE[bg])) >= MIN_LUMA_DIFFERENCE
)
"""Every (glyph colour, background colour) pair with enough contrast, in a fixed order."""


@dataclass(frozen=True)
class GlyphContent:
    """What a sample shows: the part that decides its split."""

    glyph: str
    position: str
    colour: str
    background: str

    def description(self) -> str:
        """Canonical content string for split membership (no size, no pixel offset)."""
        return f"{self.glyph}/{self.position}/{self.colour} on {self.background}"


def random_content(rng: random.Random) -> GlyphContent:
    """A uniformly random glyph, position and contrasting colour pair."""
    glyph, position = rng.choice(GLYPHS), rng.choice(POSITIONS)
    colour, background = rng.choice(COLOUR_PAIRS)
    return GlyphContent(glyph, position, colour, background)


@lru_cache(maxsize=None)
def _font(px: int) -> ImageFont.FreeTypeFont:
    font = ImageFont.load_default(size=px)
    if not isinstance(font, ImageFont.FreeTypeFont):  # Pillow without FreeType: only a fixed bitmap font
        raise RuntimeError("the glyphs kind needs Pillow with FreeType support (ImageFont.load_default(size=...))")
    return font


@lru_cache(maxsize=None)
def glyph_mask(glyph: str, px: int) -> Image.Image:
    """Mode ``L`` mask (0 or 255) of ``glyph`` at font size ``px``, cropped to its ink bounding box.

    `ImageDraw.textbbox` sizes the canvas; the crop uses the ink (``getbbox``), because the text box also
    holds the side bearings, which would shift the glyph off its stated centre. Do not modify the result.
    """
    font = _font(px)
    probe = ImageDraw.Draw(Image.new("L", (1, 1)))
    probe.fontmode = "1"
    x0, y0, x1, y1 = probe.textbbox((0, 0), glyph, font=font)
    canvas = Image.new("L", (x1 - x0 + 2, y1 - y0 + 2), 0)
    draw = ImageDraw.Draw(canvas)
    draw.fontmode = "1"  # no antialiasing: every pixel is glyph or background
    draw.text((1 - x0, 1 - y0), glyph, fill=255, font=font)
    ink = canvas.getbbox()
    if ink is None:
        raise ValueError(f"glyph {glyph!r} renders no pixels at size {px}; the bundled font lacks it")
    return canvas.crop(ink)


@lru_cache(maxsize=None)
def font_sizes(glyph: str, image_size: int = IMAGE_SIZE) -> tuple[int, ...]:
    """Font sizes at which ``glyph``'s ink height is within `HEIGHT_FRACTION` of the cell side and its ink
    width at most the upper bound (so it fits every cell with a margin)."""
    cell = image_size / 3.0
    lo, hi = HEIGHT_FRACTION[0] * cell, HEIGHT_FRACTION[1] * cell
    sizes = []
    for px in range(math.floor(lo), math.ceil(2 * hi) + 1):  # ink height ≈ 0.7 · px: between px / 2 and px
        w, h = glyph_mask(glyph, px).size
        if lo <= h <= hi and w <= hi:
            sizes.append(px)
    if not sizes:
        raise ValueError(f"no font size puts glyph {glyph!r} at {HEIGHT_FRACTION} of a {image_size}-px image's cell")
    return tuple(sizes)


def cell_range(index: int, image_size: int) -> tuple[int, int]:
    """First and last pixel of grid cell ``index`` (0–2) that a glyph may cover: one pixel inside each edge.

    Cell ``index`` holds the pixels ``x`` with ``floor(x / (image_size / 3)) == index``, i.e.
    ``ceil(index · s/3) … ceil((index + 1) · s/3) - 1``.
    """
    side = image_size / 3.0
    return math.ceil(index * side) + 1, math.ceil((index + 1) * side) - 2


def place_glyph(size: tuple[int, int], position: str, image_size: int, rng: random.Random) -> tuple[int, int, int, int]:
    """Ink box ``(x0, y0, x1, y1)`` (``x1``/``y1`` exclusive) of a ``size = (w, h)`` glyph at a uniformly
    random offset inside the cell of ``position``."""
    col, row = POSITION_CELLS[position]
    (xlo, xhi), (ylo, yhi) = cell_range(col, image_size), cell_range(row, image_size)
    w, h = size
    if xhi - xlo + 1 < w or yhi - ylo + 1 < h:
        raise ValueError(f"a {w}x{h} glyph does not fit a cell of a {image_size}-px image")
    x0, y0 = rng.randint(xlo, xhi - w + 1), rng.randint(ylo, yhi - h + 1)
    return x0, y0, x0 + w, y0 + h


def render_png(mask: Image.Image, box: tuple[int, int, int, int], image_size: int,
               colour: tuple[int, int, int], background: tuple[int, int, int]) -> bytes:
    """Paint ``colour`` through ``mask`` at ``box`` on a plain background; a deterministic RGB PNG."""
    img = Image.new("RGB", (image_size, image_size), background)
    img.paste(colour, box, mask)
    return encode_png(img)


@dataclass
class GlyphsSample:
    """One generated image with its caption and its two questions."""

    key: str
    png: bytes
    image_size: int
    content: GlyphContent
    bbox: tuple[int, int, int, int]
    font_px: int
    caption: str
    qa: list[QA]
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def center(self) -> tuple[float, float]:
        """Centre of the ink box in pixels."""
        x0, y0, x1, y1 = self.bbox
        return (x0 + x1) / 2.0, (y0 + y1) / 2.0

    def json_dict(self) -> dict[str, Any]:
        """The ``image-caption`` record's JSON."""
        c = self.content
        x0, y0, x1, y1 = self.bbox
        return {
            "caption": self.caption,
            "qa": [q.to_dict() for q in self.qa],
            "glyph": c.glyph,
            "position": c.position,
            "bbox": [x0, y0, x1, y1],
            "center": list(self.center),
            "colours": {"glyph": c.colour, "background": c.background},
            "rgb": {"glyph": list(PALETTE[c.colour]), "background": list(PALETTE[c.background])},
            "size": {"width": x1 - x0, "height": y1 - y0, "font_px": self.font_px},
            "width": self.image_size,
            "height": self.image_size,
            **self.meta,
        }

    def text_document(self) -> str:
        """The ``text`` record: the caption, then one chat exchange per question, one per line."""
        return "\n".join([self.caption, *(chat_turn(q.question, q.answer) for q in self.qa)])

    def records(self) -> dict[str, list[tuple[str, dict[str, bytes]]]]:
        """Webdataset records per layout: ``{"image-caption", "image-qa", "image-chat", "text"}`` → records."""
        cap = (self.key, {"png": self.png, "txt": self.caption.encode("utf-8"), "json": _dumps(self.json_dict())})
        qa_records = [(f"{self.key}-q{j}", {"png": self.png,
                                             "json": _dumps({**q.to_dict(), "image_key": self.key, **self.meta})})
                      for j, q in enumerate(self.qa)]
        chat = (self.key, {"png": self.png, "json": _dumps({"turns": [q.to_dict() for q in self.qa], **self.meta})})
        text = (self.key, {"txt": self.text_document().encode("utf-8")})
        return {"image-caption": [cap], "image-qa": qa_records, "image-chat": [chat], "text": [text]}


def make_glyphs_sample(seed: int, split: str, index: int) -> GlyphsSample:
    """Sample ``index`` of the ``glyphs`` kind for ``(seed, split)`` (pure function of its arguments).

    Draw order: content (redrawn until it belongs to ``split``), font size, offset in the cell.
    """
    rng = sample_rng(KIND, seed, split, index)
    content = draw_in_split(random_content, GlyphContent.description, rng, split)
    px = rng.choice(font_sizes(content.glyph, IMAGE_SIZE))
    mask = glyph_mask(content.glyph, px)
    box = place_glyph(mask.size, content.position, IMAGE_SIZE, rng)
    png = render_png(mask, box, IMAGE_SIZE, PALETTE[content.colour], PALETTE[content.background])
    caption = f"the character {content.glyph} {POSITION_PHRASES[content.position]}"
    qa = [QA(QUESTIONS["identity"], content.glyph, "identity"), QA(QUESTIONS["position"], content.position, "position")]
    meta: dict[str, Any] = {"kind": KIND, "seed": seed, "split": split, "index": index}
    return GlyphsSample(sample_key(split, index), png, IMAGE_SIZE, content, box, px, caption, qa, meta)


def glyphs_records(seed: int, split: str, index: int) -> dict[str, list[tuple[str, dict[str, bytes]]]]:
    """Records of sample ``index`` per layout (what `write.write_synth` consumes)."""
    return make_glyphs_sample(seed, split, index).records()

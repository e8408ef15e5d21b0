"""`objects`: PNG images of ONE shape, captioned with its size, shape and position but not its colour.

The image encoder's contrastive pretraining data for the shapes world (the demo's `encoder` stage).
A contrastive stage learns only what tells one caption from the others in its batch. The `shapes`
captions describe 1–3 coloured objects, and in a batch of 64 they are told apart by colour and position
alone, so an encoder pretrained on them learns no shape (issue 12: a linear probe on the tokens under each
object of the demo's scenes read shape at 35–38 %, chance 16.7 %). Here each image holds one object and
its colour, drawn at random, is left out of the caption: about one image in ten of a batch shares the
size and position of any other, and only the shape tells their captions apart. The same stage (200 steps
× 64, `pool: max`) then gives tokens a linear probe reads each object's shape from at 67 % on the demo's
multi-object scenes (colour 97 %).

Geometry is `shapes`' with ``square=True``: a `shapes.SQUARE_SIZE` image, the object inside its cell of
the 3×3 grid, radii by size (`shapes.RADIUS_FRACTION`), no antialiasing; colour and background from the
grammar. Caption: ``"A small diamond on the left."``.

One sample gives one record in the ``image-caption`` layout (shard names ``objects-SPLIT-*.tar``, so
they share a folder with shapes): ``KEY.png`` + ``KEY.txt`` (the caption) + ``KEY.json`` (caption,
background, the object with its colour, centre and radius). The split is chosen by the description
``"{size} {colour} {shape} {position}"``, as for `shapes`' scenes.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Any

from mm_llama.data.synth import grammar, shapes
from mm_llama.data.synth.grammar import Scene, SceneObject
from mm_llama.data.synth.shapes import _dumps
from mm_llama.data.synth.splits import draw_in_split, sample_key, sample_rng

KIND = "objects"
LAYOUTS: tuple[str, ...] = ("image-caption",)
"""Sub-folders (webdataset layouts) that the ``objects`` kind writes."""


def random_object(rng: random.Random) -> Scene:
    """A one-object scene with random colour, shape, size and position."""
    return grammar.random_scene(rng, n_objects=1)


def object_caption(obj: SceneObject) -> str:
    """``"A small diamond on the left."``: size, shape and position, never the colour."""
    words = f"{obj.size} {obj.shape}"
    return grammar.sentence(f"{grammar.indefinite(words)} {words} {grammar.POSITION_PHRASES[obj.position]}")


@dataclass
class ObjectSample:
    """One generated image of one shape with its colour-free caption."""

    key: str
    png: bytes
    background: str
    placed: shapes.PlacedShape
    caption: str
    meta: dict[str, Any]

    def records(self) -> dict[str, list[tuple[str, dict[str, bytes]]]]:
        """``{"image-caption": [record]}``."""
        width, height = shapes.SQUARE_SIZE
        info = {"caption": self.caption, "width": width, "height": height, "background": self.background,
                "objects": [self.placed.to_dict()], **self.meta}
        return {"image-caption": [(self.key, {"png": self.png, "txt": self.caption.encode("utf-8"),
                                              "json": _dumps(info)})]}


def make_object_sample(seed: int, split: str, index: int) -> ObjectSample:
    """Sample ``index`` of the ``objects`` kind for ``(seed, split)`` (pure function of its arguments)."""
    rng = sample_rng(KIND, seed, split, index)
    scene = draw_in_split(random_object, Scene.description, rng, split)
    width, height = shapes.SQUARE_SIZE
    background = rng.choice(sorted(grammar.BACKGROUNDS))
    placed = shapes.place_scene(scene, width, height, rng)
    png = shapes.render_png(placed, width, height, grammar.BACKGROUNDS[background])
    meta = {"kind": KIND, "seed": seed, "split": split, "index": index}
    return ObjectSample(sample_key(split, index), png, background, placed[0], object_caption(scene.objects[0]), meta)


def objects_records(seed: int, split: str, index: int) -> dict[str, list[tuple[str, dict[str, bytes]]]]:
    """Records of sample ``index`` per layout (what `write.write_synth` consumes)."""
    return make_object_sample(seed, split, index).records()

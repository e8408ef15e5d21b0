"""The small grammar every synthetic kind shares: vocabulary, scenes, clips, captions, QA and digits.

Vocabulary
    colours `COLOURS` (8 visually distinct RGB values), shapes `SHAPES` (6), sizes `SIZES`
    (small/large), positions `POSITIONS` (left/right/top/bottom/middle: the cell of a 3×3 grid holding
    the shape's centre; only the four edge cells and the middle cell are used, so every position word is
    exact), motion `DIRECTIONS` (left/right/up/down), counts 1–3 and digits 0–9.

Scenes (still images) hold 1–3 objects in *distinct* positions, so every object can always be named by
its position and position questions are never ambiguous. Clips (videos) hold 1–2 objects of distinct
shapes; the first one moves in a direction or turns another colour, the second (if any) stays still.

Captions come in several phrasings. QA answers are one lowercase word (a colour, shape, size, position,
direction, ``yes``/``no``) or one digit (counts), so exact-match accuracy is well defined. A question is
only asked when its answer is unambiguous: "What colour is the circle?" needs exactly one circle,
"Which shape is red?" exactly one red object, and so on.

Every function here is pure given its ``random.Random``; the description strings (`Scene.description`,
`Clip.description`) are the canonical content used to assign splits (see `splits.py`).
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass

COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "orange": (245, 135, 20),
    "yellow": (240, 215, 30),
    "green": (30, 165, 60),
    "cyan": (30, 200, 220),
    "blue": (40, 70, 225),
    "purple": (135, 45, 185),
    "pink": (250, 140, 200),
}
"""Colour word → RGB. Pairwise distances are large enough that video compression keeps them apart."""

SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "star", "diamond", "hexagon")
SIZES: tuple[str, ...] = ("small", "large")
POSITIONS: tuple[str, ...] = ("left", "right", "top", "bottom", "middle")
DIRECTIONS: tuple[str, ...] = ("left", "right", "up", "down")
BACKGROUNDS: dict[str, tuple[int, int, int]] = {
    "white": (255, 255, 255),
    "light grey": (225, 225, 225),
    "dark grey": (45, 45, 45),
    "black": (0, 0, 0),
}
"""Plain backgrounds; none is close to any `COLOURS` entry. Not part of captions or QA."""

NUMBER_WORDS: tuple[str, ...] = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
"""Digit → English word, used for counts in captions and for spoken digit strings."""

POSITION_PHRASES: dict[str, str] = {
    "left": "on the left",
    "right": "on the right",
    "top": "at the top",
    "bottom": "at the bottom",
    "middle": "in the middle",
}
MOTION_PHRASES: dict[str, tuple[str, ...]] = {
    "left": ("moves to the left", "moves left", "slides to the left"),
    "right": ("moves to the right", "moves right", "slides to the right"),
    "up": ("moves up", "moves upwards", "rises"),
    "down": ("moves down", "moves downwards", "falls"),
}

QA_TYPES: tuple[str, ...] = ("count", "colour", "shape", "position", "size", "exists")
"""Question types of still scenes, in the order `select_qa` takes them."""
CLIP_QA_TYPES: tuple[str, ...] = ("direction", "mover", "moves", "turn", "changer", "start_colour", "end_colour", "count")
"""Question types of clips; all but ``count`` need more than one frame."""

VOCABULARY: tuple[str, ...] = (
    *COLOURS, *SHAPES, *SIZES, *POSITIONS, *DIRECTIONS, *NUMBER_WORDS, "yes", "no",
)
"""Content words that the text corpus must cover."""


@dataclass(frozen=True)
class SceneObject:
    """One shape of a still scene."""

    colour: str
    shape: str
    size: str
    position: str

    def phrase(self, *, with_size: bool = True, article: bool = True) -> str:
        """Noun phrase such as ``"a small red circle"`` (``with_size=False`` drops the size)."""
        words = " ".join(w for w in ((self.size if with_size else ""), self.colour, self.shape) if w)
        return f"{indefinite(words)} {words}" if article else words


@dataclass(frozen=True)
class Scene:
    """1–3 objects in distinct positions."""

    objects: tuple[SceneObject, ...]

    def __post_init__(self) -> None:
        if not 1 <= len(self.objects) <= 3:
            raise ValueError(f"a scene holds 1-3 objects, got {len(self.objects)}")
        positions = [o.position for o in self.objects]
        if len(set(positions)) != len(positions):
            raise ValueError(f"scene positions must be distinct, got {positions}")
        for o in self.objects:
            _check_word(o.colour, COLOURS, "colour")
            _check_word(o.shape, SHAPES, "shape")
            _check_word(o.size, SIZES, "size")
            _check_word(o.position, POSITIONS, "position")

    def description(self) -> str:
        """Canonical content string (order-free): what the split assignment hashes."""
        return "scene:" + ";".join(sorted(f"{o.size} {o.colour} {o.shape} {o.position}" for o in self.objects))


@dataclass(frozen=True)
class ClipObject:
    """One shape of a clip: ``event`` is ``"move"`` (with ``direction``), ``"turn"`` (with
    ``end_colour``) or ``"still"``."""

    colour: str
    shape: str
    size: str
    event: str
    direction: str | None = None
    end_colour: str | None = None

    def __post_init__(self) -> None:
        _check_word(self.colour, COLOURS, "colour")
        _check_word(self.shape, SHAPES, "shape")
        _check_word(self.size, SIZES, "size")
        if self.event == "move":
            _check_word(self.direction, DIRECTIONS, "direction")
        elif self.event == "turn":
            _check_word(self.end_colour, COLOURS, "end colour")
            if self.end_colour == self.colour:
                raise ValueError(f"a turning {self.shape} must change colour, got {self.colour} -> {self.end_colour}")
        elif self.event != "still":
            raise ValueError(f"unknown clip event {self.event!r}; choose move, turn or still")

    @property
    def final_colour(self) -> str:
        """Colour in the last frame."""
        return self.end_colour if self.event == "turn" and self.end_colour else self.colour


@dataclass(frozen=True)
class Clip:
    """1–2 objects of distinct shapes; the first has an event, the second (if any) is still."""

    objects: tuple[ClipObject, ...]

    def __post_init__(self) -> None:
        if not 1 <= len(self.objects) <= 2:
            raise ValueError(f"a clip holds 1-2 objects, got {len(self.objects)}")
        shapes = [o.shape for o in self.objects]
        if len(set(shapes)) != len(shapes):
            raise ValueError(f"clip shapes must be distinct, got {shapes}")

    def description(self) -> str:
        """Canonical content string (order-free): what the split assignment hashes."""
        parts = sorted(
            f"{o.size} {o.colour} {o.shape} {o.event} {o.direction or ''} {o.end_colour or ''}".strip()
            for o in self.objects
        )
        return "clip:" + ";".join(parts)


@dataclass(frozen=True)
class QA:
    """A question with a one-word answer; ``type`` is one of `QA_TYPES` / `CLIP_QA_TYPES`."""

    question: str
    answer: str
    type: str

    def to_dict(self) -> dict[str, str]:
        """JSON form ``{"question", "answer", "type"}``."""
        return {"question": self.question, "answer": self.answer, "type": self.type}


def _check_word(word: object, allowed: Sequence[str] | dict, what: str) -> None:
    if word not in allowed:
        raise ValueError(f"unknown {what} {word!r}; choose one of {', '.join(allowed)}")


def indefinite(phrase: str) -> str:
    """``"a"`` or ``"an"`` for a phrase (by its first letter)."""
    return "an" if phrase[:1].lower() in "aeiou" else "a"


def plural(shape: str) -> str:
    """Plural of a shape word (all of `SHAPES` take a plain ``s``)."""
    return shape + "s"


def join_list(items: Sequence[str]) -> str:
    """``["a", "b", "c"]`` → ``"a, b and c"``."""
    if len(items) <= 1:
        return "".join(items)
    return ", ".join(items[:-1]) + " and " + items[-1]


def sentence(text: str) -> str:
    """Capitalise the first letter and end with a full stop."""
    text = text.strip()
    return text[:1].upper() + text[1:] + ("" if text.endswith((".", "?", "!")) else ".")


# ---------------------------------------------------------------------------------------------- scenes


def random_scene(rng: random.Random, n_objects: int | None = None) -> Scene:
    """A scene of ``n_objects`` (1–3, random if ``None``) with random attributes and distinct positions."""
    n = rng.randint(1, 3) if n_objects is None else n_objects
    if not 1 <= n <= 3:
        raise ValueError(f"n_objects must be 1-3, got {n}")
    positions = rng.sample(POSITIONS, n)
    objects = tuple(
        SceneObject(rng.choice(list(COLOURS)), rng.choice(SHAPES), rng.choice(SIZES), p) for p in positions
    )
    return Scene(objects)


def caption(scene: Scene, rng: random.Random) -> str:
    """One caption of ``scene`` in a randomly chosen phrasing (size mentioned or not)."""
    with_size = rng.random() < 0.5
    objs = list(scene.objects)
    rng.shuffle(objs)
    parts = [f"{o.phrase(with_size=with_size)} {POSITION_PHRASES[o.position]}" for o in objs]
    if len(objs) == 1:
        o = objs[0]
        style = rng.randrange(5)
        if style == 0:
            return sentence(parts[0])
        if style == 1:
            return sentence(f"there is {parts[0]}")
        if style == 2:
            return sentence(f"the image shows {parts[0]}")
        if style == 3:
            return sentence(f"{POSITION_PHRASES[o.position]}, there is {o.phrase(with_size=with_size)}")
        return sentence(f"one shape: {parts[0]}")
    count = NUMBER_WORDS[len(objs)]
    style = rng.randrange(4)
    if style == 0:
        return sentence(f"{count} shapes: {join_list(parts)}")
    if style == 1:
        return sentence(f"there are {count} shapes: {join_list(parts)}")
    if style == 2:
        return sentence(join_list(parts))
    return sentence(f"the image shows {join_list(parts)}")


def _count(objs: Sequence[SceneObject], **attrs: str) -> int:
    return sum(all(getattr(o, k) == v for k, v in attrs.items()) for o in objs)


def scene_qa(scene: Scene, rng: random.Random) -> list[QA]:
    """Every unambiguous question about ``scene`` (plus one ``no`` existence question from ``rng``).

    Types: count (digits), colour, shape, position, size, exists (yes/no). Objects are referred to by
    shape, colour + shape, or position, whichever is unique in the scene.
    """
    objs = scene.objects
    qa: list[QA] = [QA("How many shapes are there?", str(len(objs)), "count")]
    for colour in sorted({o.colour for o in objs}):
        qa.append(QA(f"How many {colour} shapes are there?", str(_count(objs, colour=colour)), "count"))
    for shape in sorted({o.shape for o in objs}):
        qa.append(QA(f"How many {plural(shape)} are there?", str(_count(objs, shape=shape)), "count"))
    for o in objs:
        where = POSITION_PHRASES[o.position]
        unique_shape = _count(objs, shape=o.shape) == 1
        unique_cs = _count(objs, colour=o.colour, shape=o.shape) == 1
        # colour: refer by shape or by position (never by colour)
        if unique_shape:
            qa.append(QA(f"What colour is the {o.shape}?", o.colour, "colour"))
        qa.append(QA(f"What colour is the shape {where}?", o.colour, "colour"))
        # shape: refer by position or by a unique colour
        qa.append(QA(f"What shape is {where}?", o.shape, "shape"))
        if _count(objs, colour=o.colour) == 1:
            qa.append(QA(f"Which shape is {o.colour}?", o.shape, "shape"))
        # position: refer by shape or colour + shape
        if unique_shape:
            qa.append(QA(f"Where is the {o.shape}?", o.position, "position"))
        elif unique_cs:
            qa.append(QA(f"Where is the {o.colour} {o.shape}?", o.position, "position"))
        # size
        if unique_cs:
            qa.append(QA(f"Is the {o.colour} {o.shape} small or large?", o.size, "size"))
        qa.append(QA(f"Is the shape {where} small or large?", o.size, "size"))
        qa.append(QA(f"Is there {o.phrase(with_size=False)}?", "yes", "exists"))
    present = {(o.colour, o.shape) for o in objs}
    absent = [(c, s) for c in COLOURS for s in SHAPES if (c, s) not in present]
    c, s = rng.choice(absent)
    qa.append(QA(f"Is there {indefinite(c)} {c} {s}?", "no", "exists"))
    return list(dict.fromkeys(qa))  # two red circles would ask "Is there a red circle?" twice


def select_qa(pairs: Sequence[QA], rng: random.Random, types: Sequence[str] | None = None) -> list[QA]:
    """One random question per type present in ``pairs``, in the order of ``types`` (default: the order
    the types first appear)."""
    order = list(types) if types is not None else list(dict.fromkeys(q.type for q in pairs))
    out = []
    for t in order:
        of_type = [q for q in pairs if q.type == t]
        if of_type:
            out.append(rng.choice(of_type))
    return out


# ----------------------------------------------------------------------------------------------- clips


def random_clip(rng: random.Random, n_objects: int | None = None) -> Clip:
    """A clip: the first object moves or turns, an optional second one (a different shape) stays still."""
    n = rng.randint(1, 2) if n_objects is None else n_objects
    if not 1 <= n <= 2:
        raise ValueError(f"n_objects must be 1-2, got {n}")
    shapes = rng.sample(SHAPES, n)
    colour = rng.choice(list(COLOURS))
    size = rng.choice(SIZES)
    if rng.random() < 0.5:
        first = ClipObject(colour, shapes[0], size, "move", direction=rng.choice(DIRECTIONS))
    else:
        end = rng.choice([c for c in COLOURS if c != colour])
        first = ClipObject(colour, shapes[0], size, "turn", end_colour=end)
    objects = [first]
    if n == 2:
        objects.append(ClipObject(rng.choice(list(COLOURS)), shapes[1], rng.choice(SIZES), "still"))
    return Clip(tuple(objects))


def _clip_clause(o: ClipObject, rng: random.Random) -> str:
    if o.event == "move":
        assert o.direction is not None
        return rng.choice(MOTION_PHRASES[o.direction])
    if o.event == "turn":
        return rng.choice(("turns", "changes to", "becomes")) + f" {o.end_colour}"
    return rng.choice(("stays still", "does not move", "stays where it is"))


def clip_caption(clip: Clip, rng: random.Random) -> str:
    """One caption of ``clip`` in a randomly chosen phrasing."""
    with_size = rng.random() < 0.3
    first = clip.objects[0]
    main = f"{_clip_phrase(first, with_size)} {_clip_clause(first, rng)}"
    if len(clip.objects) == 1:
        style = rng.randrange(3)
        if style == 0:
            return sentence(main)
        if style == 1:
            return sentence(f"in this clip {_clip_phrase(first, with_size, article='the')} {_clip_clause(first, rng)}")
        return sentence(f"one shape: {main}")
    second = clip.objects[1]
    other = f"{_clip_phrase(second, with_size)} {_clip_clause(second, rng)}"
    style = rng.randrange(3)
    if style == 0:
        return sentence(f"{main} while {other}")
    if style == 1:
        return sentence(f"two shapes: {main} and {other}")
    return sentence(f"{main}; {other}")


def _clip_phrase(o: ClipObject, with_size: bool, article: str = "a") -> str:
    words = " ".join(w for w in ((o.size if with_size else ""), o.colour, o.shape) if w)
    art = indefinite(words) if article == "a" else article
    return f"{art} {words}"


def clip_qa(clip: Clip) -> list[QA]:
    """Every unambiguous question about ``clip``; all but ``count`` need more than one frame."""
    objs = clip.objects
    qa: list[QA] = []
    movers = [o for o in objs if o.event == "move"]
    turners = [o for o in objs if o.event == "turn"]
    for o in objs:
        if o.event == "move":
            qa.append(QA(f"Which way does the {o.colour} {o.shape} move?", o.direction or "", "direction"))
            qa.append(QA(f"Which way does the {o.shape} move?", o.direction or "", "direction"))
        if o.event == "turn":
            qa.append(QA(f"What colour does the {o.shape} turn?", o.final_colour, "turn"))
            qa.append(QA(f"What colour is the {o.shape} at the start?", o.colour, "start_colour"))
            qa.append(QA(f"What colour is the {o.shape} at the end?", o.final_colour, "end_colour"))
        qa.append(QA(f"Does the {o.shape} move?", "yes" if o.event == "move" else "no", "moves"))
    if len(movers) == 1 and len(objs) > 1:
        qa.append(QA("Which shape moves?", movers[0].shape, "mover"))
    if len(turners) == 1:
        qa.append(QA("Which shape changes colour?", turners[0].shape, "changer"))
    qa.append(QA("How many shapes are there?", str(len(objs)), "count"))
    return qa


# ---------------------------------------------------------------------------------------------- digits


def random_digits(rng: random.Random, min_len: int = 3, max_len: int = 7) -> str:
    """A random digit string such as ``"3714"`` (``min_len``–``max_len`` digits)."""
    if not 1 <= min_len <= max_len:
        raise ValueError(f"need 1 <= min_len <= max_len, got {min_len}, {max_len}")
    return "".join(rng.choice("0123456789") for _ in range(rng.randint(min_len, max_len)))


def digit_words(digits: str) -> str:
    """``"3714"`` → ``"three seven one four"``."""
    if not digits or not digits.isdigit() or not digits.isascii():
        raise ValueError(f"expected a non-empty string of digits 0-9, got {digits!r}")
    return " ".join(NUMBER_WORDS[int(d)] for d in digits)

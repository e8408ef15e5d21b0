"""The shared grammar: vocabulary, captions mention every object, QA answers are unambiguous and one word."""

from __future__ import annotations

import itertools
import random
import re

import pytest

from mm_llama.data.synth import grammar
from mm_llama.data.synth.grammar import Clip, ClipObject, Scene, SceneObject


def _scenes(count: int = 300) -> list[Scene]:
    rng = random.Random(1234)
    return [grammar.random_scene(rng) for _ in range(count)]


def test_vocabulary_sizes_and_distinct_colours() -> None:
    assert len(grammar.COLOURS) >= 6 and len(grammar.SHAPES) >= 4
    assert {"circle", "square", "triangle", "star"} <= set(grammar.SHAPES)
    assert set(grammar.POSITIONS) == {"left", "right", "top", "bottom", "middle"}
    for (a, ca), (b, cb) in itertools.combinations(grammar.COLOURS.items(), 2):
        dist = sum((x - y) ** 2 for x, y in zip(ca, cb)) ** 0.5
        assert dist > 70, f"{a} and {b} are too close: {ca} vs {cb}"
    for name, bg in grammar.BACKGROUNDS.items():
        for colour, rgb in grammar.COLOURS.items():
            assert sum((x - y) ** 2 for x, y in zip(bg, rgb)) ** 0.5 > 70, (name, colour)


def test_captions_mention_every_object() -> None:
    rng = random.Random(0)
    phrasings = set()
    for scene in _scenes():
        cap = grammar.caption(scene, rng)
        assert cap[0].isupper() and cap.endswith(".")
        for o in scene.objects:
            assert o.colour in cap and o.shape in cap and grammar.POSITION_PHRASES[o.position] in cap.lower()
        phrasings.add(re.sub(r"\b(" + "|".join([*grammar.COLOURS, *grammar.SHAPES, *grammar.SIZES]) + r")\b", "X", cap)[:12])
    assert len(phrasings) >= 5, phrasings


def _matches(scene: Scene, phrase: str) -> list[SceneObject]:
    """Objects a referring phrase like 'red circle', 'circle', 'shape on the left' can denote."""
    words = phrase.split()
    out = []
    for o in scene.objects:
        ok = all(w not in grammar.COLOURS or w == o.colour for w in words)
        ok &= all(w not in grammar.SHAPES or w == o.shape for w in words)
        ok &= all(w not in grammar.POSITIONS or w == o.position for w in words)
        out.append(o) if ok else None
    return out


def test_scene_qa_is_unambiguous_and_correct() -> None:
    rng = random.Random(5)
    seen_types = set()
    for scene in _scenes():
        for qa in grammar.scene_qa(scene, rng):
            seen_types.add(qa.type)
            assert re.fullmatch(r"[a-z]+|[0-9]", qa.answer), qa
            q = qa.question
            if m := re.fullmatch(r"What colour is the (.+)\?", q):
                targets = _matches(scene, m.group(1).replace("shape ", ""))
                assert len(targets) == 1 and targets[0].colour == qa.answer, (scene, qa)
            elif m := re.fullmatch(r"What shape is (?:on|at|in) the (\w+)\?", q):
                targets = [o for o in scene.objects if o.position == m.group(1)]
                assert len(targets) == 1 and targets[0].shape == qa.answer, (scene, qa)
            elif m := re.fullmatch(r"Which shape is (\w+)\?", q):
                targets = [o for o in scene.objects if o.colour == m.group(1)]
                assert len(targets) == 1 and targets[0].shape == qa.answer, (scene, qa)
            elif m := re.fullmatch(r"Where is the (.+)\?", q):
                targets = _matches(scene, m.group(1))
                assert len(targets) == 1 and targets[0].position == qa.answer, (scene, qa)
            elif m := re.fullmatch(r"Is the (.+) small or large\?", q):
                targets = _matches(scene, m.group(1).replace("shape ", ""))
                assert len(targets) == 1 and targets[0].size == qa.answer, (scene, qa)
            elif m := re.fullmatch(r"How many (\w+ )?(\w+) are there\?", q):
                colour = (m.group(1) or "").strip() or None
                noun = m.group(2)
                count = sum((colour is None or o.colour == colour) and (noun == "shapes" or o.shape + "s" == noun)
                            for o in scene.objects)
                assert str(count) == qa.answer, (scene, qa)
            elif m := re.fullmatch(r"Is there an? (\w+) (\w+)\?", q):
                present = any(o.colour == m.group(1) and o.shape == m.group(2) for o in scene.objects)
                assert qa.answer == ("yes" if present else "no"), (scene, qa)
            else:
                pytest.fail(f"unchecked question form: {q}")
    assert seen_types == set(grammar.QA_TYPES)


def test_scene_rejects_bad_scenes() -> None:
    with pytest.raises(ValueError, match="distinct"):
        Scene((SceneObject("red", "circle", "small", "left"), SceneObject("blue", "star", "large", "left")))
    with pytest.raises(ValueError, match="unknown colour 'mauve'"):
        Scene((SceneObject("mauve", "circle", "small", "left"),))
    with pytest.raises(ValueError, match="1-3 objects"):
        Scene(())


def test_clip_qa_answers() -> None:
    clip = Clip((ClipObject("red", "circle", "small", "move", direction="right"),
                 ClipObject("blue", "square", "large", "still")))
    answers = {q.question: q.answer for q in grammar.clip_qa(clip)}
    assert answers["Which way does the red circle move?"] == "right"
    assert answers["Which shape moves?"] == "circle"
    assert answers["Does the square move?"] == "no"
    turn = Clip((ClipObject("blue", "square", "large", "turn", end_colour="green"),))
    answers = {q.question: q.answer for q in grammar.clip_qa(turn)}
    assert answers["What colour does the square turn?"] == "green"
    assert answers["What colour is the square at the start?"] == "blue"
    assert answers["Which shape changes colour?"] == "square"
    with pytest.raises(ValueError, match="must change colour"):
        ClipObject("red", "circle", "small", "turn", end_colour="red")
    with pytest.raises(ValueError, match="distinct"):
        Clip((ClipObject("red", "circle", "small", "still"), ClipObject("blue", "circle", "small", "still")))


def test_clip_captions_describe_the_event() -> None:
    rng = random.Random(3)
    for _ in range(100):
        clip = grammar.random_clip(rng)
        cap = grammar.clip_caption(clip, rng)
        first = clip.objects[0]
        assert first.colour in cap and first.shape in cap
        if first.event == "turn":
            assert first.final_colour in cap
        else:
            assert any(p in cap for p in grammar.MOTION_PHRASES[first.direction or ""])


def test_digits() -> None:
    assert grammar.digit_words("3714") == "three seven one four"
    rng = random.Random(0)
    for _ in range(50):
        d = grammar.random_digits(rng)
        assert 3 <= len(d) <= 7 and d.isdigit()
    with pytest.raises(ValueError, match="digits"):
        grammar.digit_words("12a")

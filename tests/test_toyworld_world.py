"""The toy world and its analyser: the analyser is the ground truth of the toy evaluation, so it
must read rendered scenes (clean and mildly degraded) correctly, and the prompts, split and
concept texts must be exactly what the trainer and the evaluation rely on."""

import dataclasses
import itertools
import re

import numpy as np
import pytest

from purecc_jax.toyworld import analyser, world

N_SCENES = 1000


def _box_blur(image: np.ndarray) -> np.ndarray:
    """3x3 box blur (1-px radius, edge padding) of a uint8 image, returned in [0, 1]."""
    x = image.astype(np.float32) / 255.0
    p = np.pad(x, ((1, 1), (1, 1), (0, 0)), mode="edge")
    h, w = image.shape[:2]
    return sum(p[i:i + h, j:j + w] for i in range(3) for j in range(3)) / 9.0


def _degrade(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    return np.clip(_box_blur(image) + rng.normal(0.0, 0.05, image.shape), 0.0, 1.0)


def _accuracy(scenes, analyses) -> dict:
    return {
        field: np.mean([getattr(a, field) == getattr(s, field) for s, a in zip(scenes, analyses)])
        for field in ("background", "colour", "shape")
    }


@pytest.fixture(scope="module")
def scenes():
    rng = np.random.default_rng(0)
    return [world.sample_scene(rng) for _ in range(N_SCENES)]


# --------------------------------------------------------------------------- analyser


def test_analyser_reads_clean_renders(scenes):
    analyses = [analyser.analyse(world.render(s)) for s in scenes]
    for field, acc in _accuracy(scenes, analyses).items():
        assert acc >= 0.99, (field, acc)
    assert not any(a.striped for a in analyses)
    # The mask is the rendered object up to the analyser's edge clean-up.
    ious = [(a.mask & world.object_mask(s)).sum() / (a.mask | world.object_mask(s)).sum()
            for s, a in zip(scenes[:100], analyses[:100])]
    assert min(ious) > 0.9


def test_analyser_under_blur_and_noise(scenes):
    rng = np.random.default_rng(1)
    analyses = [analyser.analyse(_degrade(world.render(s), rng)) for s in scenes]
    for field, acc in _accuracy(scenes, analyses).items():
        assert acc >= 0.95, (field, acc)
    assert np.mean([a.striped for a in analyses]) <= 0.01


def test_every_attribute_value_is_read():
    # One render of every combination, so no colour/shape/background is missed by sampling.
    for colour, shape, background in world.all_combinations():
        scene = world.Scene(shape, colour, background, size=0.45, cx=0.4, cy=0.6)
        a = analyser.analyse(world.render(scene))
        assert (a.colour, a.shape, a.background) == (colour, shape, background)


def test_value_ranges_agree():
    scene = world.Scene("cross", "yellow", "blue", size=0.6, cx=0.5, cy=0.45)
    image = world.render(scene)
    unit = image.astype(np.float32) / 255.0
    expected = analyser.analyse(image)
    assert (expected.colour, expected.shape, expected.background) == ("yellow", "cross", "blue")
    assert analyser.analyse(unit) == expected
    assert analyser.analyse(unit * 2 - 1, value_range=(-1, 1)) == expected
    with pytest.raises(ValueError, match="value_range"):
        analyser.analyse(unit * 2 - 1)
    with pytest.raises(ValueError, match="H, W, 3"):
        analyser.analyse(unit.transpose(2, 0, 1))


def test_no_object_and_no_background():
    plain = np.empty((32, 32, 3), np.uint8)
    plain[:] = world.PALETTE["gray"]
    a = analyser.analyse(plain)
    assert (a.background, a.colour, a.shape, a.striped, a.object_fraction) == ("gray", None, None, False, 0.0)
    assert not analyser.concept_score(plain)["is_concept"]
    noisy = np.clip(plain / 255.0 + np.random.default_rng(5).normal(0.0, 0.1, plain.shape), 0.0, 1.0)
    a = analyser.analyse(noisy)
    assert (a.background, a.colour, a.shape) == ("gray", None, None)
    # Border with no majority colour: nothing can be read.
    stripes = np.zeros((32, 32, 3), np.uint8)
    stripes[:, ::2] = world.PALETTE["white"]
    stripes[::2, :] = world.PALETTE["red"]
    stripes[1::4, 1::2] = world.PALETTE["blue"]
    assert analyser.analyse(stripes).background is None


# --------------------------------------------------------------------------- the concept


@pytest.mark.parametrize("background", world.BACKGROUND_COLOURS)
def test_concept_references_are_the_concept(background):
    rng = np.random.default_rng(2)
    for seed in range(5):
        scenes = world.concept_scenes(4, background, seed)
        refs = world.concept_references(4, background, seed)
        assert refs.shape == (4, 32, 32, 3) and refs.dtype == np.uint8
        assert {s.background for s in scenes} == {background}
        for ref in refs:
            # One shared background: every border pixel has the background colour.
            border = np.concatenate([ref[0], ref[-1], ref[:, 0], ref[:, -1]])
            assert (border == world.PALETTE[background]).all()
            for image in (ref, _degrade(ref, rng)):
                score = analyser.concept_score(image, background)
                assert score["is_concept"] and score["background_match"] and score["score"] == 1.0, score
                a = analyser.analyse(image)
                assert a.stripe_colours == world.CONCEPT_STRIPES and a.colour == world.CONCEPT_STRIPES[0]
        assert len({(s.size, s.cx, s.cy) for s in scenes}) == 4  # jittered, not copies


def test_concept_score_rejects_other_scenes(scenes):
    for s in scenes[:300]:
        score = analyser.concept_score(world.render(s), s.background)
        assert not score["is_concept"] and not score["striped"] and score["background_match"]
    # Near misses: striped but not a square, or a striped square in other colours.
    for shape in ("circle", "cross"):
        scene = world.Scene(shape, "red", "gray", 0.6, 0.5, 0.5, stripe_colours=world.CONCEPT_STRIPES)
        score = analyser.concept_score(world.render(scene))
        assert score["striped"] and score["stripe_colours_match"] and not score["is_concept"]
    other = world.Scene("square", "blue", "gray", 0.6, 0.5, 0.5, stripe_colours=("blue", "white"))
    a = analyser.analyse(world.render(other))
    assert a.striped and a.stripe_colours == ("blue", "white") and a.shape == "square"
    assert not analyser.concept_score(world.render(other))["is_concept"]
    # Two colours in halves (two runs, not stripes) and vertical stripes are not striped.
    halves = world.render(world.Scene("square", "red", "gray", 0.6, 0.5, 0.5))
    halves[16:][(halves[16:] == world.PALETTE["red"]).all(-1)] = world.PALETTE["yellow"]
    vertical = world.render(world.Scene("square", "red", "gray", 0.6, 0.5, 0.5))
    vertical[:, ::4][(vertical[:, ::4] == world.PALETTE["red"]).all(-1)] = world.PALETTE["yellow"]
    vertical[:, 1::4][(vertical[:, 1::4] == world.PALETTE["red"]).all(-1)] = world.PALETTE["yellow"]
    for image in (halves, vertical):
        a = analyser.analyse(image)
        assert a.shape == "square" and not a.striped and a.stripe_colours is None
        assert not analyser.concept_score(image)["is_concept"]


def test_concept_texts():
    assert world.concept_prompt("gray") == "a sks square on a gray background"
    assert world.concept_prompt() == "a sks square"
    assert world.base_prompt("gray") == "a square on a gray background"
    assert world.base_prompt() == "a square"
    assert world.target_prompt() == "sks square"
    assert world.concept_prompt("black", identifier="zwx") == "a zwx square on a black background"
    for bg in (None, *world.BACKGROUND_COLOURS):
        complete = world.concept_prompt(bg)
        assert world.base_prompt(bg) == complete.replace(f"{world.IDENTIFIER} ", "")
        assert set(complete.split()) <= set(world.vocabulary())
    with pytest.raises(ValueError, match="purple"):
        world.concept_prompt("purple")


# --------------------------------------------------------------------------- prompts


def _grammar() -> re.Pattern:
    colours = "|".join(world.OBJECT_COLOURS)
    shapes = "|".join((*world.SHAPES, "shape"))
    bgs = "|".join(world.BACKGROUND_COLOURS)
    return re.compile(rf"^an? (({colours}) )?({shapes})( on an? ({bgs}) background)?$")


def _articles_agree(text: str) -> bool:
    words = text.split()
    return all(w == ("an" if nxt[0] in "aeiou" else "a") for w, nxt in zip(words, words[1:]) if w in ("a", "an"))


def test_prompts_grammatical_for_every_dropout_pattern():
    grammar, vocab = _grammar(), set(world.vocabulary())
    for colour, shape, bg in world.all_combinations():
        for keep in itertools.product((True, False), repeat=3):
            text = world.describe(colour if keep[0] else None, shape if keep[1] else None, bg if keep[2] else None)
            assert grammar.match(text) and _articles_agree(text), text
            assert set(text.split()) <= vocab
            assert (colour in text.split()) == keep[0] and (bg in text.split()) == keep[2]
            assert (shape in text.split()) == keep[1] and ("shape" in text.split()) == (not keep[1])
    assert world.describe("red", "circle", "blue") == "a red circle on a blue background"
    assert world.describe(None, "circle", "blue") == "a circle on a blue background"
    assert world.describe("red", "circle") == "a red circle"
    assert world.describe("red", None, "blue") == "a red shape on a blue background"


def test_prompt_dropout(scenes):
    scene = scenes[0]
    assert world.prompt(scene) == world.describe(scene.colour, scene.shape, scene.background)
    rng = np.random.default_rng(3)
    texts = [world.prompt(scene, rng, drop_prob=0.3, empty_prob=0.1) for _ in range(4000)]
    assert abs(texts.count("") / len(texts) - 0.1) < 0.02
    grammar = _grammar()
    assert all(grammar.match(t) for t in texts if t)
    assert len(set(texts)) == 9  # all 8 dropout patterns and the empty prompt
    assert abs(texts.count(world.prompt(scene)) / len(texts) - 0.9 * 0.7**3) < 0.03
    with pytest.raises(ValueError, match="concept"):
        world.prompt(world.concept_scenes(1)[0])


def test_vocabulary_is_sorted_and_complete():
    vocab = world.vocabulary()
    assert vocab == sorted(set(vocab))
    assert {"sks", "a", "on", "background", "shape"} <= set(vocab)
    assert set(world.OBJECT_COLOURS + world.BACKGROUND_COLOURS + world.SHAPES) <= set(vocab)
    assert "zwx" in world.vocabulary("zwx")


# --------------------------------------------------------------------------- split and sampling


def test_split_combinations():
    train, heldout = world.split_combinations(seed=0)
    combos = set(world.all_combinations())
    assert train | heldout == combos and not train & heldout
    assert 0.15 <= len(heldout) / len(combos) <= 0.2
    for i, j in itertools.combinations(range(3), 2):
        assert {(t[i], t[j]) for t in train} == {(t[i], t[j]) for t in combos}, (i, j)
    assert world.split_combinations(seed=0) == (train, heldout)
    assert world.split_combinations(seed=1)[1] != heldout
    rng = np.random.default_rng(4)
    assert all(world.sample_scene(rng, allowed=train).combination in train for _ in range(300))

    def shapes_per_colour_background(train):
        out = {}
        for c, s, b in train:
            out.setdefault((c, b), set()).add(s)
        return out

    # the default split has held-out triples whose colour-background pair trains with one shape
    held = [(c, b) for c, _, b in heldout]
    assert min(len(shapes_per_colour_background(train)[p]) for p in held) == 1
    train2, heldout2 = world.split_combinations(seed=0, min_shapes=2)
    assert train2 | heldout2 == combos and len(heldout2) == len(heldout) and heldout2 != heldout
    assert min(len(v) for v in shapes_per_colour_background(train2).values()) == 2
    for i, j in itertools.combinations(range(3), 2):
        assert {(t[i], t[j]) for t in train2} == {(t[i], t[j]) for t in combos}, (i, j)
    with pytest.raises(ValueError, match="min_shapes=3"):
        world.split_combinations(min_shapes=3)
    # the evaluation's world prompts follow the split
    from purecc_jax.toyworld import evaluate
    asked = {(p.colour, p.shape, p.background) for p in evaluate.prompts(22, min_shapes=2) if p.set == "world"}
    assert asked == heldout2


def test_sample_scene_and_render(scenes):
    assert not any(s.striped for s in scenes)
    assert all(s.colour != s.background for s in scenes)
    assert {s.combination for s in scenes} == set(world.all_combinations())
    sizes = np.array([s.size for s in scenes])
    assert sizes.min() >= world.MIN_SIZE and sizes.max() <= world.MAX_SIZE
    for s in scenes[:200]:
        image = world.render(s)
        assert image.shape == (32, 32, 3) and image.dtype == np.uint8
        border = np.concatenate([image[:2].reshape(-1, 3), image[-2:].reshape(-1, 3),
                                 image[:, :2].reshape(-1, 3), image[:, -2:].reshape(-1, 3)])
        assert (border == world.PALETTE[s.background]).all()
        assert np.array_equal(image, world.render(s))
    assert world.render(scenes[0], size=64).shape == (64, 64, 3)
    rng_a, rng_b = np.random.default_rng(7), np.random.default_rng(7)
    assert [world.sample_scene(rng_a) for _ in range(5)] == [world.sample_scene(rng_b) for _ in range(5)]


def test_scene_validation():
    with pytest.raises(ValueError, match="equals background"):
        world.Scene("circle", "blue", "blue", 0.5, 0.5, 0.5)
    with pytest.raises(ValueError, match="triangle"):
        world.Scene("triangle", "red", "blue", 0.5, 0.5, 0.5)
    with pytest.raises(ValueError, match="leaves the image"):
        world.Scene("circle", "red", "blue", 0.5, 0.9, 0.5)
    with pytest.raises(ValueError, match="stripe_colours"):
        world.Scene("square", "red", "gray", 0.5, 0.5, 0.5, stripe_colours=("yellow", "red"))
    with pytest.raises(ValueError, match="equals background"):
        world.Scene("square", "red", "white", 0.5, 0.5, 0.5, stripe_colours=("red", "white"))


def test_world_scores_per_asked_shape():
    from purecc_jax.toyworld import evaluate

    items = [p for p in evaluate.prompts(30) if p.set == "world"]

    def render(shape_of):
        return np.stack([world.render(world.Scene(shape_of(p), p.colour, p.background, 0.55, 0.5, 0.5))
                         for p in items]).astype(np.float32) / 255

    right = evaluate.score(render(lambda p: p.shape), items)
    assert right["world_shape"]["rate"] == 1.0 and right["world_all"]["rate"] == 1.0
    assert all(right[f"world_shape_{s}"]["rate"] == 1.0 for s in world.SHAPES)
    # every square drawn as a circle: only the square rate drops
    wrong = evaluate.score(render(lambda p: "circle" if p.shape == "square" else p.shape), items)
    assert wrong["world_shape_square"]["rate"] == 0.0
    assert wrong["world_shape_circle"]["rate"] == 1.0 and wrong["world_shape_cross"]["rate"] == 1.0
    n = {s: wrong[f"world_shape_{s}"]["n"] for s in world.SHAPES}
    assert sum(n.values()) == len(items) and min(n.values()) > 0
    # per held-out combination: exactly the square ones are missed, each over its own prompts
    by = wrong["world_by_combination"]
    assert len(by) == len(world.split_combinations(0)[1])
    for name, v in by.items():
        assert v["shape"]["rate"] == v["all"]["rate"] == (0.0 if " square " in f" {name} " else 1.0), name
    assert sum(v["shape"]["n"] for v in by.values()) == len(items)
    assert by["white circle on a green background"] == right["world_by_combination"]["white circle on a green background"]


def test_endpoints_read_rendered_scenes():
    """The comparison's endpoints on renders whose answers are known: absorption (plain prompts drawn on
    gray), purity (asked background among concept images), fidelity, and segment consistency (the same
    object on the same background: IoU 1, background agreement 1; another background: agreement 0)."""
    from purecc_jax.toyworld import evaluate

    size = 32
    concept = world.concept_scenes(2, "gray", seed=0)
    on = lambda scene, bg: world.render(dataclasses.replace(scene, background=bg), size) / 255.0  # noqa: E731
    items = [evaluate.Prompt("a sks square", "concept_plain")] * 2 + [
        evaluate.Prompt("a sks square on a blue background", "concept_other", "blue"),
        evaluate.Prompt("a sks square on a green background", "concept_other", "green")]
    images = np.stack([on(concept[0], "gray"), on(concept[1], "white"), on(concept[0], "blue"),
                       on(concept[1], "gray")])
    plain_square = world.Scene("square", "red", "blue", concept[0].size, concept[0].cx, concept[0].cy)
    paired = np.stack([world.render(plain_square, size) / 255.0,
                       world.render(dataclasses.replace(plain_square, background="green"), size) / 255.0])
    s = evaluate.score(images, items, paired_base=paired)
    assert s["plain_gray"]["rate"] == 0.5 and s["fidelity_plain"]["rate"] == 1.0
    assert s["purity_other"]["rate"] == 0.5 and s["purity_other"]["n"] == 2
    iou, agree = evaluate.segment_consistency(images[2], paired[0])
    assert iou == pytest.approx(1.0, abs=0.05) and agree == pytest.approx(1.0)
    assert evaluate.segment_consistency(images[3], paired[1])[1] == 0.0  # gray where the base drew green
    assert s["segcons_background"] == pytest.approx((agree + 0.0) / 2)

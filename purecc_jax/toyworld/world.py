"""The toy world: procedural 32x32 scenes of one large shape on a plain background, their
prompts, a held-out split of attribute combinations, and the concept to customize.

A scene is one object (circle, square or cross; 40-70% of the image width) of one colour on a
background of another colour. Prompts describe it ("a red circle on a blue background"), with
attribute dropout so that texts missing the identifier-free parts ("a circle", "a red shape")
have a meaning, as PureCC's base texts need.

The concept ("sks square") is a square with five horizontal bands alternating red and yellow.
`sample_scene` never produces it; its references all share one background colour, the
redundant element a pure customization method should not absorb.

Geometry is in fractions of the image width, so a scene renders at any resolution. Everything
here is numpy-only and deterministic given a `numpy.random.Generator`.
"""

from __future__ import annotations

import dataclasses
import itertools
from collections.abc import Iterable

import numpy as np

# Very distinct RGB values; names double as prompt words.
PALETTE: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 70, 220),
    "yellow": (240, 210, 40),
    "white": (240, 240, 240),
    "black": (20, 20, 20),
    "gray": (128, 128, 128),
}
OBJECT_COLOURS: tuple[str, ...] = ("red", "green", "blue", "yellow", "white")
BACKGROUND_COLOURS: tuple[str, ...] = ("black", "gray", "white", "blue", "green")
SHAPES: tuple[str, ...] = ("circle", "square", "cross")

MIN_SIZE, MAX_SIZE = 0.4, 0.7
# Objects keep this gap to the image edge, so the border pixels always show the background.
MARGIN = 2 / 32
# A cross is two bars of width size/3 (a plus sign with equal arms).
CROSS_ARM = 1 / 3

IDENTIFIER = "sks"
CLASS_WORD = "square"
CONCEPT_STRIPES: tuple[str, str] = ("red", "yellow")
CONCEPT_BACKGROUND = "gray"
STRIPE_BANDS = 5  # horizontal bands of equal height; the top band has stripe_colours[0]
CONCEPT_SIZE = (0.55, 0.65)
CONCEPT_CENTRE_JITTER = 0.06
CENTRE_JITTER = 0.06  # objects' centres lie within this distance of the image centre

Combination = tuple[str, str, str]  # (colour, shape, background)


@dataclasses.dataclass(frozen=True)
class Scene:
    """One object on a plain background; size, cx, cy are fractions of the image width.

    A striped scene (the concept) has `stripe_colours = (top band colour, other colour)` and
    `colour == stripe_colours[0]`.
    """

    shape: str
    colour: str
    background: str
    size: float
    cx: float
    cy: float
    stripe_colours: tuple[str, str] | None = None

    def __post_init__(self) -> None:
        if self.shape not in SHAPES:
            raise ValueError(f"Scene: unknown shape {self.shape!r}; expected one of {SHAPES}")
        if self.colour not in OBJECT_COLOURS:
            raise ValueError(f"Scene: unknown object colour {self.colour!r}; expected one of {OBJECT_COLOURS}")
        if self.background not in BACKGROUND_COLOURS:
            raise ValueError(
                f"Scene: unknown background {self.background!r}; expected one of {BACKGROUND_COLOURS}"
            )
        object_colours = self.stripe_colours or (self.colour,)
        if self.background in object_colours:
            raise ValueError(f"Scene: object colour equals background {self.background!r}")
        if self.stripe_colours is not None:
            a, b = self.stripe_colours
            if b not in OBJECT_COLOURS or a == b or self.colour != a:
                raise ValueError(
                    f"Scene: stripe_colours {self.stripe_colours!r} must be two different object colours "
                    f"with colour ({self.colour!r}) first"
                )
        half = self.size / 2
        if not (0 < self.size <= 1 and 0 <= self.cx - half and self.cx + half <= 1
                and 0 <= self.cy - half and self.cy + half <= 1):
            raise ValueError(f"Scene: object (size={self.size}, cx={self.cx}, cy={self.cy}) leaves the image")

    @property
    def striped(self) -> bool:
        return self.stripe_colours is not None

    @property
    def combination(self) -> Combination:
        return (self.colour, self.shape, self.background)


# --------------------------------------------------------------------------- sampling


def all_combinations() -> list[Combination]:
    """Every valid (colour, shape, background), sorted; object colour never equals background."""
    return sorted(
        (c, s, b) for c, s, b in itertools.product(OBJECT_COLOURS, SHAPES, BACKGROUND_COLOURS) if c != b
    )


def _random_geometry(rng: np.random.Generator, size_range: tuple[float, float]) -> tuple[float, float, float]:
    size = float(rng.uniform(*size_range))
    # Near the centre: where a shape sits is not what the world is about, and a tiny model
    # pretrained for minutes learns shapes far faster when it need not learn positions too.
    lo = max(MARGIN + size / 2, 0.5 - CENTRE_JITTER)
    hi = min(1 - MARGIN - size / 2, 0.5 + CENTRE_JITTER)
    return size, float(rng.uniform(lo, hi)), float(rng.uniform(lo, hi))


def sample_scene(rng: np.random.Generator, allowed: Iterable[Combination] | None = None) -> Scene:
    """A random plain (non-striped) scene, its combination drawn uniformly from `allowed`
    (default: all combinations), its size uniform in [MIN_SIZE, MAX_SIZE], its centre within
    CENTRE_JITTER of the image centre (and inside the margins)."""
    choices = sorted(allowed) if allowed is not None else all_combinations()
    if not choices:
        raise ValueError("sample_scene: `allowed` is empty")
    colour, shape, background = choices[int(rng.integers(len(choices)))]
    size, cx, cy = _random_geometry(rng, (MIN_SIZE, MAX_SIZE))
    return Scene(shape, colour, background, size, cx, cy)


def split_combinations(seed: int = 0, heldout_fraction: float = 0.17, min_shapes: int = 1
                       ) -> tuple[frozenset[Combination], frozenset[Combination]]:
    """(train, heldout) combinations. Every attribute value and every pair of attribute values
    (colour-shape, colour-background, shape-background) still occurs in train, so a held-out
    triple is a new combination of familiar parts. With `min_shapes` = 2 every colour-background
    pair also keeps two shapes in train, so that no held-out triple pairs a colour and a
    background that training only ever showed with one shape."""
    if min_shapes not in (1, 2):
        raise ValueError(f"split_combinations: min_shapes={min_shapes} must be 1 or 2 (a pair has 3 shapes)")
    combos = all_combinations()
    order = np.random.default_rng(seed).permutation(len(combos))
    target = max(1, round(heldout_fraction * len(combos)))

    def pairs(t: Combination) -> list[tuple]:
        c, s, b = t
        return [("cs", c, s), ("cb", c, b), ("sb", s, b)]

    remaining: dict[tuple, int] = {}
    for t in combos:
        for p in pairs(t):
            remaining[p] = remaining.get(p, 0) + 1
    heldout = set()
    for i in order:
        if len(heldout) == target:
            break
        t = combos[int(i)]
        if all(remaining[p] > (min_shapes if p[0] == "cb" else 1) for p in pairs(t)):
            heldout.add(t)
            for p in pairs(t):
                remaining[p] -= 1
    return frozenset(set(combos) - heldout), frozenset(heldout)


# --------------------------------------------------------------------------- rendering


def object_mask(scene: Scene, size: int = 32) -> np.ndarray:
    """Boolean (size, size) mask of the object, sampled at pixel centres."""
    centres = (np.arange(size) + 0.5) / size
    x, y = centres[None, :] - scene.cx, centres[:, None] - scene.cy
    half = scene.size / 2
    if scene.shape == "square":
        return (np.abs(x) <= half) & (np.abs(y) <= half)
    if scene.shape == "circle":
        return x**2 + y**2 <= half**2
    arm = half * CROSS_ARM
    return ((np.abs(x) <= half) & (np.abs(y) <= arm)) | ((np.abs(x) <= arm) & (np.abs(y) <= half))


def render(scene: Scene, size: int = 32) -> np.ndarray:
    """The scene as a uint8 (size, size, 3) image with crisp edges."""
    image = np.empty((size, size, 3), np.uint8)
    image[:] = PALETTE[scene.background]
    mask = object_mask(scene, size)
    if not scene.striped:
        image[mask] = PALETTE[scene.colour]
        return image
    centres = (np.arange(size) + 0.5) / size
    band = np.floor((centres - (scene.cy - scene.size / 2)) / (scene.size / STRIPE_BANDS)).astype(int)
    row_colour = np.array([PALETTE[scene.stripe_colours[k % 2]] for k in band], np.uint8)
    image[mask] = np.broadcast_to(row_colour[:, None, :], image.shape)[mask]
    return image


# --------------------------------------------------------------------------- prompts


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def describe(colour: str | None = None, shape: str | None = None, background: str | None = None) -> str:
    """A grammatical description; a None attribute is left out ("a red shape", "a circle on a
    gray background")."""
    head = f"{colour} {shape or 'shape'}" if colour else (shape or "shape")
    text = f"{_article(head)} {head}"
    if background:
        text += f" on {_article(background)} {background} background"
    return text


def prompt(scene: Scene, rng: np.random.Generator | None = None, drop_prob: float = 0.3,
           empty_prob: float = 0.1) -> str:
    """The scene's prompt. With `rng`, the empty prompt comes with probability `empty_prob`
    (classifier-free guidance dropout); otherwise each of colour, shape and background is
    dropped independently with probability `drop_prob`. Without `rng`, the full prompt."""
    if scene.striped:
        raise ValueError("prompt: striped scenes are the concept; use concept_prompt")
    if not (0 <= drop_prob <= 1 and 0 <= empty_prob <= 1):
        raise ValueError(f"prompt: drop_prob={drop_prob} and empty_prob={empty_prob} must be in [0, 1]")
    if rng is None:
        return describe(scene.colour, scene.shape, scene.background)
    if rng.random() < empty_prob:
        return ""
    keep = rng.random(3) >= drop_prob
    return describe(scene.colour if keep[0] else None, scene.shape if keep[1] else None,
                    scene.background if keep[2] else None)


def vocabulary(identifier: str = IDENTIFIER) -> list[str]:
    """Sorted list of every word any prompt or concept text can contain."""
    words = {identifier}
    for c, s, b in itertools.product((None, *OBJECT_COLOURS), (None, *SHAPES), (None, *BACKGROUND_COLOURS)):
        words.update(describe(c, s, b).split())
    return sorted(words)


# --------------------------------------------------------------------------- the concept


def concept_scenes(n: int = 4, background: str = CONCEPT_BACKGROUND, seed: int = 0) -> list[Scene]:
    """n concept scenes on one background, with small size and position jitter."""
    rng = np.random.default_rng(seed)
    scenes = []
    for _ in range(n):
        size = float(rng.uniform(*CONCEPT_SIZE))
        cx, cy = 0.5 + rng.uniform(-CONCEPT_CENTRE_JITTER, CONCEPT_CENTRE_JITTER, size=2)
        scenes.append(Scene("square", CONCEPT_STRIPES[0], background, size, float(cx), float(cy),
                            stripe_colours=CONCEPT_STRIPES))
    return scenes


def concept_references(n: int = 4, background: str = CONCEPT_BACKGROUND, seed: int = 0,
                       size: int = 32) -> np.ndarray:
    """The customization set: uint8 (n, size, size, 3) renders of `concept_scenes`."""
    return np.stack([render(s, size) for s in concept_scenes(n, background, seed)])


def _check_background(background: str | None) -> None:
    if background is not None and background not in BACKGROUND_COLOURS:
        raise ValueError(f"unknown background {background!r}; expected one of {BACKGROUND_COLOURS}")


def concept_prompt(background: str | None = None, identifier: str = IDENTIFIER,
                   class_word: str = CLASS_WORD) -> str:
    """Complete text, e.g. "a sks square on a gray background" or "a sks square"."""
    _check_background(background)
    return describe(identifier, class_word, background)  # the identifier takes the adjective slot


def base_prompt(background: str | None = None, class_word: str = CLASS_WORD) -> str:
    """Base text: the complete text without the identifier ("a square on a gray background")."""
    _check_background(background)
    return describe(None, class_word, background)


def target_prompt(identifier: str = IDENTIFIER, class_word: str = CLASS_WORD) -> str:
    """Target text: identifier and class word ("sks square")."""
    return f"{identifier} {class_word}"

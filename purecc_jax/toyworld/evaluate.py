"""Sampling and scoring one model of the toy comparison with fixed prompts and seeds.

Prompt sets (every method sees the same prompts and the same initial noise):
    concept_ref     "a sks square on a gray background": the references' own background
    concept_other   "a sks square on a {bg} background" for every other background: does the
                    concept come without the redundant gray background?
    concept_plain   "a sks square": which background does the model choose by itself?
    class_prior     "a square on a {bg} background": the class word without the identifier;
                    a pure method keeps drawing plain squares here (no stripes)
    world           ordinary prompts of the world ("a red circle on a blue background") for the
                    held-out attribute combinations: capability preservation and drift
Images are read by the deterministic analyser. "fidelity" is the strict concept test (a square
striped in the concept's two colours); "stripes" drops the shape test (red/yellow bands, any
outline), which separates learning the concept's appearance from drawing clean squares.
Drift is the mean squared pixel difference to the base model's image for the same prompt and seed.

The endpoints of the comparison (docs/toy_world.md fixes them before the study runs):
    absorption  `plain_gray`: the share of "a sks square" drawn on gray, the references'
                background (the base model draws "a square" on gray at its own rate)
    purity      `purity_other`: for "a sks square on a {bg} background", the share drawn on the
                asked background among the samples that show the concept
    transfer    `fidelity_and_background_other`: the share of those prompts drawn as the concept on
                the asked background
    seg-cons    `segcons_iou`, `segcons_background`: the customized model's "a sks square on a
                {bg} background" against the base model's "a square on a {bg} background" from the
                same noise: IoU of the object masks, and the share of the pixels outside both objects
                whose palette colour agrees (the paper's Seg-Cons compares segmentations the same way)
    fidelity    `fidelity_plain`: the concept drawn for "a sks square"
    preservation `world_all` and `drift_world`
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import numpy as np

from purecc_jax.toyworld import analyser, world

PROMPT_SETS = ("concept_ref", "concept_other", "concept_plain", "class_prior", "world")


@dataclasses.dataclass(frozen=True)
class Prompt:
    text: str
    set: str
    background: str | None = None  # the background the prompt asks for
    colour: str | None = None
    shape: str | None = None


def prompts(n: int, identifier: str = world.IDENTIFIER, class_word: str = world.CLASS_WORD,
            reference_background: str = world.CONCEPT_BACKGROUND, seed: int = 0, min_shapes: int = 1
            ) -> list[Prompt]:
    """`n` prompts per set (cycling through a set's variants), deterministic."""
    others = [b for b in world.BACKGROUND_COLOURS if b != reference_background]
    out = [Prompt(world.concept_prompt(reference_background, identifier, class_word), "concept_ref",
                  reference_background) for _ in range(n)]
    out += [Prompt(world.concept_prompt(others[i % len(others)], identifier, class_word), "concept_other",
                   others[i % len(others)]) for i in range(n)]
    out += [Prompt(world.concept_prompt(None, identifier, class_word), "concept_plain") for _ in range(n)]
    backgrounds = list(world.BACKGROUND_COLOURS)
    out += [Prompt(world.base_prompt(backgrounds[i % len(backgrounds)], class_word), "class_prior",
                   backgrounds[i % len(backgrounds)], shape=class_word) for i in range(n)]
    _, heldout = world.split_combinations(seed, min_shapes=min_shapes)
    combos = sorted(heldout)  # attribute combinations the base model never saw together
    for i in range(n):
        colour, shape, background = combos[i % len(combos)]
        out.append(Prompt(world.describe(colour, shape, background), "world", background, colour, shape))
    return out


def segment_consistency(image: np.ndarray, base: np.ndarray) -> tuple[float, float]:
    """(IoU of the two images' object masks, share of the pixels outside both objects whose nearest
    palette colour agrees): how much of the base model's layout a customized image keeps."""
    a, b = analyser.analyse(image), analyser.analyse(base)
    union = a.mask | b.mask
    iou = float((a.mask & b.mask).sum() / union.sum()) if union.any() else 1.0
    outside = ~union
    if not outside.any():
        return iou, 0.0
    agree = analyser.palette_labels(image) == analyser.palette_labels(base)
    return iou, float(agree[outside].mean())


def score(images: np.ndarray, items: Sequence[Prompt], reference: np.ndarray | None = None,
          paired_base: np.ndarray | None = None) -> dict[str, Any]:
    """Per-set rates (with binomial standard errors) for images (N, H, W, 3) in [0, 1].

    `reference`: the base model's images of the same prompts and noise (drift); `paired_base`: per
    concept_other prompt, in order, the base model's image of its base text from the same noise
    (segment consistency)."""
    rows = []
    paired = iter(paired_base) if paired_base is not None else None
    for i, (img, p) in enumerate(zip(images, items)):
        a = analyser.analyse(img)
        c = analyser.concept_score(img, p.background)
        row = dict(set=p.set, concept=bool(c["is_concept"]), striped=bool(a.striped),
                   stripes=bool(c["striped"] and c["stripe_colours_match"]),
                   background_ok=p.background is None or a.background == p.background,
                   background=a.background)
        if p.set in ("world", "class_prior"):
            row["shape_ok"] = a.shape == p.shape and not a.striped
        if p.set == "world":
            row["shape"] = p.shape
            row["combination"] = world.describe(p.colour, p.shape, p.background).split(" ", 1)[1]
            row["colour_ok"] = a.colour == p.colour
            row["all_ok"] = row["background_ok"] and row["colour_ok"] and row["shape_ok"]
        if reference is not None:
            row["drift"] = float(np.mean((img - reference[i]) ** 2))
        if paired is not None and p.set == "concept_other":
            row["segcons_iou"], row["segcons_background"] = segment_consistency(img, next(paired))
        rows.append(row)

    def rate(name, key, shape=None, combination=None):
        return _binomial([r[key] for r in rows if r["set"] == name and key in r
                          and (shape is None or r.get("shape") == shape)
                          and (combination is None or r.get("combination") == combination)])

    def mean(name, key):
        vals = [r[key] for r in rows if r["set"] == name and key in r]
        return None if not vals else float(np.mean(vals))

    plain = [r["background"] for r in rows if r["set"] == "concept_plain"]
    out = {
        "fidelity_ref": rate("concept_ref", "concept"),
        "fidelity_other": rate("concept_other", "concept"),
        "stripes_ref": rate("concept_ref", "stripes"),
        "stripes_other": rate("concept_other", "stripes"),
        "background_other": rate("concept_other", "background_ok"),
        "plain_gray": {"rate": float(np.mean([b == world.CONCEPT_BACKGROUND for b in plain])), "n": len(plain)}
        if plain else None,
        "class_prior_striped": rate("class_prior", "striped"),
        "class_prior_shape": rate("class_prior", "shape_ok"),
        "class_prior_background": rate("class_prior", "background_ok"),
        "world_all": rate("world", "all_ok"),
        "world_background": rate("world", "background_ok"),
        "world_colour": rate("world", "colour_ok"),
        "world_shape": rate("world", "shape_ok"),
        **{f"world_shape_{shape}": rate("world", "shape_ok", shape) for shape in world.SHAPES},
        "drift_world": mean("world", "drift"),
        "drift_class_prior": mean("class_prior", "drift"),
        "fidelity_plain": rate("concept_plain", "concept"),
        "purity_other": _binomial([r["background_ok"] for r in rows if r["set"] == "concept_other" and r["concept"]]),
        "segcons_iou": mean("concept_other", "segcons_iou"),
        "segcons_background": mean("concept_other", "segcons_background"),
    }
    # Which held-out combinations a model gets wrong (a rate over a few prompts each): the base's
    # misses are whole combinations, not noise spread over all of them.
    combos = sorted({r["combination"] for r in rows if "combination" in r})
    out["world_by_combination"] = {
        c: {"shape": rate("world", "shape_ok", combination=c), "all": rate("world", "all_ok", combination=c)}
        for c in combos} or None
    out["fidelity_and_background_other"] = _binomial(
        [r["concept"] and r["background_ok"] for r in rows if r["set"] == "concept_other"])
    return out


def _binomial(vals: Sequence[bool]) -> dict[str, float] | None:
    """Rate of a list of outcomes with its binomial standard error (None for no outcomes)."""
    if not vals:
        return None
    p = float(np.mean(vals))
    return {"rate": p, "se": float(np.sqrt(max(p * (1 - p), 1e-12) / len(vals))), "n": len(vals)}

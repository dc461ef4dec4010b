"""Deterministic analyser for toy-world images: background, object colour(s), shape, stripes.

This is the ground truth of the toy evaluation, so it prefers "unknown" (None) to a guess.
It is built to survive the blur and noise of generated images:

1. background: majority vote of the border pixels' nearest palette colours;
2. object region: the largest connected region of pixels far from the measured background;
3. colour: majority vote of the nearest palette colours of the region's interior (its rim is
   peeled off, since blends live there). A blend of two colours can still lie near a third
   palette colour (white blurred into green looks gray), so a vote is dropped when its pixel
   is better explained as a blend of the background and another candidate, or of two others;
4. mask: pixels closer to an object colour than to the background, largest region, holes
   filled; a clean copy is also 3x3 majority filtered (noise flips pixels along blurred edges);
5. shape: from the clean mask's bounding box: its fill ratio and the fill of its corner
   triangles, which are empty for a circle or a cross and full for a square;
6. stripes: when a second colour holds a fair share, each full-width row of the clean mask is
   labelled with its majority colour; horizontal stripes are >= 3 alternating runs of clean rows.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from purecc_jax.toyworld.world import CONCEPT_STRIPES, PALETTE

NAMES: tuple[str, ...] = tuple(PALETTE)
_RGB = np.array([PALETTE[n] for n in NAMES], np.float32) / 255.0

BORDER_MAJORITY = 0.6  # share of border pixels that must agree on the background
OBJECT_DIST = 0.2  # RGB distance (in [0, 1] units) from the background that marks object pixels
MIN_OBJECT_FRACTION = 0.02  # smaller regions are "no object" (the smallest real object is ~9%)
OFF_PALETTE_DIST = 0.3  # pixels farther than this from every palette colour do not vote
CANDIDATE_SHARE = 0.05  # colours with fewer interior votes cannot explain other pixels as blends
INTERIOR_PEELS, INTERIOR_SHARE = 2, 0.25
SECOND_COLOUR_SHARE = 0.2  # a second colour below this share of the votes is noise
COLOUR_MAJORITY = 0.5
# Shape from the mask's bounding box. Measured on 1000 renders each, with a 1-px box blur and
# noise of std 0.05: square fill >= 0.90 and corners >= 0.5; circle fill 0.71-0.86 and
# corners <= 0.05; cross fill 0.47-0.61 and corners 0 (clean renders: 1 / 1, 0.72-0.84 / 0,
# 0.49-0.62 / 0).
MAX_ASPECT = 1.4
CORNER_L1 = 1.5
SQUARE_CORNERS, SQUARE_FILL = 0.4, 0.8
ROUND_CORNERS = 0.25
CIRCLE_FILL, MAX_ROUND_FILL = 0.665, 0.93
MIN_CROSS_FILL = 0.35
STRIPE_ROW_PURITY = 0.8
STRIPE_ROW_WIDTH = 0.5  # rows narrower than this share of the widest row are edges, not bands
MIN_STRIPE_RUNS = 3


@dataclasses.dataclass(frozen=True)
class Analysis:
    """What the analyser reads from one image; None means no confident answer.

    For a striped object, `colour` is the top band's colour (as in `world.Scene`).
    `mask` is the object mask (bool, H x W), all False when no object was found.
    """

    background: str | None
    colour: str | None
    shape: str | None
    striped: bool
    stripe_colours: tuple[str, str] | None
    object_fraction: float
    mask: np.ndarray = dataclasses.field(repr=False, compare=False)


def to_unit_rgb(image, value_range: tuple[float, float] | None = None) -> np.ndarray:
    """float32 (H, W, 3) in [0, 1]. uint8 input is read as [0, 255]; float input as [0, 1]
    unless `value_range` says otherwise (e.g. (-1, 1) for model outputs)."""
    x = np.asarray(image)
    if x.ndim != 3 or x.shape[-1] != 3:
        raise ValueError(f"analyse: expected an (H, W, 3) image, got shape {x.shape}")
    if value_range is None:
        if x.dtype == np.uint8:
            value_range = (0.0, 255.0)
        else:
            value_range = (0.0, 1.0)
            if np.nanmin(x) < -0.25 or np.nanmax(x) > 1.25:
                raise ValueError(
                    f"analyse: float image has values in [{np.nanmin(x):.3f}, {np.nanmax(x):.3f}], far outside "
                    "[0, 1]; pass value_range, e.g. (-1, 1) or (0, 255)"
                )
    if np.isnan(x).any():
        raise ValueError("analyse: image contains NaN")
    lo, hi = value_range
    return np.clip((x.astype(np.float32) - lo) / (hi - lo), 0.0, 1.0)


def _nearest(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    dist = np.linalg.norm(x[..., None, :] - _RGB, axis=-1)
    return dist.argmin(-1), dist.min(-1)


def palette_labels(image, value_range: tuple[float, float] | None = None) -> np.ndarray:
    """Each pixel's nearest palette colour, as an index into NAMES (H, W)."""
    return _nearest(to_unit_rgb(image, value_range))[0]


def _spread(a: np.ndarray, op: np.ufunc) -> np.ndarray:
    """`a` combined by `op` (e.g. np.minimum) with each pixel's in-image 4-neighbours."""
    out = a.copy()
    op(out[1:], a[:-1], out=out[1:])
    op(out[:-1], a[1:], out=out[:-1])
    op(out[:, 1:], a[:, :-1], out=out[:, 1:])
    op(out[:, :-1], a[:, 1:], out=out[:, :-1])
    return out


def _largest_component(mask: np.ndarray) -> np.ndarray:
    """The largest 4-connected region of `mask` (label propagation; images are tiny)."""
    if not mask.any():
        return mask
    big = mask.size
    labels = np.where(mask, np.arange(big).reshape(mask.shape), big)
    while True:
        new = np.where(mask, _spread(labels, np.minimum), big)
        if np.array_equal(new, labels):
            break
        labels = new
    ids, counts = np.unique(labels[mask], return_counts=True)
    return labels == ids[counts.argmax()]


def _fill_holes(mask: np.ndarray) -> np.ndarray:
    """`mask` plus every non-mask pixel that cannot reach the image border."""
    outside = ~mask
    reach = np.zeros_like(mask)
    reach[[0, -1], :], reach[:, [0, -1]] = outside[[0, -1], :], outside[:, [0, -1]]
    while True:
        new = _spread(reach, np.logical_or) & outside
        if np.array_equal(new, reach):
            return ~reach
        reach = new


def _erode(mask: np.ndarray) -> np.ndarray:
    """4-neighbour erosion; pixels on the image edge count as having outside neighbours."""
    out = _spread(mask, np.logical_and)
    out[[0, -1], :], out[:, [0, -1]] = False, False
    return out


def _majority(mask: np.ndarray) -> np.ndarray:
    """3x3 majority filter: removes isolated pixels flipped by noise along blurred edges."""
    h, w = mask.shape
    p = np.pad(mask, 1).astype(np.int8)
    return sum(p[i:i + h, j:j + w] for i in range(3) for j in range(3)) >= 5


def _segment_dist(p: np.ndarray, a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Distance of each colour in p (N, 3) to the line segment from a to b."""
    ab = b - a
    t = np.clip((p - a) @ ab / max(float(ab @ ab), 1e-12), 0.0, 1.0)
    return np.linalg.norm(p - (a + t[:, None] * ab), axis=-1)


def _object_colours(pixels: np.ndarray, labels: np.ndarray, bg_rgb: np.ndarray) -> list[tuple[int, int]]:
    """(palette index, votes) of the object's colours, strongest first.

    `pixels` (N, 3) are interior object pixels and `labels` their nearest palette colours. A
    vote for C is dropped when its pixel lies closer to the blend line between the background
    and another candidate, or between two other candidates, than to C itself: the pixel is
    then better explained as a blend than as C.
    """
    counts = np.bincount(labels, minlength=len(NAMES))
    candidates = [int(c) for c in np.nonzero(counts >= max(2, CANDIDATE_SHARE * len(labels)))[0]]
    kept = []
    for c in candidates:
        own = pixels[labels == c]
        to_c = np.linalg.norm(own - _RGB[c], axis=-1)
        anchors = [bg_rgb] + [_RGB[k] for k in candidates if k != c]
        to_blend = np.min([_segment_dist(own, a, b) for i, a in enumerate(anchors) for b in anchors[i + 1:]]
                          or [np.full(len(own), np.inf)], axis=0)
        votes = int((to_c <= to_blend).sum())
        if votes:
            kept.append((c, votes))
    return sorted(kept, key=lambda cv: -cv[1])


def _shape(mask: np.ndarray) -> str | None:
    # Bounding box over rows/columns holding >= 2 mask pixels, so single-pixel spurs do not
    # stretch it.
    rows, cols = np.nonzero(mask.sum(1) >= 2)[0], np.nonzero(mask.sum(0) >= 2)[0]
    if len(rows) < 2 or len(cols) < 2:
        return None
    box = mask[rows.min():rows.max() + 1, cols.min():cols.max() + 1]
    h, w = box.shape
    if max(h, w) > MAX_ASPECT * min(h, w):
        return None
    # Box coordinates in [-1, 1]; the corner triangles |u| + |v| >= CORNER_L1 lie outside
    # any circle or cross inscribed in the box but inside a square.
    u, v = (np.arange(w) + 0.5) / w * 2 - 1, (np.arange(h) + 0.5) / h * 2 - 1
    corners = box[np.abs(u)[None, :] + np.abs(v)[:, None] >= CORNER_L1].mean()
    fill = box.mean()
    if corners >= SQUARE_CORNERS:
        return "square" if fill >= SQUARE_FILL else None
    if corners > ROUND_CORNERS:
        return None
    if CIRCLE_FILL <= fill < MAX_ROUND_FILL:
        return "circle"
    return "cross" if MIN_CROSS_FILL <= fill < CIRCLE_FILL else None


def _stripes(x: np.ndarray, mask: np.ndarray, a: int, b: int) -> tuple[int, int] | None:
    """(top colour, other colour) if the mask rows form >= 3 alternating clean runs of a and b."""
    closer_to_a = np.linalg.norm(x - _RGB[a], axis=-1) < np.linalg.norm(x - _RGB[b], axis=-1)
    widths = mask.sum(axis=1)
    row_labels, purities = [], []
    for r in np.nonzero(widths >= STRIPE_ROW_WIDTH * widths.max())[0]:
        in_row = closer_to_a[r][mask[r]]
        share_a = in_row.mean()
        row_labels.append(a if share_a >= 0.5 else b)
        purities.append(max(share_a, 1 - share_a))
    runs = 1 + sum(p != q for p, q in zip(row_labels, row_labels[1:]))
    if runs < MIN_STRIPE_RUNS or np.mean(purities) < STRIPE_ROW_PURITY:
        return None
    top = row_labels[0]
    return top, (b if top == a else a)


def analyse(image, value_range: tuple[float, float] | None = None) -> Analysis:
    """Read background, object colour(s), shape and stripes from an (H, W, 3) image
    (uint8, or float in [0, 1]; pass value_range=(-1, 1) for [-1, 1])."""
    x = to_unit_rgb(image, value_range)
    h, w, _ = x.shape
    none = Analysis(None, None, None, False, None, 0.0, np.zeros((h, w), bool))
    labels, dist = _nearest(x)

    border = np.concatenate([labels[0], labels[-1], labels[1:-1, 0], labels[1:-1, -1]])
    votes = np.bincount(border, minlength=len(NAMES))
    bg = int(votes.argmax())
    if votes[bg] < BORDER_MAJORITY * border.size:
        return none
    edge = np.concatenate([x[0], x[-1], x[1:-1, 0], x[1:-1, -1]])
    bg_rgb = np.median(edge[border == bg], axis=0)
    background = NAMES[bg]

    region = _largest_component(np.linalg.norm(x - bg_rgb, axis=-1) > OBJECT_DIST)
    if region.sum() < MIN_OBJECT_FRACTION * h * w:
        return dataclasses.replace(none, background=background)
    # Blends sit on the region's rim: vote with its interior, peeled while enough is left.
    core = region
    for _ in range(INTERIOR_PEELS):
        inner = _erode(core)
        if inner.sum() < INTERIOR_SHARE * region.sum():
            break
        core = inner
    core = core & (dist <= OFF_PALETTE_DIST) & (labels != bg)
    candidates = _object_colours(x[core], labels[core], bg_rgb)
    if not candidates:
        return dataclasses.replace(none, background=background)
    total = sum(n for _, n in candidates)
    primary, primary_votes = candidates[0]
    secondary = None
    if len(candidates) > 1 and candidates[1][1] >= SECOND_COLOUR_SHARE * total:
        secondary = candidates[1][0]

    object_ids = [primary] if secondary is None else [primary, secondary]
    to_object = np.min([np.linalg.norm(x - _RGB[i], axis=-1) for i in object_ids], axis=0)
    closer_to_object = to_object < np.linalg.norm(x - bg_rgb, axis=-1)
    mask = _fill_holes(_largest_component(closer_to_object))
    fraction = float(mask.mean())
    if mask.sum() < MIN_OBJECT_FRACTION * h * w:
        return dataclasses.replace(none, background=background, object_fraction=fraction)

    clean = _fill_holes(_largest_component(_majority(closer_to_object)))
    stripes = _stripes(x, clean, primary, secondary) if secondary is not None else None
    if stripes is not None:
        colour = NAMES[stripes[0]]
        stripe_colours = (NAMES[stripes[0]], NAMES[stripes[1]])
    else:
        colour = NAMES[primary] if primary_votes >= COLOUR_MAJORITY * total else None
        stripe_colours = None
    return Analysis(background, colour, _shape(clean), stripes is not None, stripe_colours, fraction, mask)


def concept_score(image, background: str | None = None,
                  value_range: tuple[float, float] | None = None) -> dict:
    """Is the image the concept (a square striped in the concept's two colours), and is its
    background the requested one (None when no background is requested)?

    Returns booleans `is_concept`, `square`, `striped`, `stripe_colours_match`,
    `background_match`, and `score` (the mean of the first three checks, for partial credit).
    """
    a = analyse(image, value_range)
    square = a.shape == "square"
    colours = a.stripe_colours is not None and set(a.stripe_colours) == set(CONCEPT_STRIPES)
    return {
        "is_concept": bool(square and a.striped and colours),
        "square": square,
        "striped": a.striped,
        "stripe_colours_match": colours,
        "background_match": None if background is None else a.background == background,
        "score": (square + a.striped + colours) / 3,
    }


"""A concept: 3-5 photos, an identifier and a class word, and their PureCC texts.

A concept is given as a folder of images (jpg / png / webp; EXIF orientation honoured),
optionally with a caption file `<image>.txt` per image (see `data.texts.read_caption_file`),
or as the name of a DreamBench subject.

A mask `<image stem>.mask.png` beside an image (grayscale; white: learn, black: ignore) or the
image's alpha channel weights its training loss per pixel when the run asks for a masked loss
(`views_by_size(masks=True)`, config.concept.masked_loss).

What is refused, with the file named: any other file in the folder but hidden ones and .txt
notes (a .heic or .gif photo would otherwise drop out of training unnoticed), unreadable or
truncated images, and images smaller than the training resolution (upscaled, they would teach
blur). Converted: palette, grayscale, 16-bit grayscale (scaled, not clipped), CMYK (PIL's
conversion, no colour profile), transparency (composited on white).

Training sizes: one fixed resolution per entry of config.concept.resolution (cropped to it), or
aspect-ratio buckets (`bucket_sizes`): each photo resized to the bucket of its area whose aspect
ratio is closest to its own, so at most a sliver of it is cropped away.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

from purecc_jax import paths
from purecc_jax.data import dreambench
from purecc_jax.data import texts as texts_lib

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp")
MASK_SUFFIX = ".mask.png"
CROPS = ("center", "random")
MAX_BUCKETS = 12  # distinct training sizes of one run: each is a compiled program per stage


@dataclasses.dataclass(frozen=True)
class Concept:
    name: str
    images: tuple[Path, ...]
    identifier: str
    class_word: str
    texts: tuple[texts_lib.Texts, ...]  # one per image
    masks: tuple[Path | None, ...] = ()  # per image, its `<stem>.mask.png` or None (empty: none at all)


def find(
    path: str,
    *,
    identifier: str = "sks",
    class_word: str = "",
    template: str = texts_lib.DEFAULT_TEMPLATE,
    dreambench_root: str | None = None,
) -> Concept:
    """Resolves `path` (a folder, or a DreamBench subject name under `dreambench_root`); either may be
    in a bucket (gs://...), read from a checked copy on this host (`paths.local_copy`)."""
    path = str(paths.local_copy(path)) if paths.is_remote(path) else path
    if dreambench_root and paths.is_remote(dreambench_root):
        dreambench_root = str(paths.local_copy(dreambench_root))
    folder = Path(path).expanduser()
    bench = None
    if not folder.is_dir():
        if dreambench_root and (Path(dreambench_root) / path).is_dir():
            bench = dreambench.load(dreambench_root)
            folder = bench.subject_dir(path)
        else:
            where = f" or a DreamBench subject under {dreambench_root}" if dreambench_root else ""
            raise FileNotFoundError(f"concept {path!r} is not a folder{where}")
    elif (folder.parent / "prompts_and_classes.txt").exists():
        bench = dreambench.load(folder.parent)
    if not class_word and bench is not None:
        class_word = bench.classes.get(folder.name, "")
    if not class_word:
        raise ValueError(f"concept {folder}: no class word; set concept.class_word (e.g. 'dog')")

    files = [p for p in folder.iterdir() if p.is_file() and not p.name.startswith(".")]
    mask_files = {p.name[: -len(MASK_SUFFIX)]: p for p in files if p.name.lower().endswith(MASK_SUFFIX)}
    files = [p for p in files if p not in mask_files.values()]
    images = tuple(sorted(p for p in files if p.suffix.lower() in IMAGE_SUFFIXES))
    orphans = sorted(p.name for stem, p in mask_files.items() if stem not in {i.stem for i in images})
    if orphans:
        raise ValueError(f"concept folder {folder}: the masks {orphans} belong to no image (a mask is named "
                         f"<image name without its suffix>{MASK_SUFFIX}, e.g. dog.jpg and dog{MASK_SUFFIX})")
    others = sorted(p.name for p in files if p.suffix.lower() not in IMAGE_SUFFIXES + (".txt",))
    if others:
        raise ValueError(f"concept folder {folder} holds files that are neither images ({', '.join(IMAGE_SUFFIXES)}) "
                         f"nor captions (.txt): {others}. Convert them to jpg/png or move them out of the folder")
    if not images:
        raise FileNotFoundError(f"concept folder {folder} holds no images ({', '.join(IMAGE_SUFFIXES)})")
    per_image = []
    for image in images:
        caption = image.with_suffix(".txt")
        if caption.exists():
            per_image.append(texts_lib.read_caption_file(caption, identifier, class_word))
        else:
            per_image.append(texts_lib.from_template(identifier, class_word, template))
    masks = tuple(mask_files.get(image.stem) for image in images)
    return Concept(folder.name, images, identifier, class_word, tuple(per_image), masks if any(masks) else ())


def parse_resolution(value: int | str | tuple[int, int]) -> tuple[int, int]:
    """512, "512", "512x768" (height x width) or (h, w) -> (height, width), multiples of 16."""
    given = value
    if isinstance(value, str):
        parts = value.lower().split("x")
        if len(parts) > 2 or not all(p.strip().isdigit() for p in parts):
            raise ValueError(f"resolution {given!r} is not 'H' or 'HxW' (e.g. '512' or '512x768')")
        value = (int(parts[0]), int(parts[-1]))
    if isinstance(value, int):
        value = (value, value)
    h, w = (int(v) for v in value)
    if h <= 0 or w <= 0 or h % 16 or w % 16:
        raise ValueError(f"resolution {given!r} ({h}x{w}) must be positive multiples of 16")
    return h, w


def _read(path: Path) -> tuple[Image.Image, Image.Image | None]:
    """(RGB image, its alpha channel or None): EXIF-rotated, transparency composited on white."""
    try:
        with Image.open(path) as im:
            im = ImageOps.exif_transpose(im)
            if im.mode.startswith("I;16"):  # 16-bit grayscale PNG: converting would clip at 255
                im = Image.fromarray((np.asarray(im, np.uint16) >> 8).astype(np.uint8), "L")
            alpha = None
            if im.mode in ("RGBA", "LA", "PA", "P") or "transparency" in im.info:
                im = im.convert("RGBA")
                alpha = im.getchannel("A")
                canvas = Image.new("RGBA", im.size, (255, 255, 255, 255))
                im = Image.alpha_composite(canvas, im)  # transparent pixels become white, not black
            return im.convert("RGB"), alpha
    except (OSError, ValueError) as e:
        raise ValueError(f"cannot read image {path}: {e}. Replace it with a complete jpg/png/webp file or "
                         "remove it from the concept folder") from None


def _read_mask(path: Path, image: Path, size: tuple[int, int]) -> Image.Image:
    """A mask file as an 8-bit grayscale image of the (EXIF-rotated) image's size (width, height)."""
    try:
        with Image.open(path) as im:
            mask = im.convert("L")
    except (OSError, ValueError) as e:
        raise ValueError(f"cannot read the mask {path}: {e}") from None
    if mask.size != size:
        raise ValueError(f"the mask {path} is {mask.width}x{mask.height} but its image {image} is {size[0]}x{size[1]} "
                         "(width x height, after EXIF rotation): draw the mask on the image as it is shown")
    return mask


def load_view(path: Path, size: tuple[int, int], crop: str = "center", rng: np.random.Generator | None = None,
              mask: Path | None = None, alpha_mask: bool = False) -> tuple[np.ndarray, np.ndarray | None]:
    """(RGB float32 (H, W, 3) in [-1, 1], loss weights float32 (H, W) in [0, 1] or None): EXIF-rotated,
    resized to cover `size` (height, width), then cropped. The weights are the `mask` file's, else with
    `alpha_mask` the image's alpha channel, else None; resized and cropped as the image."""
    if crop not in CROPS:
        raise ValueError(f"crop {crop!r} is not one of {CROPS}")
    im, alpha = _read(path)
    weights = _read_mask(mask, path, im.size) if mask is not None else alpha if alpha_mask else None
    h, w = size
    if im.height < h or im.width < w:
        raise ValueError(f"image {path} is {im.width}x{im.height} (width x height), smaller than the training "
                         f"resolution {w}x{h} (concept.resolution, height x width): upscaled, it would teach a blurry "
                         "concept. Use a larger photo or a smaller concept.resolution")
    scale = max(h / im.height, w / im.width)
    new = (max(w, round(im.width * scale)), max(h, round(im.height * scale)))
    im = im.resize(new, Image.Resampling.LANCZOS)
    if crop == "center":
        top, left = (new[1] - h) // 2, (new[0] - w) // 2
    else:
        rng = rng or np.random.default_rng()
        top, left = int(rng.integers(0, new[1] - h + 1)), int(rng.integers(0, new[0] - w + 1))
    box = (left, top, left + w, top + h)
    arr = np.asarray(im.crop(box), np.float32)
    if weights is not None:  # bilinear on the 8-bit values: no overshoot out of [0, 1]
        weights = np.asarray(weights.resize(new, Image.Resampling.BILINEAR).crop(box), np.float32) / 255.0
    return arr / 127.5 - 1.0, weights


def load_image(path: Path, size: tuple[int, int], crop: str = "center",
               rng: np.random.Generator | None = None) -> np.ndarray:
    """RGB float32 (H, W, 3) in [-1, 1]: EXIF-rotated, short side resized, then cropped."""
    return load_view(path, size, crop, rng)[0]


def parse_resolutions(value: int | str | tuple[int, int]) -> list[tuple[int, int]]:
    """One or several resolutions: "512", "512x768", "512,768" (comma-separated) -> [(height, width), ...]."""
    if isinstance(value, str) and "," in value:
        sizes = [parse_resolution(v.strip()) for v in value.split(",")]
        if len(set(sizes)) != len(sizes):
            raise ValueError(f"resolution {value!r} lists a size twice")
        return sizes
    return [parse_resolution(value)]


def bucket_sizes(resolution: tuple[int, int], step: int = 64) -> list[tuple[int, int]]:
    """The aspect-ratio buckets (height, width) of `resolution`'s pixel area, sides multiples of `step` between
    the square's side / sqrt(2) and * sqrt(2) (portrait 2:1 to landscape 1:2), each as large as fits in the
    area (kohya's bucketing): for 512x512 and step 64, 640x384, 576x448, 512x512, 448x576, 384x640."""
    if step <= 0 or step % 16:
        raise ValueError(f"bucket step {step} must be a positive multiple of 16")
    area = resolution[0] * resolution[1]
    side = area ** 0.5
    low, high = math.ceil(side / math.sqrt(2) / step) * step, int(side * math.sqrt(2)) // step * step
    sizes = set()
    for width in range(max(low, step), high + 1, step):
        height = min(high, area // width // step * step)
        if height >= max(low, step):
            sizes.add((height, width))
            sizes.add((width, height))
    if not sizes:
        raise ValueError(f"resolution {resolution[0]}x{resolution[1]} has no bucket of sides a multiple of {step}: "
                         "take a smaller concept.bucket_step or a larger resolution")
    return sorted(sizes, key=lambda s: (s[0] / s[1], s))


def closest_bucket(width: int, height: int, buckets: Sequence[tuple[int, int]]) -> tuple[int, int]:
    """The bucket (height, width) whose aspect ratio is closest to the image's (in log ratio; ties: the larger)."""
    ratio = np.log(height / width)
    return min(buckets, key=lambda b: (round(abs(np.log(b[0] / b[1]) - ratio), 9), -b[0] * b[1]))


@dataclasses.dataclass(frozen=True)
class SizedViews:
    """The training views of one size (a resolution, or an aspect-ratio bucket)."""

    size: tuple[int, int]  # (height, width)
    images: np.ndarray  # (M, H, W, 3) in [-1, 1]
    view_image: np.ndarray  # (M,) the concept image each view shows
    weights: np.ndarray | None = None  # (M, H, W) per-pixel loss weights in [0, 1] (masked loss); None: none


def oriented_size(path: Path) -> tuple[int, int]:
    """(width, height) of an image as it is shown (after EXIF rotation), read from its header."""
    try:
        with Image.open(path) as im:
            w, h = im.size
            orientation = im.getexif().get(0x0112, 1)
    except (OSError, ValueError) as e:
        raise ValueError(f"cannot read image {path}: {e}. Replace it with a complete jpg/png/webp file or "
                         "remove it from the concept folder") from None
    return (h, w) if orientation in (5, 6, 7, 8) else (w, h)


def views_by_size(concept: Concept, resolutions: Sequence[tuple[int, int]], *, buckets: bool = False,
                  bucket_step: int = 64, crop: str = "center", crops_per_image: int = 1, flip: bool = True,
                  seed: int = 0, masks: bool = False) -> list[SizedViews]:
    """Every training view, grouped by size (sorted by area, then height): each image at each of
    `resolutions` (cropped to it), or with `buckets` at the bucket of each resolution's area closest to its
    aspect ratio. `masks`: per-pixel loss weights from each image's mask file or alpha channel (1 where an
    image has neither). One resolution without buckets gives `views`' views, in its order."""
    rng = np.random.default_rng(seed)
    n_crops = 1 if crop == "center" else crops_per_image
    masks_of = concept.masks or (None,) * len(concept.images)
    groups: dict[tuple[int, int], tuple[list, list, list]] = {}
    for i, path in enumerate(concept.images):
        shown = oriented_size(path) if buckets else None
        for resolution in resolutions:
            size = closest_bucket(*shown, bucket_sizes(resolution, bucket_step)) if buckets else resolution
            out, index, weights = groups.setdefault(size, ([], [], []))
            for _ in range(n_crops):
                img, weight = load_view(path, size, crop, rng, masks_of[i] if masks else None, alpha_mask=masks)
                weight = np.ones(size, np.float32) if masks and weight is None else weight
                for flipped in (False, True) if flip else (False,):
                    out.append(img[:, ::-1] if flipped else img)
                    index.append(i)
                    weights.append(None if weight is None else weight[:, ::-1] if flipped else weight)
    if len(groups) > MAX_BUCKETS:
        raise ValueError(f"concept {concept.name}: {len(groups)} training sizes {sorted(groups)}, more than "
                         f"{MAX_BUCKETS} (each is a compiled program): list fewer concept.resolution areas or "
                         "take a coarser concept.bucket_step")
    return [SizedViews(size, np.stack(out), np.asarray(index, np.int32), np.stack(weights) if masks else None)
            for size, (out, index, weights) in sorted(groups.items(), key=lambda g: (g[0][0] * g[0][1], g[0]))]


def views(concept: Concept, size: tuple[int, int], *, crop: str = "center", crops_per_image: int = 1,
          flip: bool = True, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """All training views: (images (M, H, W, 3), source image index (M,)), flips included."""
    rng = np.random.default_rng(seed)
    n_crops = 1 if crop == "center" else crops_per_image
    out, index = [], []
    for i, path in enumerate(concept.images):
        for _ in range(n_crops):
            img = load_image(path, size, crop, rng)
            out.append(img)
            index.append(i)
            if flip:
                out.append(img[:, ::-1])
                index.append(i)
    return np.stack(out), np.asarray(index, np.int32)

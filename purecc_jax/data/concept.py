"""A concept: 3-5 photos, an identifier and a class word, and their PureCC texts.

A concept is given as a folder of images (jpg / png / webp; EXIF orientation honoured),
optionally with a caption file `<image>.txt` per image (see `data.texts.read_caption_file`),
or as the name of a DreamBench subject.

What is refused, with the file named: any other file in the folder but hidden ones and .txt
notes (a .heic or .gif photo would otherwise drop out of training unnoticed), unreadable or
truncated images, and images smaller than the training resolution (upscaled, they would teach
blur). Converted: palette, grayscale, 16-bit grayscale (scaled, not clipped), CMYK (PIL's
conversion, no colour profile), transparency (composited on white).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

from purecc_jax import paths
from purecc_jax.data import dreambench
from purecc_jax.data import texts as texts_lib

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp")
CROPS = ("center", "random")


@dataclasses.dataclass(frozen=True)
class Concept:
    name: str
    images: tuple[Path, ...]
    identifier: str
    class_word: str
    texts: tuple[texts_lib.Texts, ...]  # one per image


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
    images = tuple(sorted(p for p in files if p.suffix.lower() in IMAGE_SUFFIXES))
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
    return Concept(folder.name, images, identifier, class_word, tuple(per_image))


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


def load_image(path: Path, size: tuple[int, int], crop: str = "center",
               rng: np.random.Generator | None = None) -> np.ndarray:
    """RGB float32 (H, W, 3) in [-1, 1]: EXIF-rotated, short side resized, then cropped."""
    if crop not in CROPS:
        raise ValueError(f"crop {crop!r} is not one of {CROPS}")
    try:
        with Image.open(path) as im:
            im = ImageOps.exif_transpose(im)
            if im.mode.startswith("I;16"):  # 16-bit grayscale PNG: converting would clip at 255
                im = Image.fromarray((np.asarray(im, np.uint16) >> 8).astype(np.uint8), "L")
            if im.mode in ("RGBA", "LA", "PA", "P") or "transparency" in im.info:
                im = im.convert("RGBA")
                canvas = Image.new("RGBA", im.size, (255, 255, 255, 255))
                im = Image.alpha_composite(canvas, im)  # transparent pixels become white, not black
            im = im.convert("RGB")
    except (OSError, ValueError) as e:
        raise ValueError(f"cannot read image {path}: {e}. Replace it with a complete jpg/png/webp file or "
                         "remove it from the concept folder") from None
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
    arr = np.asarray(im.crop((left, top, left + w, top + h)), np.float32)
    return arr / 127.5 - 1.0


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

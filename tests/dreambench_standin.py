"""The DreamBench copy beside the checkout (../shared/data/dreambench), or a small stand-in.

The training tests need a DreamBench-layout folder with a `dog` subject. On a clone without
the shared data they use a stand-in written here (5 smooth 96x128 JPEG "photos" of a dog-
coloured blob on varied backgrounds, and the prompts file's layout), so they run instead
of skipping. Tests of the real dataset's contents (test_concept_data, test_tfds_dreambench)
still need the real copy.
"""

from __future__ import annotations

import atexit
import functools
import shutil
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image

SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "dreambench"

PROMPTS = """Classes

subject_name,class
dog,dog

Prompts

Object Prompts

prompt_list = [
'a {0} {1} in the jungle'.format(unique_token, class_token),
]

Live Subject Prompts

prompt_list = [
'a {0} {1} on the beach'.format(unique_token, class_token),
]
"""


def photo(seed: int, h: int = 96, w: int = 128) -> np.ndarray:
    """A smooth uint8 image: a brown ellipse on a two-colour gradient, placed by the seed."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:h, 0:w] / np.array([h, w]).reshape(2, 1, 1)
    top, bottom = rng.uniform(0.3, 1.0, 3), rng.uniform(0.0, 0.7, 3)
    image = top * (1 - y[..., None]) + bottom * y[..., None]
    cy, cx = rng.uniform(0.35, 0.65, 2)
    blob = ((y - cy) / 0.25) ** 2 + ((x - cx) / 0.2) ** 2 < 1
    image[blob] = (0.55, 0.35, 0.2)
    return np.round(image * 255).astype(np.uint8)


def write(root: Path, images: int = 5) -> Path:
    (root / "dog").mkdir(parents=True, exist_ok=True)
    for i in range(images):
        Image.fromarray(photo(i)).save(root / "dog" / f"{i:02d}.jpg", quality=95)
    (root / "prompts_and_classes.txt").write_text(PROMPTS)
    return root


@functools.cache
def root() -> Path:
    """The shared DreamBench if it is there, else a stand-in (written once per test session)."""
    if (SHARED / "prompts_and_classes.txt").is_file():
        return SHARED
    path = Path(tempfile.mkdtemp(prefix="dreambench_standin_"))
    atexit.register(shutil.rmtree, path, ignore_errors=True)
    return write(path)

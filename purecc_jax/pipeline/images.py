"""Writing sampled images: PNG files (one per image) or one float32 .npy array."""

from __future__ import annotations

from pathlib import Path

import numpy as np


def output_paths(output: str | Path, count: int) -> list[Path]:
    """PNG paths for `count` images: `output` itself for one, else stem_i with output's suffix."""
    output = Path(output)
    if count == 1:
        return [output]
    return [output.with_name(f"{output.stem}_{i}{output.suffix}") for i in range(count)]


def write_images(images: np.ndarray, output: str | Path) -> list[Path]:
    """Writes (B, H, W, 3) images in [0, 1]: one .npy (float32) or PNGs (see `output_paths`)."""
    from PIL import Image

    output = Path(output)
    output.parent.mkdir(parents=True, exist_ok=True)
    images = np.asarray(images, np.float32)
    if output.suffix == ".npy":
        np.save(output, images)
        return [output]
    paths = output_paths(output, images.shape[0])
    for image, path in zip(images, paths):
        Image.fromarray(np.round(image * 255).astype(np.uint8)).save(path)
    return paths

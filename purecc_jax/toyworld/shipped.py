"""The shipped toy base model: a pipeline folder committed with the package, and its checksum.

The toy comparison starts from this base on every machine, so that its results do not depend
on how a CPU rounds a ten-minute pretraining. It was made by

    python -m purecc_jax.main --config=configs/toy_concept.py --workdir=runs/toy_base \
        --config.toy.pretrain_base=True --config.toy.base_only=True
    python -m purecc_jax.toyworld.shipped runs/toy_base/base   # copies it here, prints the checksum

(with the `toy.base` settings of configs/toy_concept.py: T5 only (the pooled-text embedder held
at zero), AdamW weight decay 0.1, 6000 steps on a cosine schedule then 3000 at its final learning
rate, logit-normal timesteps shifted by 3; 85 minutes on one core of a 2-core Xeon, made as a
6000-step run resumed with --config.toy.base.steps=9000) and its accuracy on held-out attribute
combinations is `ACCURACY`, measured with the config's sampling settings.
"""

from __future__ import annotations

import hashlib
import shutil
import sys
from pathlib import Path

ASSET = Path(__file__).resolve().parent / "assets" / "base"
SHA256 = "0c5b16fc45b84ed5bba94e4f92529586b0474cb146983b8562be6a0c4d933918"
# Measured on 150 world prompts of the 11 held-out combinations (`--config.toy.base_only=True
# --config.toy.evaluation.samples=150`, 20 sampling steps, CFG 3): background and colour 1.00 (target
# 0.95); shapes: circles 0.89, squares 0.88, crosses 0.96 (target 0.90; the main command's 50
# prompts give 0.88 / 1.00 / 1.00). The weakest held-out combination is "a yellow circle on a white
# background" (0.62).
ACCURACY: dict[str, float] = {"world_background": 1.0, "world_colour": 1.0, "world_shape": 0.91, "world_all": 0.91}


def digest(folder: str | Path) -> str:
    """sha256 over the folder's files: each relative path and its contents, in sorted order."""
    folder = Path(folder)
    h = hashlib.sha256()
    files = sorted(p for p in folder.rglob("*") if p.is_file())
    if not files:
        raise FileNotFoundError(f"{folder} holds no files")
    for p in files:
        h.update(p.relative_to(folder).as_posix().encode() + b"\0")
        h.update(hashlib.sha256(p.read_bytes()).digest())
    return h.hexdigest()


def base_folder(folder: str | Path = ASSET, expected: str | None = None) -> Path:
    """The shipped base's pipeline folder, after checking its checksum."""
    folder = Path(folder)
    expected = expected or SHA256
    if not (folder / "model_index.json").is_file():
        raise FileNotFoundError(
            f"the shipped toy base is missing from {folder} (no model_index.json): restore it from git, or "
            "pretrain one with --config.toy.pretrain_base=True")
    got = digest(folder)
    if got != expected:
        raise ValueError(
            f"the toy base in {folder} has sha256 {got}, but {__name__}.SHA256 is {expected}: its files were "
            "changed or damaged. Restore them from git (`git checkout -- purecc_jax/toyworld/assets`), or "
            "pretrain a base of your own with --config.toy.pretrain_base=True")
    return folder


def install(source: str | Path, target: Path = ASSET) -> str:
    """Copies a pretrained base folder to the package's asset folder; returns its checksum."""
    source = Path(source)
    if not (source / "model_index.json").is_file():
        raise FileNotFoundError(f"{source} is not a finished toy base folder (no model_index.json)")
    if target.exists():
        shutil.rmtree(target)
    shutil.copytree(source, target)
    return digest(target)


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: python -m purecc_jax.toyworld.shipped PRETRAINED_BASE_FOLDER")
    print(f"installed in {ASSET}; set SHA256 = {install(sys.argv[1])!r} in {__file__}")

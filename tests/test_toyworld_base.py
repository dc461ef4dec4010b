"""The shipped toy base: its checksum is checked, and it draws the held-out world as well as stated."""

import config_files
import math
import shutil

import pytest

from purecc_jax.pipeline.folder import load_pipeline
from purecc_jax.toyworld import evaluate, experiment, shipped

# Two world prompts per held-out combination: enough to catch a broken base or sampler, few
# enough to sample in seconds.
PROMPTS = 22


def _config():
    return config_files.load("toy_concept")


def test_shipped_base_matches_its_checksum():
    assert shipped.base_folder() == shipped.ASSET
    assert shipped.digest(shipped.ASSET) == shipped.SHA256


def test_a_changed_base_is_refused(tmp_path):
    copy = tmp_path / "base"
    shutil.copytree(shipped.ASSET, copy)
    weights = copy / "transformer" / "diffusion_pytorch_model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 1
    weights.write_bytes(bytes(data))
    with pytest.raises(ValueError, match="has sha256 .* changed or damaged"):
        shipped.base_folder(copy)
    (copy / "model_index.json").unlink()
    with pytest.raises(FileNotFoundError, match="pretrain_base=True"):
        shipped.base_folder(copy)


def test_shipped_base_reaches_its_stated_accuracy():
    config = _config()
    toy = config.toy
    parts = load_pipeline(shipped.base_folder())
    items = [p for p in evaluate.prompts(PROMPTS) if p.set == "world"]
    sampler = experiment.Sampler(parts, toy, items, config.model.max_sequence_length)
    max_len = config.model.max_sequence_length
    images = sampler(parts.text.encode_prompts([p.text for p in items], max_len),
                     parts.text.encode_prompts([""], max_len))
    scores = evaluate.score(images, items)
    for key, stated in shipped.ACCURACY.items():
        # A sample of 22 images (other noise than the stated measurement's): allow three binomial
        # standard errors below the stated rate, so only a real loss of quality fails.
        slack = 3 * math.sqrt(max(stated * (1 - stated), 0.05 ** 2) / PROMPTS)
        assert scores[key]["rate"] >= stated - slack, (key, scores[key], stated)

"""DreamBench as a TFDS dataset: ArrayRecord written and read back through `as_data_source`
without TensorFlow, one example per photo (centre crops exact to the pixel), subjects with
their prompt lists from the dataset's metadata, the real folder's subject table, errors."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import tensorflow_datasets as tfds
from PIL import Image

from purecc_jax.data import dreambench
from purecc_jax.data import tfds_dreambench as tdb

DREAMBENCH = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "dreambench"

OBJECT = ("a {0} {1} in the jungle", "a red {0} {1}")
LIVE = ("a {0} {1} in the jungle", "a {0} {1} wearing a red hat", "a {0} {1} sleeping")
FAKE_CLASSES = {"dog": "dog", "red_cartoon": "cartoon", "teapot": "teapot"}


def prompt_block(templates) -> str:
    rows = ",\n".join(f"'{t}'.format(unique_token, class_token)" for t in templates)
    return f"prompt_list = [\n{rows}\n]\n"


def write_fake_dreambench(root: Path) -> dict[str, list[np.ndarray]]:
    """3 subjects x 2 photos (48 x 64 JPEG-free PNGs, distinct colours) and the real file's format."""
    table = "\n".join(f"{s},{c}" for s, c in FAKE_CLASSES.items())
    (root / "prompts_and_classes.txt").parent.mkdir(parents=True, exist_ok=True)
    (root / "prompts_and_classes.txt").write_text(
        f"Classes\n\nsubject_name,class\n{table}\n\nPrompts\n\nObject Prompts\n\n{prompt_block(OBJECT)}\n"
        f"Live Subject Prompts\n\n{prompt_block(LIVE)}")
    rng = np.random.default_rng(0)
    photos = {}
    for subject in FAKE_CLASSES:
        (root / subject).mkdir()
        photos[subject] = []
        for i in range(2):
            arr = rng.integers(0, 256, (48, 64, 3), dtype=np.uint8)
            Image.fromarray(arr).save(root / subject / f"{i:02d}.png")
            photos[subject].append(arr)
    (root / "teapot" / "notes.txt").write_text("not an image")
    return photos


@pytest.fixture(scope="module")
def fake(tmp_path_factory):
    root = tmp_path_factory.mktemp("fake_dreambench")
    photos = write_fake_dreambench(root)
    data_dir = tmp_path_factory.mktemp("tfds")
    builder = tdb.prepare(root, data_dir, resolution=32)
    return root, data_dir, builder, photos


def test_builds_array_record_and_reads_without_tensorflow(fake):
    _, data_dir, builder, photos = fake
    files = sorted(p.name for p in Path(builder.data_dir).iterdir())
    assert "dreambench-train.array_record-00000-of-00001" in files and "metadata.json" in files
    source = tdb.load(data_dir, resolution=32)
    assert len(source) == 6
    rows = [source[i] for i in range(len(source))]
    assert [(r["subject"], int(r["index"])) for r in rows] == [(s.encode(), i) for s in FAKE_CLASSES for i in (0, 1)]
    assert [bool(r["live"]) for r in rows] == [True, True, False, False, False, False]
    assert rows[2]["class_word"] == b"cartoon" and rows[3]["filename"] == b"01.png"
    for r in rows:
        assert r["image"].dtype == np.uint8 and r["image"].shape == (32, 32, 3)
    # 48 x 64 -> short side 32 is an exact 2/3 Lanczos; the photo's own resize + centre crop matches exactly.
    want = np.asarray(Image.fromarray(photos["teapot"][1]).resize((43, 32), Image.Resampling.LANCZOS))[:, 5:37]
    np.testing.assert_array_equal(rows[5]["image"], want)
    # The same files through TFDS's own entry points: by registered name, and without this module's class.
    by_name = tfds.data_source("dreambench/32px", data_dir=str(data_dir), split="train")
    from_dir = tfds.builder_from_directory(builder.data_dir).as_data_source(split="train")
    for other in (by_name, from_dir):
        assert len(other) == 6
        np.testing.assert_array_equal(other[5]["image"], rows[5]["image"])
    assert "tensorflow" not in sys.modules


def test_subjects_carry_photos_and_prompts(fake):
    _, data_dir, _, photos = fake
    subjects = tdb.subjects(data_dir, resolution=32)
    assert list(subjects) == sorted(FAKE_CLASSES)
    dog, teapot = subjects["dog"], subjects["teapot"]
    assert dog.live and not teapot.live and dog.filenames == ("00.png", "01.png")
    assert dog.images.shape == (2, 32, 32, 3) and dog.images.dtype == np.uint8
    assert teapot.templates == tuple(t.replace("{0}", "{identifier}").replace("{1}", "{class_word}")
                                     for t in OBJECT)
    assert [t.complete for t in dog.texts("zwx")] == ["a zwx dog in the jungle", "a zwx dog wearing a red hat",
                                                      "a zwx dog sleeping"]
    assert [t.base for t in teapot.texts()] == ["a teapot in the jungle", "a red teapot"]
    only = tdb.subjects(data_dir, ["red_cartoon"], resolution=32)
    assert list(only) == ["red_cartoon"] and only["red_cartoon"].class_word == "cartoon"
    np.testing.assert_array_equal(only["red_cartoon"].images, subjects["red_cartoon"].images)


def test_prepare_reuses_a_prepared_dataset(fake, tmp_path):
    _, data_dir, builder, _ = fake
    again = tdb.prepare(tmp_path / "no_such_source", data_dir, resolution=32)  # no source needed once prepared
    assert again.data_dir == builder.data_dir


def test_errors(fake, tmp_path):
    root, data_dir, _, _ = fake
    with pytest.raises(FileNotFoundError, match="no prepared DreamBench at 64px"):
        tdb.load(data_dir, resolution=64)
    with pytest.raises(KeyError, match="dog4"):
        tdb.subjects(data_dir, ["dog4"], resolution=32)
    with pytest.raises(ValueError, match="resolution"):
        tdb.builder(data_dir, resolution=0)
    with pytest.raises(FileNotFoundError, match="is not a DreamBench folder"):
        tdb.prepare(tmp_path / "missing", tmp_path / "tfds", resolution=16)


@pytest.mark.skipif(not (DREAMBENCH / "prompts_and_classes.txt").is_file(), reason=f"no DreamBench at {DREAMBENCH}")
def test_real_dreambench(tmp_path):
    tdb.prepare(DREAMBENCH, tmp_path, resolution=16)
    subjects = tdb.subjects(tmp_path, resolution=16)
    bench = dreambench.load(DREAMBENCH)
    assert len(subjects) == 30 and {s: v.class_word for s, v in subjects.items()} == bench.classes
    assert sum(len(s.images) for s in subjects.values()) == 158
    assert sorted(s for s, v in subjects.items() if v.live) == ["cat", "cat2", "dog", "dog2", "dog3", "dog5", "dog6",
                                                                 "dog7", "dog8"]
    assert all(len(s.templates) == 25 for s in subjects.values())
    assert subjects["dog"].templates == bench.live_prompts and subjects["can"].templates == bench.object_prompts
    assert subjects["backpack_dog"].filenames == tuple(sorted(p.name for p in (DREAMBENCH / "backpack_dog").iterdir()
                                                              if p.suffix == ".jpg"))

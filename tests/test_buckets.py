"""Aspect-ratio buckets and several resolutions (config.concept.buckets / bucket_step / resolution): the
buckets of an area, each photo at the bucket closest to its aspect ratio with only a sliver cropped, views
grouped by size, batches drawn from one size at a time (deterministic in (seed, step), in proportion to the
sizes' views), the refused settings, and the compile check's largest size."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from purecc_jax import defaults, train
from purecc_jax.data import cache as cache_lib
from purecc_jax.data import concept as concept_lib


def test_buckets_of_an_area():
    assert concept_lib.bucket_sizes((512, 512)) == [(384, 640), (448, 576), (512, 512), (576, 448), (640, 384)]
    for resolution, step in (((512, 512), 64), ((1024, 1024), 64), ((512, 768), 32), ((64, 64), 16)):
        buckets = concept_lib.bucket_sizes(resolution, step)
        area = resolution[0] * resolution[1]
        assert resolution in buckets or resolution[0] != resolution[1]
        for h, w in buckets:
            assert h % step == 0 and w % step == 0 and h * w <= area
            assert max(h, w) / min(h, w) <= 2.0
            assert (w, h) in buckets  # every portrait bucket has its landscape twin
            # as large as fits: one side could not grow by a step within the area and the 2:1 bound
            assert max((h + step) * w, (w + step) * h) > area or max(h, w) + step > (area * 2) ** 0.5
    with pytest.raises(ValueError, match="no bucket of sides a multiple of 64"):
        concept_lib.bucket_sizes((32, 32), 64)
    with pytest.raises(ValueError, match="multiple of 16"):
        concept_lib.bucket_sizes((512, 512), 24)


@pytest.mark.parametrize("size,bucket", [((4000, 3000), (448, 576)), ((3000, 4000), (576, 448)),
                                         ((1000, 1000), (512, 512)), ((1920, 1080), (384, 640)),
                                         ((5000, 1000), (384, 640)), ((1000, 1100), (512, 512))])
def test_each_photo_takes_the_bucket_of_closest_aspect(size, bucket):
    assert concept_lib.closest_bucket(*size, concept_lib.bucket_sizes((512, 512))) == bucket


def write(folder, name, w, h):
    """A photo whose red channel is 255 * column / (w - 1): a crop's columns can be read back."""
    arr = np.zeros((h, w, 3), np.uint8)
    arr[..., 0] = np.round(255 * np.arange(w) / (w - 1))[None, :]
    arr[..., 1] = np.round(255 * np.arange(h) / (h - 1))[:, None]
    Image.fromarray(arr).save(folder / name)


@pytest.fixture
def concept(tmp_path):
    folder = tmp_path / "concept"
    folder.mkdir()
    write(folder, "a_wide.png", 200, 120)
    write(folder, "b_square.png", 100, 100)
    write(folder, "c_tall.png", 120, 200)
    write(folder, "d_wide.png", 160, 100)
    return concept_lib.find(str(folder), class_word="dog")


def test_views_are_grouped_by_bucket_without_cropping_the_subject(concept):
    groups = concept_lib.views_by_size(concept, [(64, 64)], buckets=True, bucket_step=16, flip=True)
    assert [g.size for g in groups] == [(48, 80), (80, 48), (64, 64)]  # by area, then height
    assert [g.view_image.tolist() for g in groups] == [[0, 0, 3, 3], [2, 2], [1, 1]]
    for g in groups:
        assert g.images.shape[1:3] == g.size and g.weights is None
    wide = groups[0].images[0]
    red = (wide[..., 0] + 1) / 2  # columns 0 .. w-1 of the photo as 0 .. 1
    green = (wide[..., 1] + 1) / 2
    assert red[:, 0].max() < 0.02 and red[:, -1].min() > 0.98  # every column kept: nothing cut off the sides
    assert green[0].min() < 0.04 and green[-1].max() > 0.96  # and only a sliver of the rows
    np.testing.assert_array_equal(groups[0].images[1], wide[:, ::-1])


def test_several_resolutions_without_buckets_crop_to_each(concept):
    groups = concept_lib.views_by_size(concept, [(32, 32), (48, 64)], flip=False)
    assert [g.size for g in groups] == [(32, 32), (48, 64)]
    assert [g.view_image.tolist() for g in groups] == [[0, 1, 2, 3]] * 2
    # One resolution is `views` as before, in its order.
    (one,) = concept_lib.views_by_size(concept, [(32, 32)], crop="random", crops_per_image=2, seed=3)
    images, index = concept_lib.views(concept, (32, 32), crop="random", crops_per_image=2, seed=3)
    np.testing.assert_array_equal(one.images, images)
    np.testing.assert_array_equal(one.view_image, index)
    assert concept_lib.parse_resolutions("512, 768x512") == [(512, 512), (768, 512)]
    with pytest.raises(ValueError, match="twice"):
        concept_lib.parse_resolutions("512,512")


def test_the_number_of_sizes_is_bounded(concept, monkeypatch):
    monkeypatch.setattr(concept_lib, "MAX_BUCKETS", 2)
    with pytest.raises(ValueError, match="3 training sizes .* more than 2 .*concept.bucket_step"):
        concept_lib.views_by_size(concept, [(64, 64)], buckets=True, bucket_step=16)


def caches(views: list[int]) -> list[cache_lib.ConceptCache]:
    return [cache_lib.ConceptCache({}, ["", "x"], {k: np.ones(n, np.int32) for k in ("complete", "base", "target")},
                                   np.arange(n, dtype=np.int32)) for n in views]


def test_batches_come_from_one_size_at_a_time():
    several = caches([6, 2, 4])
    drawn = [cache_lib.draw_bucket(several, step, seed=5) for step in range(3000)]
    assert drawn == [cache_lib.draw_bucket(several, step, seed=5) for step in range(3000)]  # every process alike
    assert drawn[:50] != [cache_lib.draw_bucket(several, step, seed=6) for step in range(50)]
    np.testing.assert_allclose(np.bincount(drawn) / len(drawn), [0.5, 1 / 6, 1 / 3], atol=0.03)
    assert {cache_lib.draw_bucket(caches([3]), step, seed=0) for step in range(20)} == {0}
    # The views of a batch are those the size's cache draws, as with one size.
    batch = several[2].batch(7, 3, seed=5)
    assert batch["image"].max() < 4


def config(**overrides):
    return defaults.override(defaults.concept_config(), {"concept.path": "dog", "concept.class_word": "dog",
                                                         **overrides})


def test_training_sizes():
    assert train.training_sizes(config()) == [(512, 512)]
    assert train.training_sizes(config(**{"concept.resolution": "512,768"})) == [(512, 512), (768, 768)]
    both = train.training_sizes(config(**{"concept.resolution": "512,768", "concept.buckets": True}))
    assert set(concept_lib.bucket_sizes((512, 512))) | set(concept_lib.bucket_sizes((768, 768))) == set(both)


@pytest.mark.parametrize("overrides,message", [
    ({"concept.bucket_step": 24}, "config.concept.bucket_step=24 must be a positive multiple of 16"),
    ({"concept.buckets": True, "concept.resolution": "32"},
     "config.concept.resolution='32': resolution 32x32 has no bucket of sides a multiple of 64"),
    ({"concept.resolution": "512,500"}, r"config.concept.resolution='512,500'.*multiples of 16"),
])
def test_invalid_settings_are_refused(overrides, message):
    with pytest.raises(ValueError, match=message):
        train.validate(config(**overrides))

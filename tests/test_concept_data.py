"""Concept folders and DreamBench: image formats and modes, EXIF orientation, crops, flips,
resolutions, caption files, subjects by name, errors naming what is wrong, and the
determinism of the concept cache's batches."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from purecc_jax.data import cache as cache_lib
from purecc_jax.data import concept as concept_lib
from purecc_jax.data import dreambench
from purecc_jax.data.texts import Texts

DREAMBENCH = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "dreambench"
needs_dreambench = pytest.mark.skipif(not (DREAMBENCH / "prompts_and_classes.txt").is_file(),
                                      reason=f"DreamBench not found at {DREAMBENCH}")
RED, BLUE, WHITE = (255, 0, 0), (0, 0, 255), (255, 255, 255)


def to_unit(rgb) -> np.ndarray:
    """An 8-bit colour as load_image returns it, in [-1, 1]."""
    return np.asarray(rgb, np.float32) / 127.5 - 1.0


def halves(size: tuple[int, int], first, second, vertical: bool = False) -> Image.Image:
    """(w, h) RGB image: `first` on the left (top if vertical) half, `second` on the other."""
    w, h = size
    arr = np.zeros((h, w, 3), np.uint8)
    if vertical:
        arr[: h // 2], arr[h // 2:] = first, second
    else:
        arr[:, : w // 2], arr[:, w // 2:] = first, second
    return Image.fromarray(arr)


def gradient(w: int, h: int) -> np.ndarray:
    """uint8 (h, w, 3) whose red channel is 4 * column: a crop's offset can be read back."""
    arr = np.zeros((h, w, 3), np.uint8)
    arr[..., 0] = 4 * np.arange(w)[None, :]
    arr[..., 1] = 4 * np.arange(h)[:, None]
    return arr


def folder_of(tmp_path: Path, images: dict[str, Image.Image], captions: dict[str, str] | None = None) -> Path:
    folder = tmp_path / "concept"
    folder.mkdir()
    for name, im in images.items():
        im.save(folder / name, quality=95) if name.endswith(".jpg") else im.save(folder / name)
    for name, text in (captions or {}).items():
        (folder / name).write_text(text)
    return folder


# ----------------------------------------------------------------------------- formats and modes


@pytest.mark.parametrize("suffix,tol", [(".png", 1e-6), (".webp", 0.05), (".jpg", 0.05), (".JPEG", 0.05)])
def test_formats(tmp_path, suffix, tol):
    path = tmp_path / f"x{suffix}"
    halves((32, 32), RED, BLUE).save(path, format="JPEG" if suffix == ".JPEG" else None, quality=95, lossless=True)
    img = concept_lib.load_image(path, (16, 16))
    assert img.shape == (16, 16, 3) and img.dtype == np.float32
    assert np.abs(img[:, :4] - to_unit(RED)).max() <= tol  # away from the edge that Lanczos rings at
    assert np.abs(img[:, -4:] - to_unit(BLUE)).max() <= tol


def test_modes_transparency_becomes_white(tmp_path):
    rgba = np.zeros((16, 16, 4), np.uint8)
    rgba[..., :3] = RED
    rgba[:, :8, 3] = 255  # left opaque red, right fully transparent (its colour must not show)
    Image.fromarray(rgba, "RGBA").save(tmp_path / "rgba.png")
    img = concept_lib.load_image(tmp_path / "rgba.png", (16, 16))
    np.testing.assert_allclose(img[:, :6], np.broadcast_to(to_unit(RED), (16, 6, 3)), atol=1e-6)
    np.testing.assert_allclose(img[:, -6:], np.ones((16, 6, 3)), atol=1e-6)

    la = Image.fromarray(np.stack([np.full((16, 16), 40, np.uint8), np.zeros((16, 16), np.uint8)], -1), "LA")
    la.save(tmp_path / "la.png")
    np.testing.assert_allclose(concept_lib.load_image(tmp_path / "la.png", (16, 16)), 1.0, atol=1e-6)

    pal = Image.new("P", (16, 16), 1)
    pal.putpalette([*RED, *BLUE] + [0] * 762)
    pal.paste(0, (0, 0, 8, 16))
    pal.save(tmp_path / "palette.png")
    img = concept_lib.load_image(tmp_path / "palette.png", (16, 16))
    np.testing.assert_allclose(img[:, :6], np.broadcast_to(to_unit(RED), (16, 6, 3)), atol=1e-6)
    np.testing.assert_allclose(img[:, -6:], np.broadcast_to(to_unit(BLUE), (16, 6, 3)), atol=1e-6)
    pal.save(tmp_path / "palette_transparent.png", transparency=1)  # blue is the transparent index
    img = concept_lib.load_image(tmp_path / "palette_transparent.png", (16, 16))
    np.testing.assert_allclose(img[:, -6:], 1.0, atol=1e-6)

    rgb = np.zeros((16, 16, 3), np.uint8)
    rgb[:, 8:] = BLUE
    Image.fromarray(rgb).save(tmp_path / "rgb_trns.png", transparency=BLUE)  # an RGB PNG with a tRNS colour
    np.testing.assert_allclose(concept_lib.load_image(tmp_path / "rgb_trns.png", (16, 16))[:, -6:], 1.0, atol=1e-6)


def test_grayscale_8_and_16_bit(tmp_path):
    Image.fromarray(np.full((16, 16), 200, np.uint8), "L").save(tmp_path / "gray.png")
    img = concept_lib.load_image(tmp_path / "gray.png", (16, 16))
    np.testing.assert_allclose(img, to_unit(200), atol=1e-6)
    Image.fromarray(np.full((16, 16), 200 * 257, np.uint16)).save(tmp_path / "gray16.png")
    assert Image.open(tmp_path / "gray16.png").mode.startswith("I;16")
    np.testing.assert_allclose(concept_lib.load_image(tmp_path / "gray16.png", (16, 16)), to_unit(200), atol=1e-6)


def test_exif_orientation_is_honoured(tmp_path):
    # Stored 48 wide x 24 high, red left / blue right; orientation 6 means "rotate 90° clockwise
    # to display", so the photo is 24 wide x 48 high with red on top.
    exif = Image.Exif()
    exif[0x0112] = 6
    halves((48, 24), RED, BLUE).save(tmp_path / "rotated.jpg", quality=95, exif=exif)
    img = concept_lib.load_image(tmp_path / "rotated.jpg", (32, 16))
    assert np.abs(img[:12] - to_unit(RED)).max() < 0.1
    assert np.abs(img[-12:] - to_unit(BLUE)).max() < 0.1


# ----------------------------------------------------------------------------- crops, flips, resolutions


def test_center_and_random_crops(tmp_path):
    Image.fromarray(gradient(64, 32)).save(tmp_path / "wide.png")
    center = concept_lib.load_image(tmp_path / "wide.png", (32, 32), "center")
    np.testing.assert_array_equal(center, to_unit(gradient(64, 32)[:, 16:48]))  # no resize: exact

    offsets = []
    for seed in range(6):
        crop = concept_lib.load_image(tmp_path / "wide.png", (32, 32), "random", np.random.default_rng(seed))
        left = int(round((crop[0, 0, 0] + 1) * 127.5)) // 4
        np.testing.assert_array_equal(crop, to_unit(gradient(64, 32)[:, left:left + 32]))
        offsets.append(left)
    again = concept_lib.load_image(tmp_path / "wide.png", (32, 32), "random", np.random.default_rng(0))
    assert int(round((again[0, 0, 0] + 1) * 127.5)) // 4 == offsets[0]  # the rng decides
    assert len(set(offsets)) > 1 and all(0 <= o <= 32 for o in offsets)
    with pytest.raises(ValueError, match="'middle'"):
        concept_lib.load_image(tmp_path / "wide.png", (32, 32), "middle")


def test_views_flips_and_non_square_resolution(tmp_path):
    folder = folder_of(tmp_path, {"a.png": Image.fromarray(gradient(64, 64)), "b.png": halves((64, 64), RED, BLUE)})
    concept = concept_lib.find(str(folder), class_word="dog")
    size = concept_lib.parse_resolution("32x48")
    assert size == (32, 48)
    images, index = concept_lib.views(concept, size, flip=True)
    assert images.shape == (4, 32, 48, 3) and index.tolist() == [0, 0, 1, 1]
    np.testing.assert_array_equal(images[1], images[0][:, ::-1])
    np.testing.assert_array_equal(images[3], images[2][:, ::-1])

    images, index = concept_lib.views(concept, size, crop="random", crops_per_image=3, flip=False, seed=1)
    assert images.shape == (6, 32, 48, 3) and index.tolist() == [0, 0, 0, 1, 1, 1]
    assert not np.array_equal(images[0], images[1]) or not np.array_equal(images[1], images[2])
    same, _ = concept_lib.views(concept, size, crop="random", crops_per_image=3, flip=False, seed=1)
    np.testing.assert_array_equal(same, images)


@pytest.mark.parametrize("value,expected", [(512, (512, 512)), ("512", (512, 512)), ("512x768", (512, 768)),
                                            ("64X32", (64, 32)), ((48, 16), (48, 16))])
def test_parse_resolution(value, expected):
    assert concept_lib.parse_resolution(value) == expected


@pytest.mark.parametrize("value", ["500", "512x", "512x768x3", "abc", 0, (16, -16)])
def test_bad_resolution_names_the_value(value):
    with pytest.raises(ValueError, match="resolution"):
        concept_lib.parse_resolution(value)


# ----------------------------------------------------------------------------- captions and texts


def test_caption_files_and_template(tmp_path):
    folder = folder_of(tmp_path, {"0.jpg": halves((32, 32), RED, BLUE), "1.png": halves((32, 32), RED, BLUE),
                                  "2.webp": halves((32, 32), RED, BLUE)},
                       {"0.txt": "a sks dog on the grass\n", "1.txt": "sks dog, sleeping\nbase: a sleeping dog\n"
                        "target: sks puppy\n", "notes.txt": "not a caption: no image of this name"})
    concept = concept_lib.find(str(folder), identifier="sks", class_word="dog", template="a photo of {identifier}")
    assert [p.name for p in concept.images] == ["0.jpg", "1.png", "2.webp"]
    assert concept.texts == (
        Texts("a sks dog on the grass", "a dog on the grass", "sks dog"),
        Texts("sks dog, sleeping", "a sleeping dog", "sks puppy"),
        Texts("a photo of sks", "a photo of", "sks dog"),
    )


def test_caption_without_identifier_names_the_file(tmp_path):
    folder = folder_of(tmp_path, {"0.png": halves((32, 32), RED, BLUE)}, {"0.txt": "a sksdog on the grass"})
    with pytest.raises(ValueError, match=r"0\.txt.*'sks'"):
        concept_lib.find(str(folder), class_word="dog")
    (folder / "0.txt").write_text("a sks dog\nstyle: watercolour")
    with pytest.raises(ValueError, match=r"0\.txt.*'style: watercolour'"):
        concept_lib.find(str(folder), class_word="dog")


# ----------------------------------------------------------------------------- DreamBench


@needs_dreambench
def test_dreambench_subject_by_name():
    concept = concept_lib.find("dog", dreambench_root=str(DREAMBENCH))
    assert concept.name == "dog" and concept.class_word == "dog" and len(concept.images) == 5
    assert concept.texts[0] == Texts("a photo of sks dog", "a photo of dog", "sks dog")
    plushie = concept_lib.find("bear_plushie", identifier="zwx", dreambench_root=str(DREAMBENCH))
    assert plushie.class_word == "stuffed animal" and plushie.texts[0].complete == "a photo of zwx stuffed animal"
    # A subject folder given as a path still reads its class from the table next to it.
    assert concept_lib.find(str(DREAMBENCH / "cat")).class_word == "cat"
    images, index = concept_lib.views(concept, (32, 32), flip=False)
    assert images.shape == (5, 32, 32, 3) and index.tolist() == [0, 1, 2, 3, 4]
    assert -1.0 <= images.min() and images.max() <= 1.0 and images.std() > 0.1

    bench = dreambench.load(DREAMBENCH)
    assert len(bench.classes) == 30 and bench.classes["backpack_dog"] == "backpack"
    assert len(bench.object_prompts) == 25 and len(bench.live_prompts) == 25
    assert bench.prompts("dog") == bench.live_prompts and bench.prompts("clock") == bench.object_prompts
    assert "{identifier}" in bench.live_prompts[0] and "{class_word}" in bench.live_prompts[0]
    with pytest.raises(KeyError, match="'dog4'.*known"):
        bench.subject_dir("dog4")


@needs_dreambench
def test_unknown_concept_names_where_it_looked(tmp_path):
    with pytest.raises(FileNotFoundError, match="'dog4'.*DreamBench subject under"):
        concept_lib.find("dog4", dreambench_root=str(DREAMBENCH))
    with pytest.raises(FileNotFoundError, match="'nowhere'"):
        concept_lib.find("nowhere")
    with pytest.raises(FileNotFoundError, match="not a DreamBench folder"):
        dreambench.load(tmp_path)


# ----------------------------------------------------------------------------- errors


def test_errors_name_what_is_wrong(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "readme.txt").write_text("no images here")
    with pytest.raises(FileNotFoundError, match=f"{empty}.*no images"):
        concept_lib.find(str(empty), class_word="dog")

    folder = folder_of(tmp_path, {"good.png": halves((32, 32), RED, BLUE)})
    with pytest.raises(ValueError, match="no class word.*class_word"):
        concept_lib.find(str(folder))
    (folder / "broken.jpg").write_bytes(b"not a jpeg at all")
    concept = concept_lib.find(str(folder), class_word="dog")  # found by name; read when the views are made
    with pytest.raises(ValueError, match=r"cannot read image .*broken\.jpg"):
        concept_lib.views(concept, (16, 16))


# ----------------------------------------------------------------------------- the cache's batches


def test_cache_batches_are_deterministic_in_seed_and_step():
    m = 6
    cache = cache_lib.ConceptCache(
        arrays={}, texts=["", "a sks dog", "a dog", "sks dog"],
        view_texts={"complete": np.full(m, 1, np.int32), "base": np.full(m, 2, np.int32),
                    "target": np.full(m, 3, np.int32)},
        view_image=np.arange(m, dtype=np.int32) // 2)
    a = cache.batch(7, 4, seed=0)
    assert set(a) == {"image", "complete", "base", "target", "null"}
    assert a["image"].dtype == np.int32 and len(set(a["image"].tolist())) == 4  # without replacement
    assert a["complete"].tolist() == [1] * 4 and a["null"].tolist() == [cache_lib.NULL] * 4
    for key in a:
        np.testing.assert_array_equal(cache.batch(7, 4, seed=0)[key], a[key])
    others = [cache.batch(s, 4, seed=0)["image"].tolist() for s in range(8)]
    others += [cache.batch(7, 4, seed=s)["image"].tolist() for s in range(1, 8)]
    assert any(o != a["image"].tolist() for o in others)
    big = cache.batch(0, 10, seed=0)["image"]  # more than the views: drawn with replacement
    assert big.shape == (10,) and big.min() >= 0 and big.max() < m


# ----------------------------------------------------------------------------- strict inputs


def test_truncated_image_is_refused_by_name(tmp_path):
    halves((64, 64), RED, BLUE).save(tmp_path / "whole.jpg", quality=95)
    data = (tmp_path / "whole.jpg").read_bytes()
    (tmp_path / "cut.jpg").write_bytes(data[: len(data) // 2])  # an interrupted copy
    with pytest.raises(ValueError, match=r"(?i)cannot read image .*cut\.jpg.*truncated.*Replace it"):
        concept_lib.load_image(tmp_path / "cut.jpg", (32, 32))
    (tmp_path / "text.png").write_text("a text file named like an image")
    with pytest.raises(ValueError, match=r"cannot read image .*text\.png"):
        concept_lib.load_image(tmp_path / "text.png", (32, 32))


def test_files_that_are_not_images_or_captions_are_refused(tmp_path):
    folder = folder_of(tmp_path, {"a.png": halves((32, 32), RED, BLUE)}, {"a.txt": "a sks dog", "notes.txt": "x"})
    (folder / ".DS_Store").write_bytes(b"\0")  # hidden files are not the user's photos
    (folder / "sub").mkdir()
    assert [p.name for p in concept_lib.find(str(folder), class_word="dog").images] == ["a.png"]
    (folder / "b.heic").write_bytes(b"\0")
    (folder / "c.gif").write_bytes(b"\0")
    with pytest.raises(ValueError, match=r"neither images .*nor captions.*\['b\.heic', 'c\.gif'\].*Convert"):
        concept_lib.find(str(folder), class_word="dog")


def test_image_smaller_than_the_resolution_is_refused(tmp_path):
    halves((48, 24), RED, BLUE).save(tmp_path / "small.png")
    assert concept_lib.load_image(tmp_path / "small.png", (16, 32)).shape == (16, 32, 3)  # downscaled: fine
    with pytest.raises(ValueError, match=r"small\.png is 48x24.*smaller than the training resolution 32x32.*"
                                         r"concept\.resolution"):
        concept_lib.load_image(tmp_path / "small.png", (32, 32))


def test_cmyk_and_16_bit_rgb_are_converted(tmp_path):
    cmyk = Image.new("CMYK", (16, 16), (0, 255, 255, 0))  # pure red in CMYK
    cmyk.save(tmp_path / "cmyk.jpg", quality=100)
    assert Image.open(tmp_path / "cmyk.jpg").mode == "CMYK"
    assert np.abs(concept_lib.load_image(tmp_path / "cmyk.jpg", (16, 16)) - to_unit(RED)).max() < 0.05

    rgb16 = np.zeros((16, 16, 3), np.uint16)
    rgb16[..., 2] = 200 * 257  # blue at 200/255 in 16 bits
    path = tmp_path / "rgb16.png"
    _write_png16(path, rgb16)
    np.testing.assert_allclose(concept_lib.load_image(path, (16, 16)), np.broadcast_to(to_unit((0, 0, 200)),
                               (16, 16, 3)), atol=1e-6)


def _write_png16(path: Path, rgb: np.ndarray) -> None:
    """A 48-bit RGB PNG written by hand (PIL writes none), big-endian rows with filter byte 0."""
    import struct
    import zlib

    h, w, _ = rgb.shape
    raw = b"".join(b"\0" + rgb[y].astype(">u2").tobytes() for y in range(h))

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", w, h, 16, 2, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(raw))
                     + chunk(b"IEND", b""))

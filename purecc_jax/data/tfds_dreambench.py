r"""DreamBench as a TensorFlow Datasets dataset, written as ArrayRecord and read without TensorFlow.

    python -m purecc_jax.data.tfds_dreambench --source=../shared/data/dreambench \
        --data_dir=~/tensorflow_datasets --resolution=512

builds `DATA_DIR/dreambench/512px/1.0.0/` (158 photos, 78 MB at 512 px, about 3 s) from a
DreamBench folder (`purecc_jax.data.dreambench` layout), which TFDS treats as the dataset's
manual download. One example per reference photo, in subject then file order:

    subject      "dog"            class_word  "dog"        live  True (cats and dogs)
    index        0..N-1 (the photo's place in its subject's sorted file list)
    filename     "00.jpg"         image       uint8 (R, R, 3), EXIF-rotated, short side
                                              resized to R (Lanczos), centre-cropped

The subject table and both prompt lists travel in the dataset's metadata, so a prepared
data dir is all `subjects` needs. TFDS runs without TensorFlow only on this path: the
ArrayRecord file format (TFRecord writing imports TensorFlow), `as_data_source` /
`tfds.data_source` for reading (not `as_dataset`), and plain tensor features (the Image
feature encodes PNGs with TensorFlow), with `disable_shuffling` keeping the file order.
The builder is registered as `dreambench`, so `tfds.data_source("dreambench/512px",
data_dir=...)` also reads it; `tfds.builder_from_directory` does without this module.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import tensorflow_datasets as tfds

from purecc_jax.data import concept as concept_lib
from purecc_jax.data import dreambench
from purecc_jax.data import texts as texts_lib

NAME = "dreambench"
DEFAULT_RESOLUTION = 512


@dataclasses.dataclass
class DreamBenchConfig(tfds.core.BuilderConfig):
    """One image size: square `resolution` x `resolution` crops."""

    resolution: int = DEFAULT_RESOLUTION


def builder_config(resolution: int = DEFAULT_RESOLUTION) -> DreamBenchConfig:
    """The config of one resolution, named `<resolution>px`."""
    if not isinstance(resolution, (int, np.integer)) or resolution <= 0:
        raise ValueError(f"DreamBench resolution {resolution!r} must be a positive integer")
    return DreamBenchConfig(name=f"{int(resolution)}px", resolution=int(resolution),
                            description=f"reference photos centre-cropped to {resolution}x{resolution}")


class DreamBench(tfds.core.GeneratorBasedBuilder):
    """DreamBench's 30 subjects' reference photos (see the module doc)."""

    name = NAME
    # TFDS 4.9.10 finds a packaged builder's file through the `importlib_resources` backport, which
    # it only requires on Python < 3.9; giving the path here skips that lookup.
    code_path = tfds.core.Path(__file__)
    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "Initial release."}
    BUILDER_CONFIGS = [builder_config(r) for r in (256, 512, 1024)]  # others are made on demand
    MANUAL_DOWNLOAD_INSTRUCTIONS = (
        "Pass a DreamBench folder (github.com/google/dreambooth `dataset/`: one folder of photos per subject "
        "and prompts_and_classes.txt) as the manual dir: `prepare(source, data_dir)`.")

    def _info(self) -> tfds.core.DatasetInfo:
        r = self.builder_config.resolution
        text = tfds.features.Text()
        return tfds.core.DatasetInfo(
            builder=self,
            description="DreamBench (DreamBooth, Ruiz et al. 2023): 30 subjects, 3-6 photos each.",
            features=tfds.features.FeaturesDict({
                "subject": text,
                "class_word": text,
                "index": tfds.features.Scalar(np.int32),
                "live": tfds.features.Scalar(np.bool_),
                "filename": text,
                # Raw bytes: TFDS's default would store every pixel as a separate int64.
                "image": tfds.features.Tensor(shape=(r, r, 3), dtype=np.uint8,
                                              encoding=tfds.features.Encoding.BYTES),
            }),
            metadata=tfds.core.MetadataDict(),
            disable_shuffling=True,  # keep subject then file order, as `concept.find` lists them
            homepage="https://github.com/google/dreambooth",
            citation="Ruiz et al., DreamBooth: Fine Tuning Text-to-Image Diffusion Models for "
                     "Subject-Driven Generation, CVPR 2023.",
        )

    def _split_generators(self, dl_manager):
        bench = dreambench.load(dl_manager.manual_dir)
        self.info.metadata.update(classes=dict(bench.classes), object_prompts=list(bench.object_prompts),
                                  live_prompts=list(bench.live_prompts))
        return {"train": self._generate_examples(bench)}

    def _generate_examples(self, bench: dreambench.DreamBench):
        r = self.builder_config.resolution
        for subject in sorted(bench.classes):
            folder = bench.subject_dir(subject)
            if not folder.is_dir():
                raise FileNotFoundError(f"{bench.root}/prompts_and_classes.txt lists {subject!r}, "
                                        f"but {folder} is not a folder")
            photos = sorted(p for p in folder.iterdir() if p.suffix.lower() in concept_lib.IMAGE_SUFFIXES)
            if not photos:
                raise FileNotFoundError(f"DreamBench subject folder {folder} holds no images")
            for index, photo in enumerate(photos):
                pixels = concept_lib.load_image(photo, (r, r), "center")  # [-1, 1] from uint8, so exact
                image = np.round((pixels + 1.0) * 127.5).astype(np.uint8)
                yield f"{subject}/{photo.name}", dict(
                    subject=subject, class_word=bench.classes[subject], index=index,
                    live=bench.classes[subject] in dreambench.LIVE_SUBJECT_CLASSES, filename=photo.name, image=image)


def builder(data_dir: str | Path, resolution: int = DEFAULT_RESOLUTION) -> DreamBench:
    """The builder of one resolution under `data_dir` (ArrayRecord files)."""
    config = builder_config(resolution)
    if config.name in DreamBench.builder_configs:  # TFDS wants the class's own object for a listed name
        config = config.name
    return DreamBench(data_dir=str(Path(data_dir).expanduser()), config=config, file_format="array_record")


def prepare(source: str | Path, data_dir: str | Path, resolution: int = DEFAULT_RESOLUTION) -> DreamBench:
    """Writes the dataset from the DreamBench folder `source`, unless `data_dir` already holds it."""
    b = builder(data_dir, resolution)
    if not b.is_prepared():
        source = Path(source).expanduser()
        dreambench.load(source)  # a clear error for a wrong folder before TFDS starts writing
        config = tfds.download.DownloadConfig(manual_dir=str(source))
        b.download_and_prepare(download_config=config)
    return b


def _prepared(data_dir: str | Path, resolution: int) -> DreamBench:
    b = builder(data_dir, resolution)
    if not b.is_prepared():
        raise FileNotFoundError(
            f"no prepared DreamBench at {resolution}px under {data_dir} ({b.data_dir}): run "
            f"`python -m purecc_jax.data.tfds_dreambench --source=DREAMBENCH --data_dir={data_dir} "
            f"--resolution={resolution}` or tfds_dreambench.prepare(...)")
    return b


def load(data_dir: str | Path, split: str = "train", *, resolution: int = DEFAULT_RESOLUTION):
    """A random-access data source (`len`, `source[i]` -> dict of numpy values; strings as bytes)."""
    return _prepared(data_dir, resolution).as_data_source(split=split)


@dataclasses.dataclass(frozen=True)
class Subject:
    """One subject: its reference photos and its 25 evaluation prompts."""

    name: str
    class_word: str
    live: bool
    images: np.ndarray  # (N, R, R, 3) uint8, in file order
    filenames: tuple[str, ...]
    templates: tuple[str, ...]  # with {identifier} and {class_word}

    def texts(self, identifier: str = "sks", class_word: str | None = None) -> tuple[texts_lib.Texts, ...]:
        """The prompts as PureCC texts: complete ("a sks dog in the jungle"), base ("a dog in the jungle")."""
        class_word = class_word or self.class_word
        return tuple(texts_lib.derive(t.format(identifier=identifier, class_word=class_word), identifier,
                                      class_word, source=f"DreamBench prompt {t!r}") for t in self.templates)


def _text(value) -> str:
    return value.decode("utf-8") if isinstance(value, bytes) else str(value)


def subject_names(data_dir: str | Path, *, resolution: int = DEFAULT_RESOLUTION) -> dict[str, str]:
    """{subject: class word} of a prepared dataset, from its metadata alone."""
    b = _prepared(data_dir, resolution)
    if not b.info.metadata or "classes" not in b.info.metadata:
        raise ValueError(f"{b.data_dir}: no DreamBench metadata (metadata.json); prepare the dataset again")
    return dict(b.info.metadata["classes"])


def subjects(data_dir: str | Path, names: Sequence[str] | None = None, *,
             resolution: int = DEFAULT_RESOLUTION) -> dict[str, Subject]:
    """The prepared dataset's subjects (all, or `names`), each with its photos and prompt templates."""
    classes = subject_names(data_dir, resolution=resolution)
    b = _prepared(data_dir, resolution)
    meta = b.info.metadata
    wanted = sorted(classes) if names is None else list(names)
    unknown = [n for n in wanted if n not in classes]
    if unknown:
        raise KeyError(f"{unknown} are not DreamBench subjects in {b.data_dir}; known: {sorted(classes)}")
    photos: dict[str, list[tuple[int, str, np.ndarray]]] = {n: [] for n in wanted}
    source = b.as_data_source(split="train")
    for i in range(len(source)):
        ex = source[i]
        name = _text(ex["subject"])
        if name in photos:
            photos[name].append((int(ex["index"]), _text(ex["filename"]), ex["image"]))
    out = {}
    for name in wanted:
        rows = sorted(photos[name], key=lambda row: row[0])
        live = classes[name] in dreambench.LIVE_SUBJECT_CLASSES
        templates = meta["live_prompts"] if live else meta["object_prompts"]
        out[name] = Subject(name, classes[name], live, np.stack([r[2] for r in rows]),
                            tuple(r[1] for r in rows), tuple(templates))
    return out


def _cli() -> None:
    from absl import app, flags

    source = flags.DEFINE_string("source", None, "DreamBench folder (subject folders, prompts_and_classes.txt)",
                                 required=True)
    data_dir = flags.DEFINE_string("data_dir", None, "TFDS data dir to write into", required=True)
    resolution = flags.DEFINE_integer("resolution", DEFAULT_RESOLUTION, "square crop size in pixels")

    def main(argv: Sequence[str]) -> None:
        if len(argv) > 1:
            raise app.UsageError(f"unexpected arguments: {list(argv[1:])}")
        b = prepare(source.value, data_dir.value, resolution.value)
        print(f"{b.data_dir}: {len(b.as_data_source(split='train'))} images")

    app.run(main)


if __name__ == "__main__":
    _cli()

r"""DreamBench evaluation of trained PureCC workdirs: sample, save grids, score (docs/method.md §6).

    python -m purecc_jax.evaluation.sweep --workdirs=runs/dog,runs/can --output=eval/ \
        --clip=~/clip-vit-large-patch14 --dino=~/dino-vits16 --seeds=4 --steps=28 --height=512 --width=512

Each workdir is a finished training run (`purecc_jax.main`) of one DreamBench subject; its
`config.json` names the subject (`concept.path`) and the pretrained pipeline. For each run:

- the customized model (pretrained + the run's export) samples the subject's 25 prompts
  with the identifier (complete texts, "a sks dog in the jungle"), the original model the
  same prompts without it (base texts, "a dog in the jungle"), from the same seeds;
- images go to OUTPUT/<run>/{customized,base}/pPP_sS.png and a grid to OUTPUT/<run>/grid.png
  (one row per prompt: the customized images, then the base ones);
- with --clip / --dino: CLIP-I and DINO of the customized images against the subject's
  reference photos (the TFDS DreamBench, `purecc_jax.data.tfds_dreambench`), CLIP-T against
  the complete text, and ΔCLIP-T = CLIP-T(customized, complete text) - CLIP-T(original
  model, base text); the original model's CLIP-I/DINO are reported beside them.

OUTPUT/results.json holds every number (per run, per prompt, and the mean over runs, also
per training method when runs differ); OUTPUT/results.md the tables. Without metric flags
the sweep only samples. The TFDS dataset is read from --data_dir (default OUTPUT/tfds) and
prepared there from --dreambench (default: the runs' `concept.dreambench_root`) if missing.

Every path may be a bucket URL (gs://...; `purecc_jax.paths`): workdirs, pretrained folders,
--clip / --dino and --dreambench are read from checked copies on this host (PURECC_CACHE), and
OUTPUT's images, grids, results.json and results.md are written to the bucket. The TFDS dataset
is read from local files: a bucket --data_dir (prepared elsewhere) is copied to this host once, and
with a bucket OUTPUT the default --data_dir is PURECC_CACHE/dreambench_tfds.

--clip / --dino need PyTorch: `pip install -r requirements-eval.txt` (requirements.txt has none).

Cost: 2 x 25 x seeds images per run (the base images are shared by runs of one subject and
pretrained model); 30 subjects x 4 seeds is 6,000 FLUX.1-dev images at 28 steps. Use
--dtype=bfloat16 --param_dtype=bfloat16 for the full-size model.
"""

from __future__ import annotations

import dataclasses
import io
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from absl import app, flags, logging
from PIL import Image

from purecc_jax import backbones
from purecc_jax import cli as cli_lib
from purecc_jax import paths
from purecc_jax.data import tfds_dreambench as tdb
from purecc_jax.pipeline.settings import SampleSettings
from purecc_jax.trained import load_trained, read_meta, workdir_pretrained

FLAGS = flags.FlagValues()
_WORKDIRS = flags.DEFINE_list("workdirs", None, "trained PureCC workdirs, each of one DreamBench subject",
                              flag_values=FLAGS)
_OUTPUT = flags.DEFINE_string("output", None, "folder for images, grids, results.json and results.md",
                              flag_values=FLAGS)
_BASE = flags.DEFINE_string("base_pretrained", None, "the original FLUX pipeline folder: samples the base texts "
                            "and carries the exports (default: each workdir's config.json pretrained)",
                            flag_values=FLAGS)
_CLIP = flags.DEFINE_string("clip", None, "transformers CLIPModel folder (CLIP-I, CLIP-T)", flag_values=FLAGS)
_DINO = flags.DEFINE_string("dino", None, "transformers DINO ViT folder (DINO)", flag_values=FLAGS)
_SEEDS = flags.DEFINE_integer("seeds", 4, "images per prompt (seeds --seed .. --seed + N - 1)", flag_values=FLAGS)
_SEED = flags.DEFINE_integer("seed", 0, "first seed", flag_values=FLAGS)
_STEPS = flags.DEFINE_integer("steps", 28, "denoising steps", flag_values=FLAGS)
_GUIDANCE = flags.DEFINE_float("guidance", 3.5, "embedded guidance scale (FLUX.1-dev)", flag_values=FLAGS)
_HEIGHT = flags.DEFINE_integer("height", 512, "image height (multiple of 16)", flag_values=FLAGS)
_WIDTH = flags.DEFINE_integer("width", 512, "image width (multiple of 16)", flag_values=FLAGS)
_MAX_SEQ = flags.DEFINE_integer("max_sequence_length", 512, "T5 tokens", flag_values=FLAGS)
_BATCH = flags.DEFINE_integer("batch_size", 4, "images per sampling call (at least one prompt's seeds)",
                              flag_values=FLAGS)
_DATA_DIR = flags.DEFINE_string("data_dir", None, "TFDS data dir of DreamBench (default OUTPUT/tfds)",
                                flag_values=FLAGS)
_DREAMBENCH = flags.DEFINE_string("dreambench", None, "DreamBench folder to prepare the TFDS dataset from "
                                  "(default: the workdirs' concept.dreambench_root)", flag_values=FLAGS)
_REF_RES = flags.DEFINE_integer("reference_resolution", tdb.DEFAULT_RESOLUTION, "reference photo crop size",
                                flag_values=FLAGS)
_GRID_CELL = flags.DEFINE_integer("grid_cell", 256, "largest side of an image in grid.png", flag_values=FLAGS)
_DTYPE = flags.DEFINE_string("dtype", "float32", "compute dtype", flag_values=FLAGS)
_PARAM_DTYPE = flags.DEFINE_string("param_dtype", "float32", "dtype the weights are held in", flag_values=FLAGS)
_MESH = flags.DEFINE_list("mesh", None, "DATA,FSDP,TENSOR mesh sizes; default: one device", flag_values=FLAGS)
_TORCH_DEVICE = flags.DEFINE_string("torch_device", "cpu", "device of the CLIP / DINO models", flag_values=FLAGS)

METRICS = ("clip_i", "dino", "clip_t", "clip_t_base", "delta_clip_t", "clip_i_base", "dino_base",
           "clip_t_customized_base_text")


@dataclasses.dataclass(frozen=True)
class Run:
    """One trained workdir to evaluate."""

    workdir: Any  # a local path or a bucket URL, as an epath.Path
    name: str  # its output folder
    subject: str
    pretrained: str
    dreambench_root: str  # "" when config.json names none


def read_run(workdir: str | Path, name: str, base_pretrained: str | None = None) -> Run:
    """A workdir's (local or in a bucket) subject and pretrained folder, from its config.json."""
    workdir = paths.path(workdir)
    config = workdir / "config.json"
    if not config.is_file():
        raise FileNotFoundError(f"{config} not found: is {workdir} a PureCC training workdir?")
    concept = json.loads(config.read_text()).get("concept") or {}
    path = concept.get("path", "")
    if not path:
        raise ValueError(f"{workdir / 'config.json'}: concept.path is empty; expected a DreamBench subject")
    root = concept.get("dreambench_root") or ""
    if not root and (paths.path(path).parent / "prompts_and_classes.txt").is_file():
        root = str(paths.path(path).parent)
    pretrained = base_pretrained or workdir_pretrained(workdir)
    if not paths.is_remote(pretrained):
        pretrained = str(Path(pretrained).expanduser())
    return Run(workdir, name, paths.path(path).name, pretrained, root)


def sample_prompts(backbone: backbones.Backbone, parts, prompts: Sequence[str], settings: SampleSettings,
                   seeds: Sequence[int], batch_size: int, trained=None) -> np.ndarray:
    """uint8 images (P * S, H, W, 3), prompt-major, sampled a few prompts per call.

    Every call has the same number of prompts (the last is padded with repeats), so the
    sampler compiles once per model.
    """
    per_call = max(1, batch_size // len(seeds))
    out = []
    for start in range(0, len(prompts), per_call):
        chunk = list(prompts[start:start + per_call])
        real = len(chunk)
        chunk += chunk[-1:] * (per_call - real)
        images = backbone.generate(parts, chunk, settings, seeds=seeds, trained=trained)
        images = np.asarray(images)[:real * len(seeds)]
        out.append(np.round(np.clip(images, 0.0, 1.0) * 255.0).astype(np.uint8))
        logging.info("sampled %d / %d prompts", start + real, len(prompts))
    return np.concatenate(out)


def _save_png(image: Image.Image, file: Any) -> None:
    """A PIL image as a PNG at `file` (local or in a bucket)."""
    data = io.BytesIO()
    image.save(data, format="PNG")
    paths.write_bytes(file, data.getvalue())


def save_images(images: np.ndarray, folder: Any, seeds: Sequence[int]) -> None:
    """PNGs pPP_sS.png of prompt-major images, in `folder` (local or in a bucket)."""
    folder = paths.path(folder)
    for i, image in enumerate(images):
        p, s = divmod(i, len(seeds))
        _save_png(Image.fromarray(image), folder / f"p{p:02d}_s{seeds[s]}.png")


def save_grid(customized: np.ndarray, base: np.ndarray, texts, n_seeds: int, path: Any, cell: int) -> None:
    """One row per prompt: its customized images (captioned with the complete text), then its base ones."""
    from purecc_jax.purecc.loop import grid

    h, w = customized.shape[1:3]
    scale = min(1.0, cell / max(h, w))
    size = (max(1, round(w * scale)), max(1, round(h * scale)))
    small = lambda im: np.asarray(Image.fromarray(im).resize(size, Image.Resampling.LANCZOS), np.float32) / 255.0
    cells, captions = [], []
    for p, t in enumerate(texts):
        rows = slice(p * n_seeds, (p + 1) * n_seeds)
        cells += [small(im) for im in customized[rows]] + [small(im) for im in base[rows]]
        captions += [t.complete] * n_seeds + [t.base] * n_seeds
    _save_png(Image.fromarray(grid(np.stack(cells), captions, columns=2 * n_seeds)), path)


class Scorer:
    """CLIP / DINO scores of one run's images; either model may be absent. Reference embeddings are cached."""

    def __init__(self, clip_path: str | None = None, dino_path: str | None = None, device: str = "cpu"):
        from purecc_jax.evaluation import metrics

        self.metrics = metrics
        self.clip = metrics.CLIPEmbedder(clip_path, device=device) if clip_path else None
        self.dino = metrics.DINOEmbedder(dino_path, device=device) if dino_path else None
        self._references: dict[tuple[str, str], np.ndarray] = {}

    def _refs(self, which: str, subject: tdb.Subject) -> np.ndarray:
        key = (which, subject.name)
        if key not in self._references:
            self._references[key] = getattr(self, which).images(subject.images)
        return self._references[key]

    def score(self, subject: tdb.Subject, texts, customized: np.ndarray, base: np.ndarray,
              n_seeds: int) -> tuple[dict[str, float], list[dict[str, float]]]:
        """Run-level means and per-prompt means of every available metric (cosines)."""
        m, per_image = self.metrics, {}
        if self.clip is not None:
            custom, original = self.clip.images(customized), self.clip.images(base)
            complete = np.repeat(self.clip.texts([t.complete for t in texts]), n_seeds, axis=0)
            base_text = np.repeat(self.clip.texts([t.base for t in texts]), n_seeds, axis=0)
            refs = self._refs("clip", subject)
            per_image["clip_i"] = m.pairwise_cosine(custom, refs).mean(axis=1)
            per_image["clip_i_base"] = m.pairwise_cosine(original, refs).mean(axis=1)
            per_image["clip_t"] = m.paired_cosine(custom, complete)
            per_image["clip_t_base"] = m.paired_cosine(original, base_text)
            per_image["delta_clip_t"] = per_image["clip_t"] - per_image["clip_t_base"]
            per_image["clip_t_customized_base_text"] = m.paired_cosine(custom, base_text)
        if self.dino is not None:
            refs = self._refs("dino", subject)
            per_image["dino"] = m.pairwise_cosine(self.dino.images(customized), refs).mean(axis=1)
            per_image["dino_base"] = m.pairwise_cosine(self.dino.images(base), refs).mean(axis=1)
        names = [k for k in METRICS if k in per_image]
        overall = {k: float(per_image[k].mean()) for k in names}
        per_prompt = [{k: float(per_image[k][p * n_seeds:(p + 1) * n_seeds].mean()) for k in names}
                      for p in range(len(texts))]
        return overall, per_prompt


def evaluate(runs: Sequence[Run], output: str | Path, settings: SampleSettings, seeds: Sequence[int], *,
             data_dir: str | Path, scorer: Scorer | None = None, batch_size: int = 4,
             reference_resolution: int = tdb.DEFAULT_RESOLUTION, grid_cell: int = 256,
             load_options: dict[str, Any] | None = None) -> dict[str, Any]:
    """Samples, saves and scores every run; returns (and writes) the results (see module doc)."""
    output = paths.path(output)
    if paths.is_remote(data_dir):
        data_dir = paths.local_copy(data_dir)
    known = tdb.subject_names(data_dir, resolution=reference_resolution)
    for run in runs:
        if run.subject not in known:
            raise ValueError(f"{run.workdir / 'config.json'}: concept.path names {run.subject!r}, not a DreamBench "
                             f"subject (known: {sorted(known)})")
    subjects = tdb.subjects(data_dir, sorted({r.subject for r in runs}), resolution=reference_resolution)
    pipelines: dict[str, Any] = {}
    base_images: dict[tuple[str, tuple[str, ...]], np.ndarray] = {}
    results = []
    for run in runs:
        if run.pretrained not in pipelines:
            local = backbones.local_pipeline(run.pretrained)
            backbone = backbones.from_folder(local)
            pipelines[run.pretrained] = backbone, backbone.load(local, **(load_options or {}))
        backbone, parts = pipelines[run.pretrained]
        meta = read_meta(str(run.workdir / "export"))
        subject = subjects[run.subject]
        texts = subject.texts(meta["identifier"], meta["class_word"])
        key = (run.pretrained, tuple(t.base for t in texts))
        if key not in base_images:
            logging.info("%s: original model, %d base texts x %d seeds", run.name, len(texts), len(seeds))
            base_images[key] = sample_prompts(backbone, parts, [t.base for t in texts], settings, seeds, batch_size)
        base = base_images[key]
        logging.info("%s: customized model, %d complete texts x %d seeds", run.name, len(texts), len(seeds))
        # the base texts never name the token a trained concept adds
        tuned_parts, trained = load_trained(run.workdir, parts, backbone=backbone)
        customized = sample_prompts(backbone, tuned_parts, [t.complete for t in texts], settings, seeds, batch_size,
                                    trained)

        folder = output / run.name
        save_images(customized, folder / "customized", seeds)
        save_images(base, folder / "base", seeds)
        save_grid(customized, base, texts, len(seeds), folder / "grid.png", grid_cell)
        row = dict(name=run.name, workdir=str(run.workdir), subject=run.subject, class_word=meta["class_word"],
                   identifier=meta["identifier"], method=meta.get("method", ""),
                   concept_embedding=meta["concept_embedding"], pretrained=run.pretrained, images=str(folder),
                   metrics={}, prompts=[dict(complete=t.complete, base=t.base) for t in texts])
        if scorer is not None:
            row["metrics"], per_prompt = scorer.score(subject, texts, customized, base, len(seeds))
            for entry, values in zip(row["prompts"], per_prompt):
                entry.update(values)
        results.append(row)

    summary = dict(
        settings=dict(dataclasses.asdict(settings), seeds=list(seeds), reference_resolution=reference_resolution,
                      clip=scorer.clip.source if scorer and scorer.clip else None,
                      dino=scorer.dino.source if scorer and scorer.dino else None),
        runs=results, mean=_mean(results))
    methods = sorted({r["method"] for r in results})
    if len(methods) > 1:
        summary["mean_by_method"] = {m: _mean([r for r in results if r["method"] == m]) for m in methods}
    paths.write_bytes(output / "results.json", json.dumps(summary, indent=2).encode())
    paths.write_bytes(output / "results.md", markdown(summary).encode())
    return summary


def _mean(rows: Sequence[dict[str, Any]]) -> dict[str, float]:
    names = [k for k in METRICS if rows and all(k in r["metrics"] for r in rows)]
    return {k: float(np.mean([r["metrics"][k] for r in rows])) for k in names}


_COLUMNS = (("clip_i", "CLIP-I"), ("dino", "DINO"), ("clip_t", "CLIP-T"), ("clip_t_base", "CLIP-T original"),
            ("delta_clip_t", "ΔCLIP-T"), ("clip_i_base", "CLIP-I original"), ("dino_base", "DINO original"))


def markdown(summary: dict[str, Any]) -> str:
    """results.md: one row per run, then the means."""
    s = summary["settings"]
    n_prompts = len(summary["runs"][0]["prompts"]) if summary["runs"] else 0
    lines = ["# DreamBench evaluation\n",
             f"Runs: {len(summary['runs'])}; {len(s['seeds'])} seeds x {n_prompts} prompts each, {s['steps']} steps, "
             f"guidance {s['guidance']}, {s['height']}x{s['width']}.\n",
             f"CLIP: {s['clip'] or '-'}; DINO: {s['dino'] or '-'}.\n"]
    columns = [(k, title) for k, title in _COLUMNS if k in summary["mean"]]
    if not columns:
        lines.append("No metrics (no --clip / --dino): images and grids only.\n")
    lines.append("| run | subject | method | " + " | ".join(t for _, t in columns) + " |")
    lines.append("|---|---|---|" + "---:|" * len(columns))
    fmt = lambda values: " | ".join(f"{values[k]:.4f}" for k, _ in columns)
    for r in summary["runs"]:
        lines.append(f"| {r['name']} | {r['subject']} | {r['method']} | {fmt(r['metrics'])} |")
    if columns:
        means = summary.get("mean_by_method", {}) | {"all": summary["mean"]}
        for method, values in means.items():
            lines.append(f"| **mean** | | {method} | {fmt(values)} |")
        lines.append("\nCosines. CLIP-T: customized images vs the complete text; CLIP-T original: the original "
                     "model's images vs the base text (same seeds); ΔCLIP-T is their difference (docs/method.md §6; "
                     "the paper appears to print CLIP-T x 100). CLIP-I / DINO: mean over (image, reference photo) "
                     "pairs; the original model's are the class prior's fidelity.")
    return "\n".join(lines) + "\n"


def _run_names(workdirs: Sequence[str]) -> list[str]:
    names, seen = [], {}
    for w in workdirs:
        base = (paths.path(w).name if paths.is_remote(w) else Path(w).expanduser().resolve().name) or "run"
        seen[base] = seen.get(base, 0) + 1
        names.append(base if seen[base] == 1 else f"{base}_{seen[base]}")
    return names


def local_data_dir(data_dir: str | None, output: str) -> Path:
    """The local TFDS data dir: --data_dir (a bucket one copied to this host), else OUTPUT/tfds, or with a bucket
    OUTPUT, PURECC_CACHE/dreambench_tfds (ArrayRecord files are read from local disk)."""
    if data_dir:
        return paths.local_copy(data_dir) if paths.is_remote(data_dir) else Path(data_dir).expanduser()
    if paths.is_remote(output):
        return paths.cache_root() / "dreambench_tfds"
    return Path(output).expanduser() / "tfds"


def main(argv: Sequence[str]) -> None:
    """The CLI (this module's FLAGS, parsed by `cli_lib.parse_flags`)."""
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {list(argv[1:])}")
    for flag in (_WORKDIRS, _OUTPUT):
        if not flag.value:
            raise app.UsageError(f"--{flag.name} is required")
    if _SEEDS.value < 1 or _BATCH.value < 1:
        raise app.UsageError("--seeds and --batch_size must be at least 1")
    if _CLIP.value or _DINO.value:
        from purecc_jax.evaluation import metrics

        metrics.require_torch()  # before hours of sampling, not after
    runs = [read_run(w, n, _BASE.value) for w, n in zip(_WORKDIRS.value, _run_names(_WORKDIRS.value))]
    data_dir = local_data_dir(_DATA_DIR.value, _OUTPUT.value)
    if not tdb.builder(data_dir, _REF_RES.value).is_prepared():
        source = _DREAMBENCH.value or next((r.dreambench_root for r in runs if r.dreambench_root), None)
        if not source:
            raise app.UsageError(f"no DreamBench dataset in {_DATA_DIR.value or data_dir}: pass --dreambench=FOLDER "
                                 "to prepare it")
        tdb.prepare(paths.local_copy(source), data_dir, _REF_RES.value)
    load_options = dict(dtype=_DTYPE.value, param_dtype=_PARAM_DTYPE.value)
    if _MESH.value:
        load_options["mesh"] = cli_lib.mesh_from_flag(_MESH.value)
    scorer = Scorer(_CLIP.value, _DINO.value, _TORCH_DEVICE.value) if (_CLIP.value or _DINO.value) else None
    settings = SampleSettings(_HEIGHT.value, _WIDTH.value, _STEPS.value, _GUIDANCE.value, _MAX_SEQ.value)
    seeds = [_SEED.value + i for i in range(_SEEDS.value)]
    summary = evaluate(runs, _OUTPUT.value, settings, seeds, data_dir=data_dir, scorer=scorer,
                       batch_size=_BATCH.value, reference_resolution=_REF_RES.value, grid_cell=_GRID_CELL.value,
                       load_options=load_options)
    logging.info("wrote %s/results.json: mean %s", _OUTPUT.value, summary["mean"])


def cli(argv: Sequence[str]) -> None:
    """The command line `argv` (program name first), in process."""
    cli_lib.run_cli(FLAGS, main, argv)


if __name__ == "__main__":
    app.run(main, flags_parser=lambda argv: cli_lib.parse_flags(FLAGS, argv))

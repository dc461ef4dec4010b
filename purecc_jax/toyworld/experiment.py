"""The toy comparison: base model, concept references, every method, evaluation, report.

    workdir/base/                 with toy.pretrain_base: a base pretrained here (cached);
                                  otherwise the shipped one (toyworld/shipped.py) is used
    workdir/concept/              the 4 concept references (PNG) with caption files
    workdir/runs/<method>/seed<k> each run's PureCC workdir (stage_a, stage_b, export)
    workdir/samples/              evaluation grids per run
    workdir/report.{md,json,png}

Every method runs once per training seed (toy.seeds); the report tests differences across
seeds. Runs share what they can: every PureCC variant starts from the stage A of the same
seed (the extractor), which is also that seed's L_CC-only (DreamBooth-LoRA) baseline.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import time
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from purecc_jax import defaults, train
from purecc_jax.backbones.flux import embeddings as emb_lib
from purecc_jax.backbones.flux.folder import load_pipeline
from purecc_jax.backbones.flux.generate import generate
from purecc_jax.backbones.flux.sampler import initial_noise
from purecc_jax.backbones.flux.text import TextEmbeddings
from purecc_jax.models import lora as lora_lib
from purecc_jax.pipeline.settings import SampleSettings
from purecc_jax.purecc import loop
from purecc_jax.toyworld import base, evaluate, machine, report, shipped, world

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class Method:
    name: str
    label: str
    overrides: dict[str, Any]
    stage_a_from: str | None = None  # reuse this method's finished stage A


def methods(config) -> list[Method]:
    """The methods to run: L_CC only and adaptive PureCC by default; the ablations with
    `toy.ablations`; `toy.methods` picks any subset of all of them by name."""
    toy = config.toy
    fixed = lambda lam: {"objective.lambda_mode": "fixed", "objective.fixed_lambda": lam}
    sg = {"objective.stop_grad_original": True}
    default = [
        Method("lcc", "L_CC only (DreamBooth-LoRA)", {"method": "dreambooth"}),
        Method("purecc", "PureCC, adaptive λ*", {}, "lcc"),
    ]
    ablations = [Method("purecc_sg", "PureCC, no gradient through v_b", sg, "lcc")]
    ablations += [Method(f"purecc_fixed{lam:g}", f"PureCC, fixed λ = {lam:g}", fixed(lam), "lcc")
                  for lam in toy.fixed_lambdas]
    ablations += [
        Method("lcc_layerwise", "L_CC only, layer-wise embedding", {"method": "dreambooth",
                                                                    "concept_embedding": "layerwise"}),
        Method("purecc_layerwise", "PureCC, layer-wise embedding (the paper's)", {"concept_embedding": "layerwise"},
               "lcc_layerwise"),
    ]
    for eta in toy.etas:
        ablations += [Method(f"purecc_eta{eta:g}", f"PureCC, η = {eta:g}", {"objective.eta": eta}, "lcc"),
                      Method(f"purecc_eta{eta:g}_sg", f"PureCC, η = {eta:g}, no gradient through v_b",
                             {"objective.eta": eta, **sg}, "lcc")]
    out = default + ablations if toy.ablations else default
    if toy.methods:
        every = default + ablations
        unknown = set(toy.methods) - {m.name for m in every}
        if unknown:
            raise ValueError(f"config.toy.methods names unknown methods {sorted(unknown)}; known: "
                             f"{[m.name for m in every]}")
        out = [m for m in every if m.name in toy.methods]
    return out


# The experiment-level keys (which methods and seeds run, how they are evaluated and tested) change
# no single method's run, so a rerun with more methods or seeds resumes the runs it has.
RESUME_IGNORES = ("toy.seeds", "toy.ablations", "toy.etas", "toy.fixed_lambdas", "toy.methods", "toy.alpha",
                  "toy.quick", "toy.base_only", "toy.evaluation", "toy.sampling")

# `--config.toy.quick=True`: the same comparison at a size that fits in a few minutes.
QUICK = {"stage_a.steps": 250, "stage_b.steps": 250, "toy.evaluation.samples": 20, "toy.sampling.steps": 12}


def write_concept(folder: Path, toy, identifier: str, class_word: str) -> Path:
    """The references as an ordinary concept folder: PNGs and one caption file each."""
    folder.mkdir(parents=True, exist_ok=True)
    images = world.concept_references(toy.references, world.CONCEPT_BACKGROUND, toy.seed, toy.image_size)
    caption = world.concept_prompt(world.CONCEPT_BACKGROUND, identifier, class_word)
    for i, img in enumerate(images):
        Image.fromarray(img).save(folder / f"{i:02d}.png")
        (folder / f"{i:02d}.txt").write_text(caption + "\n")
    return folder


class Sampler:
    """Samples a prompt list with fixed seeds, true CFG against the empty prompt, pixel codec."""

    def __init__(self, parts, toy, items: list[evaluate.Prompt], max_len: int):
        self.parts, self.toy, self.items, self.max_len = parts, toy, items, max_len
        s = toy.sampling
        self.settings = SampleSettings(height=toy.image_size, width=toy.image_size, steps=s.steps,
                                       true_cfg_scale=s.cfg_scale, max_sequence_length=max_len)
        codec = parts.codec
        self.noise = initial_noise(range(len(items)), toy.image_size, toy.image_size, codec.latent_channels,
                                   codec.downsample_factor)
        self.codec = codec

    def __call__(self, text: TextEmbeddings, negative: TextEmbeddings, parts=None, lora=None, concept=None):
        chunk = self.toy.evaluation.chunk
        out = []
        for i in range(0, len(self.items), chunk):
            sl = slice(i, i + chunk)
            t = TextEmbeddings(text.t5[sl], text.pooled[sl])
            c = None if concept is None else concept._replace(mask=concept.mask[sl])
            res = generate(parts or self.parts, [p.text for p in self.items[sl]], self.settings, seeds=(0,),
                           init_latents=self.noise[sl], text=t, negative_text=negative, lora=lora, concept=c,
                           codec=self.codec)
            out.append(np.asarray(res.images))
        return np.concatenate(out)


def _grid(images: np.ndarray, items, path: Path, per_set: int = 8) -> None:
    picks = []
    for name in evaluate.PROMPT_SETS:
        picks += [i for i, p in enumerate(items) if p.set == name][:per_set]
    picture = loop.grid(images[picks], [items[i].text.replace(" background", "") for i in picks], columns=per_set)
    Image.fromarray(picture).save(path)


def _base_folder(config, workdir: Path) -> tuple[Path, str]:
    """(pipeline folder, where it came from): the shipped base, or one pretrained in workdir/base."""
    if config.toy.pretrain_base:
        folder = base.pretrain(config.toy, workdir, progress=config.progress)
        return folder, f"pretrained in this workdir (sha256 {shipped.digest(folder)})"
    if config.toy.split_min_shapes != 1:
        raise ValueError(f"toy.split_min_shapes={config.toy.split_min_shapes}: the shipped base was trained on the "
                         "split of 1, so its held-out prompts would include combinations it saw; pretrain a base "
                         "on this split with --config.toy.pretrain_base=True")
    return shipped.base_folder(), f"shipped with the package (sha256 {shipped.SHA256})"


def _train_and_score(config, m: Method, seed: int, workdir: Path, concept_dir: Path, parts, sampler, items,
                     negative, base_images, names: set[str]) -> dict[str, Any]:
    mcfg = defaults.override(config, {**m.overrides, "seed": seed, "concept.path": str(concept_dir)})
    run_dir = workdir / "runs" / m.name / f"seed{seed}"
    if m.stage_a_from in names and not (run_dir / "stage_a").exists():
        run_dir.mkdir(parents=True, exist_ok=True)
        os.symlink(workdir / "runs" / m.stage_a_from / f"seed{seed}" / "stage_a", run_dir / "stage_a")
    trainer = train.Trainer(mcfg, run_dir, parts, resume_ignores=RESUME_IGNORES)
    final = trainer.run()
    text, injection = emb_lib.embed_prompts(parts.text, [p.text for p in items], mcfg.model.max_sequence_length,
                                            mcfg.concept_embedding, trainer.concept.identifier,
                                            final.trainable.get("embeddings"))
    adapter = lora_lib.variables(final.trainable["lora"], final.lora)
    images = sampler(text, negative, lora=adapter, concept=injection)
    _grid(images, items, workdir / "samples" / f"{m.name}_seed{seed}.png")
    stage = "stage_a" if m.overrides.get("method") == "dreambooth" else "stage_b"
    return {"scores": evaluate.score(images, items, base_images), "curves": loop.read_metrics(run_dir / stage)}


def run(config, workdir: str | Path) -> dict[str, Any]:
    """The whole comparison into `workdir`; returns the report's summary (also in report.json)."""
    if config.toy.quick:
        config = defaults.override(config, QUICK)
    workdir = Path(workdir).absolute()
    workdir.mkdir(parents=True, exist_ok=True)
    toy = config.toy
    if not toy.base_only and len(toy.seeds) < 2:
        raise ValueError(f"config.toy.seeds={tuple(toy.seeds)}: the report's tests need >= 2 training seeds "
                         "per method (3 by default)")
    started = machine.describe()
    timings: dict[str, float] = {}
    t0 = time.perf_counter()
    folder, origin = _base_folder(config, workdir)
    timings["base"] = time.perf_counter() - t0
    ident, cls = config.concept.identifier, config.concept.class_word
    concept_dir = write_concept(workdir / "concept", toy, ident, cls)

    parts = load_pipeline(folder, dtype=config.model.dtype, param_dtype=config.model.param_dtype)
    items = evaluate.prompts(toy.evaluation.samples, ident, cls, seed=toy.seed, min_shapes=toy.split_min_shapes)
    max_len = config.model.max_sequence_length
    sampler = Sampler(parts, toy, items, max_len)
    (workdir / "samples").mkdir(exist_ok=True)

    t = time.perf_counter()
    negative = parts.text.encode_prompts([""], max_len)
    base_text = parts.text.encode_prompts([p.text for p in items], max_len)
    base_images = sampler(base_text, negative)
    results = {"base": {"label": "base model (no customization)",
                        "runs": {"base": {"scores": evaluate.score(base_images, items)}}}}
    _grid(base_images, items, workdir / "samples" / "base.png")
    timings["evaluate_base"] = time.perf_counter() - t

    todo = [] if toy.base_only else methods(config)
    names = {m.name for m in todo}
    for m in todo:
        results[m.name] = {"label": m.label, "runs": {}}
        for seed in toy.seeds:
            t = time.perf_counter()
            results[m.name]["runs"][str(seed)] = _train_and_score(
                config, m, seed, workdir, concept_dir, parts, sampler, items, negative, base_images, names)
            timings[f"{m.name}_seed{seed}"] = time.perf_counter() - t
            log.info("%s seed %d: %.0f s", m.name, seed, timings[f"{m.name}_seed{seed}"])

    timings["total"] = time.perf_counter() - t0
    summary = {"config": json.loads(config.to_json_best_effort()), "base_origin": origin, "results": results,
               "timings": timings, "machine": {**started, "load_end": machine.load()},
               "base_training": loop.read_metrics(workdir / "base_training") if toy.pretrain_base else []}
    report.write(workdir, summary)
    return summary

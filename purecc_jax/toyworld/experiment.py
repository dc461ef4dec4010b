"""The toy comparison: base model, concept references, every arm, evaluation, report.

    workdir/base/                 with toy.pretrain_base: a base pretrained here (cached);
                                  otherwise the shipped one (toyworld/shipped.py) is used
    workdir/concept/              the 4 concept references (PNG) with caption files
    workdir/class_images/         "a square" drawn by the base model (prior preservation's class set,
                                  drawn by the first run that needs it, shared by the others)
    workdir/runs/<arm>/seed<k>    each run's PureCC workdir (stage_a, stage_b, export)
    workdir/samples/              evaluation grids per run
    workdir/report.{md,json,png}

The references are captioned as the paper captions DreamBench ("a sks square": the background is
not named, so keeping it out of the concept is the method's job); `toy.captions="named"` names it
("a sks square on a gray background"). Every arm runs once per training seed; the report tests
differences across seeds. Runs share what they can: every two-stage arm starts from the stage A of
the same seed (the extractor), which is also that seed's DreamBooth-LoRA run, so those arms are
paired. `toy.study=True` runs every arm of `STUDY_ARMS` on `toy.study_seeds` with
`toy.study_samples` samples per prompt set, and evaluates each run at checkpoints along its last
stage (`toy.checkpoints`), for the comparison at equal fidelity (docs/toy_world.md fixes the design).
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
class Arm:
    name: str
    label: str
    overrides: dict[str, Any]
    stage_a_from: str | None = None  # reuse this arm's finished stage A (same seed): a paired comparison


def _arms(toy) -> dict[str, Arm]:
    fixed = lambda lam: {"objective.lambda_mode": "fixed", "objective.fixed_lambda": lam}  # noqa: E731
    sg = {"objective.stop_grad_original": True}
    no_ext = {"objective.extractor_uses_stage_a_lora": False}
    arms = [
        Arm("lcc", "DreamBooth-LoRA (L_CC only)", {"method": "dreambooth"}),
        Arm("prior", "DreamBooth-LoRA + prior preservation", {"method": "dreambooth", "prior.weight": 1.0}),
        Arm("eta0", "two stages, η = 0 (stage B: L_CC only)", {"objective.eta": 0.0}, "lcc"),
        Arm("purecc", "PureCC, adaptive λ* (the paper)", {}, "lcc"),
        Arm("purecc_noext", "PureCC, adaptive λ*, extractor without the stage-A LoRA", no_ext, "lcc"),
        # The authors' released code: λ fixed at 1, η = 2, the extractor run with its LoRA switched off.
        Arm("authors", "PureCC as the authors' code runs it (λ = 1, η = 2, no stage-A LoRA)",
            {**fixed(1.0), "objective.eta": 2.0, **no_ext}, "lcc"),
        # Ablations of earlier rounds (`toy.ablations=True`).
        Arm("purecc_sg", "PureCC, no gradient through v_b", sg, "lcc"),
        *(Arm(f"purecc_fixed{lam:g}", f"PureCC, fixed λ = {lam:g}", fixed(lam), "lcc") for lam in toy.fixed_lambdas),
        Arm("lcc_layerwise", "L_CC only, layer-wise embedding", {"method": "dreambooth",
                                                                 "concept_embedding": "layerwise"}),
        Arm("purecc_layerwise", "PureCC, layer-wise embedding (the paper's)", {"concept_embedding": "layerwise"},
            "lcc_layerwise"),
    ]
    for eta in toy.etas:
        arms += [Arm(f"purecc_eta{eta:g}", f"PureCC, η = {eta:g}", {"objective.eta": eta}, "lcc"),
                 Arm(f"purecc_eta{eta:g}_sg", f"PureCC, η = {eta:g}, no gradient through v_b",
                     {"objective.eta": eta, **sg}, "lcc")]
    return {a.name: a for a in arms}


STUDY_ARMS = ("lcc", "prior", "eta0", "purecc", "purecc_noext", "authors")
ENDPOINT_SETS = ("concept_plain", "concept_other", "world")  # the prompt sets the endpoints read
ABLATIONS = ("purecc_sg", "purecc_fixed*", "lcc_layerwise", "purecc_layerwise", "purecc_eta*")


def arms(config) -> list[Arm]:
    """The arms to run: `toy.arms` (the main command's), every study arm with `toy.study`, and the
    earlier rounds' ablations with `toy.ablations`; an arm's stage-A arm runs first."""
    toy = config.toy
    known = _arms(toy)
    names = list(STUDY_ARMS) if toy.study else list(toy.arms)
    if toy.ablations:
        names += [n for n in known if any(n == a or (a.endswith("*") and n.startswith(a[:-1])) for a in ABLATIONS)]
    unknown = sorted(set(names) - set(known))
    if unknown:
        raise ValueError(f"config.toy.arms names unknown arms {unknown}; known: {list(known)}")
    out: list[Arm] = []
    for name in dict.fromkeys(names):
        first = known[name].stage_a_from
        if first and known[first] not in out:
            out.append(known[first])
        if known[name] not in out:
            out.append(known[name])
    return out


# The experiment-level keys (which arms and seeds run, how they are evaluated and tested) change
# no single arm's run, so a rerun with more arms or seeds resumes the runs it has.
RESUME_IGNORES = ("toy.seeds", "toy.arms", "toy.study", "toy.study_seeds", "toy.study_samples", "toy.checkpoints",
                  "toy.ablations", "toy.etas", "toy.fixed_lambdas", "toy.alpha", "toy.quick", "toy.base_only",
                  "toy.evaluation", "toy.sampling", "toy.calibration")

# The keys that change neither an arm's training nor its scores: a run's scores (scores.json in its
# folder) are reused by a rerun whose config differs from theirs in these only.
SCORE_IGNORES = ("toy.seeds", "toy.arms", "toy.study_seeds", "toy.ablations", "toy.etas", "toy.fixed_lambdas",
                 "toy.alpha", "toy.quick", "toy.base_only", "toy.calibration", "model.remat_policy")


def _score_key(config) -> dict[str, Any]:
    flat = train._flat(json.loads(config.to_json_best_effort()))
    return json.loads(json.dumps({k: v for k, v in flat.items() if not train._ignored(k, SCORE_IGNORES)},
                                 default=str))


# `--config.toy.quick=True`: the same comparison at a size that fits in a few minutes.
QUICK = {"stage_a.steps": 250, "stage_b.steps": 250, "toy.evaluation.samples": 20, "toy.sampling.steps": 12}


def write_concept(folder: Path, toy, identifier: str, class_word: str) -> Path:
    """The references as an ordinary concept folder: PNGs and one caption file each.

    `toy.captions`: "plain" captions "a sks square" (the target text "a sks square" too: the base
    never read a text without an article); "named" captions "a sks square on a gray background"."""
    folder.mkdir(parents=True, exist_ok=True)
    images = world.concept_references(toy.references, world.CONCEPT_BACKGROUND, toy.seed, toy.image_size)
    if toy.captions == "plain":
        caption = world.concept_prompt(None, identifier, class_word) + "\n"
        caption += f"target: {world.concept_prompt(None, identifier, class_word)}\n"
    elif toy.captions == "named":
        caption = world.concept_prompt(world.CONCEPT_BACKGROUND, identifier, class_word) + "\n"
    else:
        raise ValueError(f"config.toy.captions={toy.captions!r} is not 'plain' or 'named'")
    for i, img in enumerate(images):
        Image.fromarray(img).save(folder / f"{i:02d}.png")
        (folder / f"{i:02d}.txt").write_text(caption)
    return folder


class Sampler:
    """Samples prompts with fixed noise (row i of the evaluation prompts' noise), true CFG against the
    empty prompt, the pixel codec."""

    def __init__(self, parts, toy, items: list[evaluate.Prompt], max_len: int):
        self.parts, self.toy, self.items, self.max_len = parts, toy, items, max_len
        s = toy.sampling
        self.settings = SampleSettings(height=toy.image_size, width=toy.image_size, steps=s.steps,
                                       true_cfg_scale=s.cfg_scale, max_sequence_length=max_len)
        codec = parts.codec
        self.noise = initial_noise(range(len(items)), toy.image_size, toy.image_size, codec.latent_channels,
                                   codec.downsample_factor)
        self.codec = codec

    def __call__(self, text: TextEmbeddings, negative: TextEmbeddings, parts=None, lora=None, concept=None,
                 rows: np.ndarray | None = None):
        """Images of `text` (one row per prompt); `rows`: which noise rows they start from (default 0..n-1)."""
        rows = np.arange(text.t5.shape[0]) if rows is None else np.asarray(rows)
        chunk = self.toy.evaluation.chunk
        out = []
        for i in range(0, len(rows), chunk):
            sl = slice(i, i + chunk)
            t = TextEmbeddings(text.t5[sl], text.pooled[sl])
            c = None if concept is None else concept._replace(mask=concept.mask[sl])
            res = generate(parts or self.parts, None, self.settings, seeds=(0,), init_latents=self.noise[rows[sl]],
                           text=t, negative_text=negative, lora=lora, concept=c, codec=self.codec)
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


@dataclasses.dataclass
class Evaluation:
    """What every model is scored against: prompts, their noise, the base model's images of them and,
    per concept_other prompt, the base model's image of its base text from the same noise."""

    items: list[evaluate.Prompt]
    sampler: Sampler
    negative: TextEmbeddings
    base_images: np.ndarray
    paired_base: np.ndarray

    def score(self, parts, trainable: dict[str, Any], lcfg, concept_embedding: str, identifier: str,
              grid: Path | None = None, sets: tuple[str, ...] | None = None) -> dict[str, Any]:
        """The scores of one model; `sets`: only these prompt sets (checkpoints along training need only
        the endpoints' sets)."""
        rows = np.asarray([i for i, p in enumerate(self.items) if sets is None or p.set in sets])
        items = [self.items[i] for i in rows]
        text, injection = emb_lib.embed_prompts(parts.text, [p.text for p in items], self.sampler.max_len,
                                                concept_embedding, identifier, trainable.get("embeddings"))
        adapter = lora_lib.variables(trainable["lora"], lcfg)
        images = self.sampler(text, self.negative, lora=adapter, concept=injection, rows=rows)
        if grid is not None:
            _grid(images, items, grid)
        return evaluate.score(images, items, self.base_images[rows], self.paired_base)


def _stage_trainables(run_dir: Path, stage: str, fractions, final: dict[str, Any]) -> dict[int, dict[str, Any]]:
    """The final stage's trainable tree at each checkpoint nearest `fractions` of its steps (the last one is
    the run's final tree), with stage A's embeddings where stage B keeps them frozen."""
    steps = loop.checkpoint_steps(run_dir / stage)
    if not steps:
        return {}
    last = steps[-1]
    picks = sorted({min(steps, key=lambda s: abs(s - f * last)) for f in fractions})
    out = {}
    for step in picks:
        tree = final if step == last else loop.restore_trainable(run_dir / stage, step)[0]
        if "embeddings" not in tree and final.get("embeddings") is not None:
            tree = dict(tree, embeddings=final["embeddings"])
        out[step] = tree
    return out


def load_parts(folder: Path, config) -> Any:
    """The toy base model's pipeline, its transformer run as `config.model` says (dtype, scan_layers,
    remat_policy, attention): the runs train these parts, so a runtime field left out here would be
    ignored by every run."""
    return load_pipeline(folder, **train.model_runtime(config))


def _train_and_score(config, arm: Arm, seed: int, workdir: Path, concept_dir: Path, class_dir: Path, parts,
                     evaluation: Evaluation, names: set[str], study: bool) -> dict[str, Any]:
    overrides = {**arm.overrides, "seed": seed, "concept.path": str(concept_dir), "prior.class_dir": str(class_dir)}
    if study:  # every checkpoint kept, for the equal-fidelity comparison
        overrides.update({"checkpoint_every": config.toy.study_checkpoint_every, "keep_checkpoints": 1000})
    mcfg = defaults.override(config, overrides)
    run_dir = workdir / "runs" / arm.name / f"seed{seed}"
    cache, key = run_dir / "scores.json", _score_key(mcfg)
    if cache.is_file():
        saved = json.loads(cache.read_text())
        if saved.get("key") == key:
            log.info("%s seed %d: scores of the finished run reused (%s)", arm.name, seed, cache)
            return saved["out"]
    if arm.stage_a_from in names and not (run_dir / "stage_a").exists():
        run_dir.mkdir(parents=True, exist_ok=True)
        os.symlink(workdir / "runs" / arm.stage_a_from / f"seed{seed}" / "stage_a", run_dir / "stage_a")
    trainer = train.Trainer(mcfg, run_dir, parts, resume_ignores=RESUME_IGNORES)
    final = trainer.run()
    stage = "stage_a" if mcfg.method == "dreambooth" else "stage_b"
    ident = trainer.concept.identifier
    out = {"scores": evaluation.score(parts, final.trainable, final.lora, mcfg.concept_embedding, ident,
                                      workdir / "samples" / f"{arm.name}_seed{seed}.png"),
           "curves": loop.read_metrics(run_dir / stage)}
    if study:
        out["checkpoints"] = {
            str(step): evaluation.score(parts, tree, final.lora, mcfg.concept_embedding, ident, sets=ENDPOINT_SETS)
            for step, tree in _stage_trainables(run_dir, stage, config.toy.checkpoints[:-1], final.trainable).items()}
        out["checkpoints"][str(mcfg[stage].steps)] = out["scores"]
    text = json.dumps({"key": key, "out": out}, default=float)
    tmp = cache.with_suffix(".tmp")  # written whole, then renamed: a crash leaves no half file
    tmp.write_text(text)
    tmp.replace(cache)
    return json.loads(text)["out"]  # as a rerun reads it back


def run(config, workdir: str | Path) -> dict[str, Any]:
    """The whole comparison into `workdir`; returns the report's summary (also in report.json)."""
    if config.toy.quick:
        config = defaults.override(config, QUICK)
    toy = config.toy
    if toy.study:
        config = defaults.override(config, {"toy.evaluation.samples": toy.study_samples})
        toy = config.toy
    workdir = Path(workdir).absolute()
    workdir.mkdir(parents=True, exist_ok=True)
    seeds = tuple(toy.study_seeds if toy.study else toy.seeds)
    if not toy.base_only and len(seeds) < 2:
        raise ValueError(f"config.toy.seeds={seeds}: the report's tests need >= 2 training seeds per arm (3 by "
                         "default)")
    started = machine.describe()
    timings: dict[str, float] = {}
    t0 = time.perf_counter()
    folder, origin = _base_folder(config, workdir)
    timings["base"] = time.perf_counter() - t0
    ident, cls = config.concept.identifier, config.concept.class_word
    concept_dir = write_concept(workdir / "concept", toy, ident, cls)

    parts = load_parts(folder, config)
    items = evaluate.prompts(toy.evaluation.samples, ident, cls, seed=toy.seed, min_shapes=toy.split_min_shapes)
    max_len = config.model.max_sequence_length
    sampler = Sampler(parts, toy, items, max_len)
    (workdir / "samples").mkdir(exist_ok=True)

    t = time.perf_counter()
    negative = parts.text.encode_prompts([""], max_len)
    base_images = sampler(parts.text.encode_prompts([p.text for p in items], max_len), negative)
    others = np.asarray([i for i, p in enumerate(items) if p.set == "concept_other"])
    paired_text = parts.text.encode_prompts([world.base_prompt(items[i].background, cls) for i in others], max_len)
    evaluation = Evaluation(items, sampler, negative, base_images, sampler(paired_text, negative, rows=others))
    results = {"base": {"label": "base model (no customization)",
                        "runs": {"base": {"scores": evaluate.score(base_images, items)}}}}
    _grid(base_images, items, workdir / "samples" / "base.png")
    timings["evaluate_base"] = time.perf_counter() - t

    todo = [] if toy.base_only else arms(config)
    class_dir = workdir / "class_images"  # drawn by the first prior-preservation run, shared by the others
    names = {a.name for a in todo}
    for arm in todo:
        results[arm.name] = {"label": arm.label, "runs": {}, "paired_with": arm.stage_a_from}

    def summary():
        return {"config": json.loads(config.to_json_best_effort()), "base_origin": origin, "results": results,
                "timings": timings, "machine": {**started, "load_end": machine.load()},
                "base_training": loop.read_metrics(workdir / "base_training") if toy.pretrain_base else []}

    # Seed by seed, every arm of a seed before the next: the study's report is rewritten after each
    # complete seed, so a study stopped early has a report of complete, paired seeds.
    for done, seed in enumerate(seeds, 1):
        for arm in todo:
            t = time.perf_counter()
            results[arm.name]["runs"][str(seed)] = _train_and_score(
                config, arm, seed, workdir, concept_dir, class_dir, parts, evaluation, names, toy.study)
            timings[f"{arm.name}_seed{seed}"] = time.perf_counter() - t
            log.info("%s seed %d: %.0f s", arm.name, seed, timings[f"{arm.name}_seed{seed}"])
        if toy.study and done < len(seeds):
            timings["total"] = time.perf_counter() - t0
            partial = summary()
            # the complete seeds' results, for `report --merge` of studies run by several processes
            (workdir / "study_partial.json").write_text(json.dumps(partial, indent=2, default=float))
            if done >= 2:
                report.write(workdir, partial)
                log.info("report of seeds %s written (%d of %d seeds)", seeds[:done], done, len(seeds))

    timings["total"] = time.perf_counter() - t0
    out = summary()
    report.write(workdir, out)
    return out

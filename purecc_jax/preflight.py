"""Will a run fit? Its programs compiled by XLA:TPU for a Cloud TPU slice, from this host, before booking it.

`check(config, "v5e-8")` builds what `train.run` would build on that slice (the mesh from
`config.mesh`, the parts, the concept cache, both stages' inputs and jitted steps, through the
same functions of `purecc_jax.train`) from ShapeDtypeStructs instead of weights, compiles

    stage A's step, stage B's step     as `Trainer.run_stage` jits them (`purecc.step.jit_train_step`)
    the sampler                        the denoising loop the run's sample grids use, in the last stage

with the TPU compiler (`purecc_jax.topology`; `libtpu` installed, no TPU), and reports per chip what
each needs: the compiler's buffer assignment, plus the run's other arrays that stay on the chip
meanwhile ("resident": the text encoders and the VAE beside a step; the train state and the frozen
inputs beside the sampler). `search` tries other settings for a run that does not fit.

The pretrained model needs no weights: its architecture comes from `config.pretrained`'s config.json
files when that folder can be read, else from a preset (`PRESETS`: flux-dev, sd3.5-medium, ...).
Inputs a run makes outside the mesh (the sampler's sigmas and position ids) are placed replicated,
where jit places them at run time; the programs a run compiles besides these (cache encoding, the
text encoders' prompt embedding, the VAE decode of samples) are not compiled.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import jax
import ml_collections
import numpy as np

from purecc_jax import backbones, defaults, paths, sharding, topology, train
from purecc_jax.backbones.base import Backbone
from purecc_jax.data import cache as cache_lib
from purecc_jax.data import concept as concept_lib
from purecc_jax.topology import CompileFigures, Topology, Verdict

log = logging.getLogger(__name__)

PRESETS = {name: b for b in backbones.BACKBONES.values() for name in b.presets}
DEFAULT_PRESET = {"auto": "flux-dev", "flux": "flux-dev", "sd3": "sd3.5-medium"}  # by config.model.backbone
DEFAULT_IMAGES = 5  # concept images assumed when config.concept.path cannot be read here (DreamBench has 4-6)
# Remat policies from the most activations kept (least recomputation) to the fewest.
REMAT_ORDER = ("none", "dots", "dots_no_batch_attn", "dots_no_batch", "qkv_attn_mlp", "qkv_attn", "attn", "full")
STAGE_NAMES = {"stage_a": "stage A step", "stage_b": "stage B step"}


@dataclasses.dataclass(frozen=True)
class Program:
    key: str  # "stage_a", "stage_b" or "sampler"
    name: str
    figures: CompileFigures
    verdict: Verdict


@dataclasses.dataclass
class Report:
    """What the compiler said about each program of one config on one slice."""

    topology: Topology
    model: str  # the preset or folder the architecture came from
    mesh: dict[str, int]
    notes: list[str]
    programs: list[Program]

    @property
    def fits(self) -> bool:
        return all(p.verdict.fits for p in self.programs)

    def failing(self) -> list[str]:
        return [p.key for p in self.programs if not p.verdict.fits]


def model_source(config: ml_collections.ConfigDict, model: str | None = None) -> tuple[Backbone, str]:
    """(backbone, preset name or pipeline folder) whose architecture the programs are built from: `model`
    when given, else `config.pretrained` when it is a folder this host can read, else the default preset
    of `config.model.backbone`."""
    name = config.model.backbone
    if model:
        if model not in PRESETS:
            raise ValueError(f"--model={model!r} is not one of {sorted(PRESETS)}")
        if name not in (backbones.AUTO, PRESETS[model].name):
            raise ValueError(f"--model={model!r} is a {PRESETS[model].name} model; config.model.backbone={name!r}")
        return PRESETS[model], model
    folder = config.pretrained
    if folder and _readable(folder):
        if paths.is_remote(folder):
            return _remote_backbone(folder, name), folder
        return backbones.select(str(Path(folder).expanduser()), name), str(Path(folder).expanduser())
    if name != backbones.AUTO:
        backbones.get(name)  # refuses an unknown name
    return PRESETS[DEFAULT_PRESET[name]], DEFAULT_PRESET[name]


def _readable(folder: str) -> bool:
    try:
        return (paths.path(folder) / "model_index.json").exists()
    except Exception as e:  # a bucket without credentials here: fall back to a preset  # noqa: BLE001
        log.warning("cannot read %s here (%s): using a preset architecture", folder, e)
        return False


def _remote_backbone(folder: str, name: str) -> Backbone:
    if name != backbones.AUTO:
        return backbones.get(name)
    cls = json.loads((paths.path(folder) / "model_index.json").read_text()).get("_class_name")
    for backbone in backbones.BACKBONES.values():
        if cls in backbone.pipeline_classes:
            return backbone
    raise ValueError(f"{folder}/model_index.json names {cls!r}, which no backbone reads")


def concept_sizes(config: ml_collections.ConfigDict, images: int | None = None) -> tuple[int, int, str]:
    """(training views, distinct texts, how they were found) of the concept cache: counted from the concept
    folder when it can be read here, else for `images` (default 5) images captioned by the template."""
    c = config.concept
    n_crops = 1 if c.crop == "center" else c.crops_per_image
    per_image = n_crops * (2 if c.flip else 1)
    if images is None and c.path and not paths.is_remote(c.path) and not paths.is_remote(c.dreambench_root or ""):
        try:
            concept = concept_lib.find(c.path, identifier=c.identifier, class_word=c.class_word or "thing",
                                       template=c.template, dreambench_root=c.dreambench_root or None)
        except (FileNotFoundError, ValueError):
            concept = None
        if concept is not None:
            view_image = np.repeat(np.arange(len(concept.images)), per_image)
            texts, _ = cache_lib.index_texts(concept, view_image)
            return len(view_image), len(texts), f"{len(concept.images)} images of {c.path}"
    n = images or DEFAULT_IMAGES
    return n * per_image, 4, f"{n} images captioned by the template (--images to change)"


def _shardings(tree: Any) -> Any:
    return jax.tree_util.tree_map(lambda x: x.sharding, tree)


def _per_chip(x: jax.ShapeDtypeStruct) -> int:
    return int(np.prod(x.sharding.shard_shape(x.shape))) * np.dtype(x.dtype).itemsize


def resident_bytes(live: Iterable[Any], arguments: Iterable[Any]) -> int:
    """Per-chip bytes of the arrays in the trees `live` that are not among the trees `arguments`
    (the same ShapeDtypeStruct objects, as the same arrays would be in a run)."""
    taken = {id(x) for tree in arguments for x in jax.tree_util.tree_leaves(tree)}
    seen, total = set(), 0
    for tree in live:
        for x in jax.tree_util.tree_leaves(tree):
            if id(x) not in taken and id(x) not in seen:
                seen.add(id(x))
                total += _per_chip(x)
    return total


def _resolved_runtime(config: ml_collections.ConfigDict, notes: list[str]) -> dict[str, Any]:
    runtime = train.model_runtime(config)
    if runtime["attention"] == "auto":  # what `attention="auto"` picks when the run traces on a TPU
        runtime["attention"] = "splash"
        notes.append("attention auto: splash, as on a TPU")
    return runtime


@dataclasses.dataclass
class Lowering:
    """One program of a run, lowered: what the run would compile, and what else stays on its chips."""

    key: str  # "stage_a", "stage_b" or "sampler"
    name: str
    lowered: Any  # jax.stages.Lowered; None when the stage's train state alone was refused
    resident: int  # per-chip bytes of the run's other arrays on the chips while it runs
    refused: CompileFigures | None = None  # the train state initialiser's refusal, when `lowered` is None
    arguments: int = 0  # per-chip bytes of its arguments as laid out in their shardings (0: not counted)


class Programs:
    """The programs a run of `config` builds on `devices` (a TPU topology's, or this host's), from
    ShapeDtypeStructs, through the functions `train.run` builds them with; iterate to lower them one at
    a time (a stage's train state shardings come from compiling its initialiser, as the trainer's do).

    `model`: a preset name instead of config.pretrained; `images`: concept images to size the cache for;
    `only`: a subset of ("stage_a", "stage_b", "sampler") to lower (default: every one the run has).
    """

    def __init__(self, config: ml_collections.ConfigDict, devices: Sequence[jax.Device], *,
                 model: str | None = None, images: int | None = None, only: Sequence[str] | None = None):
        if not config.concept.path:  # a run needs it; the programs do not
            config = defaults.override(config, {"concept.path": "<concept>"})
        self.config = config
        self.backbone, self.model = model_source(config, model)
        train.check(config, self.backbone)
        self.notes: list[str] = []
        if config.pretrained and self.model in PRESETS and model is None:
            self.notes.append(f"config.pretrained={config.pretrained} is no pipeline folder this host can read: "
                              f"{self.model}'s architecture (--model to choose)")
        runtime = _resolved_runtime(config, self.notes)
        self.mesh = train.make_mesh(config, devices)
        self.rules = sharding.rules_from_config(config.axis_rules)
        self.parts = train.prepare_parts(
            self.backbone.abstract_parts(self.model, mesh=self.mesh, rules=self.rules, **runtime), config)
        # Of several training sizes (resolutions, aspect-ratio buckets), the steps of the largest.
        sizes = train.training_sizes(config)
        height, width = max(sizes, key=lambda x: (x[0] * x[1], x))
        views, texts, where = concept_sizes(config, images)
        if config.prior.weight > 0:  # prior preservation's class images are views too, with one more text
            views, texts = views + config.prior.class_images, texts + 1
            where += f", and {config.prior.class_images} class images"
        several = f" (the largest of {len(sizes)} training sizes)" if len(sizes) > 1 else ""
        self.notes.append(f"concept cache: {views} views of {height}x{width}{several}, {texts} texts ({where})")
        shapes = self.backbone.cache_shapes(self.parts, height, width, views, texts, config.model.max_sequence_length)
        shapes = train.step_cache_arrays(config, self.parts, shapes, (height, width))
        self.cache = train.on_mesh(shapes, sharding.replicated(self.mesh))
        self.only = set(only or ("stage_a", "stage_b", "sampler"))

    def _stage(self, name: str, inputs: train.StageInputs) -> tuple[Any, Any, Lowering | None]:
        """(train state, batch, the step's lowering) of a stage, ShapeDtypeStructs in their shardings."""
        config, mesh = self.config, self.mesh
        program = train.stage_program(config, self.backbone, self.parts, name, inputs.step_cfg, inputs.trainable)
        batch_sh = train.batch_shardings(mesh, self.rules, config[name].batch_size, train.batch_keys(config))
        batch = {k: jax.ShapeDtypeStruct((config[name].batch_size,), np.int32, sharding=s)
                 for k, s in batch_sh.items()}
        with sharding.activate(mesh, self.rules):
            compiled, figures = topology.compile_and_measure(program.init.lower(inputs.trainable))
            if compiled is None:  # the train state alone does not fit
                log.info("%s: the train state initialiser was refused: %s", name, figures.refused)
                figures = dataclasses.replace(figures, refused="its train state alone: compiler refused")
                return None, None, Lowering(name, STAGE_NAMES[name], None, 0, figures)
            state = sharding.with_shardings(jax.eval_shape(program.init.fn, inputs.trainable),
                                            compiled.output_shardings)
            del compiled
            lowering = None
            if name in self.only:
                lowered = program.jit(_shardings(state), _shardings(inputs.frozen), batch_sh, mesh).lower(
                    state, inputs.frozen, batch)
                arguments = (state, inputs.frozen, batch)
                resident = resident_bytes(self.backbone.device_params(self.parts).values(), arguments)
                lowering = Lowering(name, STAGE_NAMES[name], lowered, resident, None,
                                    resident_bytes(arguments, ()))
        return state, batch, lowering

    def __iter__(self) -> Iterator[Lowering]:
        config, backbone, parts, mesh = self.config, self.backbone, self.parts, self.mesh
        running = train.running_stages(config)
        last = None
        if "stage_a" in running:
            embeddings = backbone.embedding_shapes(parts, config.concept_embedding)
            inputs = train.stage_a_inputs(config, backbone, parts, self.cache, mesh, embeddings)
            state, batch, lowering = self._stage("stage_a", inputs)
            if lowering is not None:
                yield lowering
            if state is None:
                return
            a = train.Stage("stage_a", state.trainable, inputs.lora, Path("stage_a"))
            last = ("stage_a", inputs, state, batch)
        else:
            a = train.imported_extractor(config, backbone, parts)
        if "stage_b" in running and {"stage_b", "sampler"} & self.only:
            inputs = train.stage_b_inputs(config, backbone, parts, self.cache, mesh, a)
            state, batch, lowering = self._stage("stage_b", inputs)
            if lowering is not None:
                yield lowering
            if state is None:
                return
            last = ("stage_b", inputs, state, batch)
        if "sampler" in self.only and config.sample.prompts and last is not None:
            name, inputs, state, batch = last
            c = config.concept
            sampling_parts, trained = train.sampling_inputs(config, parts, c.identifier, c.class_word or "thing",
                                                            state.trainable, inputs.frozen, inputs.lora)
            settings = train.sample_settings(config)  # the largest of the prompts' sizes, as many as have it
            images = train.sample_sizes(config).count((settings.height, settings.width))
            lowered = backbone.lower_sampler(sampling_parts, settings, images, trained)
            resident = resident_bytes([*backbone.device_params(parts).values(), state, inputs.frozen, batch],
                                      (sampling_parts.transformer_params, trained.lora, trained.embeddings))
            size = f"{images}x{settings.height}x{settings.width}"
            yield Lowering("sampler", f"sampler ({name[-1].upper()}, {size})", lowered, resident)


def check(config: ml_collections.ConfigDict, topo: Topology | str, *, model: str | None = None,
          hbm: int | None = None, images: int | None = None, programs: Sequence[str] | None = None) -> Report:
    """Compiles the programs a run of `config` builds on the slice `topo` and measures them per chip,
    against the chip's HBM or `hbm` bytes (see `Programs` for the other arguments)."""
    topo = topology.tpu_topology(topo) if isinstance(topo, str) else topo
    built = Programs(config, topo.devices, model=model, images=images, only=programs)
    limit = topo.hbm_bytes if hbm is None else hbm
    out = []
    for p in built:
        if p.lowered is None:
            figures = p.refused
        elif p.arguments + p.resident > limit:  # certain without the compiler, which only adds to it
            figures = CompileFigures(p.arguments, None, None, None, None, p.arguments + p.resident,
                                     refused="its arguments alone: not compiled", resident=p.resident)
        else:
            log.info("compiling %s for %s", p.name, topo.name)
            _, figures = topology.compile_and_measure(p.lowered)
            figures = dataclasses.replace(figures, resident=p.resident, peak=figures.peak + p.resident)
        out.append(Program(p.key, p.name, figures, topology.verdict(figures, topo.device_kind, hbm)))
    return Report(topo, built.model, dict(built.mesh.shape), built.notes, out)


def _remat_candidates(current: str) -> list[str]:
    order = list(REMAT_ORDER)
    return order[order.index(current) + 1:] if current in order else ["full"]


def search(config: ml_collections.ConfigDict, report: Report, *, max_tries: int = 4,
           **check_kwargs: Any) -> list[tuple[dict[str, Any], Report]]:
    """Settings under which the programs that did not fit in `report` fit: a bounded search (at most
    `max_tries` compiles of them), each try's overrides with its report, the fitting ones last.

    In order: remat `full` (fewest activations kept); if it fits, the policy that recomputes least and
    still fits (a bisection over `REMAT_ORDER`, fewer activations assumed never to need more memory);
    if it does not, with remat `full`: every chip on the fsdp axis (the weights split over all of
    them), then half of them on the tensor axis (heads and MLP split, so a batch smaller than the
    slice no longer leaves every chip the whole batch's activations), then an int8 frozen base (LoRA runs).
    """
    failing = report.failing()
    tried: list[tuple[dict[str, Any], Report]] = []

    def attempt(overrides: dict[str, Any]) -> bool:
        if len(tried) >= max_tries:
            return False
        candidate = defaults.override(config, overrides)
        try:
            result = check(candidate, report.topology, programs=failing, **check_kwargs)
        except ValueError as e:  # a setting this run cannot take (e.g. int8 with full fine-tuning)
            log.info("skipping %s: %s", overrides, e)
            return False
        tried.append((overrides, result))
        return result.fits

    steps_fail = any(k in failing for k in STAGE_NAMES)
    remat = config.model.remat_policy
    lighter = _remat_candidates(remat) if steps_fail and remat != "full" else []
    if lighter and attempt({"model.remat_policy": "full"}):
        low, high = 0, len(lighter) - 1  # lighter[high] ("full") fits; find the first that fits
        while low < high and len(tried) < max_tries:
            mid = (low + high) // 2
            if attempt({"model.remat_policy": lighter[mid]}):
                high = mid
            else:
                low = mid + 1
        return tried
    chips = report.topology.chips
    base = {"model.remat_policy": "full"} if steps_fail else {}
    meshes = []
    if report.mesh.get("fsdp") != chips:
        meshes.append({"mesh.data": 1, "mesh.fsdp": chips, "mesh.tensor": 1})
    if chips % 2 == 0 and chips > 1:
        meshes.append({"mesh.data": 1, "mesh.fsdp": chips // 2, "mesh.tensor": 2})
    for mesh in meshes:
        if attempt({**base, **mesh}):
            return tried
    last_mesh = meshes[0] if meshes else {}
    if config.model.base_quantization == "none":
        attempt({**base, **last_mesh, "model.base_quantization": "int8"})
    return tried


def run(config: ml_collections.ConfigDict, topology_name: str, *, model: str | None = None, hbm: int | None = None,
        images: int | None = None, programs: Sequence[str] | None = None, max_tries: int = 4, unit: str = "GiB",
        echo: Any = print) -> bool:
    """`check` on the slice `topology_name`, its table printed through `echo`; when a program does not fit,
    `search` (up to `max_tries` compiles) and what it tried. True when every program fits."""
    unknown = sorted(set(programs or ()) - {"stage_a", "stage_b", "sampler"})
    if unknown:
        raise ValueError(f"programs {unknown} are not among stage_a, stage_b, sampler")
    report = check(config, topology_name, model=model, hbm=hbm, images=images, programs=programs)
    echo(format_report(report, unit))
    if report.fits:
        return True
    failing = ", ".join(p.name for p in report.programs if not p.verdict.fits)
    if not max_tries:
        echo(f"\n{failing}: does not fit (--max_tries=0: no other settings tried)")
        return False
    echo(f"\n{failing}: does not fit. Trying other settings (at most {max_tries} compiles):")
    tried = search(config, report, max_tries=max_tries, model=model, hbm=hbm, images=images)
    for overrides, result in tried:
        verdicts = "; ".join(f"{p.name} {p.verdict}" for p in result.programs)
        echo(f"  {format_overrides(overrides)}: {verdicts}")
    fitting = [overrides for overrides, result in tried if result.fits]
    if fitting:
        echo(f"fits with: {format_overrides(fitting[-1])}")
    else:
        echo("none of the settings tried fits" + (" (none could be tried)" if not tried else "")
             + ": a larger slice, a smaller batch or resolution, LoRA instead of full fine-tuning")
    return False


def format_report(report: Report, unit: str = "GiB") -> str:
    mesh = ", ".join(f"{k} {v}" for k, v in report.mesh.items())
    lines = [str(report.topology), f"model: {report.model}; mesh: {mesh}", *report.notes,
             topology.format_table([(p.name, p.figures, p.verdict) for p in report.programs], unit=unit)]
    return "\n".join(lines)


def format_overrides(overrides: dict[str, Any]) -> str:
    return " ".join(f"--config.{k}={v}" for k, v in overrides.items())


__all__ = ["PRESETS", "REMAT_ORDER", "Lowering", "Program", "Programs", "Report", "check", "run", "concept_sizes", "format_overrides",
           "format_report", "model_source", "resident_bytes", "search"]

"""PureCC training, top to bottom: pretrained model -> concept cache -> stage A -> stage B -> export.

    workdir/config.json        the config this run was started with
    workdir/stage_a/           representation extractor θ1 (LoRA + concept embeddings), L_CC
    workdir/stage_b/           pure learning θ2 (fresh LoRA), L_CC + η L_PureCC, frozen θ1
    workdir/export/            diffusers-format LoRA (+ concept embeddings) of the final stage

Each stage resumes from its latest checkpoint and is skipped when finished. `method=dreambooth`
runs stage A alone (L_CC only) and exports it: the baseline. The pretrained model is any
backbone's (`purecc_jax.backbones`: FLUX.1, SD3 / SD3.5), reached only through its interface
(`backbones.Backbone`); `run(config, workdir)` is the whole job from a config.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import optax

from purecc_jax import backbones, defaults, multihost, paths, sharding
from purecc_jax import trained as trained_lib
from purecc_jax.backbones.base import Backbone, Trained
from purecc_jax.data import cache as cache_lib
from purecc_jax.data import concept as concept_lib
from purecc_jax.data import texts as texts_lib
from purecc_jax.models import lora as lora_lib
from purecc_jax.models import quantize
from purecc_jax.pipeline import flow
from purecc_jax.pipeline.settings import SampleSettings
from purecc_jax.purecc import loop
from purecc_jax.purecc.objective import ObjectiveConfig
from purecc_jax.purecc.step import (Extractor, Frozen, StepConfig, init_state, jit_train_step, make_optimizer,
                                    make_train_step)

log = logging.getLogger(__name__)
METHODS = ("purecc", "dreambooth")


# ----------------------------------------------------------------------------- configuration

def validate(config: ml_collections.ConfigDict) -> None:
    """Fails early, naming the offending config value."""
    if config.method not in METHODS:
        raise ValueError(f"config.method={config.method!r} is not one of {METHODS}")
    if config.concept_embedding not in ("none", "token", "layerwise"):
        raise ValueError(f"config.concept_embedding={config.concept_embedding!r} is not none|token|layerwise")
    if not config.concept.path:
        raise ValueError("config.concept.path is empty: give a folder of 3-5 images or a DreamBench subject name")
    texts_lib.check_identifier(config.concept.identifier, config.concept.class_word)
    if config.extractor_lora:
        if config.method != "purecc":
            raise ValueError(f"config.extractor_lora is stage B's extractor; method={config.method!r} has no stage B")
        if config.concept_embedding != "none":
            raise ValueError("config.extractor_lora replaces stage A, which learns the concept embedding: "
                             f"set concept_embedding=none (not {config.concept_embedding!r})")
        if not Path(config.extractor_lora).expanduser().is_file():
            raise FileNotFoundError(f"config.extractor_lora={config.extractor_lora!r} is not a file")
    quant = config.model.base_quantization
    quantize.check_mode(quant)
    if quant != "none" and (config.stage_a.full_finetune or config.stage_b.full_finetune):
        raise ValueError(f"config.model.base_quantization={quant!r} holds the frozen weights quantized: it needs "
                         "LoRA in both stages (set stage_a/stage_b.full_finetune=False or base_quantization=none)")
    runs = {"stage_a": not config.extractor_lora, "stage_b": config.method == "purecc"}
    for name in ("stage_a", "stage_b"):
        st = config[name]
        if st.steps < int(runs[name]) or st.batch_size < 1:
            raise ValueError(f"config.{name}: steps={st.steps} and batch_size={st.batch_size} must be >= "
                             f"{int(runs[name])} and >= 1")
        if st.schedule not in ("constant", "cosine", "linear"):
            raise ValueError(f"config.{name}.schedule={st.schedule!r} is not constant|cosine|linear")
        if st.grad_accum < 1 or st.steps % st.grad_accum:
            raise ValueError(f"config.{name}.grad_accum={st.grad_accum} must be >= 1 and divide steps={st.steps} "
                             "(the micro-steps of an unfinished last update would be dropped)")
        if not 0 <= st.warmup_steps <= st.steps:
            raise ValueError(f"config.{name}.warmup_steps={st.warmup_steps} must be in [0, steps={st.steps}]")
    try:
        concept_lib.parse_resolution(config.concept.resolution)
    except ValueError as e:
        raise ValueError(f"config.concept.resolution: {e}") from None
    if config.sample.prompts and (config.sample.height % 16 or config.sample.width % 16):
        raise ValueError(f"config.sample.height={config.sample.height} and width={config.sample.width} must be "
                         "multiples of 16")
    for key in ("log_every", "checkpoint_every", "keep_checkpoints"):
        if config[key] < 1:
            raise ValueError(f"config.{key}={config[key]} must be >= 1")
    if config.max_nonfinite_steps < 0:
        raise ValueError(f"config.max_nonfinite_steps={config.max_nonfinite_steps} must be >= 0 (0: never stop)")
    ObjectiveConfig(**_objective_kwargs(config))
    flow.TimestepConfig(**config.timesteps)


def check(config: ml_collections.ConfigDict, backbone: Backbone) -> None:
    """`validate` and what `backbone` cannot run; cheap, so it runs before anything is loaded."""
    validate(config)
    backbone.check_config(config)


def _objective_kwargs(config) -> dict[str, Any]:
    o = config.objective
    return dict(eta=o.eta, lambda_mode=o.lambda_mode, fixed_lambda=o.fixed_lambda,
                lambda_clip=tuple(o.lambda_clip) if o.lambda_clip else None, eps=o.eps,
                stop_grad_original=o.stop_grad_original)


def lora_config(stage_cfg, backbone: Backbone) -> lora_lib.LoRAConfig:
    """A stage's LoRA; `targets` is a preset name of the backbone (e.g. "attention") or a list of regexes."""
    c = stage_cfg.lora
    return lora_lib.LoRAConfig(rank=c.rank, alpha=float(c.alpha), targets=backbone.lora_targets(c.targets),
                               init_scale=None if c.init_scale is None or c.init_scale < 0 else c.init_scale)


def schedule(stage_cfg, lr: float) -> optax.Schedule:
    """The learning rate per optimizer update. `steps` and `warmup_steps` count micro-steps (loop
    steps); with `grad_accum` k the optimizer advances its schedule once per k of them, so update u
    gets the micro-step schedule's value at step u * k."""
    warm, total = stage_cfg.warmup_steps, max(stage_cfg.steps, 1)
    if stage_cfg.schedule == "constant":
        main = optax.constant_schedule(lr)
    elif stage_cfg.schedule == "cosine":
        main = optax.cosine_decay_schedule(lr, max(total - warm, 1))
    else:
        main = optax.linear_schedule(lr, 0.0, max(total - warm, 1))
    per_step = optax.join_schedules([optax.linear_schedule(0.0, lr, warm), main], [warm]) if warm else main
    k = stage_cfg.grad_accum
    return per_step if k == 1 else (lambda update: per_step(update * k))


def save_config(config: ml_collections.ConfigDict, workdir: Path) -> None:
    if not multihost.is_main():
        return
    # in one piece: the other processes read it (check_resume) while process 0 writes it again on a resume
    paths.write_bytes(workdir / "config.json", config.to_json_best_effort(indent=2).encode())


# Config keys (and groups) that change how a run reports or exports, not the parameters it trains.
RESUME_IGNORES = ("progress", "log_every", "checkpoint_every", "keep_checkpoints", "max_nonfinite_steps",
                  "force_resume", "sample", "export")


def _ignored(key: str, ignore: Sequence[str]) -> bool:
    parts = key.rstrip(".").split(".")
    return any(".".join(parts[:i]) in ignore for i in range(1, len(parts) + 1))


def _flat(tree: Any, prefix: str = "") -> dict[str, Any]:
    if not isinstance(tree, dict):
        return {prefix: tree}
    return {k: v for key, sub in tree.items() for k, v in _flat(sub, f"{prefix}{key}.").items()} or {prefix: {}}


def check_resume(config: ml_collections.ConfigDict, workdir: str | Path, ignore: Sequence[str] = ()) -> None:
    """Refuses a workdir that holds a run of a different config (its config.json), unless
    `config.force_resume`: resuming it would mix two runs' checkpoints. Keys in `RESUME_IGNORES` and
    `ignore` (an application's keys that change no single run) may differ."""
    path = paths.path(workdir) / "config.json"
    if not path.is_file() or config.force_resume:
        return
    saved, now = _flat(json.loads(path.read_text())), _flat(json.loads(config.to_json_best_effort()))
    # A key newer than the saved run, at its default, is the behaviour that run had.
    default = _flat(json.loads(defaults.concept_config().to_json_best_effort()))
    keys = sorted(k for k in saved.keys() | now.keys()
                  if not _ignored(k, (*RESUME_IGNORES, *ignore)) and saved.get(k, "<unset>") != now.get(k, "<unset>")
                  and not (k not in saved and k in default and now[k] == default[k]))
    if keys:
        diffs = "\n  ".join(f"{k.rstrip('.')}: {saved.get(k, '<unset>')!r} there, {now.get(k, '<unset>')!r} now"
                            for k in keys)
        raise ValueError(f"workdir {workdir} holds a run of a different config ({path}):\n  {diffs}\n"
                         "Use a new --workdir, or pass --config.force_resume=True to continue that run with this config.")


# ----------------------------------------------------------------------------- the run

@dataclasses.dataclass
class Stage:
    """What a finished stage hands on: its trainable tree and how to read it."""

    name: str
    trainable: dict[str, Any]
    lora: lora_lib.LoRAConfig | None
    directory: Path


class Trainer:
    """Holds the pretrained model, the concept cache and the mesh for both stages.

    `parts` is what a backbone loaded (`Backbone.load`); everything backbone-specific (the cache,
    the denoiser the step runs, learned embeddings, sampling, export) goes through `self.backbone`.
    `resume_ignores`: config keys an application (the toy world) may change between runs of one workdir.
    """

    def __init__(self, config: ml_collections.ConfigDict, workdir: str | Path, parts: Any,
                 concept: concept_lib.Concept | None = None, codec: Any = None,
                 backbone: Backbone | None = None, resume_ignores: Sequence[str] = ()):
        self.backbone = backbone or backbones.for_parts(parts)
        check(config, self.backbone)
        quant = config.model.base_quantization
        if quant != "none":  # QLoRA-style: one quantized copy, shared by the trainable model and the extractor
            parts = dataclasses.replace(parts, transformer_params=quantize.quantize(parts.transformer_params, quant))
        self.config, self.workdir, self.parts = config, paths.path(workdir), parts
        self.resume_ignores = tuple(resume_ignores)
        self.mesh = parts.mesh or sharding.make_mesh(data=1, fsdp=1, tensor=1, devices=jax.devices()[:1])
        self.rules = parts.rules
        self.codec = codec or parts.codec
        c = config.concept
        self.concept = concept or concept_lib.find(
            c.path, identifier=c.identifier, class_word=c.class_word, template=c.template,
            dreambench_root=c.dreambench_root or None)
        self.token_mode = config.concept_embedding == "token"
        if self.token_mode:
            _check_whole_word_identifier(self.concept)
        self.backbone.prepare_identifier(parts, self.concept.identifier, config.concept_embedding)
        self.max_len = config.model.max_sequence_length
        self.guidance = self.backbone.train_guidance(parts, config)
        self.cache = self._build_cache()
        self.cache_device = jax.device_put(self.cache.arrays, sharding.replicated(self.mesh))

    # --- data

    def _build_cache(self) -> cache_lib.ConceptCache:
        c = self.config.concept
        size = concept_lib.parse_resolution(c.resolution)
        images, view_image = concept_lib.views(self.concept, size, crop=c.crop, crops_per_image=c.crops_per_image,
                                               flip=c.flip, seed=self.config.seed)
        # Token rows start from the class word's embeddings and enter the cached encodings.
        extra = self.backbone.initial_embeddings(self.parts, "token", self.concept, None, self.config.seed,
                                                 self.guidance) if self.token_mode else None
        log.info("encoding %d views of %d images and their texts", len(images), len(self.concept.images))
        return self.backbone.build_cache(self.concept, images, view_image, self.parts, self.codec, self.max_len, extra)

    def batch_fn(self, batch_size: int, seed: int):
        def get(step: int):
            b = self.cache.batch(step, batch_size, seed)  # indices, the same in every process
            # each process puts only the rows of its own devices
            return multihost.put(b, jax.tree_util.tree_map(
                lambda x: sharding.batch_sharding(self.mesh, x.shape, self.rules), b))
        return get

    def initial_embeddings(self) -> Any:
        """The concept embeddings' starting values (layer-wise ones read the model on the concept cache)."""
        return self.backbone.initial_embeddings(self.parts, self.config.concept_embedding, self.concept, self.cache,
                                                self.config.seed, self.guidance)

    # --- one stage

    def run_stage(self, name: str, stage_cfg, step_cfg: StepConfig, trainable: dict[str, Any],
                  frozen: Frozen, sample_lora: lora_lib.LoRAConfig | None) -> dict[str, Any]:
        lrs = {k: schedule(stage_cfg, stage_cfg.embedding_learning_rate if k == "embeddings"
                           else stage_cfg.learning_rate) for k in trainable}
        o = self.config.optimizer
        tx = make_optimizer(lrs, b1=o.b1, b2=o.b2, eps=o.eps, weight_decay=o.weight_decay,
                            grad_clip=o.grad_clip or None, grad_accum=stage_cfg.grad_accum)
        main_lr = lrs.get("lora", lrs.get("params"))
        denoiser = self.backbone.denoiser(self.parts, self.config)
        step = make_train_step(denoiser, step_cfg, tx, main_lr, stage_cfg.grad_accum)
        seed = self.config.seed + (0 if name == "stage_a" else 1)
        with sharding.activate(self.mesh, self.rules):
            state = jax.jit(lambda tr: init_state(tr, tx, seed))(trainable)
            state_sh = jax.tree_util.tree_map(lambda x: x.sharding, state)
            frozen_sh = jax.tree_util.tree_map(lambda x: x.sharding, frozen)
            batch0 = self.batch_fn(stage_cfg.batch_size, seed)(0)
            batch_sh = jax.tree_util.tree_map(lambda x: x.sharding, batch0)
            jitted = jit_train_step(step, state_sh, frozen_sh, batch_sh, self.mesh)  # as benchmarks/ time it
            lcfg = loop_config(self.config, stage_cfg.steps)
            sample_fn = self._sample_fn(sample_lora, frozen) if self.config.sample.prompts else None
            state = loop.run_stage(name, self.workdir / name, lcfg, state, state_sh, jitted, frozen,
                                   self.batch_fn(stage_cfg.batch_size, seed), sample_fn)
        return state.trainable

    # --- sampling during training

    def sample_prompts(self) -> list[str]:
        c = self.concept
        return [p.format(identifier=c.identifier, class_word=c.class_word) for p in self.config.sample.prompts]

    def _sample_fn(self, lcfg: lora_lib.LoRAConfig | None, frozen: Frozen):
        s = self.config.sample
        prompts = self.sample_prompts()
        settings = SampleSettings(height=s.height, width=s.width, steps=s.steps, guidance=s.guidance,
                                  max_sequence_length=self.max_len)
        c = self.concept

        def sample(state):
            tr = state.trainable
            parts = self.parts
            if "params" in tr:
                parts = dataclasses.replace(parts, transformer_params=tr["params"])
            adapter = None if "lora" not in tr else lora_lib.variables(tr["lora"], lcfg)
            trained = Trained(c.identifier, c.class_word, self.config.concept_embedding, adapter,
                              tr.get("embeddings", frozen.embeddings))
            images = self.backbone.generate(parts, prompts, settings, seeds=(s.seed,), trained=trained,
                                            codec=self.codec)
            return multihost.to_host(images), prompts
        return sample

    # --- the two stages

    def fresh_trainable(self, stage_cfg, rng: jax.Array, embeddings: dict[str, Any] | None) -> dict[str, Any]:
        params = self.parts.transformer_params
        if stage_cfg.full_finetune:
            # float32 master copy: bf16 weights would round small updates away
            trainable = {"params": jax.tree_util.tree_map(lambda x: x.astype(jnp.float32), params)}
        else:
            lcfg = lora_config(stage_cfg, self.backbone)
            abstract = jax.tree_util.tree_map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), params)
            lsh = lora_lib.shardings(jax.eval_shape(lambda: lora_lib.init(rng, abstract, lcfg)),
                                     jax.tree_util.tree_map(lambda x: x.sharding, params))
            trainable = {"lora": jax.jit(lambda: lora_lib.init(rng, abstract, lcfg), out_shardings=lsh)()}
        if embeddings is not None:
            trainable["embeddings"] = jax.device_put(embeddings, sharding.replicated(self.mesh))
        return trainable

    def stage_a(self) -> Stage:
        cfg = self.config
        st = cfg.stage_a
        trainable = self.fresh_trainable(st, jax.random.key(cfg.seed), self.initial_embeddings())
        text = self.backbone.text_params(self.parts) if self.token_mode else None
        frozen = Frozen(params=self.parts.transformer_params, cache=self.cache_device, text=text)
        lcfg = None if st.full_finetune else lora_config(st, self.backbone)
        step_cfg = StepConfig(stage="cc", timesteps=flow.TimestepConfig(**cfg.timesteps), trainable_lora=lcfg,
                              extractor_lora=None)
        trained = self.run_stage("stage_a", st, step_cfg, trainable, frozen, lcfg)
        return Stage("stage_a", trained, lcfg, self.workdir / "stage_a")

    def imported_extractor(self) -> Stage:
        """Stage A's result taken from an existing LoRA file (`config.extractor_lora`), placed like the model."""
        path = Path(self.config.extractor_lora).expanduser()
        params, cfg = self.parts.transformer_params, self.parts.transformer_config
        tree, lcfg = self.backbone.read_lora(path, cfg, scanned=cfg.scan_layers)
        lora_lib.check_fits(tree, params, path)
        placed = jax.device_put(tree, lora_lib.shardings(tree, jax.tree_util.tree_map(lambda x: x.sharding, params)))
        log.info("stage A skipped: the extractor is the LoRA of %s (rank %d)", path, lcfg.rank)
        return Stage("extractor_lora", {"lora": placed}, lcfg, path)

    def stage_b(self, a: Stage) -> Stage:
        cfg = self.config
        st = cfg.stage_b
        learned = a.trainable.get("embeddings")
        train_emb = cfg.train_embeddings_in_stage_b and learned is not None
        if learned is not None:
            # Frozen token embeddings are baked into the cached encodings of the complete/target texts.
            self.cache = self.backbone.bake_embeddings(self.cache, self.parts, learned, cfg.concept_embedding)
            self.cache_device = jax.device_put(self.cache.arrays, sharding.replicated(self.mesh))
        trainable = self.fresh_trainable(st, jax.random.key(cfg.seed + 1), learned if train_emb else None)
        extractor = Extractor()
        if train_emb:
            # θ1 is frozen, its concept embedding included: the extractor keeps stage A's while stage B's move.
            # A copy: the trainable embeddings may share these buffers, and the step donates them.
            extractor = extractor.replace(embeddings=jax.tree_util.tree_map(jnp.copy, learned))
        extractor_lora = None
        if cfg.objective.extractor_uses_stage_a_lora:
            if "lora" in a.trainable:
                extractor = extractor.replace(lora=a.trainable["lora"])
                extractor_lora = a.lora
            else:
                extractor = extractor.replace(params=a.trainable["params"])
        frozen = Frozen(params=self.parts.transformer_params, cache=self.cache_device,
                        embeddings=learned if learned is not None and not train_emb else None,
                        text=self.backbone.text_params(self.parts) if self.token_mode and train_emb else None,
                        extractor=extractor)
        lcfg = None if st.full_finetune else lora_config(st, self.backbone)
        step_cfg = StepConfig(stage="purecc", objective=ObjectiveConfig(**_objective_kwargs(cfg)),
                              timesteps=flow.TimestepConfig(**cfg.timesteps), trainable_lora=lcfg,
                              extractor_lora=extractor_lora)
        trained = self.run_stage("stage_b", st, step_cfg, trainable, frozen, lcfg)
        if not train_emb and learned is not None:
            trained = dict(trained, embeddings=learned)
        return Stage("stage_b", trained, lcfg, self.workdir / "stage_b")

    def run(self) -> Stage:
        check_resume(self.config, self.workdir, self.resume_ignores)
        save_config(self.config, self.workdir)
        a = self.imported_extractor() if self.config.extractor_lora else self.stage_a()
        final = a if self.config.method == "dreambooth" else self.stage_b(a)
        host = dataclasses.replace(final, trainable=multihost.to_host(final.trainable))  # every process gathers
        if multihost.is_main():
            export(host, self, self.workdir / "export")
        return final


def _check_whole_word_identifier(concept: concept_lib.Concept) -> None:
    """A concept token is matched inside longer words too (as in diffusers): "masks" would carry `sks`."""
    for t in concept.texts:
        for text in (t.complete, t.base, t.target):
            if inside := texts_lib.words_containing(text, concept.identifier):
                raise ValueError(
                    f"concept {concept.name}: the text {text!r} has the identifier {concept.identifier!r} inside "
                    f"{inside}; with concept_embedding=token the tokenizers (and diffusers after loading the "
                    "export) read the learned token there too: rephrase the caption or choose another identifier")


def loop_config(config, steps: int) -> loop.LoopConfig:
    return loop.LoopConfig(steps=steps, log_every=config.log_every, checkpoint_every=config.checkpoint_every,
                           keep_checkpoints=config.keep_checkpoints, sample_every=config.sample.every,
                           progress=config.progress, max_nonfinite_steps=config.max_nonfinite_steps)


# ----------------------------------------------------------------------------- export

def export(stage: Stage, trainer: Trainer, folder: Path) -> Path:
    """The final stage in the default format (diffusers LoRA, or a transformer/ folder for full weights),
    with the concept embeddings and a model card: the same writer as `python -m purecc_jax.export`."""
    c = trainer.config
    step = c[stage.name].steps
    info = trained_lib.ConceptInfo(trainer.concept.identifier, trainer.concept.class_word, c.concept_embedding,
                                   c.method, stage.name, step, str(c.pretrained), json.loads(c.to_json_best_effort()))
    grid = stage.directory / "samples" / f"{step:06d}.png"
    # The writers need local files: a bucket folder is written locally, then copied up.
    with paths.local_folder(folder) as local, paths.local_file(grid) as local_grid:
        trained_lib.write_export(local, info, stage.trainable, stage.lora, trainer.parts.transformer_config,
                                 trainer.backbone, dtype=trained_lib.dtype_named(c.export.dtype),
                                 sample_grid=local_grid)
    return folder


# ----------------------------------------------------------------------------- the job


def run(config: ml_collections.ConfigDict, workdir: str | Path) -> Stage:
    """The whole job of a config: checks, the mesh, the pretrained folder, both stages, the export.

    Everything that can be refused is refused before the pretrained weights are read.
    """
    validate(config)
    running = [config.stage_a] * (not config.extractor_lora) + [config.stage_b] * (config.method == "purecc")
    mesh = sharding.make_mesh(*sharding.mesh_sizes(config.mesh.data, config.mesh.fsdp, config.mesh.tensor,
                                                   jax.device_count(), [st.batch_size for st in running]))
    if not config.pretrained:
        raise ValueError("config.pretrained is empty: point it at a diffusers FLUX.1-dev folder "
                         "(huggingface-cli download black-forest-labs/FLUX.1-dev --local-dir DIR) or an SD3.5 one "
                         "(stabilityai/stable-diffusion-3.5-medium)")
    # A bucket folder is copied once per host (checked, cached) for the readers that need local files.
    pretrained = backbones.local_pipeline(config.pretrained)
    backbone = backbones.select(pretrained, config.model.backbone)
    backbone.check_folder(pretrained, config)
    check(config, backbone)
    check_resume(config, workdir)
    m = config.model
    parts = backbone.load(pretrained, mesh=mesh, rules=sharding.rules_from_config(config.axis_rules), dtype=m.dtype,
                          param_dtype=m.param_dtype, scan_layers=m.scan_layers, remat_policy=m.remat_policy,
                          attention=m.attention)
    return Trainer(config, workdir, parts, backbone=backbone).run()

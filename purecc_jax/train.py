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
import io
import json
import logging
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding

from purecc_jax import backbones, defaults, multihost, paths, sharding
from purecc_jax import trained as trained_lib
from purecc_jax.backbones.base import Backbone, Trained
from purecc_jax.data import cache as cache_lib
from purecc_jax.data import concept as concept_lib
from purecc_jax.data import texts as texts_lib
from purecc_jax.models import lora as lora_lib
from purecc_jax.models import quantize
from purecc_jax.models import runtime as runtime_lib
from purecc_jax.pipeline import flow
from purecc_jax.pipeline import schedule as schedule_lib
from purecc_jax.pipeline.settings import SampleSettings
from purecc_jax.purecc import loop
from purecc_jax.purecc.objective import ObjectiveConfig
from purecc_jax.purecc.step import (TEXT_KINDS, Extractor, Frozen, OptimizerConfig, StepConfig, TrainState,
                                    eval_params, init_state, jit_train_step, make_optimizer, make_train_step)

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
    optimizer = OptimizerConfig.from_config(config.optimizer)
    for name in running_stages(config):
        optimizer.check_schedule(name, config[name].schedule)
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
    c = config.concept
    if isinstance(c.bucket_step, bool) or not isinstance(c.bucket_step, int) or c.bucket_step <= 0 \
            or c.bucket_step % 16:
        raise ValueError(f"config.concept.bucket_step={c.bucket_step!r} must be a positive multiple of 16")
    try:
        training_sizes(config)
    except ValueError as e:
        raise ValueError(f"config.concept.resolution={c.resolution!r}: {e}") from None
    if config.sample.prompts:
        sample_sizes(config)
    for key in ("log_every", "checkpoint_every", "keep_checkpoints"):
        if config[key] < 1:
            raise ValueError(f"config.{key}={config[key]} must be >= 1")
    if config.max_nonfinite_steps < 0:
        raise ValueError(f"config.max_nonfinite_steps={config.max_nonfinite_steps} must be >= 0 (0: never stop)")
    ObjectiveConfig(**_objective_kwargs(config))
    flow.TimestepConfig(**config.timesteps)
    _check_ema(config, optimizer)
    if config.objective.gradient_share_every < 0:
        raise ValueError(f"config.objective.gradient_share_every={config.objective.gradient_share_every} must be "
                         ">= 0 (0: never)")
    p = config.prior
    if p.weight < 0 or (p.weight > 0 and p.class_images < 1):
        raise ValueError(f"config.prior.weight={p.weight} must be >= 0 (0: off) and class_images={p.class_images} "
                         ">= 1 when it is on")
    if p.weight > 0 and "{identifier}" in p.prompt:
        raise ValueError(f"config.prior.prompt={p.prompt!r} names the identifier: the class prompt is the class "
                         "without the concept (e.g. 'a photo of a {class_word}')")
    if p.weight > 0 and len(training_sizes(config)) > 1:
        raise ValueError(f"config.prior.weight={p.weight} with several training sizes (concept.resolution="
                         f"{c.resolution!r}, concept.buckets={c.buckets}): prior preservation trains at one size "
                         "for now; give one resolution without buckets")
    if not 0 <= config.concept.caption_dropout < 1:
        raise ValueError(f"config.concept.caption_dropout={config.concept.caption_dropout} must be in [0, 1) "
                         "(the probability that a row's complete text is the empty prompt; 0: never)")
    if config.log.wandb_project:
        loop.require_wandb(config.log.wandb_project)


def _check_ema(config: ml_collections.ConfigDict, optimizer: OptimizerConfig) -> None:
    decay = config.ema.decay
    if isinstance(decay, bool) or not isinstance(decay, (int, float)) or not 0 <= decay < 1:
        raise ValueError(f"config.ema.decay={decay!r} must be in [0, 1) (0: no EMA; e.g. 0.99 or 0.999)")
    if decay and optimizer.name == "schedule_free_adamw":
        raise ValueError(f"config.ema.decay={decay}: optimizer.name=schedule_free_adamw already averages its "
                         "iterates (samples and exports use the average); set ema.decay=0 or another optimizer")


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


# Config keys (and groups) that change how a run reports or exports, not the parameters it trains;
# the remat policy changes what the backward pass recomputes, not what it computes (a run that ran out
# of memory resumes with `full`).
RESUME_IGNORES = ("progress", "log_every", "checkpoint_every", "keep_checkpoints", "max_nonfinite_steps",
                  "force_resume", "sample", "export", "log", "model.remat_policy")


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


# ----------------------------------------------------------------------------- a stage's program
# What the trainer runs and what `purecc_jax.preflight` compiles without weights come from these
# functions: the parameters, the cache and the embeddings they take may be arrays or
# ShapeDtypeStructs carrying their shardings (then so is what they return).

@dataclasses.dataclass
class Stage:
    """What a finished stage hands on: its trainable tree and how to read it."""

    name: str
    trainable: dict[str, Any]
    lora: lora_lib.LoRAConfig | None
    directory: Path


@dataclasses.dataclass
class StageInputs:
    """A stage's trainable tree, its frozen inputs and how its step reads them."""

    trainable: dict[str, Any]
    frozen: Frozen
    step_cfg: StepConfig
    lora: lora_lib.LoRAConfig | None  # the trainable LoRA's config; None: full fine-tuning


@dataclasses.dataclass
class StageProgram:
    """A stage's step (unjitted), optimizer and state initialiser (jitted); `jit` gives the step as it runs."""

    step: Callable[..., Any]
    tx: optax.GradientTransformation
    init: StateInit
    seed: int

    def jit(self, state_shardings: Any, frozen_shardings: Any, batch_shardings: Any, mesh: Mesh):
        return jit_train_step(self.step, state_shardings, frozen_shardings, batch_shardings, mesh)


def running_stages(config: ml_collections.ConfigDict) -> list[str]:
    """The stages a run of `config` trains: stage A unless an extractor LoRA replaces it, stage B for PureCC."""
    return ["stage_a"] * (not config.extractor_lora) + ["stage_b"] * (config.method == "purecc")


def training_sizes(config: ml_collections.ConfigDict) -> list[tuple[int, int]]:
    """Every (height, width) a run of `config` may train at: each of concept.resolution's resolutions, or
    with concept.buckets every aspect-ratio bucket of their areas (which the images' shapes pick from)."""
    c = config.concept
    resolutions = concept_lib.parse_resolutions(c.resolution)
    if not c.buckets:
        return resolutions
    return sorted({b for r in resolutions for b in concept_lib.bucket_sizes(r, c.bucket_step)})


def step_cache_arrays(config: ml_collections.ConfigDict, parts: Any, arrays: dict[str, Any],
                      size: tuple[int, int]) -> dict[str, Any]:
    """The cache arrays a stage's step reads for views of `size` (height, width): `arrays` (numpy, or
    ShapeDtypeStructs) and, with timesteps.shift="auto", `timestep_shift`: the pipeline's shift at that size
    (`pipeline.schedule.training_shift`; FLUX's and SD3's transformers see (h / 16) (w / 16) image tokens).
    With concept.masked_loss, shapes gain the `loss_weight` that the trainer's caches hold (the latents')."""
    if config.concept.masked_loss and is_abstract(arrays) and "loss_weight" not in arrays:
        arrays = dict(arrays, loss_weight=jax.ShapeDtypeStruct(arrays["latents"].shape, np.float32))
    if config.timesteps.shift != flow.AUTO:
        return arrays
    tokens = (size[0] // 16) * (size[1] // 16)
    shift = np.float32(schedule_lib.training_shift(getattr(parts, "scheduler", None), tokens))
    return dict(arrays, timestep_shift=jax.ShapeDtypeStruct((), np.float32) if is_abstract(arrays) else shift)


def make_mesh(config: ml_collections.ConfigDict, devices: Sequence[jax.Device] | None = None) -> Mesh:
    """The run's mesh over `devices` (default: every device jax sees): config.mesh's sizes as
    `sharding.mesh_sizes` resolves them for the running stages' batches."""
    devices = list(jax.devices() if devices is None else devices)
    sizes = sharding.mesh_sizes(config.mesh.data, config.mesh.fsdp, config.mesh.tensor, len(devices),
                                [config[name].batch_size for name in running_stages(config)])
    return sharding.make_mesh(*sizes, devices=devices)


def model_runtime(config: ml_collections.ConfigDict) -> dict[str, Any]:
    """The runtime fields a backbone loads its models with (`Backbone.load`, `Backbone.abstract_parts`)."""
    return {field: config.model[field] for field in runtime_lib.FIELDS}


def prepare_parts(parts: Any, config: ml_collections.ConfigDict) -> Any:
    """`parts` as a run holds them: with `model.base_quantization`, QLoRA-style, one quantized copy of the
    frozen transformer, shared by the trainable model and the extractor."""
    quant = config.model.base_quantization
    if quant == "none":
        return parts
    return dataclasses.replace(parts, transformer_params=quantize.quantize(parts.transformer_params, quant))


def is_abstract(tree: Any) -> bool:
    return any(isinstance(x, jax.ShapeDtypeStruct) for x in jax.tree_util.tree_leaves(tree))


def on_mesh(tree: Any, placement: Any) -> Any:
    """`tree` in `placement` (a Sharding or a tree of them): device_put for arrays, ShapeDtypeStructs for shapes."""
    if is_abstract(tree):
        return sharding.with_shardings(tree, placement)
    return jax.device_put(tree, placement)


def _copy(tree: Any) -> Any:
    return tree if is_abstract(tree) else jax.tree_util.tree_map(jnp.copy, tree)


def fresh_trainable(config: ml_collections.ConfigDict, stage_cfg, backbone: Backbone, params: Any, mesh: Mesh,
                    rng: jax.Array, embeddings: dict[str, Any] | None) -> dict[str, Any]:
    """A stage's trainable tree at its start: a fresh LoRA of `params` (or their float32 master copy for full
    fine-tuning), with `embeddings` (replicated) when the stage trains them."""
    if stage_cfg.full_finetune:
        # float32 master copy: bf16 weights would round small updates away
        if is_abstract(params):
            trainable = {"params": jax.tree_util.tree_map(
                lambda x: jax.ShapeDtypeStruct(x.shape, jnp.float32, sharding=x.sharding), params)}
        else:
            trainable = {"params": jax.tree_util.tree_map(lambda x: x.astype(jnp.float32), params)}
    else:
        lcfg = lora_config(stage_cfg, backbone)
        abstract = jax.tree_util.tree_map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), params)
        init = lambda: lora_lib.init(rng, abstract, lcfg)  # noqa: E731
        lsh = lora_lib.shardings(jax.eval_shape(init), jax.tree_util.tree_map(lambda x: x.sharding, params))
        if is_abstract(params):
            trainable = {"lora": sharding.with_shardings(jax.eval_shape(init), lsh)}
        else:
            trainable = {"lora": jax.jit(init, out_shardings=lsh)()}
    if embeddings is not None:
        trainable["embeddings"] = on_mesh(embeddings, sharding.replicated(mesh))
    return trainable


def stage_a_inputs(config: ml_collections.ConfigDict, backbone: Backbone, parts: Any, cache: Any, mesh: Mesh,
                   embeddings: dict[str, Any] | None) -> StageInputs:
    """Stage A (the extractor θ1, L_CC): a fresh LoRA (or all weights) and the concept embeddings train;
    the pretrained weights, the cache on the devices and, for token rows, the text encoders are frozen."""
    st = config.stage_a
    trainable = fresh_trainable(config, st, backbone, parts.transformer_params, mesh, jax.random.key(config.seed),
                                embeddings)
    text = backbone.text_params(parts) if config.concept_embedding == "token" else None
    frozen = Frozen(params=parts.transformer_params, cache=cache, text=text)
    lcfg = None if st.full_finetune else lora_config(st, backbone)
    step_cfg = StepConfig(stage="cc", trainable_lora=lcfg, extractor_lora=None, **step_options(config))
    return StageInputs(trainable, frozen, step_cfg, lcfg)


def imported_extractor(config: ml_collections.ConfigDict, backbone: Backbone, parts: Any) -> Stage:
    """Stage A's result taken from an existing LoRA file (`config.extractor_lora`), placed like the model."""
    path = Path(config.extractor_lora).expanduser()
    params, cfg = parts.transformer_params, parts.transformer_config
    tree, lcfg = backbone.read_lora(path, cfg, scanned=cfg.scan_layers)
    lora_lib.check_fits(tree, params, path)
    placed = on_mesh(tree if not is_abstract(params) else jax.eval_shape(lambda: tree),
                     lora_lib.shardings(tree, jax.tree_util.tree_map(lambda x: x.sharding, params)))
    return Stage("extractor_lora", {"lora": placed}, lcfg, path)


def stage_b_inputs(config: ml_collections.ConfigDict, backbone: Backbone, parts: Any, cache: Any, mesh: Mesh,
                   a: Stage) -> StageInputs:
    """Stage B (pure learning θ2, L_CC + η L_PureCC): a fresh LoRA (or all weights) trains against the frozen
    extractor θ1 of stage A `a`; `cache` holds stage A's token rows baked in when they stay frozen."""
    st = config.stage_b
    learned = a.trainable.get("embeddings")
    train_emb = config.train_embeddings_in_stage_b and learned is not None
    trainable = fresh_trainable(config, st, backbone, parts.transformer_params, mesh, jax.random.key(config.seed + 1),
                                learned if train_emb else None)
    extractor = Extractor()
    if train_emb:
        # θ1 is frozen, its concept embedding included: the extractor keeps stage A's while stage B's move.
        # A copy: the trainable embeddings may share these buffers, and the step donates them.
        extractor = extractor.replace(embeddings=_copy(learned))
    extractor_lora = None
    if config.objective.extractor_uses_stage_a_lora:
        if "lora" in a.trainable:
            extractor = extractor.replace(lora=a.trainable["lora"])
            extractor_lora = a.lora
        else:
            extractor = extractor.replace(params=a.trainable["params"])
    token_rows = config.concept_embedding == "token" and train_emb
    frozen = Frozen(params=parts.transformer_params, cache=cache,
                    embeddings=learned if learned is not None and not train_emb else None,
                    text=backbone.text_params(parts) if token_rows else None, extractor=extractor)
    lcfg = None if st.full_finetune else lora_config(st, backbone)
    step_cfg = StepConfig(stage="purecc", objective=ObjectiveConfig(**_objective_kwargs(config)), trainable_lora=lcfg,
                          extractor_lora=extractor_lora, **step_options(config))
    return StageInputs(trainable, frozen, step_cfg, lcfg)


def step_options(config: ml_collections.ConfigDict) -> dict[str, Any]:
    """The StepConfig fields both stages take from the config: timesteps, EMA, caption dropout, prior
    preservation, the logged gradient share (stage B)."""
    return dict(timesteps=flow.TimestepConfig(**config.timesteps), ema_decay=float(config.ema.decay),
                ema_warmup=config.ema.warmup, caption_dropout=config.concept.caption_dropout > 0,
                prior_weight=float(config.prior.weight),
                gradient_share_every=config.objective.gradient_share_every)


def stage_program(config: ml_collections.ConfigDict, backbone: Backbone, parts: Any, name: str,
                  step_cfg: StepConfig, trainable: dict[str, Any]) -> StageProgram:
    """Stage `name`'s optimizer (a learning-rate schedule per trainable group), step and state initialiser."""
    stage_cfg = config[name]
    lrs = {k: schedule(stage_cfg, stage_cfg.embedding_learning_rate if k == "embeddings"
                       else stage_cfg.learning_rate) for k in trainable}
    tx = make_optimizer(lrs, OptimizerConfig.from_config(config.optimizer), grad_accum=stage_cfg.grad_accum)
    main_lr = lrs.get("lora", lrs.get("params"))
    step = make_train_step(backbone.denoiser(parts, config), step_cfg, tx, main_lr, stage_cfg.grad_accum)
    seed = config.seed + (0 if name == "stage_a" else 1)
    ema = step_cfg.ema_decay > 0
    return StageProgram(step, tx, StateInit(lambda tr: init_state(tr, tx, seed, ema=ema)), seed)


class StateInit:
    """A train state initialiser, jitted so that the state is sharded like the trainable tree: every leaf
    of the state whose path ends with a trainable leaf's path and has its shape (the trainable copy,
    optimizer moments, the EMA) gets that leaf's sharding, the rest (counters, rng) is replicated.
    Left to the compiler, the optimizer moments came out replicated: a full fine-tune's float32
    moments whole on every chip. `fn`: the initialiser itself (for `jax.eval_shape`)."""

    def __init__(self, fn: Callable[[Any], TrainState]):
        self.fn = fn

    def jitted(self, trainable: Any):
        leaves = jax.tree_util.tree_leaves_with_path(trainable)
        named = [getattr(x, "sharding", None) for _, x in leaves]
        if not leaves or not all(isinstance(sh, NamedSharding) for sh in named):
            return jax.jit(self.fn)
        by_path = {tuple(path): (x.shape, sh) for (path, x), sh in zip(leaves, named)}
        replicated = sharding.replicated(named[0].mesh)

        def pick(path, leaf):
            for start in range(len(path)):  # the longest trainable path the state leaf's path ends with
                shape, sh = by_path.get(tuple(path[start:]), (None, None))
                if sh is not None and shape == leaf.shape:
                    return sh
            return replicated

        abstract = jax.eval_shape(self.fn, trainable)
        return jax.jit(self.fn, out_shardings=jax.tree_util.tree_map_with_path(pick, abstract))

    def __call__(self, trainable: Any) -> TrainState:
        return self.jitted(trainable)(trainable)

    def lower(self, trainable: Any):
        return self.jitted(trainable).lower(trainable)


def evaluated(state: TrainState, ema: bool = True) -> dict[str, Any]:
    """The weights a stage's state stands for, to sample, export and hand on: its EMA (with `ema`, when it
    keeps one), else schedule-free AdamW's average (`purecc.step.eval_params`), else the trainable tree."""
    if ema and state.ema is not None:
        return state.ema.params
    return eval_params(state.trainable, state.opt_state)


BATCH_KEYS = ("image", *TEXT_KINDS)  # what `ConceptCache.batch` returns: indices into the cache
PRIOR_KEYS = ("class_image", "class_text")  # and with prior preservation's class views


def batch_keys(config: ml_collections.ConfigDict) -> tuple[str, ...]:
    return BATCH_KEYS + (PRIOR_KEYS if config.prior.weight > 0 else ())


def batch_shardings(mesh: Mesh, rules: Any, batch_size: int, keys: Sequence[str] = BATCH_KEYS
                    ) -> dict[str, jax.sharding.Sharding]:
    """Where a stage's batch of indices lies: split over the batch's mesh axes where they divide it."""
    return {k: sharding.batch_sharding(mesh, (batch_size,), rules) for k in keys}


@flax.struct.dataclass
class Batch:
    """A step's batch: indices into the concept cache of training size `bucket` (`Trainer.caches`)."""

    indices: dict[str, jax.Array]
    bucket: int = flax.struct.field(pytree_node=False, default=0)


@dataclasses.dataclass(frozen=True)
class BucketSteps:
    """The jitted step on a `Batch`, with the frozen inputs of its training size (a list, one per size): one
    program per size, which jit compiles on first use."""

    jitted: Any

    def __call__(self, state: TrainState, frozen: Sequence[Frozen], batch: Batch):
        return self.jitted(state, frozen[batch.bucket], batch.indices)

    def lower(self, state: TrainState, frozen: Sequence[Frozen], batch: Batch):
        return self.jitted.lower(state, frozen[batch.bucket], batch.indices)


def sample_sizes(config: ml_collections.ConfigDict) -> list[tuple[int, int]]:
    """(height, width) of each sample prompt: sample.height / sample.width, one value for all prompts or
    one per prompt."""
    s = config.sample
    n = len(s.prompts)
    sides = {}
    for key in ("height", "width"):
        value = s[key]
        values = [value] * n if isinstance(value, int) and not isinstance(value, bool) else list(value)
        if len(values) != n or not all(isinstance(v, int) and not isinstance(v, bool) and v > 0 and v % 16 == 0
                                       for v in values):
            raise ValueError(f"config.sample.{key}={value!r} must be a positive multiple of 16, or one per sample "
                             f"prompt ({n})")
        sides[key] = values
    return list(zip(sides["height"], sides["width"]))


def sample_settings(config: ml_collections.ConfigDict, size: tuple[int, int] | None = None) -> SampleSettings:
    """The samples' settings at `size` (default: the largest of the prompts' sizes)."""
    s = config.sample
    height, width = size or max(sample_sizes(config) or [(s.height, s.width)], key=lambda x: (x[0] * x[1], x))
    return SampleSettings(height=height, width=width, steps=s.steps, guidance=s.guidance,
                          max_sequence_length=config.model.max_sequence_length)


def sampling_inputs(config: ml_collections.ConfigDict, parts: Any, identifier: str, class_word: str,
                    trainable: dict[str, Any], frozen: Frozen, lcfg: lora_lib.LoRAConfig | None) -> tuple[Any, Trained]:
    """(parts, trained concept) that a stage's samples are drawn with from its current `trainable` tree."""
    if "params" in trainable:
        parts = dataclasses.replace(parts, transformer_params=trainable["params"])
    adapter = None
    if "lora" in trainable:
        adapter = (jax.eval_shape(lambda t: lora_lib.variables(t, lcfg), trainable["lora"])
                   if is_abstract(trainable["lora"]) else lora_lib.variables(trainable["lora"], lcfg))
        if is_abstract(trainable["lora"]):  # a new tree of the adapter's shapes, placed like it
            adapter = sharding.with_shardings(adapter, jax.tree_util.tree_map(lambda x: x.sharding, trainable["lora"]))
    return parts, Trained(identifier, class_word, config.concept_embedding, adapter,
                          trainable.get("embeddings", frozen.embeddings))


# ----------------------------------------------------------------------------- the run

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
        parts = prepare_parts(parts, config)
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
        self.caches = self._build_cache()
        self._place_caches()

    # --- data

    @property
    def cache(self) -> cache_lib.ConceptCache:
        """The concept cache of the first training size (the only one with one resolution and no buckets)."""
        return self.caches[0]

    @property
    def cache_device(self) -> dict[str, jax.Array]:
        """`cache`'s arrays as the step reads them, on the devices."""
        return self.cache_devices[0]

    def _build_cache(self) -> list[cache_lib.ConceptCache]:
        """One concept cache per training size (`concept_lib.views_by_size`), in the order of `self.sizes`."""
        c = self.config.concept
        groups = concept_lib.views_by_size(
            self.concept, concept_lib.parse_resolutions(c.resolution), buckets=c.buckets, bucket_step=c.bucket_step,
            crop=c.crop, crops_per_image=c.crops_per_image, flip=c.flip, seed=self.config.seed, masks=c.masked_loss)
        if c.masked_loss and not self.concept.masks and all(np.all(g.weights == 1) for g in groups):
            raise ValueError(f"config.concept.masked_loss=True but no image of {self.concept.name} has an alpha "
                             f"channel or a mask file (<image stem>{concept_lib.MASK_SUFFIX}) beside it")
        # Token rows start from the class word's embeddings and enter the cached encodings.
        extra = self.backbone.initial_embeddings(self.parts, "token", self.concept, None, self.config.seed,
                                                 self.guidance) if self.token_mode else None
        self.sizes = [g.size for g in groups]
        caches = []
        for g in groups:
            concept, images, view_image, n_views = self.concept, g.images, g.view_image, len(g.images)
            if self.config.prior.weight > 0:  # the class images are views too, after the concept's (one size)
                classes = self.class_images(g.size)
                prompt = class_prompt(self.config, concept.class_word)
                concept = dataclasses.replace(concept, texts=(*concept.texts, texts_lib.Texts(prompt, prompt, prompt)))
                images = np.concatenate([images, classes])
                view_image = np.concatenate([view_image, np.full(len(classes), len(concept.texts) - 1, np.int32)])
            log.info("encoding %d views of %dx%d and their texts", len(images), *g.size)
            cache = self.backbone.build_cache(concept, images, view_image, self.parts, self.codec, self.max_len,
                                              extra)
            cache = dataclasses.replace(cache, class_views=np.arange(n_views, len(images), dtype=np.int32))
            if g.weights is not None:
                weights = self._loss_weights(g)
                if len(cache.class_views):  # class images count whole
                    weights = np.concatenate([weights, np.ones((len(cache.class_views), *weights.shape[1:]),
                                                               weights.dtype)])
                cache = dataclasses.replace(cache, arrays=dict(cache.arrays, loss_weight=weights))
            caches.append(cache)
        return caches

    def class_images(self, size: tuple[int, int]) -> np.ndarray:
        """Prior preservation's class images (N, H, W, 3) in [-1, 1]: the N in `prior.class_dir` (default
        WORKDIR/class_images), or, when it does not hold them all, drawn by the pretrained model from seeds
        prior.seed + i and written there (every process draws them, so every process has them)."""
        p = self.config.prior
        folder = paths.path(p.class_dir) if p.class_dir else self.workdir / "class_images"
        files = [folder / f"{i:05d}.png" for i in range(p.class_images)]
        if not multihost.any_process(not all(f.exists() for f in files)):
            return np.stack([concept_lib.load_image(io.BytesIO(f.read_bytes()), size, "center", None) for f in files])
        prompt = class_prompt(self.config, self.concept.class_word)
        settings = SampleSettings(height=size[0], width=size[1], steps=p.steps, guidance=p.guidance,
                                  max_sequence_length=self.max_len,
                                  negative_prompt="" if p.true_cfg_scale > 1 else None, true_cfg_scale=p.true_cfg_scale)
        log.info("prior preservation: drawing %d images of %r into %s", p.class_images, prompt, folder)
        out = []
        for start in range(0, p.class_images, 8):
            seeds = [p.seed + i for i in range(start, min(start + 8, p.class_images))]
            drawn = np.asarray(multihost.to_host(self.backbone.generate(self.parts, [prompt], settings, seeds=seeds,
                                                                        codec=self.codec)))
            for i, image in zip(range(start, start + len(seeds)), drawn):
                png = _png(image)
                if multihost.is_main():
                    paths.write_bytes(files[i], png)
                out.append(concept_lib.load_image(io.BytesIO(png), size, "center", None))  # as a resume reads it
        return np.stack(out)

    def _loss_weights(self, views: concept_lib.SizedViews) -> np.ndarray:
        """A masked loss's per-pixel weights, averaged over each latent pixel, in the latents' layout."""
        f = self.codec.downsample_factor
        m, h, w = views.weights.shape
        pooled = views.weights.reshape(m, h // f, f, w // f, f).mean(axis=(2, 4))
        empty = [str(self.concept.images[views.view_image[i]]) for i in range(m) if not pooled[i].sum() > 0]
        if empty:
            raise ValueError(f"the masks of {sorted(set(empty))} leave nothing to learn at {h}x{w} (all black, or "
                             "no pixel of the crop): paint the subject white in the mask or its alpha channel")
        return self.backbone.loss_weights(pooled, self.codec.latent_channels).astype(np.float32)

    def _place_caches(self) -> None:
        self.cache_devices = [on_mesh(step_cache_arrays(self.config, self.parts, cache.arrays, size),
                                      sharding.replicated(self.mesh)) for cache, size in zip(self.caches, self.sizes)]

    def batch_fn(self, batch_size: int, seed: int):
        shardings = batch_shardings(self.mesh, self.rules, batch_size, batch_keys(self.config))
        dropout = self.config.concept.caption_dropout

        def get(step: int) -> Batch:
            # indices, the same in every process (the size too)
            bucket = cache_lib.draw_bucket(self.caches, step, seed)
            b = self.caches[bucket].batch(step, batch_size, seed, caption_dropout=dropout)
            return Batch(multihost.put(b, shardings), bucket)  # each process puts only its own devices' rows
        return get

    def initial_embeddings(self) -> Any:
        """The concept embeddings' starting values (layer-wise ones read the model on the concept cache)."""
        return self.backbone.initial_embeddings(self.parts, self.config.concept_embedding, self.concept, self.cache,
                                                self.config.seed, self.guidance)

    # --- one stage

    def run_stage(self, name: str, stage_cfg, step_cfg: StepConfig, trainable: dict[str, Any],
                  frozen: Frozen, sample_lora: lora_lib.LoRAConfig | None) -> dict[str, Any]:
        program = stage_program(self.config, self.backbone, self.parts, name, step_cfg, trainable)
        shardings_of = lambda tree: jax.tree_util.tree_map(lambda x: x.sharding, tree)  # noqa: E731
        with sharding.activate(self.mesh, self.rules):
            state = program.init(trainable)
            state_sh = shardings_of(state)
            jitted = BucketSteps(program.jit(state_sh, shardings_of(frozen), batch_shardings(
                self.mesh, self.rules, stage_cfg.batch_size, batch_keys(self.config)), self.mesh))
            frozen = [frozen.replace(cache=cache) for cache in self.cache_devices]  # by training size
            lcfg = loop_config(self.config, stage_cfg.steps, run=self.workdir.name,
                               first_stage=name == running_stages(self.config)[0])
            sample_fn = self._sample_fn(sample_lora, frozen[0]) if self.config.sample.prompts else None
            state = loop.run_stage(name, self.workdir / name, lcfg, state, state_sh, jitted, frozen,
                                   self.batch_fn(stage_cfg.batch_size, program.seed), sample_fn)
        # Stage A hands stage B its EMA when it keeps one; the final stage's export takes it by export.ema.
        final = name == running_stages(self.config)[-1]
        return evaluated(state, ema=not final or self.config.export.ema)

    # --- sampling during training

    def sample_prompts(self) -> list[str]:
        c = self.concept
        return [p.format(identifier=c.identifier, class_word=c.class_word) for p in self.config.sample.prompts]

    def _sample_fn(self, lcfg: lora_lib.LoRAConfig | None, frozen: Frozen):
        s = self.config.sample
        prompts = self.sample_prompts()
        sizes = sample_sizes(self.config)
        c = self.concept

        def sample(state):
            parts, trained = sampling_inputs(self.config, self.parts, c.identifier, c.class_word, evaluated(state),
                                             frozen, lcfg)
            images = [None] * len(prompts)
            for size in dict.fromkeys(sizes):  # one call per size, in the prompts' order
                rows = [i for i, x in enumerate(sizes) if x == size]
                out = self.backbone.generate(parts, [prompts[i] for i in rows], sample_settings(self.config, size),
                                             seeds=(s.seed,), trained=trained, codec=self.codec)
                for i, image in zip(rows, multihost.to_host(out)):
                    images[i] = image
            return (np.stack(images) if len(set(sizes)) == 1 else images), prompts
        return sample

    # --- the two stages

    def stage_a(self) -> Stage:
        inputs = stage_a_inputs(self.config, self.backbone, self.parts, self.cache_device, self.mesh,
                                self.initial_embeddings())
        trained = self.run_stage("stage_a", self.config.stage_a, inputs.step_cfg, inputs.trainable, inputs.frozen,
                                 inputs.lora)
        return Stage("stage_a", trained, inputs.lora, self.workdir / "stage_a")

    def imported_extractor(self) -> Stage:
        """Stage A's result taken from an existing LoRA file (`config.extractor_lora`), placed like the model."""
        stage = imported_extractor(self.config, self.backbone, self.parts)
        log.info("stage A skipped: the extractor is the LoRA of %s (rank %d)", stage.directory, stage.lora.rank)
        return stage

    def stage_b(self, a: Stage) -> Stage:
        cfg = self.config
        learned = a.trainable.get("embeddings")
        if learned is not None:
            # Frozen token embeddings are baked into the cached encodings of the complete/target texts.
            self.caches = [self.backbone.bake_embeddings(cache, self.parts, learned, cfg.concept_embedding)
                           for cache in self.caches]
            self._place_caches()
        inputs = stage_b_inputs(cfg, self.backbone, self.parts, self.cache_device, self.mesh, a)
        trained = self.run_stage("stage_b", cfg.stage_b, inputs.step_cfg, inputs.trainable, inputs.frozen,
                                 inputs.lora)
        train_emb = cfg.train_embeddings_in_stage_b and learned is not None
        if not train_emb and learned is not None:
            trained = dict(trained, embeddings=learned)
        return Stage("stage_b", trained, inputs.lora, self.workdir / "stage_b")

    def run(self) -> Stage:
        check_resume(self.config, self.workdir, self.resume_ignores)
        save_config(self.config, self.workdir)
        a = self.imported_extractor() if self.config.extractor_lora else self.stage_a()
        final = a if self.config.method == "dreambooth" else self.stage_b(a)
        host = dataclasses.replace(final, trainable=multihost.to_host(final.trainable))  # every process gathers
        if multihost.is_main():
            export(host, self, self.workdir / "export")
        return final


def class_prompt(config: ml_collections.ConfigDict, class_word: str) -> str:
    return config.prior.prompt.format(class_word=class_word)


def _png(image: np.ndarray) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(np.round(np.clip(image, 0, 1) * 255).astype(np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def _check_whole_word_identifier(concept: concept_lib.Concept) -> None:
    """A concept token is matched inside longer words too (as in diffusers): "masks" would carry `sks`."""
    for t in concept.texts:
        for text in (t.complete, t.base, t.target):
            if inside := texts_lib.words_containing(text, concept.identifier):
                raise ValueError(
                    f"concept {concept.name}: the text {text!r} has the identifier {concept.identifier!r} inside "
                    f"{inside}; with concept_embedding=token the tokenizers (and diffusers after loading the "
                    "export) read the learned token there too: rephrase the caption or choose another identifier")


def loop_config(config, steps: int, run: str = "", first_stage: bool = True) -> loop.LoopConfig:
    """A stage's loop settings; `run`: the run's name (its workdir's) for W&B; `first_stage`: whether the
    stage is the run's first, which samples the untrained model at step 0 (`sample.at_start`)."""
    log_cfg = config.log
    wandb = None
    if log_cfg.wandb_project:
        wandb = loop.WandbConfig(project=log_cfg.wandb_project, entity=log_cfg.wandb_entity, run=run,
                                 config=json.loads(config.to_json_best_effort()))
    return loop.LoopConfig(steps=steps, log_every=config.log_every, checkpoint_every=config.checkpoint_every,
                           keep_checkpoints=config.keep_checkpoints, sample_every=config.sample.every,
                           progress=config.progress, max_nonfinite_steps=config.max_nonfinite_steps, wandb=wandb,
                           sample_at_start=bool(config.sample.at_start and first_stage))


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
    mesh = make_mesh(config)
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
    parts = backbone.load(pretrained, mesh=mesh, rules=sharding.rules_from_config(config.axis_rules),
                          **model_runtime(config))
    return Trainer(config, workdir, parts, backbone=backbone).run()

"""The one fused train step of both PureCC stages (and of the DreamBooth baseline).

    state  = TrainState(step, trainable, opt_state, rng, nonfinite_skipped, nonfinite_streak, ema)  donated
    frozen = Frozen(params, cache, embeddings, text, extractor)    never donated, stop-gradient
    batch  = {"image": (B,), "complete": (B,), "base": (B,), "target": (B,), "null": (B,)}  indices

Stage "cc" (stage A, DreamBooth): L_CC of the trainable model on the complete text.
Stage "purecc" (stage B): the trainable model runs once on [complete; base] (2B sequences)
and the frozen extractor once on [target; null] (2B sequences); λ*, L_CC and L_PureCC
follow `objective.purecc_loss` (docs/method.md Eq. 8-15).

The batch holds only indices into `frozen.cache`: latents and text encodings are computed
once, live on device, and are gathered inside the step. The noise x1 and the timesteps come
from `fold_in(state.rng, state.step)`, so a resumed run draws the same numbers as an
uninterrupted one.

A step whose loss or gradient is not finite changes neither the parameters nor the optimizer
state (the whole update is selected away inside the step); it is counted in
`nonfinite_skipped` (in total) and `nonfinite_streak` (in a row), which the loop watches.

With `StepConfig.ema_decay` > 0 the state also keeps an exponential moving average of the trainable
tree (`EMA`), updated inside the step after each optimizer update that reached the parameters.

The step knows no model. It is built from a `Denoiser` (a backbone hands one to the trainer:
`Backbone.denoiser`) that turns cached texts into conditioning and predicts velocities from
a set of `Weights`; the objective does not care which model it is.

trainable: {"lora": LoRA tree} or {"params": full transformer params}, plus {"embeddings": ...}
when concept embeddings train in this stage (their structure is the denoiser's).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any, Protocol

import flax.struct
import jax
import jax.numpy as jnp
import optax

from purecc_jax.models import lora as lora_lib
from purecc_jax.pipeline import flow
from purecc_jax.purecc.objective import ObjectiveConfig, flow_loss, purecc_loss

STAGES = ("cc", "purecc")
TEXT_KINDS = ("complete", "base", "target", "null")
NULL_TEXT = 0  # the null text's index in every concept cache (`data.cache.NULL`)


@flax.struct.dataclass
class TrainState:
    step: jax.Array
    trainable: Any
    opt_state: Any
    rng: jax.Array  # raw key data (uint32), so it checkpoints like any array
    nonfinite_skipped: jax.Array  # int32: steps whose update was skipped for a NaN/Inf loss or gradient
    nonfinite_streak: jax.Array  # int32: of those, how many in a row up to this step
    ema: EMA | None = None  # the exponential moving average of `trainable` (StepConfig.ema_decay > 0)


@flax.struct.dataclass
class EMA:
    """An exponential moving average of the trainable tree, updated once per optimizer update."""

    count: jax.Array  # int32: optimizer updates averaged so far
    params: Any  # the average, in the trainable tree's structure and dtypes


@flax.struct.dataclass
class Extractor:
    """The frozen extractor θ1 of stage B: the pretrained model plus what stage A trained."""

    params: Any = None  # its own transformer weights (stage A fine-tuned them all); None: the pretrained ones
    lora: Any = None  # stage A's LoRA tree, or None (no adapter: the pretrained model)
    embeddings: Any = None  # stage A's concept embeddings, when stage B trains its own copy


@flax.struct.dataclass
class Frozen:
    """Everything the step reads but never trains; passed as a constant (stop-gradient), never donated."""

    params: Any  # the pretrained transformer (possibly quantized), shared by the trainable model and θ1
    cache: Any  # the concept cache's on-device arrays (`data.cache`), gathered by the batch's indices
    embeddings: Any = None  # concept embeddings not trained in this stage (token rows already in the cache)
    text: Any = None  # text-encoder parameters, when learned token rows re-encode texts inside the step
    extractor: Extractor | None = None  # stage B's θ1; None in stage A


@flax.struct.dataclass
class Weights:
    """One model the denoiser runs: transformer weights, a LoRA, concept embeddings, text encoders."""

    params: Any
    lora: Any = None  # a `lora` collection (`models.lora.variables`), or None
    embeddings: Any = None  # concept embeddings, or None
    text: Any = None  # text-encoder parameters: set when token rows are to be re-encoded into the texts


class Denoiser(Protocol):
    """What the step needs of a model (`Backbone.denoiser` builds one)."""

    def condition(self, weights: Weights, cache: Any, kind: str, index: jax.Array) -> Any:
        """The conditioning of the cached texts `index` (B,) of `kind` (one of TEXT_KINDS): a pytree
        whose leaves have the batch as their first axis (the step concatenates those of two kinds)."""

    def velocity(self, weights: Weights, cache: Any, xt: jax.Array, t: jax.Array, cond: Any) -> jax.Array:
        """v(x_t | cond) of the model `weights` (float32), for x_t in the cache's latent layout, t (B,)."""


@dataclasses.dataclass(frozen=True)
class StepConfig:
    stage: str = "purecc"
    objective: ObjectiveConfig = ObjectiveConfig()
    timesteps: flow.TimestepConfig = flow.TimestepConfig()
    trainable_lora: lora_lib.LoRAConfig | None = lora_lib.LoRAConfig()  # None: full fine-tuning
    extractor_lora: lora_lib.LoRAConfig | None = lora_lib.LoRAConfig()  # None: extractor without LoRA
    # DreamBooth's prior preservation: L_CC of the batch's class examples (`class_image`, `class_text`),
    # weighted by this and added to the loss; 0 (or a batch without them): none.
    prior_weight: float = 0.0
    # On the steps whose number (counted from 1) is a multiple of this, the metrics also hold
    # η‖∇L_PureCC‖ / ‖∇L_CC‖ (the two terms' gradients computed apart: one more backward pass on those
    # steps; nan on the others, which the loop does not log); 0: never.
    gradient_share_every: int = 0
    ema_decay: float = 0.0  # > 0: keep TrainState.ema, the average of the trainable tree (`ema_update`)
    ema_warmup: bool = True  # the decay ramps up as diffusers' EMAModel's does (`ema_decay_at`)
    # Batches may carry dropped captions (the complete text replaced by the null text, `data.cache`):
    # stage B gives those rows no L_PureCC term (docs/method.md §4).
    caption_dropout: bool = False

    def __post_init__(self):
        if self.stage not in STAGES:
            raise ValueError(f"stage {self.stage!r} is not one of {STAGES}")
        if self.prior_weight < 0 or self.gradient_share_every < 0:
            raise ValueError(f"prior_weight={self.prior_weight} and gradient_share_every={self.gradient_share_every} "
                             "must be >= 0")
        if not 0 <= self.ema_decay < 1:
            raise ValueError(f"ema decay {self.ema_decay} must be in [0, 1) (0: no EMA)")


def _collection(adapter: Any, lora_cfg: lora_lib.LoRAConfig | None) -> Any:
    return None if adapter is None else lora_lib.variables(adapter, lora_cfg)


def _cat(*conds: Any) -> Any:
    return jax.tree_util.tree_map(lambda *x: jnp.concatenate(x, axis=0), *conds)


def make_loss_fn(denoiser: Denoiser, cfg: StepConfig):
    """loss(trainable, frozen, batch, rng) -> (loss, metrics), the step's differentiable core."""

    def loss_fn(trainable: dict[str, Any], frozen: Frozen, batch: dict[str, jax.Array], rng: jax.Array):
        cache = frozen.cache
        x0 = cache["latents"][batch["image"]].astype(jnp.float32)
        # Per-element weights of L_CC (masked loss), in the latents' layout; absent: unweighted.
        weight = cache["loss_weight"][batch["image"]] if "loss_weight" in cache else None
        b = x0.shape[0]
        noise_rng, t_rng = jax.random.split(rng)
        x1 = jax.random.normal(noise_rng, x0.shape, jnp.float32)
        # timesteps.shift="auto": the shift of this resolution comes with the cache (train.step_cache).
        t = flow.sample_timesteps(t_rng, b, cfg.timesteps, cache.get("timestep_shift"))
        xt = flow.noisy(x0, x1, t)

        # Token embeddings that train in this stage re-encode the texts in the step; frozen ones were
        # baked into the cache before the stage started.
        trains_embeddings = "embeddings" in trainable
        model = Weights(
            params=trainable["params"] if "params" in trainable else jax.lax.stop_gradient(frozen.params),
            lora=_collection(trainable.get("lora"), cfg.trainable_lora),
            embeddings=trainable.get("embeddings", frozen.embeddings),
            text=frozen.text if trains_embeddings else None)
        complete = denoiser.condition(model, cache, "complete", batch["complete"])
        # Prior preservation: class examples ride in the same forward pass, after the concept's rows.
        prior = cfg.prior_weight > 0 and "class_image" in batch
        if prior:
            x0p = cache["latents"][batch["class_image"]].astype(jnp.float32)
            noise_p, t_p = jax.random.split(jax.random.fold_in(rng, 1))
            x1p = jax.random.normal(noise_p, x0p.shape, jnp.float32)
            tp = flow.sample_timesteps(t_p, x0p.shape[0], cfg.timesteps, cache.get("timestep_shift"))
            xtp = flow.noisy(x0p, x1p, tp)
            weight_p = cache["loss_weight"][batch["class_image"]] if "loss_weight" in cache else None
            class_cond = denoiser.condition(model, cache, "base", batch["class_text"])  # no identifier in it

        def with_prior(loss, metrics, v_prior):
            l_prior = flow_loss(v_prior, x0p, x1p, weight_p)
            loss = loss + cfg.prior_weight * l_prior
            return loss, dict(metrics, loss=loss, l_prior=l_prior)

        if cfg.stage == "cc":
            if prior:
                v = denoiser.velocity(model, cache, jnp.concatenate([xt, xtp]), jnp.concatenate([t, tp]),
                                      _cat(complete, class_cond))
                loss = flow_loss(v[:b], x0, x1, weight)
                return with_prior(loss, dict(loss=loss, l_cc=loss), v[b:])
            v_c = denoiser.velocity(model, cache, xt, t, complete)
            loss = flow_loss(v_c, x0, x1, weight)
            return loss, dict(loss=loss, l_cc=loss)

        base = denoiser.condition(model, cache, "base", batch["base"])
        xt2, t2 = jnp.concatenate([xt, xt]), jnp.concatenate([t, t])
        if prior:
            v = denoiser.velocity(model, cache, jnp.concatenate([xt2, xtp]), jnp.concatenate([t2, tp]),
                                  _cat(complete, base, class_cond))
            v, v_prior = v[:2 * b], v[2 * b:]
        else:
            v = denoiser.velocity(model, cache, xt2, t2, _cat(complete, base))
        v_complete, v_base = v[:b], v[b:]

        # The frozen extractor θ1: pretrained weights (+ stage-A LoRA and embeddings) as constants.
        sg = jax.lax.stop_gradient(frozen)
        ext = sg.extractor or Extractor()
        if ext.embeddings is not None:  # stage A's own, held apart from the copy stage B trains
            ext_embeddings, ext_text = ext.embeddings, None
        else:
            ext_embeddings = jax.lax.stop_gradient(trainable["embeddings"]) if trains_embeddings else sg.embeddings
            ext_text = sg.text if trains_embeddings else None
        extractor = Weights(params=sg.params if ext.params is None else ext.params,
                            lora=_collection(ext.lora, cfg.extractor_lora), embeddings=ext_embeddings, text=ext_text)
        target = denoiser.condition(extractor, cache, "target", batch["target"])
        null = denoiser.condition(extractor, cache, "null", batch["null"])
        r = denoiser.velocity(extractor, cache, xt2, t2, _cat(target, null))
        r = r.astype(jnp.float32)  # R_tar is a difference of close velocities: subtract in float32
        r_tar = jax.lax.stop_gradient(r[:b] - r[b:])
        # A row whose caption was dropped (complete text -> the null text, index NULL) has no R_learn.
        kept = (batch["complete"] != NULL_TEXT) if cfg.caption_dropout else None
        loss, metrics = purecc_loss(v_complete, v_base, r_tar, x0, x1, cfg.objective, weight=weight, kept=kept)
        return with_prior(loss, metrics, v_prior) if prior else (loss, metrics)

    return loss_fn


OPTIMIZERS = ("adamw", "adafactor", "prodigy", "schedule_free_adamw")


@dataclasses.dataclass(frozen=True)
class AdafactorOptions:
    """optax.adafactor's options (config.optimizer.adafactor); 0 turns momentum and clipping off."""

    decay_rate: float = 0.8
    clipping_threshold: float = 1.0
    min_dim_size_to_factor: int = 128
    multiply_by_parameter_scale: bool = False
    momentum: float = 0.0
    weight_decay_rate: float = 0.0
    eps: float = 1e-30


@dataclasses.dataclass(frozen=True)
class ProdigyOptions:
    """optax.contrib.prodigy's options (config.optimizer.prodigy); beta3 < 0: sqrt(b2)."""

    beta3: float = -1.0
    estim_lr0: float = 1e-6
    estim_lr_coef: float = 1.0
    safeguard_warmup: bool = False


@dataclasses.dataclass(frozen=True)
class ScheduleFreeOptions:
    """optax.contrib.schedule_free_adamw's option besides AdamW's (config.optimizer.schedule_free)."""

    weight_lr_power: float = 2.0


@dataclasses.dataclass(frozen=True)
class OptimizerConfig:
    """config.optimizer: the optimizer by name and its options (defaults.py documents each field).

    b1, b2, eps and weight_decay are AdamW's and also Prodigy's (betas, eps, decoupled weight decay)
    and schedule-free AdamW's (b1 is its interpolation between the averaged and the gradient
    sequences); Adafactor has its own. grad_clip: global-norm clipping before any of them (None or 0: none).
    Invalid values are refused, naming the key.
    """

    name: str = "adamw"
    b1: float = 0.9
    b2: float = 0.999
    eps: float = 1e-8
    weight_decay: float = 1e-4
    grad_clip: float | None = 1.0
    adafactor: AdafactorOptions = AdafactorOptions()
    prodigy: ProdigyOptions = ProdigyOptions()
    schedule_free: ScheduleFreeOptions = ScheduleFreeOptions()

    def __post_init__(self):
        def refuse(key: str, value: Any, why: str):
            raise ValueError(f"config.optimizer.{key}={value!r} {why}")

        if self.name not in OPTIMIZERS:
            refuse("name", self.name, f"is not one of {', '.join(OPTIMIZERS)}")
        if self.name == "schedule_free_adamw" and self.b1 == 0:
            refuse("b1", self.b1, "must be > 0 for schedule_free_adamw (its evaluation parameters divide by b1)")
        a, p = self.adafactor, self.prodigy
        checks = (("b1", self.b1, 0 <= self.b1 < 1, "must be in [0, 1)"),
                  ("b2", self.b2, 0 <= self.b2 < 1, "must be in [0, 1)"),
                  ("eps", self.eps, self.eps > 0, "must be > 0"),
                  ("weight_decay", self.weight_decay, self.weight_decay >= 0, "must be >= 0"),
                  ("grad_clip", self.grad_clip, self.grad_clip is None or self.grad_clip >= 0,
                   "must be >= 0 (0: no clipping)"),
                  ("adafactor.decay_rate", a.decay_rate, 0 < a.decay_rate <= 1, "must be in (0, 1]"),
                  ("adafactor.clipping_threshold", a.clipping_threshold, a.clipping_threshold >= 0,
                   "must be >= 0 (0: no clipping)"),
                  ("adafactor.min_dim_size_to_factor", a.min_dim_size_to_factor, a.min_dim_size_to_factor >= 1,
                   "must be >= 1"),
                  ("adafactor.momentum", a.momentum, 0 <= a.momentum < 1, "must be in [0, 1) (0: none)"),
                  ("adafactor.weight_decay_rate", a.weight_decay_rate, a.weight_decay_rate >= 0, "must be >= 0"),
                  ("adafactor.eps", a.eps, a.eps > 0, "must be > 0"),
                  ("prodigy.beta3", p.beta3, p.beta3 < 1, "must be < 1 (< 0: sqrt(b2))"),
                  ("prodigy.estim_lr0", p.estim_lr0, p.estim_lr0 > 0, "must be > 0"),
                  ("prodigy.estim_lr_coef", p.estim_lr_coef, p.estim_lr_coef > 0, "must be > 0"),
                  ("schedule_free.weight_lr_power", self.schedule_free.weight_lr_power,
                   self.schedule_free.weight_lr_power >= 0, "must be >= 0"))
        for key, value, ok, why in checks:
            if not ok:
                refuse(key, value, why)

    @classmethod
    def from_config(cls, optimizer: Any) -> OptimizerConfig:
        """From config.optimizer (a ConfigDict or dict, defaults.py's layout); keys it lacks keep their defaults."""
        def build(kind: type, values: Any, where: str) -> Any:
            values = dict(values.to_dict() if hasattr(values, "to_dict") else values)
            known = {f.name for f in dataclasses.fields(kind)}
            if set(values) - known:
                raise ValueError(f"{where} has unknown keys {sorted(set(values) - known)}; known: {sorted(known)}")
            return kind(**values)

        c = dict(optimizer.to_dict() if hasattr(optimizer, "to_dict") else optimizer)
        for key, kind in dict(adafactor=AdafactorOptions, prodigy=ProdigyOptions,
                              schedule_free=ScheduleFreeOptions).items():
            if key in c:
                c[key] = build(kind, c[key], f"config.optimizer.{key}")
        if "grad_clip" in c and not c["grad_clip"]:
            c["grad_clip"] = None
        return build(cls, c, "config.optimizer")

    def check_schedule(self, stage: str, schedule: str) -> None:
        """Refuses a decaying learning-rate schedule with schedule-free AdamW, which replaces the decay."""
        if self.name == "schedule_free_adamw" and schedule != "constant":
            raise ValueError(f"config.{stage}.schedule={schedule!r}: optimizer.name=schedule_free_adamw replaces "
                             "the learning-rate decay; use schedule=constant (warmup_steps still applies)")


def _group_optimizer(lr: optax.Schedule | float, o: OptimizerConfig) -> optax.GradientTransformation:
    if o.name == "adamw":
        return optax.adamw(lr, b1=o.b1, b2=o.b2, eps=o.eps, weight_decay=o.weight_decay, mu_dtype=jnp.float32)
    if o.name == "adafactor":
        a = o.adafactor
        return optax.adafactor(lr, min_dim_size_to_factor=a.min_dim_size_to_factor, decay_rate=a.decay_rate,
                               multiply_by_parameter_scale=a.multiply_by_parameter_scale,
                               clipping_threshold=a.clipping_threshold or None, momentum=a.momentum or None,
                               weight_decay_rate=a.weight_decay_rate or None, eps=a.eps)
    if o.name == "prodigy":
        p = o.prodigy
        return optax.contrib.prodigy(lr, betas=(o.b1, o.b2), beta3=None if p.beta3 < 0 else p.beta3, eps=o.eps,
                                     estim_lr0=p.estim_lr0, estim_lr_coef=p.estim_lr_coef,
                                     weight_decay=o.weight_decay, safeguard_warmup=p.safeguard_warmup)
    return optax.contrib.schedule_free_adamw(lr, b1=o.b1, b2=o.b2, eps=o.eps, weight_decay=o.weight_decay,
                                             weight_lr_power=o.schedule_free.weight_lr_power,
                                             state_dtype=jnp.float32)


def make_optimizer(
    learning_rates: dict[str, optax.Schedule | float],
    optimizer: OptimizerConfig = OptimizerConfig(),
    *,
    grad_accum: int = 1,
    **fields: Any,
) -> optax.GradientTransformation:
    """`optimizer` (AdamW by default) per trainable group ("lora", "params", "embeddings") at its learning
    rate, after global-norm clipping; `fields` override `optimizer`'s (b1=..., grad_clip=None, ...).

    Adam moments are float32 (AdamW's first moment, schedule-free's z); with schedule-free AdamW the
    trained parameters are its gradient point y, and sampling and export take `eval_params`.
    """
    o = dataclasses.replace(optimizer, **fields) if fields else optimizer
    groups = {name: _group_optimizer(lr, o) for name, lr in learning_rates.items()}
    tx = optax.multi_transform(groups, lambda tree: {k: jax.tree_util.tree_map(lambda _: k, v) for k, v in tree.items()})
    if o.grad_clip:
        tx = optax.chain(optax.clip_by_global_norm(o.grad_clip), tx)
    if grad_accum > 1:
        tx = optax.MultiSteps(tx, every_k_schedule=grad_accum)
    return tx


def eval_params(trainable: dict[str, Any], opt_state: Any) -> dict[str, Any]:
    """The parameters to sample and export from (`TrainState.trainable`, `.opt_state`).

    Schedule-free AdamW takes its gradients at y (the trained parameters) and evaluates at the average
    x = (y - (1 - b1) z) / b1 (`optax.contrib.schedule_free_eval_params`), per trainable group. With
    every other optimizer this is `trainable` itself.
    """
    is_sf = lambda x: isinstance(x, optax.contrib.ScheduleFreeState)  # noqa: E731
    is_groups = lambda x: isinstance(x, optax.MultiTransformState)  # noqa: E731
    out = dict(trainable)
    for node in jax.tree_util.tree_leaves(opt_state, is_leaf=is_groups):
        if not is_groups(node):
            continue
        for group, inner in node.inner_states.items():
            states = [s for s in jax.tree_util.tree_leaves(inner, is_leaf=is_sf) if is_sf(s)]
            if states and group in out:  # z holds the whole tree, the other groups masked out
                state = states[0]._replace(z=states[0].z[group])
                out[group] = optax.contrib.schedule_free_eval_params(state, trainable[group])
    return out


def init_state(trainable: Any, tx: optax.GradientTransformation, seed: int, ema: bool = False) -> TrainState:
    """A stage's first TrainState; `ema`: with the average started at `trainable`."""
    # Copied: Prodigy's state keeps the initial parameters (params0), and a state holding one buffer
    # twice cannot be donated to the step (outside jit they would be the same buffer). So is the EMA.
    return TrainState(
        step=jnp.zeros((), jnp.int32),
        trainable=trainable,
        opt_state=jax.tree_util.tree_map(jnp.copy, tx.init(trainable)),
        rng=jax.random.key_data(jax.random.key(seed)),
        nonfinite_skipped=jnp.zeros((), jnp.int32),
        nonfinite_streak=jnp.zeros((), jnp.int32),
        ema=EMA(jnp.zeros((), jnp.int32), jax.tree_util.tree_map(jnp.copy, trainable)) if ema else None,
    )


def ema_decay_at(update: jax.Array, decay: float, warmup: bool) -> jax.Array:
    """The decay of the `update`-th (1-based) optimizer update's EMA step. With `warmup`, as diffusers'
    EMAModel by default: 0 at the first update (the average starts at the trained weights), then
    min(decay, (1 + s) / (10 + s)) with s = update - 1; without, `decay` from the start."""
    if not warmup:
        return jnp.asarray(decay, jnp.float32)
    s = (update - 1).astype(jnp.float32)
    return jnp.where(s <= 0, 0.0, jnp.minimum(decay, (1 + s) / (10 + s)))


def ema_update(ema: EMA, trainable: Any, decay: float, warmup: bool, applied: jax.Array) -> EMA:
    """The average after one micro-step: where `applied` (an optimizer update happened and was kept),
    average = d * average + (1 - d) * trainable with d = `ema_decay_at`; otherwise unchanged."""
    count = ema.count + applied.astype(jnp.int32)
    d = ema_decay_at(count, decay, warmup)
    averaged = jax.tree_util.tree_map(lambda a, p: (d * a + (1 - d) * p).astype(a.dtype), ema.params, trainable)
    return EMA(count, _select(applied, averaged, ema.params))


def _update_applied(opt_state: Any) -> jax.Array:
    """Whether the optimizer's update just reached the parameters (`optax.MultiSteps` emits one per k)."""
    if isinstance(opt_state, optax.MultiStepsState):
        return opt_state.mini_step == 0
    return jnp.asarray(True)


def all_finite(tree: Any) -> jax.Array:
    """True when every element of every floating leaf of `tree` is finite."""
    leaves = [jnp.all(jnp.isfinite(x)) for x in jax.tree_util.tree_leaves(tree)
              if jnp.issubdtype(jnp.asarray(x).dtype, jnp.inexact)]
    return jnp.all(jnp.stack(leaves)) if leaves else jnp.asarray(True)


def make_train_step(
    denoiser: Denoiser,
    cfg: StepConfig,
    tx: optax.GradientTransformation,
    lr_schedule: optax.Schedule | None = None,
    grad_accum: int = 1,
) -> Callable[[TrainState, Any, Any], tuple[TrainState, dict[str, jax.Array]]]:
    """step(state, frozen, batch) -> (new state, metrics); jit it with `jit_train_step`.

    `lr_schedule` (for the logged learning rate) counts optimizer updates, as the optimizer's
    own schedules do: with `grad_accum` micro-steps per update, step s is in update s // grad_accum.
    """
    loss_fn = make_loss_fn(denoiser, cfg)

    def step(state: TrainState, frozen: Frozen, batch: Any):
        rng = jax.random.fold_in(jax.random.wrap_key_data(state.rng), state.step)
        trainable_before = state.trainable
        (loss, metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.trainable, frozen, batch, rng)
        updates, opt_state = tx.update(grads, state.opt_state, state.trainable)
        trainable = optax.apply_updates(state.trainable, updates)
        # NaN/Inf anywhere skips the whole update, moments and accumulators included, so a bad
        # batch can never reach the parameters or a checkpoint.
        finite = jnp.isfinite(loss) & all_finite(grads)
        skipped = jnp.logical_not(finite).astype(jnp.int32)
        if state.ema is not None:
            ema = ema_update(state.ema, trainable, cfg.ema_decay, cfg.ema_warmup, finite & _update_applied(opt_state))
            state = state.replace(ema=ema)
        state = state.replace(
            step=state.step + 1, trainable=_select(finite, trainable, state.trainable),
            opt_state=_select(finite, opt_state, state.opt_state),
            nonfinite_skipped=state.nonfinite_skipped + skipped, nonfinite_streak=(state.nonfinite_streak + 1) * skipped)
        metrics = dict(metrics, grad_norm=optax.tree.norm(grads), nonfinite_skipped=state.nonfinite_skipped,
                       nonfinite_streak=state.nonfinite_streak)
        if lr_schedule is not None:
            metrics["learning_rate"] = jnp.asarray(lr_schedule((state.step - 1) // grad_accum), jnp.float32)
        if cfg.stage == "purecc" and cfg.gradient_share_every:
            metrics["grad_share"] = jax.lax.cond(
                state.step % cfg.gradient_share_every == 0,  # the steps the loop logs when it equals log_every
                lambda: gradient_share(loss_fn, trainable_before, frozen, batch, rng, cfg.objective.eta),
                lambda: jnp.asarray(jnp.nan, jnp.float32))
        return state, metrics

    return step


def gradient_share(loss_fn, trainable: Any, frozen: Frozen, batch: Any, rng: jax.Array, eta: float) -> jax.Array:
    """η‖∇L_PureCC‖ / ‖∇L_CC‖ at `trainable` for the step's batch and draws: how strongly the PureCC term
    pulls against L_CC (one forward pass, two backward passes)."""
    def terms(tr):
        _, m = loss_fn(tr, frozen, batch, rng)
        return jnp.stack([m["l_cc"], m["l_pure"]])

    _, pullback = jax.vjp(terms, trainable)
    (g_cc,), (g_pure,) = pullback(jnp.array([1.0, 0.0])), pullback(jnp.array([0.0, 1.0]))
    return (eta * optax.tree.norm(g_pure) / jnp.maximum(optax.tree.norm(g_cc), 1e-30)).astype(jnp.float32)


def _select(condition: jax.Array, new: Any, old: Any) -> Any:
    """`new` where `condition` holds, else `old`, leaf by leaf."""
    return jax.tree_util.tree_map(lambda n, o: jnp.where(condition, n, o), new, old)


def jit_train_step(step, state_shardings: Any, frozen_shardings: Any, batch_shardings: Any, mesh):
    """The step under jit with explicit shardings; the state is donated, frozen inputs are not."""
    replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    return jax.jit(
        step,
        in_shardings=(state_shardings, frozen_shardings, batch_shardings),
        out_shardings=(state_shardings, replicated),
        donate_argnums=(0,),
    )

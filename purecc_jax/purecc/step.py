"""The one fused train step of both PureCC stages (and of the DreamBooth baseline).

    state  = TrainState(step, trainable, opt_state, rng, nonfinite_skipped, nonfinite_streak)  donated
    frozen = {"params": pretrained transformer, "cache": ..., ...}   never donated, stop-gradient
    batch  = {"image": (B,), "complete": (B,), "base": (B,), "target": (B,), "null": (B,)}  indices

Stage "cc" (stage A, DreamBooth): L_CC of the trainable model on the complete text.
Stage "purecc" (stage B): the trainable model runs once on [complete; base] (2B sequences)
and the frozen extractor once on [target; null] (2B sequences); λ*, L_CC and L_PureCC
follow `objective.purecc_loss` (METHOD.md Eq. 8-15).

The batch holds only indices into `frozen["cache"]`: VAE latents and text encodings are
computed once, live on device, and are gathered inside the step. The noise x1 and the
timesteps come from `fold_in(state.rng, state.step)`, so a resumed run draws the same
numbers as an uninterrupted one.

A step whose loss or gradient is not finite changes neither the parameters nor the optimizer
state (the whole update is selected away inside the step); it is counted in
`nonfinite_skipped` (in total) and `nonfinite_streak` (in a row), which the loop watches.

The model is any backbone's transformer (`backbones`): the step reaches it only through
`Backbone.velocity`, and the objective does not care which one it is.

trainable: {"lora": LoRA tree} or {"params": full transformer params}, plus {"embeddings": ...}
when concept embeddings train in this stage. Embeddings: token -> {"clip": (n, Dclip),
"t5": (n, Dt5)} extra rows of the text encoders; layerwise -> {"double": (depth, D),
"single": (depth_single, D)} written into the context stream (`ConceptInjection`).

The extractor reads `frozen["extractor_embeddings"]` when given (stage A's embeddings while
stage B trains its own; token rows among them must already be baked into the cached
encodings), else the stage's frozen embeddings, else (constant) the trainable ones.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp
import optax

from purecc_jax import backbones
from purecc_jax.models import lora as lora_lib
from purecc_jax.models.flux import ConceptInjection
from purecc_jax.purecc import flow
from purecc_jax.purecc.objective import ObjectiveConfig, flow_loss, purecc_loss

STAGES = ("cc", "purecc")
CONCEPT_EMBEDDINGS = ("none", "token", "layerwise")
TEXT_KINDS = ("complete", "base", "target", "null")

# encode_text(text_params, clip_ids, t5_ids, clip_extra, t5_extra) -> (t5_hidden, pooled)
TextEncodeFn = Callable[[Any, jax.Array, jax.Array, Any, Any], tuple[jax.Array, jax.Array]]


@flax.struct.dataclass
class TrainState:
    step: jax.Array
    trainable: Any
    opt_state: Any
    rng: jax.Array  # raw key data (uint32), so it checkpoints like any array
    nonfinite_skipped: jax.Array  # int32: steps whose update was skipped for a NaN/Inf loss or gradient
    nonfinite_streak: jax.Array  # int32: of those, how many in a row up to this step


@dataclasses.dataclass(frozen=True)
class StepConfig:
    stage: str = "purecc"
    objective: ObjectiveConfig = ObjectiveConfig()
    timesteps: flow.TimestepConfig = flow.TimestepConfig()
    guidance: float | None = 1.0  # embedded guidance during training; None for models without it
    concept_embedding: str = "none"
    trainable_lora: lora_lib.LoRAConfig | None = lora_lib.LoRAConfig()  # None: full fine-tuning
    extractor_lora: lora_lib.LoRAConfig | None = lora_lib.LoRAConfig()  # None: extractor without LoRA

    def __post_init__(self):
        if self.stage not in STAGES:
            raise ValueError(f"stage {self.stage!r} is not one of {STAGES}")
        if self.concept_embedding not in CONCEPT_EMBEDDINGS:
            raise ValueError(f"concept_embedding {self.concept_embedding!r} is not one of {CONCEPT_EMBEDDINGS}")


def _velocity(model, params, adapter, lora_cfg, xt, t, text, cache, guidance, injection):
    """v_θ(x_t | text) of `model`'s backbone (`backbones.Backbone.velocity`), with the LoRA `adapter` if any."""
    variables = {"params": params}
    if adapter is not None:
        variables["lora"] = lora_lib.variables(adapter, lora_cfg)
    return backbones.for_model(model).velocity(model, variables, xt, t, text, cache, guidance, injection)


def make_loss_fn(model: nn.Module, cfg: StepConfig, encode_text: TextEncodeFn | None = None):
    """loss(trainable, frozen, batch, rng) -> (loss, metrics), the step's differentiable core.

    `model`: the transformer of any backbone (FluxTransformer, SD3Transformer); the cache's
    latents are in the layout its backbone gives them (`Backbone.build_cache`)."""

    def texts(kind, idx, trainable, frozen):
        cache = frozen["cache"]
        emb = trainable.get("embeddings", frozen.get("embeddings"))
        t5, pooled = cache["t5"][idx], cache["pooled"][idx]
        # Token embeddings that train in this stage are applied by running the text encoders here;
        # frozen ones were baked into the cache before the stage started.
        if cfg.concept_embedding == "token" and "embeddings" in trainable and kind in ("complete", "target"):
            t5, pooled = encode_text(frozen["text"], cache["clip_ids"][idx], cache["t5_ids"][idx],
                                     emb["clip"], emb["t5"])
        return t5, pooled

    def injection(kinds_idx, trainable, frozen):
        if cfg.concept_embedding != "layerwise":
            return None
        emb = trainable.get("embeddings", frozen.get("embeddings"))
        mask = jnp.concatenate([frozen["cache"]["ident_mask"][i] for i in kinds_idx], axis=0)
        return ConceptInjection(mask=mask, double=emb["double"], single=emb["single"])

    def cat(*texts):
        return tuple(jnp.concatenate(parts, axis=0) for parts in zip(*texts))

    def loss_fn(trainable, frozen, batch, rng):
        cache = frozen["cache"]
        x0 = cache["latents"][batch["image"]].astype(jnp.float32)
        b = x0.shape[0]
        noise_rng, t_rng = jax.random.split(rng)
        x1 = jax.random.normal(noise_rng, x0.shape, jnp.float32)
        t = flow.sample_timesteps(t_rng, b, cfg.timesteps)
        xt = flow.noisy(x0, x1, t)

        params = trainable["params"] if "params" in trainable else jax.lax.stop_gradient(frozen["params"])
        adapter = trainable.get("lora")
        complete = texts("complete", batch["complete"], trainable, frozen)

        if cfg.stage == "cc":
            v_c = _velocity(model, params, adapter, cfg.trainable_lora, xt, t, complete, cache, cfg.guidance,
                            injection([batch["complete"]], trainable, frozen))
            loss = flow_loss(v_c, x0, x1)
            return loss, dict(loss=loss, l_cc=loss)

        base = texts("base", batch["base"], trainable, frozen)
        v = _velocity(model, params, adapter, cfg.trainable_lora, jnp.concatenate([xt, xt]), jnp.concatenate([t, t]),
                      cat(complete, base), cache, cfg.guidance,
                      injection([batch["complete"], batch["base"]], trainable, frozen))
        v_complete, v_base = v[:b], v[b:]

        # The frozen extractor θ1: pretrained weights (+ stage-A LoRA and embeddings) as constants.
        frozen_sg = jax.lax.stop_gradient(frozen)
        ext_params = frozen_sg.get("extractor_params", frozen_sg["params"])
        if "extractor_embeddings" in frozen_sg:
            ext_trainable, ext_frozen = {}, dict(frozen_sg, embeddings=frozen_sg["extractor_embeddings"])
        else:
            ext_trainable, ext_frozen = jax.lax.stop_gradient(trainable), frozen_sg
        target = texts("target", batch["target"], ext_trainable, ext_frozen)
        null = texts("null", batch["null"], ext_trainable, ext_frozen)
        r = _velocity(model, ext_params, frozen_sg.get("extractor_lora"), cfg.extractor_lora,
                      jnp.concatenate([xt, xt]), jnp.concatenate([t, t]), cat(target, null), cache, cfg.guidance,
                      injection([batch["target"], batch["null"]], ext_trainable, ext_frozen))
        r = r.astype(jnp.float32)  # R_tar is a difference of close velocities: subtract in float32
        r_tar = jax.lax.stop_gradient(r[:b] - r[b:])
        return purecc_loss(v_complete, v_base, r_tar, x0, x1, cfg.objective)

    return loss_fn


def make_optimizer(
    learning_rates: dict[str, optax.Schedule | float],
    *,
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-8,
    weight_decay: float = 1e-4,
    grad_clip: float | None = 1.0,
    grad_accum: int = 1,
) -> optax.GradientTransformation:
    """AdamW per trainable group ("lora", "params", "embeddings"), float32 moments, global clipping."""
    groups = {
        name: optax.adamw(lr, b1=b1, b2=b2, eps=eps, weight_decay=weight_decay, mu_dtype=jnp.float32)
        for name, lr in learning_rates.items()
    }
    tx = optax.multi_transform(groups, lambda tree: {k: jax.tree_util.tree_map(lambda _: k, v) for k, v in tree.items()})
    if grad_clip:
        tx = optax.chain(optax.clip_by_global_norm(grad_clip), tx)
    if grad_accum > 1:
        tx = optax.MultiSteps(tx, every_k_schedule=grad_accum)
    return tx


def init_state(trainable: Any, tx: optax.GradientTransformation, seed: int) -> TrainState:
    # Moments are created from float32 copies so bf16 parameters never get bf16 moments.
    return TrainState(
        step=jnp.zeros((), jnp.int32),
        trainable=trainable,
        opt_state=tx.init(trainable),
        rng=jax.random.key_data(jax.random.key(seed)),
        nonfinite_skipped=jnp.zeros((), jnp.int32),
        nonfinite_streak=jnp.zeros((), jnp.int32),
    )


def all_finite(tree: Any) -> jax.Array:
    """True when every element of every floating leaf of `tree` is finite."""
    leaves = [jnp.all(jnp.isfinite(x)) for x in jax.tree_util.tree_leaves(tree)
              if jnp.issubdtype(jnp.asarray(x).dtype, jnp.inexact)]
    return jnp.all(jnp.stack(leaves)) if leaves else jnp.asarray(True)


def make_train_step(
    model: nn.Module,
    cfg: StepConfig,
    tx: optax.GradientTransformation,
    lr_schedule: optax.Schedule | None = None,
    encode_text: TextEncodeFn | None = None,
    grad_accum: int = 1,
) -> Callable[[TrainState, Any, Any], tuple[TrainState, dict[str, jax.Array]]]:
    """step(state, frozen, batch) -> (new state, metrics); jit it with `jit_train_step`.

    `lr_schedule` (for the logged learning rate) counts optimizer updates, as the optimizer's
    own schedules do: with `grad_accum` micro-steps per update, step s is in update s // grad_accum.
    """
    loss_fn = make_loss_fn(model, cfg, encode_text)

    def step(state: TrainState, frozen: Any, batch: Any):
        rng = jax.random.fold_in(jax.random.wrap_key_data(state.rng), state.step)
        (loss, metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.trainable, frozen, batch, rng)
        updates, opt_state = tx.update(grads, state.opt_state, state.trainable)
        trainable = optax.apply_updates(state.trainable, updates)
        # NaN/Inf anywhere skips the whole update, moments and accumulators included, so a bad
        # batch can never reach the parameters or a checkpoint.
        finite = jnp.isfinite(loss) & all_finite(grads)
        skipped = jnp.logical_not(finite).astype(jnp.int32)
        state = state.replace(
            step=state.step + 1, trainable=_select(finite, trainable, state.trainable),
            opt_state=_select(finite, opt_state, state.opt_state),
            nonfinite_skipped=state.nonfinite_skipped + skipped, nonfinite_streak=(state.nonfinite_streak + 1) * skipped)
        metrics = dict(metrics, grad_norm=optax.tree.norm(grads), nonfinite_skipped=state.nonfinite_skipped,
                       nonfinite_streak=state.nonfinite_streak)
        if lr_schedule is not None:
            metrics["learning_rate"] = jnp.asarray(lr_schedule((state.step - 1) // grad_accum), jnp.float32)
        return state, metrics

    return step


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

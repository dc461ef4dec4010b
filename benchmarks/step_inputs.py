"""The fused train step of one benchmark variant and its inputs, abstract or concrete.

A variant is a stage ("cc": DreamBooth, L_CC only; "purecc": stage B) and a way to train
(LoRA or full fine-tuning). Its inputs mirror what `purecc_jax.train.Trainer` passes the step:

    LoRA, cc       trainable {"lora"}     Frozen(params, cache)
    LoRA, purecc   trainable {"lora"}     Frozen(params, cache, extractor=Extractor(lora))  one copy of the weights
    full, cc       trainable {"params"}   Frozen(params, cache)                             float32 master copy
    full, purecc   trainable {"params"}   Frozen(params, cache, extractor=Extractor(params)) stage A was full FT too
    LoRA, purecc, extractor_copy          Frozen(params, cache, extractor=Extractor(params)) stage-A LoRA merged
                                                                                          into a second copy

`abstract_inputs` returns ShapeDtypeStructs that carry their shardings (for AOT lowering, no
memory used); `concrete_inputs` creates real arrays of the same shapes in those shardings.
"""

from __future__ import annotations

import dataclasses
import itertools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from purecc_jax import sharding
from purecc_jax.models import lora as lora_lib
from purecc_jax.models import quantize
from purecc_jax.backbones.flux.denoiser import FluxDenoiser
from purecc_jax.models.flux import FluxConfig, FluxTransformer, init_fn
from purecc_jax.pipeline.latents import latent_image_ids
from purecc_jax.purecc.step import (Extractor, Frozen, StepConfig, init_state, make_loss_fn, make_optimizer,
                                    make_train_step)

N_IMAGES = 3  # cached concept images
TEXTS = ("complete", "base", "target", "null")  # one cached text of each kind


@dataclasses.dataclass(frozen=True)
class Variant:
    stage: str  # "cc" | "purecc"
    full_finetune: bool = False
    extractor_copy: bool = False  # purecc + LoRA only: the extractor gets its own (merged) copy of the weights

    @property
    def name(self) -> str:
        how = "full" if self.full_finetune else "lora"
        return f"{self.stage}/{how}" + ("/extractor-copy" if self.extractor_copy else "")


@dataclasses.dataclass(frozen=True)
class Shapes:
    batch: int = 2
    img_tokens: int = 256  # packed 2x2 latent patches: (H/16) * (W/16)
    txt_tokens: int = 64  # T5 sequence length


@dataclasses.dataclass
class StepInputs:
    """The step function and its (state, frozen, batch) arguments."""

    step: Any  # step(state, frozen, batch) -> (state, metrics)
    loss: Any  # loss(trainable, frozen, batch, rng) -> (loss, metrics), the step's differentiable core
    tx: Any
    state: Any
    frozen: Any
    batch: Any


def step_config(variant: Variant, lcfg: lora_lib.LoRAConfig) -> StepConfig:
    """The StepConfig of a variant: LoRA `lcfg` where the variant has adapters, None where not."""
    trainable_lora = None if variant.full_finetune else lcfg
    extractor_has_lora = variant.stage == "purecc" and not (variant.full_finetune or variant.extractor_copy)
    extractor_lora = lcfg if extractor_has_lora else None
    return StepConfig(stage=variant.stage, trainable_lora=trainable_lora, extractor_lora=extractor_lora)


def _image_grid(img_tokens: int) -> tuple[int, int]:
    """(height, width) in latent pixels of a near-square image with `img_tokens` packed tokens."""
    rows = int(np.sqrt(img_tokens))
    while img_tokens % rows:
        rows -= 1
    return 2 * rows, 2 * (img_tokens // rows)


def _sds(shape, dtype, sh) -> jax.ShapeDtypeStruct:
    return jax.ShapeDtypeStruct(tuple(shape), dtype, sharding=sh)


def _with_shardings(tree: Any, shardings: Any) -> Any:
    return jax.tree_util.tree_map(lambda x, s: _sds(x.shape, x.dtype, s), tree, shardings)


def abstract_inputs(cfg: FluxConfig, variant: Variant, lcfg: lora_lib.LoRAConfig, shapes: Shapes,
                    mesh: jax.sharding.Mesh, learning_rate: float = 1e-4,
                    base_quantization: str = "none") -> StepInputs:
    """The variant's step and ShapeDtypeStructs (with shardings) of its arguments; no memory used.

    `base_quantization` ("none", "int8", "fp8"): the frozen weights quantized (`models/quantize.py`),
    LoRA variants only.
    """
    if variant.extractor_copy and (variant.stage != "purecc" or variant.full_finetune):
        raise ValueError(f"extractor_copy applies to the LoRA purecc stage only, not {variant.name}")
    if base_quantization != "none" and variant.full_finetune:
        raise ValueError(f"base_quantization={base_quantization!r} needs a LoRA variant, not {variant.name}")
    rep = sharding.replicated(mesh)
    params, pshard = sharding.abstract_and_shardings(init_fn(cfg, jax.random.key(0)), mesh)
    params = _with_shardings(params, pshard)
    lora_params = params
    params = quantize.quantize(params, base_quantization)

    def lora_tree(seed):
        tree = jax.eval_shape(lambda: lora_lib.init(jax.random.key(seed), lora_params, lcfg))
        return _with_shardings(tree, lora_lib.shardings(tree, pshard))

    h, w = _image_grid(shapes.img_tokens)
    f32 = jnp.float32
    cache = dict(
        latents=_sds((N_IMAGES, shapes.img_tokens, cfg.in_channels), f32, rep),
        t5=_sds((len(TEXTS), shapes.txt_tokens, cfg.context_dim), f32, rep),
        pooled=_sds((len(TEXTS), cfg.pooled_dim), f32, rep),
        img_ids=_sds(latent_image_ids(h, w).shape, f32, rep),
    )
    extractor = None
    if variant.stage == "purecc":
        if variant.full_finetune or variant.extractor_copy:
            extractor = Extractor(params=params)  # same shapes, a separate argument: a second copy
        else:
            extractor = Extractor(lora=lora_tree(1))
    frozen = Frozen(params=params, cache=cache, extractor=extractor)

    if variant.full_finetune:
        trainable = {"params": jax.tree_util.tree_map(lambda x: _sds(x.shape, f32, x.sharding), params)}
    else:
        trainable = {"lora": lora_tree(2)}
    tx = make_optimizer({k: learning_rate for k in trainable})
    # The optimizer state takes the shardings jit propagates from the trainable tree, as in the trainer.
    with sharding.activate(mesh):
        compiled_init = jax.jit(lambda tr: init_state(tr, tx, 0)).lower(trainable).compile()
    state = _with_shardings(jax.eval_shape(lambda tr: init_state(tr, tx, 0), trainable),
                            compiled_init.output_shardings)

    batch = {k: _sds((shapes.batch,), jnp.int32, sharding.batch_sharding(mesh, (shapes.batch,)))
             for k in ("image",) + TEXTS}
    # Training guidance 1.0, as the trainer's default (a model without a guidance embedder ignores it).
    denoiser, scfg = FluxDenoiser(FluxTransformer(cfg), guidance=1.0), step_config(variant, lcfg)
    return StepInputs(make_train_step(denoiser, scfg, tx), make_loss_fn(denoiser, scfg), tx, state, frozen, batch)


def pretrained(cfg: FluxConfig, mesh: jax.sharding.Mesh, seed: int = 0) -> Any:
    """Freshly initialised FLUX weights in their shardings, standing in for the pretrained model."""
    return sharding.sharded_init(init_fn(cfg, jax.random.key(seed)), mesh)


def concrete_inputs(abstract: StepInputs, params: Any, shapes: Shapes, seed: int = 0) -> StepInputs:
    """Real arrays for `abstract` around `params` (shared, not copied): random LoRA and cache, valid indices."""
    counter = itertools.count()

    def random(x):
        key = jax.random.fold_in(jax.random.key(seed + 1), next(counter))
        return jax.jit(lambda k: 0.02 * jax.random.normal(k, x.shape, x.dtype), out_shardings=x.sharding)(key)

    h, w = _image_grid(shapes.img_tokens)
    cache = {k: random(v) for k, v in abstract.frozen.cache.items() if k != "img_ids"}
    cache["img_ids"] = jax.device_put(latent_image_ids(h, w), abstract.frozen.cache["img_ids"].sharding)
    extractor = abstract.frozen.extractor
    if extractor is not None and extractor.lora is not None:
        extractor = Extractor(lora=jax.tree_util.tree_map(random, extractor.lora))
    elif extractor is not None:
        extractor = Extractor(params=jax.tree_util.tree_map(jnp.copy, params))
    frozen = Frozen(params=params, cache=cache, extractor=extractor)

    tr_abstract = abstract.state.trainable
    if "params" in tr_abstract:
        trainable = {"params": jax.tree_util.tree_map(lambda p: p.astype(jnp.float32), params)}
    else:
        trainable = {"lora": jax.tree_util.tree_map(random, tr_abstract["lora"])}
    state_sh = jax.tree_util.tree_map(lambda a: a.sharding, abstract.state)
    state = jax.jit(lambda tr: init_state(tr, abstract.tx, seed), out_shardings=state_sh)(trainable)

    index = dict(image=np.arange(shapes.batch) % N_IMAGES, **{k: np.full(shapes.batch, TEXTS.index(k)) for k in TEXTS})
    batch = {k: jax.device_put(index[k].astype(np.int32), v.sharding) for k, v in abstract.batch.items()}
    return dataclasses.replace(abstract, state=state, frozen=frozen, batch=batch)


def compiled_step(cfg: FluxConfig, variant: Variant, lcfg: lora_lib.LoRAConfig, shapes: Shapes,
                  mesh: jax.sharding.Mesh, params: Any, base_quantization: str = "none") -> tuple[Any, StepInputs]:
    """The variant's step under `step.jit_train_step`, compiled ahead of time, and concrete inputs around `params`.

    Returns (compiled, inputs); `compiled(inputs.state, inputs.frozen, inputs.batch)` runs one step
    (the state is donated: store the returned one back into `inputs.state`).
    """
    from purecc_jax.purecc.step import jit_train_step

    ab = abstract_inputs(cfg, variant, lcfg, shapes, mesh, base_quantization=base_quantization)
    shard = lambda tree: jax.tree_util.tree_map(lambda x: x.sharding, tree)
    with sharding.activate(mesh):
        jitted = jit_train_step(ab.step, shard(ab.state), shard(ab.frozen), shard(ab.batch), mesh)
        compiled = jitted.lower(ab.state, ab.frozen, ab.batch).compile()
    return compiled, concrete_inputs(ab, quantize.quantize(params, base_quantization), shapes)


def step_flops(cfg: FluxConfig, variant: Variant, lcfg: lora_lib.LoRAConfig, shapes: Shapes,
               mesh: jax.sharding.Mesh) -> float:
    """FLOPs of one step as XLA counts them (`Lowered.cost_analysis`), on the unscanned model: XLA counts
    a scanned loop body once, not once per layer."""
    ab = abstract_inputs(cfg.replace(scan_layers=False, remat_policy="none"), variant, lcfg, shapes, mesh)
    with sharding.activate(mesh):
        lowered = jax.jit(ab.step).lower(ab.state, ab.frozen, ab.batch)
    cost = lowered.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    return float(cost["flops"])

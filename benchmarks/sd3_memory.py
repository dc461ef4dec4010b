r"""Per-device memory of a PureCC stage-B train step for full SD3.5-Medium, from XLA's buffer assignment.

    python -m benchmarks.sd3_memory                       # 1 CPU device, remat full/dots_no_batch/none
    python -m benchmarks.sd3_memory --remat=full --extractor=shared

The paper's recipe (docs/method.md §5): LoRA rank 4 on the image-stream attention projections
(`models.sd3.LORA_TARGETS`), batch 2 at 512x512 (64x64 latents: 1024 image tokens), 77 CLIP +
256 T5 text tokens, bf16 weights and compute. The step is compiled ahead of time on abstract
inputs, as `benchmarks/memory.py` does for FLUX.1-dev (same columns, so the two tables sit side
by side). The trainable SD3 model runs once on [complete; base] (2B sequences) with gradients,
the frozen extractor once on [target; null] without, then `objective.purecc_loss` and AdamW
(`step.make_optimizer`) on the LoRA: the trainer's own step (`purecc.step.make_train_step`) on SD3's
denoiser (`backbones.sd3.SD3Denoiser`).
"""

from __future__ import annotations

import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags

from purecc_jax import sharding
from purecc_jax.backbones.sd3.backbone import SD3Denoiser
from purecc_jax.models import lora as lora_lib
from purecc_jax.models import sd3
from purecc_jax.purecc.step import Extractor, Frozen, StepConfig, init_state, make_optimizer, make_train_step

_PRESET = flags.DEFINE_string("preset", "sd3.5-medium", "SD3 preset (sd3.5-medium, sd3.5-large, tiny)")
_BATCH = flags.DEFINE_integer("batch", 2, "images per step (B)")
_RESOLUTION = flags.DEFINE_integer("resolution", 512, "image side in pixels (latents are side / 8)")
_T5 = flags.DEFINE_integer("t5_tokens", 256, "T5 tokens (after CLIP's 77)")
_DTYPE = flags.DEFINE_string("dtype", "bfloat16", "compute dtype")
_PARAM_DTYPE = flags.DEFINE_string("param_dtype", "bfloat16", "dtype of the pretrained weights")
_REMAT = flags.DEFINE_list("remat", ["full", "dots_no_batch", "none"], "remat policies to compile")
_EXTRACTOR = flags.DEFINE_list("extractor", ["shared", "copy"], "extractor layouts: shared (LoRA on the one copy), copy")
_RANK = flags.DEFINE_integer("lora_rank", 4, "LoRA rank of θ1 and θ2")

GIB = 2**30


def _nbytes(tree) -> int:
    return sum(int(np.prod(x.shape)) * np.dtype(x.dtype).itemsize for x in jax.tree_util.tree_leaves(tree))


def _count(tree) -> int:
    return sum(int(np.prod(x.shape)) for x in jax.tree_util.tree_leaves(tree))


def main(argv):
    del argv
    side = _RESOLUTION.value // 8
    base_cfg = sd3.preset(_PRESET.value, dtype=_DTYPE.value, param_dtype=_PARAM_DTYPE.value)
    lcfg = lora_lib.LoRAConfig(rank=_RANK.value, alpha=float(_RANK.value), targets=sd3.LORA_TARGETS)
    dev = jax.devices()[0]
    params = sharding.unbox(jax.eval_shape(sd3.init_fn(base_cfg, jax.random.key(0))))
    lora = jax.eval_shape(lambda: lora_lib.init(jax.random.key(1), params, lcfg))
    tx = make_optimizer({"lora": 1e-4})
    state = jax.eval_shape(lambda: init_state({"lora": lora}, tx, 0))
    spec = lambda shape, dtype=jnp.float32: jax.ShapeDtypeStruct(shape, dtype)
    text_len, b = 77 + _T5.value, _BATCH.value
    cache = dict(latents=spec((3, side, side, base_cfg.in_channels)),
                 t5=spec((4, text_len, base_cfg.context_dim), base_cfg.dtype),
                 pooled=spec((4, base_cfg.pooled_dim), base_cfg.dtype))
    batch = {k: spec((b,), jnp.int32) for k in ("image", "complete", "base", "target", "null")}
    print(f"jax {jax.__version__}, 1 x {dev.device_kind} ({dev.platform})")
    print(f"SD3 {_PRESET.value}: {base_cfg.num_layers} blocks ({base_cfg.num_dual} MMDiT-X), width "
          f"{base_cfg.hidden_size}, params {base_cfg.param_dtype}, compute {base_cfg.dtype}; batch {b} at "
          f"{_RESOLUTION.value}px ({(side // 2) ** 2} image + {text_len} text tokens); LoRA rank {lcfg.rank}")
    print(f"parameters: {_count(params) / 1e9:.3f} B ({_nbytes(params) / GIB:.2f} GiB); LoRA per adapter "
          f"{_count(lora) / 1e6:.3f} M; train state {_nbytes((state.trainable, state.opt_state)) / 2**20:.1f} MiB\n",
          flush=True)

    rows = []
    for policy in _REMAT.value:
        cfg = base_cfg.replace(remat_policy=policy)
        for e in _EXTRACTOR.value:
            if e not in ("shared", "copy"):
                raise ValueError(f"--extractor entry {e!r} is not 'shared' or 'copy'")
            extractor = Extractor(lora=lora, params=params if e == "copy" else None)
            frozen = Frozen(params=params, cache=cache, extractor=extractor)
            step = make_train_step(SD3Denoiser(sd3.SD3Transformer(cfg)),
                                   StepConfig(stage="purecc", trainable_lora=lcfg, extractor_lora=lcfg), tx)
            t0 = time.perf_counter()
            compiled = jax.jit(step, donate_argnums=(0,)).lower(state, frozen, batch).compile()
            secs = time.perf_counter() - t0
            m = compiled.memory_analysis()
            arg, out, alias, temp = (m.argument_size_in_bytes, m.output_size_in_bytes, m.alias_size_in_bytes,
                                     m.temp_size_in_bytes)
            rows.append((policy, e, arg, out, alias, temp, arg + out - alias + temp, secs))
            print(f"  compiled remat={policy} extractor={e} in {secs:.0f} s", flush=True)

    print(f"\nGiB per device ({dev.platform} backend):\n")
    print("| remat | extractor | arguments | outputs | aliased | temp | peak ≈ arg + out - alias + temp | compile s |")
    print("|---|---|---|---|---|---|---|---|")
    for policy, e, arg, out, alias, temp, peak, secs in rows:
        print(f"| {policy} | {e} | {arg / GIB:.2f} | {out / GIB:.3f} | {alias / GIB:.3f} | {temp / GIB:.2f} | "
              f"{peak / GIB:.2f} | {secs:.0f} |")


if __name__ == "__main__":
    app.run(main)

r"""Per-device memory of the stage-B PureCC train step for full FLUX.1-dev, from XLA's buffer assignment.

    python -m benchmarks.memory                                    # 1 CPU device, remat full/dots_no_batch/none
    python -m benchmarks.memory --host_devices=8 --fsdp=8          # the per-device share on an fsdp=8 mesh
    python -m benchmarks.memory --remat=dots_no_batch --extractor=shared   # on a GPU/TPU: that backend's figures

The step is lowered and compiled ahead of time on abstract inputs (ShapeDtypeStructs with
shardings): no weights are created and no device memory is used. `compiled.memory_analysis()`
gives, per device, the bytes of the arguments (weights, LoRA, optimizer state, cache, batch),
the outputs, the outputs aliased to donated arguments (the train state) and the temporaries
(activations kept for the backward pass, workspaces). Peak ≈ arguments + outputs - aliased + temp.
A backend-independent column, "saved for bwd", adds up the arrays JAX's vjp keeps for the
backward pass (read from the jaxpr, before XLA; the weights themselves are not counted).

Two extractor layouts are compared (docs/method.md §4, memory shape):
  shared  θ1 = pretrained + stage-A LoRA, θ2 = pretrained + fresh LoRA: one copy of the weights
  copy    θ1 = its own copy of the weights (stage-A LoRA merged), θ2 = pretrained + LoRA: two copies
On the CPU backend the XLA columns show XLA's buffer assignment for CPU, which fuses and schedules
differently from a GPU or TPU backend and computes bf16 matmuls in float32, keeping float32 copies
of the bf16 weights in `temp` (about 2x the weight bytes): indicative, not a GPU measurement.
"""

from __future__ import annotations

import time

import jax
import jax.extend
import numpy as np
from absl import app, flags

from benchmarks.step_inputs import Shapes, Variant, abstract_inputs
from purecc_jax import sharding
from purecc_jax.models.flux import preset
from purecc_jax.models.lora import LoRAConfig
from purecc_jax.purecc.step import jit_train_step

_PRESET = flags.DEFINE_string("preset", "flux-dev", "FLUX preset (flux-dev, flux-schnell, tiny)")
_DEPTH = flags.DEFINE_integer("depth", None, "override: double-stream blocks (default: the preset's, 19)")
_DEPTH_SINGLE = flags.DEFINE_integer("depth_single", None, "override: single-stream blocks (default: the preset's, 38)")
_BATCH = flags.DEFINE_integer("batch", 2, "images per step (B)")
_IMG = flags.DEFINE_integer("img_tokens", 1024, "packed image tokens (1024: 512x512)")
_TXT = flags.DEFINE_integer("txt_tokens", 512, "T5 tokens")
_DTYPE = flags.DEFINE_string("dtype", "bfloat16", "compute dtype")
_PARAM_DTYPE = flags.DEFINE_string("param_dtype", "bfloat16", "dtype of the pretrained weights")
_REMAT = flags.DEFINE_list("remat", ["full", "dots_no_batch", "none"], "remat policies to compile")
_EXTRACTOR = flags.DEFINE_list("extractor", ["shared", "copy"], "extractor layouts: shared (LoRA on the one copy), copy")
_SCAN = flags.DEFINE_bool("scan_layers", True, "nn.scan over blocks (keeps the HLO small)")
_ATTENTION = flags.DEFINE_string("attention", "xla", "attention implementation (purecc_jax.models.attention)")
_RANK = flags.DEFINE_integer("lora_rank", 4, "LoRA rank of θ1 and θ2 (attention targets)")
_DATA = flags.DEFINE_integer("data", 1, "mesh: data-parallel size")
_FSDP = flags.DEFINE_integer("fsdp", 1, "mesh: fsdp size")
_TENSOR = flags.DEFINE_integer("tensor", 1, "mesh: tensor-parallel size")
_HOST_DEVICES = flags.DEFINE_integer("host_devices", 0, "CPU only: number of virtual host devices (0: as is)")
_QUANT = flags.DEFINE_list("base_quantization", ["none"], "frozen-weight formats to compile: none, int8, fp8 "
                           "(models/quantize.py; the extractor 'copy' layout is skipped for int8/fp8)")

GIB = 2**30


def _nbytes(tree) -> int:
    return sum(int(np.prod(x.shape)) * x.dtype.itemsize for x in jax.tree_util.tree_leaves(tree))


def _count(tree) -> int:
    return sum(int(np.prod(x.shape)) for x in jax.tree_util.tree_leaves(tree))


def saved_for_backward(loss, trainable, frozen, batch) -> int:
    """Bytes of the arrays JAX keeps from the forward pass for the backward pass (vjp residuals), whole
    batch, before XLA; inputs (the weights, also behind stop_gradient) are not counted. Backend-independent."""
    def residuals(tr, fr, b):
        _, vjp_fn = jax.vjp(lambda t: loss(t, fr, b, jax.random.key(0))[0], tr)
        return jax.tree_util.tree_leaves(vjp_fn)

    jaxpr = jax.make_jaxpr(residuals)(trainable, frozen, batch).jaxpr
    through = {e.outvars[0]: e.invars[0] for e in jaxpr.eqns if e.primitive.name == "stop_gradient"}
    inputs, seen, total = set(jaxpr.invars) | set(jaxpr.constvars), set(), 0
    for v in jaxpr.outvars:
        if isinstance(v, jax.extend.core.Literal):
            continue
        while v in through:
            v = through[v]
        if v not in inputs and v not in seen:
            seen.add(v)
            total += int(np.prod(v.aval.shape)) * v.aval.dtype.itemsize
    return total


def main(argv):
    del argv
    if _HOST_DEVICES.value:
        jax.config.update("jax_num_cpu_devices", _HOST_DEVICES.value)
    overrides = {k: v for k, v in dict(depth=_DEPTH.value, depth_single=_DEPTH_SINGLE.value).items() if v is not None}
    base_cfg = preset(_PRESET.value, dtype=_DTYPE.value, param_dtype=_PARAM_DTYPE.value, scan_layers=_SCAN.value,
                      attention=_ATTENTION.value, **overrides)
    shapes = Shapes(_BATCH.value, _IMG.value, _TXT.value)
    lcfg = LoRAConfig(rank=_RANK.value, alpha=float(_RANK.value))
    n = _DATA.value * _FSDP.value * _TENSOR.value
    mesh = sharding.make_mesh(_DATA.value, _FSDP.value, _TENSOR.value, devices=jax.devices()[:n])
    dev = jax.devices()[0]
    print(f"jax {jax.__version__}, {n} x {dev.device_kind} ({dev.platform}); mesh {dict(mesh.shape)}")
    print(f"FLUX {_PRESET.value}: {base_cfg.depth}+{base_cfg.depth_single} blocks, width {base_cfg.hidden_size}, "
          f"params {base_cfg.param_dtype}, compute {base_cfg.dtype}, scan_layers {base_cfg.scan_layers}; "
          f"batch {shapes.batch}, {shapes.img_tokens} image + {shapes.txt_tokens} text tokens; LoRA rank {lcfg.rank}")

    variants = {"shared": Variant("purecc"), "copy": Variant("purecc", extractor_copy=True)}
    for e in _EXTRACTOR.value:
        if e not in variants:
            raise ValueError(f"--extractor entry {e!r} is not one of {sorted(variants)}")

    rows, counted = [], False
    for policy, quant, e in ((p, q, e) for q in _QUANT.value for p in _REMAT.value for e in _EXTRACTOR.value):
        if quant != "none" and e == "copy":
            continue
        cfg = base_cfg.replace(remat_policy=policy)
        ab = abstract_inputs(cfg, variants[e], lcfg, shapes, mesh, base_quantization=quant)
        if not counted:
            params, adapter = ab.frozen.params, ab.state.trainable["lora"]
            print(f"parameters: FLUX {_count(params) / 1e9:.3f} B ({_nbytes(params) / GIB:.2f} GiB in "
                  f"{cfg.param_dtype}); LoRA per adapter {_count(adapter) / 1e6:.3f} M "
                  f"({_nbytes(adapter) / 2**20:.1f} MiB float32); whole train state "
                  f"{_nbytes(ab.state) / 2**20:.1f} MiB\n", flush=True)
            counted = True
        shard = lambda tree: jax.tree_util.tree_map(lambda x: x.sharding, tree)
        t0 = time.perf_counter()
        with sharding.activate(mesh):
            jitted = jit_train_step(ab.step, shard(ab.state), shard(ab.frozen), shard(ab.batch), mesh)
            compiled = jitted.lower(ab.state, ab.frozen, ab.batch).compile()
            secs = time.perf_counter() - t0
            saved = saved_for_backward(ab.loss, ab.state.trainable, ab.frozen, ab.batch)
        m = compiled.memory_analysis()
        arg, out, alias, temp = (m.argument_size_in_bytes, m.output_size_in_bytes, m.alias_size_in_bytes,
                                 m.temp_size_in_bytes)
        rows.append((policy, quant, e, arg, out, alias, temp, arg + out - alias + temp, saved, secs))
        print(f"  compiled remat={policy} base={quant} extractor={e} in {secs:.0f} s", flush=True)

    print(f"\nGiB; XLA columns per device ({dev.platform} backend); 'saved for bwd' from the jaxpr, all devices:\n")
    print("| remat | base | extractor | arguments | outputs | aliased | temp | peak ≈ arg + out - alias + temp "
          "| saved for bwd | arguments + saved for bwd | compile s |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for policy, quant, e, arg, out, alias, temp, peak, saved, secs in rows:
        print(f"| {policy} | {quant} | {e} | {arg / GIB:.2f} | {out / GIB:.3f} | {alias / GIB:.3f} | {temp / GIB:.2f} | "
              f"{peak / GIB:.2f} | {saved / GIB:.2f} | {(arg + saved) / GIB:.2f} | {secs:.0f} |")


if __name__ == "__main__":
    app.run(main)

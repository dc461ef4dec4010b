r"""Wall time per train step: PureCC (stage B) against DreamBooth (L_CC only), LoRA and full FT.

    python -m benchmarks.step_cost                                  # small FLUX on CPU, a few minutes
    python -m benchmarks.step_cost --preset=flux-dev --dtype=bfloat16 --param_dtype=bfloat16 \
        --img_tokens=1024 --txt_tokens=512 --remat=dots_no_batch --variants=cc/lora,purecc/lora

Each variant's step is compiled ahead of time (`jit(...).lower(...).compile()`, timed apart),
then the variants run interleaved, one step each per round in a rotating order, so that
load from other processes hits them alike; the table gives the median over rounds after
warm-up. The ratios PureCC / DreamBooth (ratio of medians, and median of the per-round
ratios) are printed next to docs/method.md §4's ideal: 3.0 with LoRA, 2.7 with full fine-tuning.
"""

from __future__ import annotations

import functools
import os
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags

from benchmarks.step_inputs import Shapes, Variant, abstract_inputs, concrete_inputs, pretrained
from purecc_jax import sharding
from purecc_jax.models import lora as lora_lib
from purecc_jax.models.flux import FluxConfig, FluxTransformer, preset
from purecc_jax.purecc.step import jit_train_step

_PRESET = flags.DEFINE_string("preset", "small",
                              "'small' (built from the size flags) or a FLUX preset: flux-dev, flux-schnell, tiny")
_HEADS = flags.DEFINE_integer("num_heads", 4, "small preset: attention heads")
_HEAD_DIM = flags.DEFINE_integer("head_dim", 64, "small preset: head width (a multiple of 16); width = heads * head_dim")
_DEPTH = flags.DEFINE_integer("depth", 2, "small preset: double-stream blocks")
_DEPTH_SINGLE = flags.DEFINE_integer("depth_single", 4, "small preset: single-stream blocks")
_BATCH = flags.DEFINE_integer("batch", 2, "images per step (B)")
_IMG = flags.DEFINE_integer("img_tokens", 256, "packed image tokens (1024 for 512x512, 4096 for 1024x1024)")
_TXT = flags.DEFINE_integer("txt_tokens", 64, "T5 tokens (512 for FLUX.1-dev)")
_DTYPE = flags.DEFINE_string("dtype", "float32", "compute dtype")
_PARAM_DTYPE = flags.DEFINE_string("param_dtype", "float32", "dtype of the pretrained weights")
_REMAT = flags.DEFINE_string("remat", "none", "remat policy (purecc_jax.models.runtime.REMAT_POLICIES)")
_SCAN = flags.DEFINE_bool("scan_layers", True, "nn.scan over blocks")
_ATTENTION = flags.DEFINE_string("attention", "xla", "attention implementation (purecc_jax.models.attention)")
_RANK = flags.DEFINE_integer("lora_rank", 4, "LoRA rank (alpha = rank), attention targets")
_VARIANTS = flags.DEFINE_list("variants", ["cc/lora", "purecc/lora", "cc/full", "purecc/full"],
                              "stage/how with stage in {cc, purecc} and how in {lora, full}")
_BREAKDOWN = flags.DEFINE_bool("breakdown", True, "also time the model alone: forward, and forward+backward "
                                "(LoRA / full gradients) at B and 2B sequences, interleaved with the steps")
_STEPS = flags.DEFINE_integer("steps", 10, "timed rounds (one step of every variant per round)")
_WARMUP = flags.DEFINE_integer("warmup", 2, "untimed rounds first")
_DATA = flags.DEFINE_integer("data", 1, "mesh: data-parallel size")
_FSDP = flags.DEFINE_integer("fsdp", 1, "mesh: fsdp size")
_TENSOR = flags.DEFINE_integer("tensor", 1, "mesh: tensor-parallel size")
_HOST_DEVICES = flags.DEFINE_integer("host_devices", 0, "CPU only: number of virtual host devices (0: as is)")

IDEAL = {"lora": 3.0, "full": 8 / 3}  # docs/method.md §4: (2*2 + 2*1) / 2 and (2*3 + 2*1) / 3


def flux_config() -> FluxConfig:
    runtime = dict(dtype=_DTYPE.value, param_dtype=_PARAM_DTYPE.value, remat_policy=_REMAT.value,
                   scan_layers=_SCAN.value, attention=_ATTENTION.value)
    if _PRESET.value != "small":
        return preset(_PRESET.value, **runtime)
    d = _HEAD_DIM.value
    if d % 16:
        raise ValueError(f"--head_dim={d} must be a multiple of 16 (RoPE axes d/8, 7d/16, 7d/16)")
    return preset("flux-dev", num_heads=_HEADS.value, head_dim=d, axes_dim=(d // 8, 7 * d // 16, 7 * d // 16),
                  depth=_DEPTH.value, depth_single=_DEPTH_SINGLE.value, **runtime)


def parse_variant(text: str) -> Variant:
    stage, _, how = text.partition("/")
    if stage not in ("cc", "purecc") or how not in ("lora", "full"):
        raise ValueError(f"--variants entry {text!r} is not stage/how with stage in (cc, purecc), how in (lora, full)")
    return Variant(stage, full_finetune=how == "full")


def model_jobs(cfg: FluxConfig, lcfg: lora_lib.LoRAConfig, shapes: Shapes, mesh: jax.sharding.Mesh, params,
               full: bool) -> dict:
    """Timed calls of the bare model: forward, LoRA (and, if `full`, all-weights) forward+backward,
    at B and 2B sequences."""
    model = FluxTransformer(cfg)
    adapter = lora_lib.init(jax.random.key(1), params, lcfg)
    master = jax.tree_util.tree_map(lambda x: x.astype(jnp.float32), params) if full else None
    n_img = shapes.img_tokens

    def inputs(n):
        k = jax.random.split(jax.random.key(n), 4)
        batched = lambda x: jax.device_put(x, sharding.batch_sharding(mesh, x.shape))
        rep = lambda x: jax.device_put(x, sharding.replicated(mesh))
        return (batched(jax.random.normal(k[0], (n, n_img, cfg.in_channels))),
                batched(jax.random.normal(k[1], (n, shapes.txt_tokens, cfg.context_dim))),
                batched(jax.random.normal(k[2], (n, cfg.pooled_dim))), batched(jax.random.uniform(k[3], (n,))),
                rep(jnp.zeros((n_img, 3))), rep(jnp.zeros((shapes.txt_tokens, 3))),
                batched(jnp.ones((n,))) if cfg.guidance_embed else None)

    def apply(p, lo, x):
        variables = {"params": p} if lo is None else {"params": p, "lora": lora_lib.variables(lo, lcfg)}
        return model.apply(variables, *x)

    sq = lambda v: jnp.sum(jnp.square(v))
    fns = {
        "forward": lambda p, lo, m, x: apply(p, lo, x),
        "fwd+bwd lora": lambda p, lo, m, x: jax.grad(lambda a: sq(apply(p, a, x)))(lo),
    }
    if full:
        fns["fwd+bwd full"] = lambda p, lo, m, x: jax.grad(lambda w: sq(apply(w, None, x)))(m)
    jobs = {}
    with sharding.activate(mesh):
        for name, fn in fns.items():
            for n, label in ((shapes.batch, "B"), (2 * shapes.batch, "2B")):
                x = inputs(n)
                compiled = jax.jit(fn).lower(params, adapter, master, x).compile()
                jobs[f"{name} {label}"] = functools.partial(compiled, params, adapter, master, x)
    return jobs


def main(argv):
    del argv
    if _HOST_DEVICES.value:
        jax.config.update("jax_num_cpu_devices", _HOST_DEVICES.value)
    cfg = flux_config()
    variants = [parse_variant(v) for v in _VARIANTS.value]
    shapes = Shapes(_BATCH.value, _IMG.value, _TXT.value)
    lcfg = lora_lib.LoRAConfig(rank=_RANK.value, alpha=float(_RANK.value))
    n = _DATA.value * _FSDP.value * _TENSOR.value
    mesh = sharding.make_mesh(_DATA.value, _FSDP.value, _TENSOR.value, devices=jax.devices()[:n])
    dev = jax.devices()[0]
    print(f"jax {jax.__version__}, {n} x {dev.device_kind} ({dev.platform}), {os.cpu_count()} host cores, "
          f"load average {os.getloadavg()[0]:.2f}")
    print(f"FLUX width {cfg.hidden_size} ({cfg.num_heads} x {cfg.head_dim}), {cfg.depth}+{cfg.depth_single} blocks, "
          f"batch {shapes.batch}, {shapes.img_tokens} image + {shapes.txt_tokens} text tokens, dtype {cfg.dtype}, "
          f"params {cfg.param_dtype}, remat {cfg.remat_policy}, LoRA rank {lcfg.rank}; mesh {dict(mesh.shape)}",
          flush=True)

    params = pretrained(cfg, mesh)  # one copy, shared by every job
    steps, jobs = {}, {}
    for v in variants:
        ab = abstract_inputs(cfg, v, lcfg, shapes, mesh)
        shard = lambda tree: jax.tree_util.tree_map(lambda x: x.sharding, tree)
        with sharding.activate(mesh):
            jitted = jit_train_step(ab.step, shard(ab.state), shard(ab.frozen), shard(ab.batch), mesh)
            t0 = time.perf_counter()
            lowered = jitted.lower(ab.state, ab.frozen, ab.batch)
            t1 = time.perf_counter()
            compiled = lowered.compile()
            t2 = time.perf_counter()
        x = concrete_inputs(ab, params, shapes)

        def run(compiled=compiled, x=x, name=v.name):
            x.state, metrics = compiled(x.state, x.frozen, x.batch)
            if not np.isfinite(float(metrics["loss"])):
                raise FloatingPointError(f"{name}: loss {float(metrics['loss'])}")

        mem = compiled.memory_analysis()
        steps[v.name] = dict(lower=t1 - t0, compile=t2 - t1, temp=getattr(mem, "temp_size_in_bytes", float("nan")))
        jobs[v.name] = run
    if _BREAKDOWN.value:
        jobs.update(model_jobs(cfg, lcfg, shapes, mesh, params, any(v.full_finetune for v in variants)))

    # Interleaved rounds: every job once per round, the starting job rotating, so load that
    # comes and goes hits all jobs alike and per-round ratios cancel it.
    names, times = list(jobs), {k: [] for k in jobs}
    for r in range(_WARMUP.value + _STEPS.value):
        for name in names[r % len(names):] + names[: r % len(names)]:
            t0 = time.perf_counter()
            jax.block_until_ready(jobs[name]())
            if r >= _WARMUP.value:
                times[name].append(time.perf_counter() - t0)

    med = {k: statistics.median(v) for k, v in times.items()}
    print(f"\nload average after: {os.getloadavg()[0]:.2f}; {_STEPS.value} timed rounds after {_WARMUP.value} warm-up\n")
    print("| train step | lower s | compile s | median ms | min ms | max ms | XLA temp MiB |")
    print("|---|---|---|---|---|---|---|")
    for name, st in steps.items():
        t = times[name]
        print(f"| {name} | {st['lower']:.1f} | {st['compile']:.1f} | {1e3 * med[name]:.1f} | {1e3 * min(t):.1f} | "
              f"{1e3 * max(t):.1f} | {st['temp'] / 2**20:.1f} |")

    def per_round(num, den):
        return statistics.median(a / b for a, b in zip(times[num], times[den]))

    print("\n| PureCC / DreamBooth step | ratio of medians | median of per-round ratios | ideal (docs/method.md §4) |")
    print("|---|---|---|---|")
    for how in ("lora", "full"):
        a, b = f"cc/{how}", f"purecc/{how}"
        if a in times and b in times:
            print(f"| {how} | {med[b] / med[a]:.2f} | {per_round(b, a):.2f} | {IDEAL[how]:.1f} |")

    if _BREAKDOWN.value:
        print("\n| model alone | median ms | / forward B |")
        print("|---|---|---|")
        for name in jobs:
            if name not in steps:
                print(f"| {name} | {1e3 * med[name]:.1f} | {per_round(name, 'forward B'):.2f} |")
        print("\nThe ideal ratio assumes cost(2B) = 2 cost(B), LoRA fwd+bwd = 2 forward, full fwd+bwd = 3 forward.")
        print("From the parts, (fwd+bwd 2B + forward 2B) / fwd+bwd B, per round (no optimizer, loss or gathers):")
        for how in ("lora", "full"):
            if f"fwd+bwd {how} B" not in times:
                continue
            fb2, fb1 = times[f"fwd+bwd {how} 2B"], times[f"fwd+bwd {how} B"]
            parts = statistics.median((x + y) / z for x, y, z in zip(fb2, times["forward 2B"], fb1))
            print(f"  {how}: {parts:.2f}")


if __name__ == "__main__":
    app.run(main)

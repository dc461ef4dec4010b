r"""Stage-B LoRA step of FLUX.1-dev on one accelerator: step time, peak memory, MFU, time per concept.

    bash benchmarks/accelerator.sh                   # on one H100/H200 (about 10 minutes)
    python -m benchmarks.accelerator --tiny          # CPU smoke test at tiny size (seconds)

Builds FLUX.1-dev-size random weights on the device (bf16), then per resolution compiles and times
the DreamBooth-LoRA step (stage A) and the PureCC stage-B LoRA step (`step.jit_train_step`, the
trainer's wrapper), and prints the median step time, the device's peak memory
(`device.memory_stats()["peak_bytes_in_use"]`), the model FLOPs utilisation against `--peak_tflops`
(989 TFLOP/s: dense bf16 of an H100 SXM and of an H200) with FLOPs counted by XLA on the unscanned
step, and the projected time of one concept: stage A steps x its step time + stage B steps x its.
"""

from __future__ import annotations

import statistics
import time

import jax
import numpy as np
from absl import app, flags

from benchmarks.step_inputs import Shapes, Variant, compiled_step, pretrained, step_flops
from purecc_jax import sharding
from purecc_jax.models.flux import preset
from purecc_jax.models.lora import LoRAConfig

_TINY = flags.DEFINE_bool("tiny", False, "tiny FLUX and 32x32 images: a smoke test that runs on CPU in seconds")
_RES = flags.DEFINE_list("resolutions", ["512", "1024"], "square image sizes (multiples of 16)")
_REMAT = flags.DEFINE_string("remat", "dots_no_batch", "remat policy (purecc_jax.models.runtime.REMAT_POLICIES)")
_ATTENTION = flags.DEFINE_string("attention", "auto", "attention implementation (auto: cuDNN on GPU, splash on TPU)")
_QUANT = flags.DEFINE_string("base_quantization", "none", "frozen weights: none (bf16), int8, fp8")
_BATCH = flags.DEFINE_integer("batch", 2, "images per step")
_STEPS = flags.DEFINE_integer("steps", 5, "timed steps per variant and resolution")
_CONCEPT = flags.DEFINE_list("concept_steps", ["400", "400"], "stage A and stage B steps of one concept")
_PEAK = flags.DEFINE_float("peak_tflops", 989.0, "the card's dense bf16 peak, TFLOP/s (H100 SXM / H200: 989)")


def main(argv):
    del argv
    dev = jax.devices()[0]
    if _TINY.value:
        cfg = preset("tiny", remat_policy=_REMAT.value, attention="xla")
        sizes = [(32, 8)]
    else:
        cfg = preset("flux-dev", dtype="bfloat16", param_dtype="bfloat16", remat_policy=_REMAT.value,
                     attention=_ATTENTION.value)
        sizes = [(int(r), 512) for r in _RES.value]
    mesh = sharding.make_mesh(1, 1, 1, devices=[dev])
    lcfg = LoRAConfig(rank=4, alpha=4.0)
    print(f"jax {jax.__version__}, {dev.device_kind} ({dev.platform}); remat {cfg.remat_policy}, attention "
          f"{cfg.attention}, base {_QUANT.value}, batch {_BATCH.value}", flush=True)
    t0 = time.perf_counter()
    params = jax.block_until_ready(pretrained(cfg, mesh))
    print(f"random weights on device in {time.perf_counter() - t0:.0f} s", flush=True)

    rows = []
    for res, txt in sizes:
        shapes = Shapes(_BATCH.value, (res // 16) ** 2, txt)
        times = {}
        for stage in ("cc", "purecc"):
            t0 = time.perf_counter()
            compiled, x = compiled_step(cfg, Variant(stage), lcfg, shapes, mesh, params, _QUANT.value)
            compile_s = time.perf_counter() - t0
            flops = step_flops(cfg, Variant(stage), lcfg, shapes, mesh)
            ts = []
            for i in range(_STEPS.value + 1):
                t0 = time.perf_counter()
                x.state, metrics = compiled(x.state, x.frozen, x.batch)
                loss = float(metrics["loss"])
                if i:
                    ts.append(time.perf_counter() - t0)
            if not np.isfinite(loss):
                raise FloatingPointError(f"{stage} at {res}: loss {loss}")
            stats = dev.memory_stats() or {}
            peak = stats.get("peak_bytes_in_use", float("nan"))
            med = statistics.median(ts)
            times[stage] = med
            rows.append((res, stage, compile_s, med, peak, flops))
            print(f"  {res}^2 {stage}: compile {compile_s:.0f} s, step {1e3 * med:.0f} ms", flush=True)
        a, b = (int(s) for s in _CONCEPT.value)
        rows.append((res, "concept", a * times["cc"] + b * times["purecc"]))

    print(f"\n| resolution | step | compile s | median step ms | peak memory GiB | TFLOP / step | MFU vs "
          f"{_PEAK.value:.0f} TFLOP/s |")
    print("|---|---|---|---|---|---|---|")
    for row in rows:
        if row[1] == "concept":
            continue
        res, stage, comp, med, peak, flops = row
        print(f"| {res}^2 | {stage}/lora | {comp:.0f} | {1e3 * med:.1f} | {peak / 2**30:.2f} | {flops / 1e12:.2f} | "
              f"{100 * flops / med / (_PEAK.value * 1e12):.1f}% |")
    print(f"\nProjected time of one concept ({_CONCEPT.value[0]} stage-A + {_CONCEPT.value[1]} stage-B steps, "
          "step time only):")
    for row in rows:
        if row[1] == "concept":
            print(f"  {row[0]}^2: {row[2] / 60:.1f} min")


if __name__ == "__main__":
    app.run(main)

r"""The JAX train step against the PyTorch one (`benchmarks.torch_reference`), each in its own process.

    python -m benchmarks.versus_torch                      # widths 256 (2+4 blocks) and 512 (4+8), cc and purecc
    python -m benchmarks.versus_torch --sizes=4x64:2+4 --rounds=3 --steps=2

Both steps use the same config as `python -m benchmarks.step_cost`'s default (FLUX structure,
T5 width 4096, CLIP 768, batch 2, 256 image + 64 text tokens, LoRA rank 4 on the attention
projections, float32): DreamBooth-LoRA (L_CC) and PureCC stage B.

The harness is fair to both: each framework runs in a process of its own (JAX's thread pool and
PyTorch's OpenMP threads never share one), built and warmed up once; the parent then asks the two
processes in turn for `--steps` timed steps of each stage, `--rounds` times, the order alternating,
with a pause between turns so that OpenMP threads still spinning after PyTorch's turn have parked
before JAX's starts. The load average is recorded at every turn. Ratios are medians of per-round
ratios. In the same two processes `jnp.dot` and `torch.matmul` are timed the same way at the
model's matmul shapes (the machine's own matmul peak), and the JAX step's counted FLOPs (XLA's cost
analysis of the unscanned step) over its median time give the fraction of that peak the step reaches.

`--host_devices=2` splits the JAX process into two CPU devices (`jax_num_cpu_devices`) and the batch
over them, data parallel, as the trainer's mesh does over accelerators: each device runs its half of
every operation on the machine's cores, instead of every operation being split between the cores.
"""

from __future__ import annotations

import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time

import numpy as np
from absl import app, flags

from benchmarks.report import call_seconds, fmt, fmt_ratio, median_seconds

LORA_RANK = 4  # the JAX step's LoRA rank (alpha 4)
STAGE_NAMES = {"cc": "DreamBooth-LoRA", "purecc": "PureCC stage B"}
_SIZES = flags.DEFINE_list("sizes", ["4x64:2+4", "8x64:4+8"], "model sizes, HEADSxHEAD_DIM:DOUBLE+SINGLE")
_STAGES = flags.DEFINE_list("stages", ["cc", "purecc"], "steps: cc (DreamBooth-LoRA), purecc (stage B)")
_BATCH = flags.DEFINE_integer("batch", 2, "images per step (B)")
_IMG = flags.DEFINE_integer("img_tokens", 256, "packed image tokens")
_TXT = flags.DEFINE_integer("txt_tokens", 64, "T5 tokens")
_REMAT = flags.DEFINE_string("remat", "none", "JAX remat policy (purecc_jax.models.runtime.REMAT_POLICIES)")
_ATTENTION = flags.DEFINE_string("attention", "xla", "JAX attention (purecc_jax.models.attention.IMPLEMENTATIONS)")
_SCAN = flags.DEFINE_bool("scan_layers", True, "JAX: blocks as one nn.scan (else a Python loop)")
_LORA_BACKWARD = flags.DEFINE_string("lora_backward", "explicit",
                                     "JAX: LoRA's backward (purecc_jax.models.runtime.LORA_BACKWARDS)")
_HOST_DEVICES = flags.DEFINE_integer(
    "host_devices", 1, "JAX: CPU devices the process splits into (jax_num_cpu_devices); the batch is split over "
    "them (data parallel) and each runs its share of every step on the machine's cores")
_ROUNDS = flags.DEFINE_integer("rounds", 6, "timed turns per framework and stage")
_STEPS = flags.DEFINE_integer("steps", 2, "steps per turn (their median is the turn's time)")
_WARMUP = flags.DEFINE_integer("warmup", 2, "untimed steps per stage when a worker starts")
_PAUSE = flags.DEFINE_float("pause", 0.5, "seconds between turns (OpenMP threads stop spinning)")
_MATMUL_REPS = flags.DEFINE_integer("matmul_reps", 5, "timed calls per matmul shape and turn (median)")
_ALLOCATOR = flags.DEFINE_enum(
    "allocator", "default", ["default", "tcmalloc"],
    "memory allocator of both workers: the C library's malloc, or tcmalloc (LD_PRELOAD; Debian/Ubuntu package "
    "libtcmalloc-minimal4), which keeps freed memory mapped instead of handing each step fresh pages")
_WORKER = flags.DEFINE_enum("worker", None, ["jax", "torch"], "internal: serve one framework's steps on stdin")
_SIZE = flags.DEFINE_string("size", None, "internal: the worker's model size")


def parse_size(text: str) -> tuple[int, int, int, int]:
    """'HEADSxHEAD_DIM:DOUBLE+SINGLE' -> (heads, head_dim, depth, depth_single)."""
    try:
        width, blocks = text.split(":")
        heads, head_dim = (int(v) for v in width.split("x"))
        depth, single = (int(v) for v in blocks.split("+"))
    except ValueError:
        raise ValueError(f"--sizes entry {text!r} is not HEADSxHEAD_DIM:DOUBLE+SINGLE, e.g. 4x64:2+4") from None
    if head_dim % 32:
        raise ValueError(f"--sizes entry {text!r}: head_dim must be a multiple of 32 (RoPE axes d/8, 7d/16, 7d/16, "
                         "each even)")
    return heads, head_dim, depth, single


def matmul_shapes(heads: int, d: int, batch: int, img: int, txt: int, context: int = 4096) -> list[tuple[int, ...]]:
    """(m, k, n) of the model's large matmuls at batch B: q/k/v/out, MLP in/out, single-block in/out, T5 in."""
    width = heads * d
    h = 4 * width
    tokens = batch * (img + txt)
    return [(tokens, width, width), (tokens, width, h), (tokens, h, width), (tokens, width, 3 * width + h),
            (tokens, width + h, width), (batch * txt, context, width)]


# ----------------------------------------------------------------------------- the workers


class JaxSteps:
    """The JAX steps of one size (`benchmarks.step_inputs`: the trainer's step on random inputs)."""

    def __init__(self, size: str, stages: list[str]):
        import jax

        if _HOST_DEVICES.value > 1:
            jax.config.update("jax_num_cpu_devices", _HOST_DEVICES.value)
        from benchmarks.step_inputs import Shapes, Variant, compiled_step, pretrained, step_flops
        from purecc_jax import sharding
        from purecc_jax.models import lora as lora_lib
        from purecc_jax.models.flux import preset

        heads, d, depth, single = parse_size(size)
        cfg = preset("flux-dev", num_heads=heads, head_dim=d, axes_dim=(d // 8, 7 * d // 16, 7 * d // 16),
                     depth=depth, depth_single=single, dtype="float32", param_dtype="float32",
                     remat_policy=_REMAT.value, scan_layers=_SCAN.value, attention=_ATTENTION.value,
                     lora_backward=_LORA_BACKWARD.value)
        shapes = Shapes(_BATCH.value, _IMG.value, _TXT.value)
        lcfg = lora_lib.LoRAConfig(rank=LORA_RANK, alpha=4.0)
        devices = jax.devices()[:_HOST_DEVICES.value]
        mesh = sharding.make_mesh(len(devices), 1, 1, devices=devices)
        params = pretrained(cfg, mesh)
        self.jax, self.jobs, self.flops, self.devices = jax, {}, {}, mesh.devices.size
        for stage in stages:
            compiled, x = compiled_step(cfg, Variant(stage), lcfg, shapes, mesh, params)
            self.flops[stage] = step_flops(cfg, Variant(stage), lcfg, shapes, mesh)

            def run(compiled=compiled, x=x):
                x.state, metrics = compiled(x.state, x.frozen, x.batch)
                return float(jax.block_until_ready(metrics["loss"]))

            self.jobs[stage] = run

    def matmul(self, mkn: list[tuple[int, ...]], reps: int) -> list[float]:
        import jax.numpy as jnp

        out = []
        dot = self.jax.jit(jnp.dot)
        for m, k, n in mkn:
            rng = np.random.default_rng(0)
            a, b = jnp.asarray(rng.standard_normal((m, k), np.float32)), jnp.asarray(rng.standard_normal((k, n), np.float32))
            out.append(2.0 * m * k * n / median_seconds(lambda a=a, b=b: dot(a, b).block_until_ready(), reps,
                                                        warmup=1) / 1e9)
        return out


class TorchSteps:
    """The PyTorch steps of one size (`benchmarks.torch_reference`, eager, the authors' style)."""

    def __init__(self, size: str, stages: list[str]):
        import torch

        from benchmarks.torch_reference import TorchSize, TorchStep

        torch.set_num_threads(os.cpu_count())
        heads, d, depth, single = parse_size(size)
        tsize = TorchSize(heads, d, depth, single, _BATCH.value, _IMG.value, _TXT.value, 4)
        self.torch, self.flops = torch, {}
        self.jobs = {stage: TorchStep(stage, tsize) for stage in stages}

    def matmul(self, mkn: list[tuple[int, ...]], reps: int) -> list[float]:
        out = []
        for m, k, n in mkn:
            rng = np.random.default_rng(0)
            a = self.torch.from_numpy(rng.standard_normal((m, k), np.float32))
            b = self.torch.from_numpy(rng.standard_normal((k, n), np.float32))
            out.append(2.0 * m * k * n / median_seconds(lambda a=a, b=b: self.torch.matmul(a, b), reps,
                                                        warmup=1) / 1e9)
        return out


def serve(framework: str) -> None:
    """A worker: build, warm up, then answer JSON commands on stdin, one JSON line each on stdout."""
    out, sys.stdout = sys.stdout, sys.stderr  # the protocol has stdout to itself
    stages = list(_STAGES.value)
    steps = (JaxSteps if framework == "jax" else TorchSteps)(_SIZE.value, stages)
    for stage in stages:
        for _ in range(_WARMUP.value):
            loss = steps.jobs[stage]()
            if not np.isfinite(loss):
                raise FloatingPointError(f"{framework} {stage}: loss {loss}")
    print(json.dumps({"ready": True, "flops": steps.flops, "devices": getattr(steps, "devices", None)}),
          file=out, flush=True)
    for line in sys.stdin:
        cmd = json.loads(line)
        if cmd["op"] == "step":
            before = resource.getrusage(resource.RUSAGE_SELF)
            times = call_seconds(steps.jobs[cmd["stage"]], cmd["n"])
            after = resource.getrusage(resource.RUSAGE_SELF)
            # page faults (a fresh page touched) and kernel time, per step: what the allocator costs
            reply = {"times": times, "minflt": (after.ru_minflt - before.ru_minflt) / cmd["n"],
                     "sys": (after.ru_stime - before.ru_stime) / cmd["n"]}
        elif cmd["op"] == "matmul":
            reply = {"gflops": steps.matmul([tuple(s) for s in cmd["shapes"]], cmd["reps"])}
        else:
            break
        print(json.dumps(reply), file=out, flush=True)


class Worker:
    """One framework's worker process of one size."""

    def __init__(self, framework: str, size: str):
        args = [sys.executable, "-m", "benchmarks.versus_torch", f"--worker={framework}", f"--size={size}",
                f"--stages={','.join(_STAGES.value)}", f"--batch={_BATCH.value}", f"--img_tokens={_IMG.value}",
                f"--txt_tokens={_TXT.value}", f"--remat={_REMAT.value}", f"--warmup={_WARMUP.value}",
                f"--attention={_ATTENTION.value}", f"--host_devices={_HOST_DEVICES.value}",
                f"--lora_backward={_LORA_BACKWARD.value}", "--scan_layers" if _SCAN.value else "--noscan_layers"]
        self.name = framework
        self.proc = subprocess.Popen(args, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                                     env=allocator_env(dict(os.environ)))
        self.ready = self._read()

    def _read(self) -> dict:
        line = self.proc.stdout.readline()
        if not line:
            raise SystemExit(f"the {self.name} worker died (exit {self.proc.wait()}); see its output above")
        return json.loads(line)

    def ask(self, **cmd) -> dict:
        self.proc.stdin.write(json.dumps(cmd) + "\n")
        self.proc.stdin.flush()
        return self._read()

    def close(self) -> None:
        self.proc.stdin.write(json.dumps({"op": "quit"}) + "\n")
        self.proc.stdin.close()
        self.proc.wait()


TCMALLOC = ("/usr/lib/x86_64-linux-gnu/libtcmalloc_minimal.so.4", "/usr/lib/x86_64-linux-gnu/libtcmalloc.so.4",
            "/usr/lib/aarch64-linux-gnu/libtcmalloc_minimal.so.4", "/usr/lib64/libtcmalloc_minimal.so.4")


def tcmalloc() -> str:
    """The path of an installed tcmalloc shared library, or a clear error."""
    for path in TCMALLOC:
        if os.path.exists(path):
            return path
    raise SystemExit("--allocator=tcmalloc: no tcmalloc library found (looked for " + ", ".join(TCMALLOC) +
                     "); install it, e.g. `apt-get install libtcmalloc-minimal4` on Debian/Ubuntu")


def allocator_env(env: dict[str, str]) -> dict[str, str]:
    """`env` with `--allocator`'s library preloaded (unchanged for the C library's malloc)."""
    if _ALLOCATOR.value == "tcmalloc":
        env["LD_PRELOAD"] = " ".join(filter(None, [tcmalloc(), env.get("LD_PRELOAD")]))
    return env


def allocator_name() -> str:
    return tcmalloc() if _ALLOCATOR.value == "tcmalloc" else "the C library malloc"


def size_label(size: str) -> str:
    """'8x64:4+8' -> 'width 512, 4+8 blocks'."""
    heads, d, depth, single = parse_size(size)
    return f"width {heads * d}, {depth}+{single} blocks"


def machine() -> str:
    """The CPU in a few words: model name, cores, whether it has AVX-512."""
    name, flags_ = platform.processor() or "unknown CPU", ""
    try:
        with open("/proc/cpuinfo") as f:
            info = f.read()
        name = next(line.split(":", 1)[1].strip() for line in info.splitlines() if line.startswith("model name"))
        flags_ = next(line for line in info.splitlines() if line.startswith("flags"))
    except (OSError, StopIteration):
        pass
    return f"{name}, {os.cpu_count()} cores, {'AVX-512' if 'avx512f' in flags_ else 'no AVX-512'}"


def compare(size: str) -> dict:
    """Both workers of `size`, alternating turns; per stage the per-turn times and per-round ratios."""
    workers = {fw: Worker(fw, size) for fw in ("jax", "torch")}
    if workers["jax"].ready["devices"] != _HOST_DEVICES.value:
        raise RuntimeError(f"the JAX worker runs on {workers['jax'].ready['devices']} CPU devices, "
                           f"not --host_devices={_HOST_DEVICES.value}")
    times = {(fw, s): [] for fw in workers for s in _STAGES.value}
    faults = {(fw, s): [] for fw in workers for s in _STAGES.value}
    loads = [os.getloadavg()[0]]
    for r in range(_ROUNDS.value):
        order = ["jax", "torch"] if r % 2 == 0 else ["torch", "jax"]
        for stage in _STAGES.value:
            for fw in order:
                time.sleep(_PAUSE.value)
                turn = workers[fw].ask(op="step", stage=stage, n=_STEPS.value)
                times[(fw, stage)].append(statistics.median(turn["times"]))
                faults[(fw, stage)].append((turn["minflt"], turn["sys"]))
                loads.append(os.getloadavg()[0])
    heads, d, _, _ = parse_size(size)
    mkn = matmul_shapes(heads, d, _BATCH.value, _IMG.value, _TXT.value)
    dots = {fw: [] for fw in workers}
    for r in range(2):
        for fw in (["jax", "torch"] if r == 0 else ["torch", "jax"]):
            time.sleep(_PAUSE.value)
            dots[fw].append(workers[fw].ask(op="matmul", shapes=mkn, reps=_MATMUL_REPS.value)["gflops"])
    flops = workers["jax"].ready["flops"]
    for w in workers.values():
        w.close()
    best = {fw: [max(col) for col in zip(*runs)] for fw, runs in dots.items()}  # per shape, the better turn
    return dict(times=times, faults=faults, loads=loads, flops=flops, mkn=mkn, dots=best)


def main(argv):
    del argv
    if _WORKER.value:
        serve(_WORKER.value)
        return
    if _HOST_DEVICES.value < 1 or _BATCH.value % _HOST_DEVICES.value:
        raise app.UsageError(f"--host_devices={_HOST_DEVICES.value} must be a positive divisor of "
                             f"--batch={_BATCH.value} (the batch is split over the JAX process's CPU devices)")
    import jax
    import torch

    print(f"{machine()}; jax {jax.__version__}, torch {torch.__version__}; each framework in its own process, "
          f"{_ROUNDS.value} alternating turns of {_STEPS.value} steps, {_PAUSE.value} s between turns; "
          f"JAX: remat {_REMAT.value}, attention {_ATTENTION.value}, LoRA backward {_LORA_BACKWARD.value}, "
          f"{_HOST_DEVICES.value} CPU device(s); "
          f"allocator {allocator_name()}")
    rows, dot_rows, loads, fault_rows = [], [], [], []
    for size in _SIZES.value:
        label = size_label(size)
        print(f"\n{label}: building both workers ...", flush=True)
        res = compare(size)
        loads += res["loads"]
        peak = max(res["dots"]["jax"])
        for stage in _STAGES.value:
            tj, tt = res["times"][("jax", stage)], res["times"][("torch", stage)]
            ratio = statistics.median(a / b for a, b in zip(tj, tt))
            rows.append((STAGE_NAMES[stage], label, statistics.median(tt), statistics.median(tj), ratio,
                         res["flops"][stage], peak))
            fault_rows.append((STAGE_NAMES[stage], label, *(statistics.median(f[i] for f in res["faults"][(fw, stage)])
                                                      for fw in ("torch", "jax") for i in (0, 1))))
        for shape, j, t in zip(res["mkn"], res["dots"]["jax"], res["dots"]["torch"]):
            dot_rows.append((shape, j, t))

    print(f"\nload average during the turns: min {min(loads):.2f}, median {statistics.median(loads):.2f}, "
          f"max {max(loads):.2f}\n")
    print("| step | size | PyTorch ms | JAX ms | JAX / PyTorch | JAX GFLOP | JAX GFLOP/s | of jnp.dot peak |")
    print("|---|---|---|---|---|---|---|---|")
    for stage, label, tt, tj, ratio, fl, peak in rows:
        print(f"| {stage} | {label} | {1e3 * tt:.0f} | {1e3 * tj:.0f} | **{fmt(ratio)}** | {fl / 1e9:.1f} | "
              f"{fmt_ratio(fl, tj * 1e9, '.0f')} | {fmt_ratio(100 * fl, tj * 1e9 * peak, '.0f')}% |")
    print("\n| step | size | PyTorch page faults per step | PyTorch system ms per step | JAX page faults per step "
          "| JAX system ms per step |")
    print("|---|---|---|---|---|---|")
    for stage, label, ft, st, fj, sj in fault_rows:
        print(f"| {stage} | {label} | {ft:.0f} | {1e3 * st:.0f} | {fj:.0f} | {1e3 * sj:.0f} |")
    print("\n| matmul m x k x n (float32) | jnp.dot GFLOP/s | torch.matmul GFLOP/s | jnp.dot / torch.matmul |")
    print("|---|---|---|---|")
    for (m, k, n), j, t in dot_rows:
        print(f"| {m} x {k} x {n} | {j:.0f} | {t:.0f} | {fmt_ratio(j, t)} |")
    med_j = statistics.median(j for _, j, _ in dot_rows)
    med_t = statistics.median(t for _, _, t in dot_rows)
    print(f"\nmedian over the shapes: jnp.dot {med_j:.0f} GFLOP/s, torch.matmul {med_t:.0f} GFLOP/s "
          f"({fmt_ratio(med_j, med_t)}x)")


if __name__ == "__main__":
    app.run(main)

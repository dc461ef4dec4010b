"""Host memory of an export that merges a LoRA into FLUX.1-width weights while writing (`backbones.flux.formats`).

    python -m benchmarks.export_memory [--single=2] [--rank=16]

Builds a FLUX.1-dev-width transformer (hidden 3072) with one double block and `--single`
single blocks in bfloat16, a LoRA on every linear layer of the blocks, and writes it merged as
a BFL file and as a diffusers transformer/ folder through `trained.write_export` (which also
reads every file back for the manifest). A thread samples the process's resident memory every
5 ms; the table gives the model's size, the peak rise over the memory held before the export
(what the export itself needed), and the time: for anonymous memory (what the export
allocates) and for the whole resident set, which also counts the pages of the written files
while they are mapped to be read back (page cache the kernel can drop). Streaming keeps the
anonymous rise near a few tensors, not the model.
"""

from __future__ import annotations

import argparse
import tempfile
import threading
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from purecc_jax import backbones, sharding, trained
from purecc_jax.models import flux, lora


def rss(field: str) -> int:
    """VmRSS (all resident memory) or RssAnon (without file pages, e.g. of files mapped to read back)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"no {field} in /proc/self/status")


class Peak:
    """The largest resident set (and anonymous part of it) seen while the block runs."""

    def __enter__(self):
        self.start = {f: rss(f) for f in ("VmRSS", "RssAnon")}
        self.peak, self._stop = dict(self.start), False
        self._thread = threading.Thread(target=self._watch, daemon=True)
        self._thread.start()
        return self

    def _watch(self):
        while not self._stop:
            for f in self.peak:
                self.peak[f] = max(self.peak[f], rss(f))
            time.sleep(0.005)

    def rise(self, field: str) -> int:
        return self.peak[field] - self.start[field]

    def __exit__(self, *exc):
        self._stop = True
        self._thread.join()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--single", type=int, default=1, help="single-stream blocks")
    parser.add_argument("--rank", type=int, default=16, help="LoRA rank")
    args = parser.parse_args()

    cfg = flux.preset("flux-dev", depth=1, depth_single=args.single, param_dtype="bfloat16")
    params = sharding.unbox(jax.jit(flux.init_fn(cfg, jax.random.key(0)))())
    size = sum(x.nbytes for x in jax.tree_util.tree_leaves(params))
    lcfg = lora.LoRAConfig(rank=args.rank, alpha=float(args.rank), targets=lora.FLUX_ALL_BLOCKS)
    adapter = jax.tree_util.tree_map(lambda x: x + 1e-3, lora.init(jax.random.key(1), params, lcfg))
    jax.block_until_ready((params, adapter))
    info = trained.ConceptInfo("sks", "dog", "none", "purecc", "stage_b", None)
    rows = []
    for fmt in ("bfl", "diffusers-full"):
        with tempfile.TemporaryDirectory() as tmp, Peak() as peak:
            t0 = time.perf_counter()
            out = trained.write_export(Path(tmp) / "e", info, {"lora": adapter}, lcfg, cfg, backbones.FLUX,
                                       formats=(fmt,), dtype=jnp.bfloat16, merge_lora=True, base_params=params)
            seconds = time.perf_counter() - t0
            written = sum(p.stat().st_size for p in out.rglob("*.safetensors"))
        rows.append((fmt, written, peak.rise("RssAnon"), peak.rise("VmRSS"), seconds))
    print(f"FLUX.1 width, 1 double + {args.single} single blocks, bf16 weights {size / 2**30:.2f} GiB, "
          f"LoRA rank {args.rank} on every block layer, merged while writing\n")
    print("| format | written | peak rise, anonymous memory | / model | peak rise, RSS with mapped files | time |")
    print("|---|---|---|---|---|---|")
    for fmt, written, anon, total, seconds in rows:
        print(f"| {fmt} | {written / 2**30:.2f} GiB | {anon / 2**20:.0f} MiB | {anon / size:.2f} | "
              f"{total / 2**20:.0f} MiB | {seconds:.1f} s |")
    largest = max(np.prod(x.shape) for x in jax.tree_util.tree_leaves(params)) * 4
    print(f"\nlargest single tensor merged in float32: {largest / 2**20:.0f} MiB")


if __name__ == "__main__":
    main()

"""XLA:CPU flags for a quick compile, shared by the test session and the processes tests start.

The suite's programs are tiny and compile-bound (a tiny model's step runs in milliseconds, its
compile takes seconds), so these flags decide most of its time:
- no LLVM optimisation (`--xla_backend_optimization_level=0`, `--xla_llvm_disable_expensive_passes`);
- XLA:CPU's elemental IR emitter instead of its MLIR fusion emitters
  (`--xla_cpu_use_fusion_emitters=false`: the MLIR pipeline, a context per fusion, was the largest
  part of a compile under `perf`), in one LLVM module per program
  (`--xla_cpu_parallel_codegen_split_count=1`).
Measured on the 2-core Xeon (AVX-512), idle: the whole suite (`pytest -n 2 tests`) 12 min 7 s and
1361 CPU-s with all four against 18 min 57 s and 2226 CPU-s with the first two; the one-process
run of tests/test_multihost.py 21 s against 42 s. Every test still compares against its PyTorch
reference or its own second run, compiled alike; speed figures come from benchmarks/, never from
tests. PURECC_TEST_FULL_COMPILE=1 keeps XLA's defaults, in the test session and in every process
the tests start (FAST_COMPILE is then empty).
"""

import os

FAST_COMPILE = "" if os.environ.get("PURECC_TEST_FULL_COMPILE") else (
    "--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true"
    " --xla_cpu_use_fusion_emitters=false --xla_cpu_parallel_codegen_split_count=1")

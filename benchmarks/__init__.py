"""Speed and memory benchmarks: `python -m benchmarks.step_cost`, `python -m benchmarks.memory` (see README.md)."""

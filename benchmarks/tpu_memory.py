r"""Per-chip memory of both stages' steps on Cloud TPU slices, from the TPU compiler: the figures table.

    python -m benchmarks.tpu_memory --model=flux-dev --mode=lora --resolution=512
    python -m benchmarks.tpu_memory --model=sd3.5-medium --mode=full --resolution=1024 --topologies=v5p-8

For each slice, the run of configs/flux_concept.py (or sd35_concept.py) with every chip on the fsdp
axis and one image per chip (batch = chips), LoRA or full fine-tuning in both stages, at the
resolution, is checked as `python -m purecc_jax.compile_check` checks it (`preflight.check`: stage A
and stage B steps, no sampler) under the remat policies of --remat in turn; each stage's row is
the first policy under which it fits (or the last tried). Prints one Markdown row per slice with
the equivalent compile_check command. Needs libtpu; 1-3 minutes per FLUX.1-dev compile on 2 cores.
"""

from __future__ import annotations

import time

from absl import app, flags

from purecc_jax import defaults, preflight, topology

_MODEL = flags.DEFINE_string("model", "flux-dev", "preset: flux-dev or sd3.5-medium (any of preflight.PRESETS)")
_MODE = flags.DEFINE_enum("mode", "lora", ["lora", "full"], "LoRA or full fine-tuning, both stages")
_RESOLUTION = flags.DEFINE_integer("resolution", 512, "training resolution (square)")
_TOPOLOGIES = flags.DEFINE_list("topologies", ["v5e-4", "v5e-8", "v6e-4", "v6e-8", "v5p-8", "v5e:4x4"], "slices")
_REMAT = flags.DEFINE_list("remat", ["dots_no_batch", "full"], "remat policies to try, cheapest recomputation first")

CONFIGS = {"flux": "configs/flux_concept.py", "sd3": "configs/sd35_concept.py"}


def overrides(topo: topology.Topology, mode: str, resolution: int, remat: str) -> dict:
    out = {"mesh.data": 1, "mesh.fsdp": -1, "stage_a.batch_size": topo.chips, "stage_b.batch_size": topo.chips,
           "concept.resolution": str(resolution), "sample.prompts": (), "model.remat_policy": remat}
    if mode == "full":
        out.update({"stage_a.full_finetune": True, "stage_b.full_finetune": True})
    return out


def command(config_file: str, topo: topology.Topology, model: str, values: dict) -> str:
    """The compile_check command of a row, the remat policy left for the reader to fill in from the cell."""
    values = dict(values, **{"model.remat_policy": "POLICY"})
    flags_ = " ".join(f"--config.{k}={'()' if v == () else v}" for k, v in values.items())
    return f"python -m purecc_jax.compile_check --config={config_file} --topology={topo.name} --model={model} {flags_}"


def load(config_file: str):
    import importlib.util

    spec = importlib.util.spec_from_file_location("config", config_file)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config()


def main(argv):
    del argv
    model, mode, res = _MODEL.value, _MODE.value, _RESOLUTION.value
    config_file = CONFIGS[preflight.PRESETS[model].name]
    base = load(config_file)
    rows = []
    for name in _TOPOLOGIES.value:
        topo = topology.tpu_topology(name)
        best: dict[str, tuple[str, preflight.Program]] = {}
        pending = ["stage_a", "stage_b"]
        started = time.perf_counter()
        for remat in _REMAT.value:
            values = overrides(topo, mode, res, remat)
            report = preflight.check(defaults.override(base, values), topo, model=model, programs=pending)
            print(preflight.format_report(report), flush=True)
            for p in report.programs:
                best[p.key] = (remat, p)
            pending = [k for k in pending if k not in best or not best[k][1].verdict.fits]
            if not pending:
                break
        cells = []
        for key in ("stage_a", "stage_b"):
            if key not in best:  # stage B needs stage A's train state, which could not be built
                cells.append("not built (stage A's train state does not fit)")
                continue
            remat, p = best[key]
            f = p.figures
            state = "fits" if p.verdict.fits else "does not fit"
            how = "compiler refused" if "RESOURCE_EXHAUSTED" in f.refused or "compiler" in f.refused else (
                "arguments alone" if f.refused else "")
            at_least = "≥ " if p.verdict.lower_bound else ""
            cells.append(f"{at_least}{f.peak / topology.GiB:.2f} ({remat}, {state}{', ' + how if how else ''})")
        minutes = (time.perf_counter() - started) / 60
        rows.append(f"| {model} | {mode} | {res}² | {name} ({topo.chips} chips, {topo.hosts} host"
                    f"{'s' * (topo.hosts > 1)}, {topo.hbm_bytes // topology.GiB} GiB) | {cells[0]} | {cells[1]} | "
                    f"{minutes:.1f} | `{command(config_file, topo, model, overrides(topo, mode, res, (best.get('stage_b') or best['stage_a'])[0]))}` |")
        print(rows[-1], flush=True)
    print("\n| model | training | resolution | slice | stage A GiB per chip (remat) | stage B GiB per chip (remat) "
          "| minutes | command |")
    print("|---|---|---|---|---|---|---|---|")
    print("\n".join(rows))


if __name__ == "__main__":
    app.run(main)

r"""Will a run fit a TPU slice? `python -m purecc_jax.compile_check --config=CONFIG --topology=SLICE`.

    python -m purecc_jax.compile_check --config=configs/flux_concept.py --topology=v5e-8
    python -m purecc_jax.compile_check --config=configs/sd35_concept.py --topology=v6e:2x4 \
        --config.stage_b.full_finetune=True --config.stage_a.full_finetune=True
    python -m purecc_jax.compile_check --config=configs/flux_concept.py --topology=v5e:4x4 --model=flux-schnell

Compiles the run's stage A step, stage B step and sampler with XLA:TPU for the slice (a Cloud TPU
accelerator type, v5e-8 / v6e-4 / v5p-8, or a chip grid, v5e:2x4 / v5p:2x2x2; several hosts are
compiled as one `--distributed` run), with the same --config.* overrides a run takes, and prints
per chip what each needs against the chip's HBM. Needs `libtpu` (requirements-test.txt), no TPU
and no weights: the architecture comes from --config.pretrained's config.json files, or from
--model. Exit status 0 when every program fits; 1 when one does not (after trying other settings,
--max_tries compiles, and naming those that fit); 2 when the command cannot run.
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Sequence
from pathlib import Path

from absl import app, flags
from ml_collections import config_flags

from purecc_jax import cli as cli_lib

_DEFAULT_CONFIG = str(Path(__file__).resolve().parent.parent / "configs" / "flux_concept.py")
EXIT_FITS, EXIT_DOES_NOT_FIT, EXIT_ERROR = 0, 1, 2


def make_flags(argv: Sequence[str]) -> flags.FlagValues:
    fv = flags.FlagValues()
    config_flags.DEFINE_config_file("config", _DEFAULT_CONFIG, "ml_collections config file of the run", flag_values=fv,
                                    lock_config=True, sys_argv=list(argv))
    flags.DEFINE_string("topology", None, "TPU slice: v5e-8, v6e-4, v5p-8, v4-8, or a chip grid v5e:2x4, v5p:2x2x2 "
                        "(required)", flag_values=fv)
    flags.DEFINE_string("model", None, "a preset architecture instead of --config.pretrained's folder: flux-dev, "
                        "flux-schnell, sd3.5-medium, sd3.5-large, sd3-medium (tiny ones for tests: flux-tiny, "
                        "sd3-tiny); default: the folder's when it can be read here, else flux-dev (sd3.5-medium "
                        "for config.model.backbone=sd3)", flag_values=fv)
    flags.DEFINE_float("hbm_gib", None, "judge against this many GiB per chip instead of the chip's HBM",
                       flag_values=fv)
    flags.DEFINE_integer("images", None, "concept images to size the cache for when --config.concept.path cannot "
                         "be read here (default 5)", flag_values=fv)
    flags.DEFINE_integer("max_tries", 4, "compiles the search for settings that fit may spend (0: no search)",
                         flag_values=fv)
    flags.DEFINE_list("programs", ["stage_a", "stage_b", "sampler"], "which of the run's programs to compile",
                      flag_values=fv)
    flags.DEFINE_enum("unit", "GiB", ["GiB", "MiB"], "unit of the table", flag_values=fv)
    flags.DEFINE_string("workdir", None, "ignored: taken so that a run's command line can be checked as it is",
                        flag_values=fv)
    return fv


def main(argv: Sequence[str], fv: flags.FlagValues) -> int:
    """Runs the parsed command line; returns the exit status."""
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {list(argv[1:])}")
    if not fv.topology:
        raise app.UsageError("--topology is required (e.g. --topology=v5e-8)")
    logging.getLogger("absl").setLevel(logging.WARNING)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    os.environ.setdefault("JAX_PLATFORMS", "cpu")  # the TPU compiler needs no TPU backend
    from purecc_jax import preflight, topology

    try:
        fits = preflight.run(fv.config, fv.topology, model=fv.model, images=fv.images, max_tries=fv.max_tries,
                             unit=fv.unit, hbm=None if fv.hbm_gib is None else round(fv.hbm_gib * topology.GiB),
                             programs=fv.programs)
    except (ValueError, FileNotFoundError) as e:
        print(f"compile_check: {e}", file=sys.stderr)
        return EXIT_ERROR
    return EXIT_FITS if fits else EXIT_DOES_NOT_FIT


def cli(argv: Sequence[str]) -> int:
    """The command line `argv` (program name first), in process; returns the exit status."""
    fv = make_flags(argv)
    return cli_lib.run_cli(fv, lambda rest: main(rest, fv), argv)


if __name__ == "__main__":
    _FLAGS = make_flags(sys.argv)
    app.run(lambda argv: sys.exit(main(argv, _FLAGS)), flags_parser=lambda argv: cli_lib.parse_flags(_FLAGS, argv))

r"""PureCC concept customization: `python -m purecc_jax.main --config=CONFIG --workdir=W`.

    --config=configs/toy_concept.py    the built-in toy world (no downloads; the default)
    --config=configs/flux_concept.py   FLUX.1-dev: set --config.pretrained and --config.concept.path
    --config=configs/sd35_concept.py   SD3.5-Medium (the paper's backbone), the same two settings

Any config value can be overridden on the command line (`--config.stage_b.steps=200`).
Re-running with the same workdir resumes where the run stopped; finished stages are skipped.
"""

from __future__ import annotations

import logging
import os
import signal
import sys
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from absl import app, flags
from ml_collections import config_flags

from purecc_jax import cli as cli_lib
from purecc_jax import paths

_DEFAULT_CONFIG = str(Path(__file__).resolve().parent.parent / "configs" / "toy_concept.py")


def make_flags(argv: Sequence[str]) -> flags.FlagValues:
    """This entry point's flags, in a registry of their own. The --config.* override flags are
    defined while parsing, from `argv`, so every command line gets a fresh registry."""
    fv = flags.FlagValues()
    config_flags.DEFINE_config_file("config", _DEFAULT_CONFIG, "ml_collections config file", flag_values=fv,
                                    lock_config=True, sys_argv=list(argv))
    flags.DEFINE_string("workdir", None, "where checkpoints, samples, logs and exports go (required)",
                        flag_values=fv)
    flags.DEFINE_bool("distributed", False, "multi-host run: call jax.distributed.initialize() first (on a TPU "
                      "slice or under SLURM it finds the other hosts itself)", flag_values=fv)
    flags.DEFINE_string("coordinator_address", None, "with --distributed elsewhere (GPU nodes): HOST:PORT of "
                        "process 0, the same on every process", flag_values=fv)
    flags.DEFINE_integer("num_processes", None, "with --coordinator_address: how many processes take part",
                         flag_values=fv)
    flags.DEFINE_integer("process_id", None, "with --coordinator_address: this process's rank, 0 .. "
                         "num_processes - 1", flag_values=fv)
    flags.DEFINE_bool("compilation_cache", True, "keep compiled XLA programs in WORKDIR/jax_cache, so a resumed "
                      "or repeated run skips recompiling", flag_values=fv)
    return fv


def run(config, workdir: str | Path) -> Any:
    """Runs the job a config describes: the toy world (configs/toy_concept.py, the default) or a training
    run (`train.run`); returns what it produced (the toy report, or the final stage)."""
    if config.get("toy") is not None:
        from purecc_jax.toyworld import experiment

        return experiment.run(config, workdir)
    from purecc_jax import train

    return train.run(config, workdir)


def compilation_cache(workdir: str | Path, several_processes: bool) -> None:
    """Keeps compiled programs in WORKDIR/jax_cache (only process 0 writes; every process reads).

    The JAX_* environment variables of the cache's minimum compile time and size, where set, win.
    jax writes an entry in place (no temporary file and rename) and locks its directory only when
    the cache has a size limit: a process reading an entry that process 0 is still writing would load
    half an executable. So several processes sharing a local (or NFS) workdir get a limit (64 GiB),
    and with it the lock; in a bucket an object appears whole, and no lock is needed.
    """
    import jax

    directory = paths.path(workdir) / "jax_cache"
    jax.config.update("jax_compilation_cache_dir", str(directory))
    if "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS" not in os.environ:
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 1.0)
    if several_processes and not paths.is_remote(directory) and "JAX_COMPILATION_CACHE_MAX_SIZE" not in os.environ:
        jax.config.update("jax_compilation_cache_max_size", 64 << 30)


def main(argv: Sequence[str], fv: flags.FlagValues) -> Any:
    """Runs the parsed command line (`fv` from `make_flags`); returns what `run` returns."""
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {list(argv[1:])}")
    if not fv.workdir:
        raise app.UsageError("--workdir is required")
    logging.getLogger("absl").setLevel(logging.WARNING)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    import jax

    if fv.distributed:
        jax.distributed.initialize(fv.coordinator_address, fv.num_processes, fv.process_id)
    elif fv.coordinator_address or fv.num_processes is not None or fv.process_id is not None:
        raise app.UsageError("--coordinator_address, --num_processes and --process_id need --distributed")
    if fv.compilation_cache:
        compilation_cache(fv.workdir, several_processes=fv.distributed)
    from purecc_jax.purecc import loop

    # SIGTERM (preemption, `kill`, a scheduler's stop): finish the current step, checkpoint it, exit.
    in_main_thread = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, loop.request_stop) if in_main_thread else None
    try:
        return run(fv.config, fv.workdir)
    finally:
        if in_main_thread:
            signal.signal(signal.SIGTERM, previous)


def cli(argv: Sequence[str]) -> Any:
    """The command line `argv` (program name first), in process: `cli(["main", "--workdir=w", ...])`."""
    fv = make_flags(argv)
    return cli_lib.run_cli(fv, lambda rest: main(rest, fv), argv)


EXIT_PREEMPTED = 128 + signal.SIGTERM  # what a shell reports for a process ended by SIGTERM


def _app_main(argv: Sequence[str], fv: flags.FlagValues) -> None:
    from purecc_jax.purecc import loop

    try:
        main(argv, fv)  # app.run exits with what its main returns: the run's result is not an exit status
    except loop.Preempted as e:
        logging.getLogger(__name__).error("%s", e)
        sys.exit(EXIT_PREEMPTED)


if __name__ == "__main__":
    _FLAGS = make_flags(sys.argv)
    app.run(lambda argv: _app_main(argv, _FLAGS), flags_parser=lambda argv: cli_lib.parse_flags(_FLAGS, argv))

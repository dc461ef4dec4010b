"""One process of tests/test_multihost.py and tests/test_gcs.py:

    python multihost_worker.py DEVICES INTERRUPT -- MAIN_ARGS...

Runs `purecc_jax.main` in process on DEVICES virtual CPU devices. It notes in WORKDIR/export_writers
which process wrote the export. INTERRUPT > 0 stops the run with an exception when stage B asks for
the batch of that step, as a kill would (every process at the same step).

XLA compiles with the suite's quick-compile flags (tests/fast_compile.py): compiling is most of
these tests' cost (the tiny model's steps take milliseconds). Every run the tests compare (one
process against two, stopped against resumed) is compiled alike.
"""

import os
import sys

devices, interrupt = int(sys.argv[1]), int(sys.argv[2])
assert sys.argv[3] == "--", sys.argv
from fast_compile import FAST_COMPILE  # noqa: E402  (this file's folder is on sys.path: it runs as a script)
os.environ["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices} {FAST_COMPILE}"
os.environ["JAX_PLATFORMS"] = "cpu"
# Every program into WORKDIR/jax_cache, not only those compiling for over a second (main's default):
# the rerun after the interruption then compiles nothing, in either process (process 0 writes, both read).
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import faulthandler  # noqa: E402
import logging  # noqa: E402
import signal  # noqa: E402

# a hung run: the test sends SIGUSR1 before killing it, and every thread's stack is printed
faulthandler.register(signal.SIGUSR1, all_threads=True)

import jax  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")


def write_cache_from_every_process() -> None:
    """Lets every process, not only process 0, write its compiled programs to the persistent cache.

    On CPU a program's cache key differs between processes (the topology fingerprint and the
    compile options name the process's own devices), so process 1 never finds what process 0
    wrote and, jax writing from process 0 alone, recompiled everything on the rerun after the
    interruption: a sixth of the test's time. The keys being distinct, each process writes its own
    entries (the cache's lock guards the directory). Numerics are unchanged: the rerun loads the
    executable the interrupted run compiled. Where jax's internals differ, nothing is patched.
    """
    from jax._src import compilation_cache, compiler

    if not hasattr(compiler, "_cache_write") or not hasattr(compilation_cache, "put_executable_and_time"):
        return

    def cache_write(cache_key, compile_time_secs, module_name, backend, executable, host_callbacks):
        if host_callbacks or compile_time_secs < jax.config.jax_persistent_cache_min_compile_time_secs:
            return
        compilation_cache.put_executable_and_time(cache_key, module_name, executable, backend, int(compile_time_secs))

    compiler._cache_write = cache_write


write_cache_from_every_process()

from purecc_jax import main, train  # noqa: E402

# the tests read "resumed from step N" from the loop's log
logging.basicConfig(level=logging.INFO, format="%(relativeCreated)7.0fms %(name)s: %(message)s", stream=sys.stdout, force=True)


class Interrupted(Exception):
    pass


if interrupt:
    original = train.Trainer.batch_fn

    def batch_fn(self, batch_size, seed):
        get = original(self, batch_size, seed)

        def batch(step):
            if seed == self.config.seed + 1 and step == interrupt:
                raise Interrupted(f"stage B interrupted at step {step}")
            return get(step)
        return batch

    train.Trainer.batch_fn = batch_fn

export = train.export


def recorded_export(stage, trainer, folder):
    """train.export, noting which process called it in WORKDIR/export_writers."""
    from purecc_jax import paths

    log = paths.AppendText(folder.parent / "export_writers")  # the workdir may be in a bucket
    log.write(f"{jax.process_index()}\n")
    log.close()
    return export(stage, trainer, folder)


train.export = recorded_export

try:
    main.cli(["main", *sys.argv[4:]])
except Interrupted as e:
    print(e, flush=True)
    sys.exit(3)

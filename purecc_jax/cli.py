"""What the command-line entry points share: each keeps its flags in its own `FlagValues`.

absl's global registry holds only absl's own flags (logging, verbosity). The entry points
(`main`, `sample`, `convert`, `evaluation.sweep`) define flags of the same names (--output,
--seed, --workdir, ...) and are imported into one process by tests and scripts, so each
has a private registry, parsed by `parse_flags` and run by `run_cli`, which leaves nothing
parsed behind: calling an entry point twice in one process behaves as two processes would.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Sequence
from typing import Any

from absl import app, flags


def parse_flags(fv: flags.FlagValues, argv: Sequence[str]) -> list[str]:
    """argv (program name first) → the positional arguments left; `fv` takes its flags, absl's own go to
    the global registry. --help prints `fv`'s flags; a bad flag exits with them."""
    argv = list(argv)
    if any(a in ("--help", "-h", "--helpshort", "--helpfull", "-?") for a in argv[1:]):
        print(fv.get_help())
        sys.exit(0)
    try:
        # The entry point's own flags first: another module in the process (a benchmark, in tests) may have
        # defined global flags of the same names (--topology, --model), which must not take their values.
        rest = fv(argv, known_only=True)
        return flags.FLAGS(rest)
    except flags.Error as e:
        sys.exit(f"{e}\n\n{fv.get_help()}")


def run_cli(fv: flags.FlagValues, main: Callable[[list[str]], Any], argv: Sequence[str]) -> Any:
    """Parses argv into `fv`, runs `main` on the positional arguments, and unparses `fv` again."""
    fv.unparse_flags()
    try:
        return main(parse_flags(fv, argv))
    finally:
        fv.unparse_flags()


def mesh_from_flag(sizes: Sequence[str] | None):
    """A --mesh=DATA,FSDP,TENSOR flag's value as a device mesh (None when the flag is unset)."""
    if not sizes:
        return None
    if len(sizes) != 3:
        raise app.UsageError(f"--mesh={','.join(sizes)} must give three sizes DATA,FSDP,TENSOR")
    from purecc_jax import sharding

    return sharding.make_mesh(*(int(x) for x in sizes))

"""Real Cloud TPU topologies on a machine without a TPU, and what their compiler says about a program.

With `libtpu` installed (requirements-test.txt pins the one `jax[tpu]` uses), XLA:TPU and Mosaic
compile for a TPU slice from any host:

    topo = tpu_topology("v5e-8")                    # or "v5e:2x4"; 8 chips, 1 host
    mesh = sharding.make_mesh(fsdp=8, devices=topo.devices)
    lowered = jax.jit(step, ...).lower(*abstract_inputs_sharded_on(mesh))
    compiled, figures = compile_and_measure(lowered)  # per-chip bytes from the TPU compiler
    print(format_table([("stage B step", figures, verdict(figures, topo.device_kind))]))

Names: Cloud TPU accelerator types (`v5e-8` or `v5litepod-8`, `v6e-4`, `v5p-8`, `v4-8`) or explicit
chip grids (`v5e:2x4`, `v6e:4x4`, `v5p:2x2x2`, `v4:2x2x1`). v5e and v6e types count chips; v4 and
v5p types count TensorCores, two per chip, so `v5p-8` is 4 chips (2x2x1). Hosts are laid out as
Cloud TPU lays them out: v5e/v6e slices of up to 8 chips on one host, larger ones on 4-chip hosts
(`v5e:4x4`: 16 chips, 4 processes); v4/v5p on 4-chip hosts (`v5p:2x2x2`: 8 chips, 2 processes).
"""

from __future__ import annotations

import dataclasses
import os
import re
import time
from collections.abc import Sequence

import jax

GiB = 1 << 30

# Accelerator-type spellings -> generation; the generation's name for libtpu, its grid rank, how
# many TensorCores its accelerator types count per chip, and the chips of its largest single host.
_ALIASES = {"v4": "v4", "v5p": "v5p", "v5e": "v5e", "v5litepod": "v5e", "v6e": "v6e"}
_GENERATIONS = {  # generation: (rank, cores counted per chip, chips on one host)
    "v4": (3, 2, 4),
    "v5p": (3, 2, 4),
    "v5e": (2, 1, 8),
    "v6e": (2, 1, 8),
}

# Per-chip HBM as Cloud TPU documents it, keyed by the device kind the TPU compiler reports (both
# spellings libtpu uses). The compiler's own usable limit is a little different (v5e 15.75 GiB,
# v6e 31.25, v4 30.75, v5p 95.74): a program over it is refused at compile time, see
# `compile_and_measure`.
_HBM_GIB = {
    "tpu v4": 32,
    "tpu v5 lite": 16, "tpu v5e": 16,
    "tpu v5": 95, "tpu v5p": 95,
    "tpu v6 lite": 32, "tpu v6e": 32,
}

_SLICE = re.compile(r"(?P<gen>[a-z0-9]+)-(?P<count>\d+)")
_GRID = re.compile(r"(?P<gen>[a-z0-9]+):(?P<grid>\d+(?:x\d+)+)")
# XLA:TPU's refusal, e.g. "... for HLO temporaries (24.06G) exceeds available HBM (15.75G)".
_OUT_OF_HBM = re.compile(r"RESOURCE_EXHAUSTED.*?\(([\d.]+)G\) exceeds available HBM \(([\d.]+)G\)", re.S)


@dataclasses.dataclass(frozen=True)
class Topology:
    """A TPU slice's compile-only devices and what the compiler says about its chips."""

    name: str  # as given, e.g. "v5e-8"
    generation: str  # "v4", "v5e", "v5p" or "v6e"
    grid: tuple[int, ...]  # chips along each axis, e.g. (2, 4)
    devices: tuple[jax.Device, ...]

    @property
    def chips(self) -> int:
        return len(self.devices)

    @property
    def hosts(self) -> int:
        """Processes (TPU VMs) the slice runs as; each device's `process_index` says which."""
        return len({d.process_index for d in self.devices})

    @property
    def device_kind(self) -> str:
        return self.devices[0].device_kind

    @property
    def hbm_bytes(self) -> int:
        return hbm_bytes(self.device_kind)

    def __str__(self) -> str:
        grid = "x".join(map(str, self.grid))
        plural = lambda n, noun: f"{n} {noun}" + "s" * (n > 1)
        return (f"{self.name} ({self.generation}:{grid}): {plural(self.chips, 'chip')} of {self.device_kind}, "
                f"{self.hbm_bytes / GiB:g} GiB HBM each, {plural(self.hosts, 'host')}")


def parse_topology(name: str) -> tuple[str, tuple[int, ...]]:
    """`"v5p-8"` -> `("v5p", (2, 2, 1))`, `"v5e:2x4"` -> `("v5e", (2, 4))`; no TPU library needed."""
    text = name.strip().lower()
    if m := _GRID.fullmatch(text):
        generation = _generation(m["gen"], name)
        grid = tuple(int(n) for n in m["grid"].split("x"))
        rank = _GENERATIONS[generation][0]
        if len(grid) != rank or 0 in grid:
            example = "2x2x1" if rank == 3 else "2x4"
            raise ValueError(f"TPU topology {name!r}: a {generation} grid has {rank} positive sizes, "
                             f"e.g. {generation}:{example}")
        return generation, grid
    if m := _SLICE.fullmatch(text):
        generation = _generation(m["gen"], name)
        rank, cores_per_chip, _ = _GENERATIONS[generation]
        count = int(m["count"])
        shapes = _slice_grids(rank)
        chips, remainder = divmod(count, cores_per_chip)
        if remainder or chips not in shapes:
            counted = "TensorCores (2 per chip)" if cores_per_chip == 2 else "chips"
            sizes = ", ".join(str(c * cores_per_chip) for c in shapes)
            raise ValueError(f"TPU topology {name!r}: {generation} slice names count {counted}; known sizes "
                             f"are {sizes}; name other grids explicitly, e.g. {generation}:"
                             + ("4x4x12" if rank == 3 else "4x8"))
        return generation, shapes[chips]
    raise ValueError(f"TPU topology {name!r} is neither a slice name (v5e-8, v6e-4, v5p-8, v4-8) "
                     "nor a chip grid (v5e:2x4, v5p:2x2x2)")


def tpu_topology(name: str) -> Topology:
    """The compile-only devices of a TPU slice, laid out over hosts as Cloud TPU lays them out.

    Needs `libtpu`; runs with JAX_PLATFORMS=cpu (the topology does not need a TPU backend).
    """
    generation, grid = parse_topology(name)
    rank, _, host_chips = _GENERATIONS[generation]
    chips = _product(grid)
    grid3 = grid + (1,) * (3 - rank)
    host_bounds = grid3 if chips <= host_chips else (2, 2, 1)
    if rank == 2:
        wrap = tuple(n == 16 for n in grid) + (False,)  # a full 16-chip pod axis is a ring
    else:
        wrap = (all(n % 4 == 0 for n in grid),) * 3  # whole 4x4x4 cubes are tori
    options = {"chips_per_host_bounds": host_bounds, "wrap": wrap}
    if generation == "v4":
        options["chip_config_name"] = "megacore"  # one device per chip, as JAX runs v4
    # Compiling never opens a chip, so another process holding libtpu's lock file (a test worker,
    # a CPU run in an environment with libtpu installed) must not stop this one.
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
    from jax.experimental import topologies

    topology_name = f"{generation}:{'x'.join(map(str, grid3 if rank == 3 else grid))}"
    try:
        devices = topologies.get_topology_desc(topology_name, platform="tpu", **options).devices
    except jax.errors.JaxRuntimeError as e:
        raise ValueError(f"TPU topology {name!r} ({topology_name}): libtpu refused it: {e}") from e
    return Topology(name=name, generation=generation, grid=grid, devices=tuple(devices))


def hbm_bytes(device_kind: str) -> int:
    """Per-chip HBM of a TPU generation, from the device kind the compiler reports."""
    gib = _HBM_GIB.get(device_kind.strip().lower())
    if gib is None:
        raise ValueError(f"no HBM size known for device kind {device_kind!r} "
                         f"(known: {', '.join(sorted(_HBM_GIB))})")
    return gib * GiB


@dataclasses.dataclass(frozen=True)
class CompileFigures:
    """Per-chip bytes of one compiled program, from XLA:TPU's buffer assignment.

    `peak` = argument + output - alias + temporary + generated_code: parameters and outputs are
    live for the whole program (an aliased output reuses its donated argument's buffer, so it
    counts once), temporaries are the compiler's scratch heap, and the program itself sits in HBM.
    MaxText's train_compile prints the same sum without the (few-MiB) generated code as its
    "Total memory size". `memory_analysis().peak_memory_in_bytes` is not used: with libtpu 0.0.42
    it came out up to 0.5% below this sum for programs with temporaries, and 56-60 MiB above it
    for programs with none.

    XLA:TPU itself refuses a program larger than the chip's usable HBM (RESOURCE_EXHAUSTED at
    compile time); then only its figure for the whole program is known: `peak` is that, the other
    fields None, and `refused` holds the compiler's message.

    `resident`: bytes of other arrays that stay on the chip while the program runs (a caller's
    knowledge, not the compiler's; 0 unless set), counted in `peak` by whoever sets it.
    """

    argument: int | None
    output: int | None
    alias: int | None
    temporary: int | None
    generated_code: int | None
    peak: int
    seconds: float = 0.0  # compile time
    refused: str = ""
    resident: int = 0


def measure(compiled: jax.stages.Compiled, seconds: float = 0.0) -> CompileFigures:
    """The figures of a compiled program (its `memory_analysis()`, per chip)."""
    m = compiled.memory_analysis()
    fields = dict(argument=m.argument_size_in_bytes, output=m.output_size_in_bytes, alias=m.alias_size_in_bytes,
                  temporary=m.temp_size_in_bytes, generated_code=m.generated_code_size_in_bytes)
    peak = fields["argument"] + fields["output"] - fields["alias"] + fields["temporary"] + fields["generated_code"]
    return CompileFigures(**fields, peak=peak, seconds=seconds)


def compile_and_measure(lowered: jax.stages.Lowered) -> tuple[jax.stages.Compiled | None, CompileFigures]:
    """Compiles `lowered` and measures it. A program the compiler refuses for want of HBM comes
    back as (None, figures with `refused` set), not as an error; other compile errors propagate."""
    start = time.perf_counter()
    try:
        compiled = lowered.compile()
    except jax.errors.JaxRuntimeError as e:
        m = _OUT_OF_HBM.search(str(e))
        if m is None:
            raise
        return None, CompileFigures(None, None, None, None, None, peak=round(float(m[1]) * GiB),
                                    seconds=time.perf_counter() - start, refused=str(e).splitlines()[0])
    return compiled, measure(compiled, time.perf_counter() - start)


@dataclasses.dataclass(frozen=True)
class Verdict:
    fits: bool
    peak: int
    hbm: int
    lower_bound: bool = False  # not compiled (refused): `peak` is the refusal's size or the arguments' alone

    def __str__(self) -> str:
        share = f"{self.peak / GiB:.2f} of {self.hbm / GiB:g} GiB ({100 * self.peak / self.hbm:.0f}%)"
        if self.lower_bound:
            return f"DOES NOT FIT: at least {share}"
        return f"fits: {share}" if self.fits else f"DOES NOT FIT: {share}"


def verdict(figures: CompileFigures, device_kind: str | None = None, hbm: int | None = None) -> Verdict:
    """Whether a program fits one chip: its peak against the chip's HBM (by device kind), or
    against `hbm` bytes when given. A program the compiler refused (or that was not compiled because
    its arguments alone are over) never fits, and its size is a lower bound of what it needs."""
    if hbm is None:
        if device_kind is None:
            raise ValueError("verdict needs the chip's device_kind or an hbm size in bytes")
        hbm = hbm_bytes(device_kind)
    refused = bool(figures.refused)
    return Verdict(fits=not refused and figures.peak <= hbm, peak=figures.peak, hbm=hbm, lower_bound=refused)


def format_table(rows: Sequence[tuple[str, CompileFigures, Verdict]], unit: str = "GiB") -> str:
    """A fixed-width table per chip, in GiB or MiB: program, arguments, outputs, aliased,
    temporaries, generated code, resident (a column only when some row has it), peak, compile
    seconds, verdict."""
    scale = {"GiB": GiB, "MiB": 1 << 20}[unit]
    columns = ("arguments", "outputs", "aliased", "temporaries", "code")
    columns += ("resident",) * any(f.resident for _, f, _ in rows) + ("peak",)
    header = ("program", *(f"{c} {unit}" for c in columns), "compile s", "verdict")
    size = lambda n: "-" if n is None else f"{n / scale:.2f}"
    lines = [header]
    for name, f, v in rows:
        sizes = [f.argument, f.output, f.alias, f.temporary, f.generated_code] + [f.resident] * ("resident" in columns)
        note = "" if not f.refused else " (compiler refused)" if "RESOURCE_EXHAUSTED" in f.refused else f" ({f.refused})"
        lines.append((name, *map(size, sizes), size(f.peak), f"{f.seconds:.1f}", str(v) + note))
    widths = [max(len(line[i]) for line in lines) for i in range(len(header) - 1)]
    return "\n".join("  ".join([c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(line, widths))]
                               + [line[-1]]) for line in lines)


def _generation(spelling: str, name: str) -> str:
    if spelling not in _ALIASES:
        raise ValueError(f"TPU topology {name!r}: unknown generation {spelling!r} "
                         f"(known: {', '.join(sorted(_ALIASES))})")
    return _ALIASES[spelling]


def _slice_grids(rank: int) -> dict[int, tuple[int, ...]]:
    """Chip count -> grid of Cloud TPU's standard slices: v5e/v6e 1x1, 2x2, 2x4, ... 16x16;
    v4/v5p 2x2x1, 2x2x2, 2x2x4, 2x4x4, 4x4x4, ... 16x16x16 (the last smallest axis doubles)."""
    if rank == 2:
        grids, grid = [(1, 1)], (2, 2)
        while _product(grid) <= 256:
            grids.append(grid)
            grid = (grid[0], grid[1] * 2) if grid[0] == grid[1] else (grid[0] * 2, grid[1])
    else:
        grids, grid = [], (2, 2, 1)
        while _product(grid) <= 4096:
            grids.append(grid)
            smallest = max(i for i, n in enumerate(grid) if n == min(grid))
            grid = tuple(n * 2 if i == smallest else n for i, n in enumerate(grid))
    return {_product(g): g for g in grids}


def _product(grid: Sequence[int]) -> int:
    out = 1
    for n in grid:
        out *= n
    return out

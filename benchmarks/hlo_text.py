"""Reading XLA's optimised HLO text: computations, instruction shapes, dot FLOPs (no flags, importable anywhere)."""

from __future__ import annotations

import math
import re


def computations(hlo: str) -> dict[str, str]:
    """Body text of every computation in an HLO module's text, by name."""
    return {m.group(1).lstrip("%"): m.group(2)
            for m in re.finditer(r"^(%?[\w.\-]+) .*?\{\n(.*?)\n\}", hlo, re.S | re.M)}


def dot_shapes(text: str) -> list[list[int]]:
    """Result shapes of the dots in an HLO text."""
    return [[int(d) for d in s.split(",") if d] for s in re.findall(r"= f\d+\[([\d,]*)\]\S* dot\(", text)]


def instruction_shapes(hlo: str) -> dict[str, list[int]]:
    """Dimensions of every array-valued instruction of an HLO module's text, by name (names are module-unique)."""
    return {m.group(1): [int(d) for d in m.group(2).split(",") if d]
            for m in re.finditer(r"^\s*(?:ROOT )?%?([\w.\-]+) = \w+\[([\d,]*)\]", hlo, re.M)}


def dot_flops(text: str, shapes: dict[str, list[int]]) -> float:
    """Multiply-adds x 2 of the dots in an HLO text: 2 x output elements x contracted size."""
    total = 0.0
    for out, lhs, dims in re.findall(r"= \w+\[([\d,]*)\]\S* dot\(%?([\w.\-]+), .*?lhs_contracting_dims=\{([\d,]*)\}",
                                     text):
        lhs_dims = shapes.get(lhs)
        if lhs_dims is None:
            raise ValueError(f"dot operand {lhs!r}: no array instruction of that name in the HLO")
        total += 2.0 * math.prod(int(d) for d in out.split(",") if d) * math.prod(
            lhs_dims[int(c)] for c in dims.split(",") if c)
    return total


def instructions(hlo: str) -> dict[str, tuple[str, str, str]]:
    """(result shape, opcode, rest of the line) of every instruction of an HLO module's text, by name: one pass
    over the text (an unrolled model's HLO runs to 15 MB and thousands of operations)."""
    return {m.group(1): m.group(2, 3, 4)
            for m in re.finditer(r"^\s*(?:ROOT )?%?([\w.\-]+) = (\S+) ([\w\-]+)\((.*)$", hlo, re.M)}


def instruction(name: str, index: dict[str, tuple[str, str, str]],
                comps: dict[str, str]) -> tuple[str, str, str] | None:
    """(result shape, opcode, text) of one operation of the module (`index`: `instructions(hlo)`): a fusion's
    text is its computation's body, any other operation's its own line."""
    found = index.get(name)
    if found is None:
        return None
    shape, opcode, rest = found
    called = re.search(r"calls=%?([\w.\-]+)", rest)
    return shape, opcode, comps.get(called.group(1), "") if called else f"{name} = {shape} {opcode}({rest}"

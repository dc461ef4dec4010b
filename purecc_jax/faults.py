"""Fault injection for the reliability tests: a process signals itself at a named point.

With `PURECC_TEST_KILL_AT=<point>` set, the process sends itself `PURECC_TEST_KILL_SIGNAL`
(`KILL` by default, or `TERM`) when it reaches `<point>`. The points:

    <stage>:step:<n>          after step n, before any checkpoint of step n
    <stage>:checkpoint:<n>    right after the checkpoint of step n started writing (async)
    write:<file name>         half-way through writing a safetensors file (exports)

Unset (always, outside the tests), `point` is a dictionary lookup and nothing else.
"""

from __future__ import annotations

import os
import signal

KILL_AT = "PURECC_TEST_KILL_AT"
KILL_SIGNAL = "PURECC_TEST_KILL_SIGNAL"


def point(name: str) -> None:
    """Signals this process if `PURECC_TEST_KILL_AT` names `name`."""
    if os.environ.get(KILL_AT) == name:
        os.kill(os.getpid(), getattr(signal, "SIG" + os.environ.get(KILL_SIGNAL, "KILL")))

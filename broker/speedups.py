"""The optional C speedups: which are built and in use.

A speedup is a C twin of one hot Python loop: the common case of client frames
(`broker/wire/_speedups.c`), fan-out's appends (`broker/pubsub/_speedups.c`), and the
end-of-iteration flush with the write-through of a lone read's deliveries
(`broker/net/_speedups.c`). `pip install` builds them when a C
compiler is there and skips them otherwise; the broker then runs the Python twins, which stay
the reference (the tests run both and compare). BROKER_NO_SPEEDUPS=1 in the environment turns
them off, to measure what they give or to rule them out. docs/design.md "C speedups"."""

from __future__ import annotations

import importlib
import os
from types import ModuleType

DISABLE = "BROKER_NO_SPEEDUPS"
# What each speeds up, and its module.
MODULES = {
    "frames": "broker.wire._speedups",
    "fan-out": "broker.pubsub._speedups",
    "flush and write-through": "broker.net._speedups",
}


def disabled() -> bool:
    """True when BROKER_NO_SPEEDUPS asks for the Python twins."""
    return os.environ.get(DISABLE, "") not in ("", "0")


def load(name: str) -> ModuleType | None:
    """The speedup module `name`, or None when it is not built or turned off."""
    if disabled():
        return None
    try:
        return importlib.import_module(name)
    except ImportError:
        return None


def status() -> dict[str, bool]:
    """What each speedup speeds up, and whether it is in use (for the startup log)."""
    return {what: load(name) is not None for what, name in MODULES.items()}

"""The optional C speedups: which are built and in use.

A speedup is a C twin of one hot Python loop: fan-out's appends (`broker/pubsub/_speedups.c`)
and the end-of-iteration flush (`broker/net/_speedups.c`). `pip install` builds them when a C
compiler is there and skips them otherwise; the broker then runs the Python twins, which stay
the reference (the tests run both and compare). BROKER_NO_SPEEDUPS=1 in the environment turns
them off, to measure what they give or to rule them out. docs/design.md "C speedups"."""

from __future__ import annotations

import importlib
import os
from types import ModuleType

DISABLE = "BROKER_NO_SPEEDUPS"
MODULES = ("broker.pubsub._speedups", "broker.net._speedups")


def load(name: str) -> ModuleType | None:
    """The speedup module `name`, or None when it is not built or turned off."""
    if os.environ.get(DISABLE, "") not in ("", "0"):
        return None
    try:
        return importlib.import_module(name)
    except ImportError:
        return None


def status() -> dict[str, bool]:
    """Each speedup module and whether it is in use (for the startup log and /stats)."""
    return {name.rsplit(".", 2)[-2]: load(name) is not None for name in MODULES}

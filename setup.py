"""The optional C speedups (everything else is in pyproject.toml).

Each extension has a pure-Python twin that the broker uses when the extension is not built
(`optional=True`: no compiler, or BROKER_NO_SPEEDUPS=1 at run time); docs/design.md "C speedups"."""

from setuptools import Extension, setup

setup(
    ext_modules=[
        Extension("broker.wire._speedups", ["broker/wire/_speedups.c"], optional=True),
        Extension(
            "broker.pubsub._speedups",
            ["broker/pubsub/_speedups.c"],
            depends=["broker/_slots.h"],
            optional=True,
        ),
        Extension(
            "broker.net._speedups",
            ["broker/net/_speedups.c"],
            depends=["broker/_slots.h"],
            optional=True,
        ),
    ]
)

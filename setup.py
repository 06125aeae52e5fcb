"""Build hook for the one C extension (``sniff/_shipper.c``); everything else is in
pyproject.toml. ``optional=True``: without a C compiler sniff installs and runs on
the pure-Python path (``sniff.capture_proc.CaptureShipper.raw_shipper``)."""

from setuptools import Extension, setup

setup(
    ext_modules=[
        Extension("sniff._shipper", ["sniff/_shipper.c"], optional=True, extra_compile_args=["-O2"])
    ]
)

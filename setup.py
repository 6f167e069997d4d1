"""Only the optional C kernel lives here; everything else is in pyproject.toml.

The extension is optional: where it cannot be built, merges use the numpy
fallback in adapterhub_local/merge/cast.py, which gives identical bits.
"""

from setuptools import Extension, setup

setup(
    ext_modules=[
        Extension("adapterhub_local._kernels", ["adapterhub_local/_kernels.c"],
                  extra_compile_args=["-O3"], optional=True),
    ],
)

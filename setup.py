"""Optional ahead-of-time build of the C++ kernels.

The kernels are JIT-compiled with ninja on first use, so a plain ``pip install .`` needs no compiler.
To build them ahead of time (same torch as at run time):

    PEFTMED_BUILD_EXT=1 pip install --no-build-isolation -e .

(``--no-build-isolation`` keeps pip from pulling a second torch with GBs of CUDA wheels.)
"""

import os

from setuptools import setup

ext_modules, cmdclass = [], {}
if os.environ.get("PEFTMED_BUILD_EXT") == "1":
    from peftmed_build import extensions  # noqa: F401  (provided by the kernels package when present)

    ext_modules, cmdclass = extensions()

setup(ext_modules=ext_modules, cmdclass=cmdclass)

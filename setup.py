"""Optional ahead-of-time build of the C++ (and, with a CUDA torch, CUDA) kernels in peftmed/kernels/csrc/.

The kernels are JIT-compiled with ninja on first use from the sources the package ships (a wheel
carries them as package data), so a plain ``pip install .`` needs no compiler until first use.
To build them ahead of time (against the torch installed now, which must be the one used at run time):

    PEFTMED_BUILD_EXT=1 pip install --no-build-isolation -e .

(``--no-build-isolation`` keeps pip from pulling a second torch with GBs of CUDA wheels.) The built
modules land in peftmed/kernels/_ext/ and are imported instead of JIT-building; the extension table
is peftmed/kernels/build.py's, loaded by path so that setup.py does not import peftmed itself.
"""

import importlib.util
import os
from pathlib import Path

from setuptools import setup

ext_modules, cmdclass = [], {}
if os.environ.get("PEFTMED_BUILD_EXT") == "1":
    spec = importlib.util.spec_from_file_location(
        "peftmed_kernels_build", Path(__file__).resolve().parent / "peftmed" / "kernels" / "build.py")
    build = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(build)
    ext_modules, cmdclass = build.setup_extensions()

setup(ext_modules=ext_modules, cmdclass=cmdclass)

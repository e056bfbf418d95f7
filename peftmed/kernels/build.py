"""Compiling the C++/CUDA kernels in ``csrc/``: on first use with ninja, or ahead of time in setup.py.

JIT builds go to a cache folder per peftmed version, torch version, Python version, CUDA version
and CPU (the C++ is compiled with ``-march=native``), so upgrading any of them rebuilds instead of
loading a stale binary; inside it, one folder per extension and hash of its sources (every file of
``csrc/`` it can include, and the flags):

    $PEFTMED_KERNEL_CACHE (default ~/.cache/peftmed/kernels)/peftmed0.1.0-torch2.13.0-py311-cpu-<cpu>/<name>-<hash>/

The sources are compiled from a copy in that folder (``src/``), never from the checkout: ninja records the
absolute paths it compiled, so another checkout (or a moved one) of the same sources finds the same paths and
loads the cached build instead of rebuilding it (85 s).

A failed build leaves the compiler output in ``build.log`` in that folder; :class:`BuildError` names
the log and the compiler's first error line.

Builds of one folder are serialised by an advisory lock (``flock`` on ``.peftmed-build.lock``) that the
kernel releases when its holder dies. torch's own ``lock`` file is not released that way: a build killed
mid-way (a timeout, kill -9) leaves it, and torch then waits on it forever. Holding our lock, nobody else is
building, so a ``lock`` file found then is stale and is removed (with a warning) before torch runs.

setup.py loads this file by path (without importing peftmed) and calls :func:`setup_extensions`;
this module therefore imports nothing from peftmed at top level but the version (which only names the JIT cache),
and reads the op folders' extension tables by path.
"""

from __future__ import annotations

import ast
import hashlib
import importlib
import logging
import os
import sys
import threading
from pathlib import Path

try:
    from .. import __version__
except ImportError:  # loaded by path from setup.py, before peftmed is installed: no JIT cache is named there
    __version__ = "unknown"

log = logging.getLogger("peftmed.kernels.build")

# the C++/CUDA sources ship inside the package (package data), so an installed wheel builds them too
CSRC = Path(__file__).resolve().parent / "csrc"
# -fopenmp, not just -fopenmp-simd: without it ATen's at::parallel_for (a header template) compiles to a
# serial loop. The extension then uses the libgomp torch has already loaded (same soname).
CXX_FLAGS = ["-O3", "-march=native", "-mprefer-vector-width=512", "-fopenmp"]
NVCC_FLAGS = ["-O3", "--use_fast_math", "-lineinfo"]

OPS = ("lora_linear", "layer_norm", "prefix_attention")  # the built-in ops: one folder each


def _op_extensions() -> dict[str, dict]:
    """Every op's ``<op>/extensions.py``, read by path as a literal (this module may be loaded without its package,
    and the table is plain data: nothing in it is run)."""
    table: dict[str, dict] = {}
    for op in OPS:
        path = Path(__file__).resolve().parent / op / "extensions.py"
        tree = ast.parse(path.read_text(), str(path))
        value = next(node.value for node in tree.body if isinstance(node, ast.Assign)
                     and any(isinstance(t, ast.Name) and t.id == "EXTENSIONS" for t in node.targets))
        table.update({name: {"op": op, **spec} for name, spec in ast.literal_eval(value).items()})
    return table


# The table of compiled extensions, gathered from the op folders that declare them: the JIT build, the AOT build
# (setup.py, PEFTMED_BUILD_EXT=1) and `peftmed kernels --build` all read it.
EXTENSIONS: dict[str, dict] = _op_extensions()
AOT_PACKAGE = "peftmed.kernels._ext"  # setup.py builds peftmed/kernels/_ext/<name>.so


class BuildError(RuntimeError):
    """A C++/CUDA extension failed to compile; ``log_path`` has the whole compiler output."""

    def __init__(self, name: str, log_path: Path, first_error: str):
        self.name, self.log_path, self.first_error = name, log_path, first_error
        super().__init__(f"building extension {name!r} failed: {first_error} (full log: {log_path})")


def _cpu_tag() -> str:
    try:
        text = Path("/proc/cpuinfo").read_text()
        flags = next((ln for ln in text.splitlines() if ln.startswith(("flags", "Features"))), "")
    except OSError:
        import platform

        flags = platform.processor()
    return hashlib.sha1(flags.encode()).hexdigest()[:8]


def cache_root() -> Path:
    """The per-version folder the JIT builds go to."""
    import torch


    base = Path(os.environ.get("PEFTMED_KERNEL_CACHE") or Path.home() / ".cache" / "peftmed" / "kernels")
    cuda = f"cu{torch.version.cuda.replace('.', '')}" if torch.version.cuda else "cpu"
    tag = f"peftmed{__version__}-torch{torch.__version__.split('+')[0]}-py{sys.version_info[0]}{sys.version_info[1]}-{cuda}-{_cpu_tag()}"
    return base / tag


def first_error_line(output: str) -> str:
    """The compiler's first error line (what a user needs to see), else the output's last line."""
    lines = [ln.strip() for ln in output.splitlines() if ln.strip()]
    for ln in lines:
        if "error" in ln.lower() and not ln.lower().startswith(("ninja: build stopped", "subprocess")):
            return ln
    return lines[-1] if lines else "(no compiler output)"


def can_compile(cuda: bool = False) -> tuple[bool, str]:
    """Whether this machine has what a JIT build needs (checked without compiling)."""
    import shutil

    import torch

    if cuda:
        if torch.version.cuda is None:
            return False, f"this torch ({torch.__version__}) is a CPU build and cannot build CUDA extensions"
        if not torch.cuda.is_available():
            return False, "no CUDA device"
    if shutil.which(os.environ.get("CXX", "c++")) is None:
        return False, "no C++ compiler on PATH (set CXX)"
    try:
        from torch.utils.cpp_extension import verify_ninja_availability

        verify_ninja_availability()
    except RuntimeError:
        return False, "ninja is not installed (pip install ninja)"
    return True, ""


def _source_files(csrc: Path) -> list[Path]:
    """Every file an extension can compile or include: csrc/'s C++, CUDA and header files."""
    return sorted(p for p in csrc.rglob("*") if p.is_file() and p.suffix in (".cpp", ".cu", ".cuh", ".h", ".hpp"))


def source_key(name: str, csrc: Path | None = None) -> str:
    """16 hex digits of a hash of the extension's name, flags and csrc/'s sources (their relative paths and
    bytes): the same for two checkouts of the same sources, different after any edit."""
    csrc = csrc or CSRC
    digest = hashlib.sha256(repr((name, EXTENSIONS[name], CXX_FLAGS, NVCC_FLAGS)).encode())
    for path in _source_files(csrc):
        digest.update(str(path.relative_to(csrc)).encode() + b"\0" + path.read_bytes() + b"\0")
    return digest.hexdigest()[:16]


def build_folder(name: str, csrc: Path | None = None) -> Path:
    """Where extension ``name`` of these sources is built and cached."""
    return cache_root() / f"{name}-{source_key(name, csrc)}"


def _staged_sources(name: str, build_dir: Path, csrc: Path | None = None) -> Path:
    """A copy of csrc/ inside ``build_dir`` (written once, atomically), from which the extension compiles."""
    import shutil
    import tempfile

    csrc = csrc or CSRC
    staged = build_dir / "src"
    if staged.is_dir():
        return staged
    tmp = Path(tempfile.mkdtemp(prefix=".src-", dir=build_dir))
    for path in _source_files(csrc):
        target = tmp / path.relative_to(csrc)
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(path, target)
    try:
        os.replace(tmp, staged)
    except OSError:  # another process staged it first: theirs is the same bytes
        shutil.rmtree(tmp, ignore_errors=True)
    return staged


def last_failure(name: str) -> str | None:
    """The first error of this extension's last failed JIT build (any process), if it has not built since
    (a failure of other sources does not count: the key changes with them)."""
    try:
        log_file = build_folder(name) / "build.log"
        if not log_file.is_file():
            return None
        return (f"last build failed: {first_error_line(log_file.read_text())} (full log: {log_file}; "
                f"`peftmed kernels --build` retries)")
    except OSError:  # an unreadable cache is the same as no record
        return None


def extension_status(name: str) -> tuple[bool, str]:
    """Can extension ``name`` run here (cheap: no compiling)? For KernelImpl.check and `peftmed kernels`."""
    ok, why = can_compile(cuda=EXTENSIONS[name]["cuda"])
    if not ok:
        return ok, why
    failure = last_failure(name)
    return (False, failure) if failure else (True, "")


_modules: dict[str, object] = {}
_lock = threading.Lock()


def forget_failure(name: str) -> None:
    """Drop the record of a failed build so that the next use compiles again."""
    (build_folder(name) / "build.log").unlink(missing_ok=True)


def load_extension(name: str):
    """Import the AOT-built extension ``name`` if setup.py built it, else JIT-build it (cached)."""
    with _lock:
        if name in _modules:
            return _modules[name]
        try:
            module = importlib.import_module(f"{AOT_PACKAGE}.{name}")
        except ImportError:
            module = _jit_build(name)
        _modules[name] = module
        return module


class _BuildLock:
    """Exclusive advisory lock on a build folder (released by the kernel if the holder dies); inside it, a
    torch ``lock`` file left by a killed build is removed."""

    def __init__(self, build_dir: Path):
        self.build_dir = build_dir
        self.fd: int | None = None

    def __enter__(self):
        import fcntl

        self.fd = os.open(self.build_dir / ".peftmed-build.lock", os.O_RDWR | os.O_CREAT, 0o644)
        fcntl.flock(self.fd, fcntl.LOCK_EX)
        stale = self.build_dir / "lock"
        if stale.exists():
            log.warning("removing %s, left by a build that was stopped before it finished", stale)
            stale.unlink(missing_ok=True)
        return self

    def __exit__(self, *exc):
        import fcntl

        if self.fd is not None:
            fcntl.flock(self.fd, fcntl.LOCK_UN)
            os.close(self.fd)
            self.fd = None


def _jit_build(name: str):
    build_dir = build_folder(name)
    build_dir.mkdir(parents=True, exist_ok=True)
    with _BuildLock(build_dir):
        return _jit_build_locked(name, build_dir)


def _jit_build_locked(name: str, build_dir: Path):
    import torch.utils.cpp_extension as cpp_ext

    spec = EXTENSIONS[name]
    staged = _staged_sources(name, build_dir)
    sources = [str(staged / s) for s in spec["sources"]]
    log_path = build_dir / "build.log"
    fresh = not any(build_dir.glob("*.so"))
    if fresh:
        log.info("compiling %s (first use; about 40 s; cached in %s)", name, build_dir)
    try:
        module = cpp_ext.load(
            name=f"peftmed_{name}", sources=sources, build_directory=str(build_dir),
            extra_cflags=CXX_FLAGS, extra_ldflags=[] if spec["cuda"] else ["-fopenmp"], extra_cuda_cflags=NVCC_FLAGS,
            extra_include_paths=[str(staged)] if spec["cuda"] else None, verbose=False,
        )
    except Exception as exc:  # ninja/compiler failure: keep the whole output, surface the first error
        output = str(exc)
        ninja_log = build_dir / ".ninja_log"
        log_path.write_text(output + (f"\n(ninja log: {ninja_log})" if ninja_log.exists() else ""))
        raise BuildError(name, log_path, first_error_line(output)) from exc
    log_path.unlink(missing_ok=True)  # a success clears the record of an earlier failure
    return module


def setup_extensions():
    """setup.py's ahead-of-time build: (ext_modules, cmdclass) for the extensions this torch can build."""
    import torch
    from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension

    root = Path("peftmed") / "kernels" / "csrc"  # setup.py runs from the repository root; setuptools wants
    include = [str(root)]                          # relative paths
    ext_modules = []
    for name, spec in EXTENSIONS.items():
        sources = [str(root / s) for s in spec["sources"]]
        if spec["cuda"]:
            if torch.version.cuda is None:
                continue  # a CPU torch cannot build CUDA extensions
            ext_modules.append(CUDAExtension(f"{AOT_PACKAGE}.{name}", sources, include_dirs=include,
                                             extra_compile_args={"cxx": ["-O3"], "nvcc": NVCC_FLAGS}))
        else:
            # no -march=native here: a wheel may run on another CPU
            ext_modules.append(CppExtension(f"{AOT_PACKAGE}.{name}", sources, include_dirs=include,
                                            extra_compile_args=["-O3", "-fopenmp"], extra_link_args=["-fopenmp"]))
    return ext_modules, {"build_ext": BuildExtension}

"""layer_norm's compiled extensions: the sources each is built from (relative to peftmed/kernels/csrc/).

Plain data, no imports: setup.py's ahead-of-time build reads it by path (through build.py) before peftmed is
installed. The JIT build, the AOT build and `peftmed kernels --build` all read it (build.EXTENSIONS).
"""

EXTENSIONS = {
    "layer_norm_cpu": {"sources": ["layer_norm/layer_norm.cpp"], "cuda": False},
    "layer_norm_cuda": {"sources": ["layer_norm/layer_norm_cuda.cpp", "layer_norm/layer_norm.cu"], "cuda": True},
}

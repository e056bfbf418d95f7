"""prefix_attention's compiled extension: the sources it is built from (relative to peftmed/kernels/csrc/).

Plain data, no imports: setup.py's ahead-of-time build reads it by path (through build.py) before peftmed is
installed. The JIT build, the AOT build and `peftmed kernels --build` all read it (build.EXTENSIONS).
"""

EXTENSIONS = {
    "prefix_attention_cuda": {
        "sources": ["prefix_attention/prefix_attention_cuda.cpp", "prefix_attention/prefix_attention.cu"],
        "cuda": True,
    },
}

"""lora_linear's compiled extensions: the sources each is built from (relative to peftmed/kernels/csrc/).

Plain data, no imports: setup.py's ahead-of-time build reads it by path (through build.py) before peftmed is
installed. The JIT build, the AOT build and `peftmed kernels --build` all read it (build.EXTENSIONS).
"""

EXTENSIONS = {
    "lora_linear_cpu": {"sources": ["lora_linear/lora_linear.cpp"], "cuda": False},
    "lora_linear_cuda": {"sources": ["lora_linear/lora_linear_cuda.cpp", "lora_linear/lora_linear.cu"], "cuda": True},
}

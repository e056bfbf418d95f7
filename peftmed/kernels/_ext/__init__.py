"""Ahead-of-time builds of the C++/CUDA kernels land here (setup.py with PEFTMED_BUILD_EXT=1)."""

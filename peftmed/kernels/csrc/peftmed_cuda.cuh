// Helpers shared by peftmed's .cu files. Plain CUDA only (no c10/cuda or ATen/cuda headers), so the
// kernels compile-check with `nvcc -c` on a machine whose torch has no CUDA.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <cstdint>

namespace peftmed {

// dtype codes the bindings pass in (0: fp32, 1: fp16, 2: bf16)
enum DType : int { kF32 = 0, kF16 = 1, kBF16 = 2 };

__device__ __forceinline__ float to_f(float v) { return v; }
__device__ __forceinline__ float to_f(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_f(__nv_bfloat16 v) { return __bfloat162float(v); }

template <typename T> __device__ __forceinline__ T from_f(float v);
template <> __device__ __forceinline__ float from_f<float>(float v) { return v; }
template <> __device__ __forceinline__ __half from_f<__half>(float v) { return __float2half(v); }
template <> __device__ __forceinline__ __nv_bfloat16 from_f<__nv_bfloat16>(float v) { return __float2bfloat16(v); }

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) v += __shfl_xor_sync(0xffffffffu, v, off);
  return v;
}

// sum over the block; every thread gets the result. `shared` holds >= 32 floats.
__device__ __forceinline__ float block_sum(float v, float* shared) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, warps = (blockDim.x + 31) >> 5;
  v = warp_sum(v);
  __syncthreads();  // shared may still be read by a previous call
  if (lane == 0) shared[warp] = v;
  __syncthreads();
  v = lane < warps ? shared[lane] : 0.f;
  return warp_sum(v);
}

// the dropout hash of peftmed/kernels/dropout.py
__device__ __forceinline__ uint32_t mix32(uint32_t h) {
  h ^= h >> 16;
  h *= 0x7feb352dU;
  h ^= h >> 15;
  h *= 0x846ca68bU;
  h ^= h >> 16;
  return h;
}

__device__ __forceinline__ uint32_t row_key(uint32_t key, int64_t row) { return mix32(static_cast<uint32_t>(row) ^ key); }

__device__ __forceinline__ bool keep(uint32_t rk, int64_t col, uint32_t threshold) {
  return (mix32(rk + static_cast<uint32_t>(col) * 0x9E3779B1U) >> 8) >= threshold;
}

}  // namespace peftmed

// instantiate LAUNCH(T) for the dtype code `code`
#define PEFTMED_DISPATCH(code, LAUNCH)                   \
  switch (code) {                                        \
    case peftmed::kF32: LAUNCH(float); break;            \
    case peftmed::kF16: LAUNCH(__half); break;           \
    case peftmed::kBF16: LAUNCH(__nv_bfloat16); break;   \
    default: return cudaErrorInvalidValue;               \
  }

// lora_linear on CUDA: the parts cuBLAS cannot fuse, i.e. everything that touches the dropout mask.
// The dense products (x W^T with the bias and the rank-r LoRA term folded in by addmm, dy W, dB)
// are cuBLAS calls made by lora_linear_cuda.cpp; the mask is never stored: each kernel below
// regenerates it from (seed, row, col) with the hash of peftmed/kernels/dropout.py.
//
//   dropout_down:  xa (T, r) = (x * mask) A^T                   one block per row, r in tiles of 16
//   dropout_dx:    dx (T, in) += mask * (gs A)                  one thread per column, rows strided over
//                                                               gridDim.y (at most 65,535 blocks on y)
//   dropout_da:    partial[split] (r, in) = gs^T (x * mask)     fp32 partials, summed by the caller
//
// Plain CUDA only (see peftmed_cuda.cuh) so `nvcc -c` checks it without a CUDA torch.

#include <algorithm>

#include "peftmed_cuda.cuh"

namespace {

using namespace peftmed;

constexpr int R_TILE = 16;
constexpr int64_t kMaxGridY = 65535;

template <typename T>
__global__ void dropout_down_kernel(const T* __restrict__ x, const T* __restrict__ a, T* __restrict__ xa, int64_t rows,
                                    int64_t in, int r, uint32_t key, uint32_t threshold, float scale) {
  __shared__ float shared[32];
  const int64_t t = blockIdx.x;
  if (t >= rows) return;
  const uint32_t rk = row_key(key, t);
  const T* xr = x + t * in;
  for (int r0 = 0; r0 < r; r0 += R_TILE) {
    float acc[R_TILE];
#pragma unroll
    for (int j = 0; j < R_TILE; ++j) acc[j] = 0.f;
    for (int64_t i = threadIdx.x; i < in; i += blockDim.x) {
      const float v = keep(rk, i, threshold) ? to_f(xr[i]) * scale : 0.f;
#pragma unroll
      for (int j = 0; j < R_TILE; ++j)
        if (r0 + j < r) acc[j] += v * to_f(a[(r0 + j) * in + i]);
    }
    for (int j = 0; j < R_TILE && r0 + j < r; ++j) {
      const float s = block_sum(acc[j], shared);
      if (threadIdx.x == 0) xa[t * r + r0 + j] = from_f<T>(s);
    }
  }
}

template <typename T>
__global__ void dropout_dx_kernel(const float* __restrict__ gs, const T* __restrict__ a, T* __restrict__ dx,
                                  int64_t rows, int64_t in, int r, uint32_t key, uint32_t threshold, float scale) {
  const int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  if (i >= in) return;
  for (int64_t t = blockIdx.y; t < rows; t += gridDim.y) {
    if (!keep(row_key(key, t), i, threshold)) continue;
    float up = 0.f;
    for (int k = 0; k < r; ++k) up += gs[t * r + k] * to_f(a[k * in + i]);
    dx[t * in + i] = from_f<T>(to_f(dx[t * in + i]) + scale * up);
  }
}

template <typename T>
__global__ void dropout_da_kernel(const float* __restrict__ gs, const T* __restrict__ x, float* __restrict__ partial,
                                  int64_t rows, int64_t in, int r, int64_t rows_per_split, uint32_t key,
                                  uint32_t threshold, float scale) {
  const int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  const int64_t split = blockIdx.y;
  if (i >= in) return;
  const int64_t t0 = split * rows_per_split;
  const int64_t t1 = min(rows, t0 + rows_per_split);
  for (int r0 = 0; r0 < r; r0 += R_TILE) {
    float acc[R_TILE];
#pragma unroll
    for (int j = 0; j < R_TILE; ++j) acc[j] = 0.f;
    for (int64_t t = t0; t < t1; ++t) {
      if (!keep(row_key(key, t), i, threshold)) continue;
      const float v = to_f(x[t * in + i]) * scale;
#pragma unroll
      for (int j = 0; j < R_TILE; ++j)
        if (r0 + j < r) acc[j] += gs[t * r + r0 + j] * v;
    }
    for (int j = 0; j < R_TILE && r0 + j < r; ++j) partial[(split * r + r0 + j) * in + i] = acc[j];
  }
}

}  // namespace

// ---- launchers (called by lora_linear_cuda.cpp) --------------------------------------------------
cudaError_t peftmed_lora_dropout_down(int dtype, const void* x, const void* a, void* xa, int64_t rows, int64_t in,
                                      int r, uint32_t key, uint32_t threshold, float scale, cudaStream_t stream) {
  const dim3 grid(static_cast<unsigned>(rows));
#define LAUNCH(T)                                                                                   \
  dropout_down_kernel<T><<<grid, 256, 0, stream>>>(static_cast<const T*>(x), static_cast<const T*>(a), \
                                                   static_cast<T*>(xa), rows, in, r, key, threshold, scale)
  PEFTMED_DISPATCH(dtype, LAUNCH)
#undef LAUNCH
  return cudaGetLastError();
}

cudaError_t peftmed_lora_dropout_dx(int dtype, const float* gs, const void* a, void* dx, int64_t rows, int64_t in,
                                    int r, uint32_t key, uint32_t threshold, float scale, cudaStream_t stream) {
  // gridDim.y is at most 65,535: rows beyond it are strided over by the same blocks
  const dim3 grid(static_cast<unsigned>((in + 255) / 256), static_cast<unsigned>(std::min<int64_t>(rows, kMaxGridY)));
#define LAUNCH(T)                                                                                         \
  dropout_dx_kernel<T><<<grid, 256, 0, stream>>>(gs, static_cast<const T*>(a), static_cast<T*>(dx), rows, in, r, \
                                                 key, threshold, scale)
  PEFTMED_DISPATCH(dtype, LAUNCH)
#undef LAUNCH
  return cudaGetLastError();
}

cudaError_t peftmed_lora_dropout_da(int dtype, const float* gs, const void* x, float* partial, int64_t rows,
                                    int64_t in, int r, int64_t splits, uint32_t key, uint32_t threshold, float scale,
                                    cudaStream_t stream) {
  const int64_t rows_per_split = (rows + splits - 1) / splits;
  const dim3 grid(static_cast<unsigned>((in + 255) / 256), static_cast<unsigned>(splits));
#define LAUNCH(T)                                                                                        \
  dropout_da_kernel<T><<<grid, 256, 0, stream>>>(gs, static_cast<const T*>(x), partial, rows, in, r,          \
                                                 rows_per_split, key, threshold, scale)
  PEFTMED_DISPATCH(dtype, LAUNCH)
#undef LAUNCH
  return cudaGetLastError();
}

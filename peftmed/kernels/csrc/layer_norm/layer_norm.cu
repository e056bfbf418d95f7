// layer_norm on CUDA (last dimension, with weight and bias).
//
//   forward:  one block per row; mean and variance by two block reductions in fp32 (the row is
//             re-read from L1/L2, not from DRAM); mean and rstd saved in fp32.
//   backward: a fixed grid of blocks (a few per SM), each walking a contiguous range of rows: per row
//             two block reductions give dx; each thread keeps fp32 running sums of dy*xhat and dy for
//             its columns, written once per block as a partial row (stage 1). A second kernel sums the
//             partials per column (stage 2). No atomics, no locks.
//
// Plain CUDA only (see peftmed_cuda.cuh) so `nvcc -c` checks it without a CUDA torch.

#include "peftmed_cuda.cuh"

namespace {

using namespace peftmed;

template <typename T>
__global__ void ln_forward_kernel(const T* __restrict__ x, const T* __restrict__ w, const T* __restrict__ b,
                                  T* __restrict__ y, float* __restrict__ mean, float* __restrict__ rstd, int64_t rows,
                                  int64_t n, float eps) {
  __shared__ float shared[32];
  const int64_t r = blockIdx.x;
  if (r >= rows) return;
  const T* xr = x + r * n;
  float s = 0.f;
  for (int64_t i = threadIdx.x; i < n; i += blockDim.x) s += to_f(xr[i]);
  const float mu = block_sum(s, shared) / n;
  float sq = 0.f;
  for (int64_t i = threadIdx.x; i < n; i += blockDim.x) {
    const float d = to_f(xr[i]) - mu;
    sq += d * d;
  }
  const float rs = rsqrtf(block_sum(sq, shared) / n + eps);
  T* yr = y + r * n;
  for (int64_t i = threadIdx.x; i < n; i += blockDim.x)
    yr[i] = from_f<T>((to_f(xr[i]) - mu) * rs * to_f(w[i]) + to_f(b[i]));
  if (threadIdx.x == 0) {
    mean[r] = mu;
    rstd[r] = rs;
  }
}

template <typename T>
__global__ void ln_backward_kernel(const T* __restrict__ dy, const T* __restrict__ x, const T* __restrict__ w,
                                   const float* __restrict__ mean, const float* __restrict__ rstd, T* __restrict__ dx,
                                   float* __restrict__ part_w, float* __restrict__ part_b, int64_t rows, int64_t n,
                                   int64_t rows_per_block) {
  __shared__ float shared[32];
  const int64_t r0 = blockIdx.x * rows_per_block;
  const int64_t r1 = min(rows, r0 + rows_per_block);
  float* pw = part_w + blockIdx.x * n;
  float* pb = part_b + blockIdx.x * n;
  for (int64_t i = threadIdx.x; i < n; i += blockDim.x) pw[i] = pb[i] = 0.f;  // owned by this thread
  for (int64_t r = r0; r < r1; ++r) {
    const T* xr = x + r * n;
    const T* dyr = dy + r * n;
    const float mu = mean[r], rs = rstd[r];
    float s_gx = 0.f, s_g = 0.f;
    for (int64_t i = threadIdx.x; i < n; i += blockDim.x) {
      const float d = to_f(dyr[i]);
      const float xhat = (to_f(xr[i]) - mu) * rs;
      const float g = d * to_f(w[i]);
      s_gx += g * xhat;
      s_g += g;
      pw[i] += d * xhat;
      pb[i] += d;
    }
    if (dx != nullptr) {
      const float c1 = block_sum(s_gx, shared) / n;
      const float c2 = block_sum(s_g, shared) / n;
      T* dxr = dx + r * n;
      for (int64_t i = threadIdx.x; i < n; i += blockDim.x) {
        const float xhat = (to_f(xr[i]) - mu) * rs;
        dxr[i] = from_f<T>(rs * (to_f(dyr[i]) * to_f(w[i]) - c2 - xhat * c1));
      }
    }
  }
}

template <typename T>
__global__ void ln_reduce_kernel(const float* __restrict__ part_w, const float* __restrict__ part_b, T* __restrict__ dw,
                                 T* __restrict__ db, int64_t blocks, int64_t n) {
  const int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  if (i >= n) return;
  float sw = 0.f, sb = 0.f;
  for (int64_t k = 0; k < blocks; ++k) {
    sw += part_w[k * n + i];
    sb += part_b[k * n + i];
  }
  if (dw != nullptr) dw[i] = from_f<T>(sw);
  if (db != nullptr) db[i] = from_f<T>(sb);
}

int threads_for(int64_t n) { return n >= 1024 ? 512 : (n >= 256 ? 256 : 128); }

}  // namespace

// ---- launchers (called by layer_norm_cuda.cpp) ---------------------------------------------------
cudaError_t peftmed_ln_forward(int dtype, const void* x, const void* w, const void* b, void* y, float* mean,
                               float* rstd, int64_t rows, int64_t n, float eps, cudaStream_t stream) {
  const dim3 grid(static_cast<unsigned>(rows));
#define LAUNCH(T)                                                                                                 \
  ln_forward_kernel<T><<<grid, threads_for(n), 0, stream>>>(static_cast<const T*>(x), static_cast<const T*>(w),    \
                                                            static_cast<const T*>(b), static_cast<T*>(y), mean, rstd, \
                                                            rows, n, eps)
  PEFTMED_DISPATCH(dtype, LAUNCH)
#undef LAUNCH
  return cudaGetLastError();
}

// part_w/part_b: (blocks, n) fp32 scratch; dx, dw, db may be null when not needed
cudaError_t peftmed_ln_backward(int dtype, const void* dy, const void* x, const void* w, const float* mean,
                                const float* rstd, void* dx, void* dw, void* db, float* part_w, float* part_b,
                                int64_t rows, int64_t n, int64_t blocks, cudaStream_t stream) {
  const int64_t rows_per_block = (rows + blocks - 1) / blocks;
#define LAUNCH(T)                                                                                                  \
  ln_backward_kernel<T><<<static_cast<unsigned>(blocks), threads_for(n), 0, stream>>>(                              \
      static_cast<const T*>(dy), static_cast<const T*>(x), static_cast<const T*>(w), mean, rstd, static_cast<T*>(dx), \
      part_w, part_b, rows, n, rows_per_block);                                                                      \
  ln_reduce_kernel<T><<<static_cast<unsigned>((n + 255) / 256), 256, 0, stream>>>(                                  \
      part_w, part_b, static_cast<T*>(dw), static_cast<T*>(db), blocks, n)
  PEFTMED_DISPATCH(dtype, LAUNCH)
#undef LAUNCH
  return cudaGetLastError();
}

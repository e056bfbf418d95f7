// layer_norm on CUDA (last dimension, with weight and bias).
//
//   forward:  one block per row; mean and variance by two block reductions in fp32 (the row is
//             re-read from L1/L2, not from DRAM); mean and rstd saved in fp32.
//   backward: a fixed grid of blocks (a few per SM), each walking a contiguous range of rows: per row
//             two block reductions give dx; each thread keeps fp32 running sums of dy*xhat and dy for
//             its columns in registers (K = 2, 8 or 16 columns a thread, a template argument chosen from the
//             row width: rows up to 8,192 wide at 512 threads; wider rows keep them in the block's partial row in global memory), and the row's
//             dy and x-hat in registers between the reductions and the dx pass (read once from DRAM).
//             The sums are written once per block as a partial row (stage 1). Stage 2 sums the partials
//             per column with 32 columns x 16 row-strided threads a block and a shared-memory tree.
//             No atomics, no locks.
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

constexpr int kMaxPerThread = 16;  // columns a thread holds in registers in the backward, at most
constexpr int kMaxThreads = 512;   // threads_for's largest block
constexpr int kReduceCols = 32, kReduceRows = 16;  // stage 2's block

// K: columns a thread holds in registers (n <= blockDim.x * K), or 0 for the global-memory path
template <typename T, int K>
__global__ void __launch_bounds__(kMaxThreads) ln_backward_kernel(const T* __restrict__ dy, const T* __restrict__ x, const T* __restrict__ w,
                                   const float* __restrict__ mean, const float* __restrict__ rstd, T* __restrict__ dx,
                                   float* __restrict__ part_w, float* __restrict__ part_b, int64_t rows, int64_t n,
                                   int64_t rows_per_block) {
  __shared__ float shared[32];
  const int64_t r0 = blockIdx.x * rows_per_block;
  const int64_t r1 = min(rows, r0 + rows_per_block);
  float* pw = part_w + blockIdx.x * n;
  float* pb = part_b + blockIdx.x * n;
  if constexpr (K > 0) {
    // registers: column threadIdx.x + k * blockDim.x of every row is this thread's (k < K)
    float aw[K], ab[K], wk[K], dk[K], xk[K];
#pragma unroll
    for (int k = 0; k < K; ++k) {
      const int64_t i = threadIdx.x + static_cast<int64_t>(k) * blockDim.x;
      aw[k] = ab[k] = 0.f;
      wk[k] = i < n ? to_f(w[i]) : 0.f;
    }
    for (int64_t r = r0; r < r1; ++r) {
      const T* xr = x + r * n;
      const T* dyr = dy + r * n;
      const float mu = mean[r], rs = rstd[r];
      float s_gx = 0.f, s_g = 0.f;
#pragma unroll
      for (int k = 0; k < K; ++k) {
        const int64_t i = threadIdx.x + static_cast<int64_t>(k) * blockDim.x;
        dk[k] = xk[k] = 0.f;
        if (i < n) {
          dk[k] = to_f(dyr[i]);
          xk[k] = (to_f(xr[i]) - mu) * rs;
          const float g = dk[k] * wk[k];
          s_gx += g * xk[k];
          s_g += g;
          aw[k] += dk[k] * xk[k];
          ab[k] += dk[k];
        }
      }
      if (dx != nullptr) {
        const float c1 = block_sum(s_gx, shared) / n;
        const float c2 = block_sum(s_g, shared) / n;
        T* dxr = dx + r * n;
#pragma unroll
        for (int k = 0; k < K; ++k) {
          const int64_t i = threadIdx.x + static_cast<int64_t>(k) * blockDim.x;
          if (i < n) dxr[i] = from_f<T>(rs * (dk[k] * wk[k] - c2 - xk[k] * c1));
        }
      }
    }
#pragma unroll
    for (int k = 0; k < K; ++k) {
      const int64_t i = threadIdx.x + static_cast<int64_t>(k) * blockDim.x;
      if (i < n) {
        pw[i] = aw[k];
        pb[i] = ab[k];
      }
    }
  } else {
  // wider rows: the running sums live in this block's partial row (each column owned by one thread)
  for (int64_t i = threadIdx.x; i < n; i += blockDim.x) pw[i] = pb[i] = 0.f;
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
}

// stage 2: dw[i] = sum_k part_w[k, i] (db likewise); block (kReduceCols, kReduceRows): coalesced column reads,
// partial rows strided over threadIdx.y, a shared-memory sum over y
template <typename T>
__global__ void ln_reduce_kernel(const float* __restrict__ part_w, const float* __restrict__ part_b, T* __restrict__ dw,
                                 T* __restrict__ db, int64_t blocks, int64_t n) {
  __shared__ float sw[kReduceRows][kReduceCols + 1];
  __shared__ float sb[kReduceRows][kReduceCols + 1];
  const int64_t i = blockIdx.x * static_cast<int64_t>(kReduceCols) + threadIdx.x;
  float aw = 0.f, ab = 0.f;
  if (i < n) {
    for (int64_t k = threadIdx.y; k < blocks; k += kReduceRows) {
      aw += part_w[k * n + i];
      ab += part_b[k * n + i];
    }
  }
  sw[threadIdx.y][threadIdx.x] = aw;
  sb[threadIdx.y][threadIdx.x] = ab;
  __syncthreads();
  if (threadIdx.y == 0 && i < n) {
    float tw = 0.f, tb = 0.f;
#pragma unroll
    for (int j = 0; j < kReduceRows; ++j) {
      tw += sw[j][threadIdx.x];
      tb += sb[j][threadIdx.x];
    }
    if (dw != nullptr) dw[i] = from_f<T>(tw);
    if (db != nullptr) db[i] = from_f<T>(tb);
  }
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
  const int threads = threads_for(n);
  const int64_t per = (n + threads - 1) / threads;  // columns per thread
  // (no K = 4: ptxas spills a few bytes there at sm_90; K = 8 holds it in 81 registers)
  const int k = per <= 2 ? 2 : per <= 8 ? 8 : per <= kMaxPerThread ? kMaxPerThread : 0;
#define BACKWARD(T, K)                                                                                              \
  ln_backward_kernel<T, K><<<static_cast<unsigned>(blocks), threads, 0, stream>>>(                                  \
      static_cast<const T*>(dy), static_cast<const T*>(x), static_cast<const T*>(w), mean, rstd, static_cast<T*>(dx), \
      part_w, part_b, rows, n, rows_per_block)
#define LAUNCH(T)                                                                                                  \
  switch (k) {                                                                                                     \
    case 2: BACKWARD(T, 2); break;                                                                                 \
    case 8: BACKWARD(T, 8); break;                                                                                 \
    case kMaxPerThread: BACKWARD(T, kMaxPerThread); break;                                                        \
    default: BACKWARD(T, 0);                                                                                       \
  }                                                                                                                \
  ln_reduce_kernel<T><<<static_cast<unsigned>((n + kReduceCols - 1) / kReduceCols), dim3(kReduceCols, kReduceRows), \
                        0, stream>>>(part_w, part_b, static_cast<T*>(dw), static_cast<T*>(db), blocks, n)
  PEFTMED_DISPATCH(dtype, LAUNCH)
#undef LAUNCH
#undef BACKWARD
  return cudaGetLastError();
}

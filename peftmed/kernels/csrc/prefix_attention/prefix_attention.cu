// prefix_attention on CUDA: softmax attention over [prefix; sequence], the prefix (H, P, D) shared by
// the batch (read in place by every sample, never copied), merged by one online softmax.
//
//   forward:  one warp per query row; each lane holds D/32 of q and of the fp32 accumulator; the
//             prefix keys and then the sequence keys update one running max and sum (the log-sum-exp
//             merge of the two branches); writes out and the fp32 lse.
//   backward: each branch with the merged out and lse, delta = rowsum(dO * O) given:
//             dq: one warp per query row over the prefix and the sequence keys;
//             dk/dv: one warp per sequence key row over its sample's queries; one warp per prefix
//             key row over every sample's queries (summed over the batch in registers, no atomics).
//   Dropout: the shared hash of peftmed/kernels/dropout.py (row (b*H+h)*Tq+i, column over [prefix; seq]).
//
// Plain CUDA only (see peftmed_cuda.cuh) so `nvcc -c` checks it without a CUDA torch. Warp-per-row
// loops, not tensor-core tiles: correct everywhere; the Triton kernel is the fast GPU path.

#include "peftmed_cuda.cuh"

namespace {

using namespace peftmed;

constexpr int kMaxPerLane = 8;  // head dim <= 256
constexpr int kWarps = 4;       // warps (rows) per block

struct Shape {
  int64_t B, H, Tq, Tk, P, D;
  float scale;
  uint32_t key, thr;
  float drop_scale;
  bool dropout, causal;
  const uint8_t* mask;  // nullptr: all visible
  int64_t smb, smh, smq, smk;
};

__device__ __forceinline__ bool visible(const Shape& s, int64_t b, int64_t h, int64_t i, int64_t j) {
  if (s.causal && j > i + (s.Tk - s.Tq)) return false;
  return s.mask == nullptr || s.mask[b * s.smb + h * s.smh + i * s.smq + j * s.smk] != 0;
}

template <typename T>
__device__ __forceinline__ void load_row(const T* row, float* out, int64_t D, int lane) {
#pragma unroll
  for (int e = 0; e < kMaxPerLane; ++e) {
    const int64_t d = lane + 32 * e;
    out[e] = d < D ? to_f(row[d]) : 0.f;
  }
}

template <typename T>
__device__ __forceinline__ float row_dot(const float* a, const T* row, int64_t D, int lane) {
  float acc = 0.f;
#pragma unroll
  for (int e = 0; e < kMaxPerLane; ++e) {
    const int64_t d = lane + 32 * e;
    if (d < D) acc += a[e] * to_f(row[d]);
  }
  return warp_sum(acc);
}

template <typename T>
__device__ __forceinline__ void online_step(const Shape& s, const float* q, const T* krow, const T* vrow,
                                            uint32_t rk, int64_t col, float& m, float& l, float* acc, int lane) {
  const float sc = row_dot(q, krow, s.D, lane) * s.scale;
  const float m_new = fmaxf(m, sc);
  const float alpha = __expf(m - m_new);
  float p = __expf(sc - m_new);
  l = l * alpha + p;
  if (s.dropout) p = keep(rk, col, s.thr) ? p * s.drop_scale : 0.f;
#pragma unroll
  for (int e = 0; e < kMaxPerLane; ++e) {
    const int64_t d = lane + 32 * e;
    acc[e] = acc[e] * alpha + (d < s.D ? p * to_f(vrow[d]) : 0.f);
  }
  m = m_new;
}

template <typename T>
__global__ void fwd_kernel(Shape s, const T* q, const T* k, const T* v, const T* pk, const T* pv, T* out, float* lse) {
  const int lane = threadIdx.x & 31;
  const int64_t row = static_cast<int64_t>(blockIdx.x) * kWarps + (threadIdx.x >> 5);  // (b*H + h)*Tq + i
  if (row >= s.B * s.H * s.Tq) return;
  const int64_t bh = row / s.Tq, i = row % s.Tq, b = bh / s.H, h = bh % s.H;
  float qr[kMaxPerLane], acc[kMaxPerLane];
  load_row(q + row * s.D, qr, s.D, lane);
#pragma unroll
  for (int e = 0; e < kMaxPerLane; ++e) acc[e] = 0.f;
  const uint32_t rk = row_key(s.key, row);
  float m = -INFINITY, l = 0.f;
  for (int64_t j = 0; j < s.P; ++j)  // the prefix first: the running max is finite from here on
    online_step(s, qr, pk + (h * s.P + j) * s.D, pv + (h * s.P + j) * s.D, rk, j, m, l, acc, lane);
  for (int64_t j = 0; j < s.Tk; ++j)
    if (visible(s, b, h, i, j))
      online_step(s, qr, k + (bh * s.Tk + j) * s.D, v + (bh * s.Tk + j) * s.D, rk, s.P + j, m, l, acc, lane);
#pragma unroll
  for (int e = 0; e < kMaxPerLane; ++e) {
    const int64_t d = lane + 32 * e;
    if (d < s.D) out[row * s.D + d] = from_f<T>(acc[e] / l);
  }
  if (lane == 0) lse[row] = m + __logf(l);
}

// ds = p * (dp - delta) for query row `row` and one key: the gradient of its scaled score
template <typename T>
__device__ __forceinline__ float dscore(const Shape& s, const float* q, const float* dout, float lse, float delta,
                                        const T* krow, const T* vrow, uint32_t rk, int64_t col, float* pdrop,
                                        int lane) {
  const float p = __expf(row_dot(q, krow, s.D, lane) * s.scale - lse);
  float dp = row_dot(dout, vrow, s.D, lane);
  float pd = p;
  if (s.dropout) {
    const bool kept = keep(rk, col, s.thr);
    dp = kept ? dp * s.drop_scale : 0.f;
    pd = kept ? p * s.drop_scale : 0.f;
  }
  *pdrop = pd;
  return p * (dp - delta);
}

template <typename T>
__global__ void dq_kernel(Shape s, const T* q, const T* dout, const float* lse, const float* delta, const T* k,
                          const T* v, const T* pk, const T* pv, T* dq) {
  const int lane = threadIdx.x & 31;
  const int64_t row = static_cast<int64_t>(blockIdx.x) * kWarps + (threadIdx.x >> 5);
  if (row >= s.B * s.H * s.Tq) return;
  const int64_t bh = row / s.Tq, i = row % s.Tq, b = bh / s.H, h = bh % s.H;
  float qr[kMaxPerLane], dor[kMaxPerLane], acc[kMaxPerLane];
  load_row(q + row * s.D, qr, s.D, lane);
  load_row(dout + row * s.D, dor, s.D, lane);
#pragma unroll
  for (int e = 0; e < kMaxPerLane; ++e) acc[e] = 0.f;
  const uint32_t rk = row_key(s.key, row);
  float pd;
  for (int64_t j = 0; j < s.P + s.Tk; ++j) {
    const bool prefix = j < s.P;
    const int64_t jj = prefix ? j : j - s.P;
    if (!prefix && !visible(s, b, h, i, jj)) continue;
    const T* krow = prefix ? pk + (h * s.P + jj) * s.D : k + (bh * s.Tk + jj) * s.D;
    const T* vrow = prefix ? pv + (h * s.P + jj) * s.D : v + (bh * s.Tk + jj) * s.D;
    const float ds = dscore(s, qr, dor, lse[row], delta[row], krow, vrow, rk, j, &pd, lane);
#pragma unroll
    for (int e = 0; e < kMaxPerLane; ++e) {
      const int64_t d = lane + 32 * e;
      if (d < s.D) acc[e] += ds * to_f(krow[d]);
    }
  }
#pragma unroll
  for (int e = 0; e < kMaxPerLane; ++e) {
    const int64_t d = lane + 32 * e;
    if (d < s.D) dq[row * s.D + d] = from_f<T>(acc[e] * s.scale);
  }
}

// one warp per key row: the sequence's (key_rows = B*H*Tk) or the prefix's (key_rows = H*P)
template <typename T>
__global__ void dkdv_kernel(Shape s, bool prefix, const T* q, const T* dout, const float* lse, const float* delta,
                            const T* k, const T* v, T* dk, T* dv) {
  const int lane = threadIdx.x & 31;
  const int64_t kr = static_cast<int64_t>(blockIdx.x) * kWarps + (threadIdx.x >> 5);
  const int64_t n_keys = prefix ? s.P : s.Tk;
  const int64_t groups = prefix ? s.H : s.B * s.H;  // head h, or sample-head b*H+h
  if (kr >= groups * n_keys) return;
  const int64_t g = kr / n_keys, j = kr % n_keys, h = g % s.H;
  const int64_t b_first = prefix ? 0 : g / s.H, b_last = prefix ? s.B : g / s.H + 1;
  const int64_t col = prefix ? j : s.P + j;
  float kv_k[kMaxPerLane], kv_v[kMaxPerLane], gk[kMaxPerLane], gv[kMaxPerLane];
  load_row(k + kr * s.D, kv_k, s.D, lane);
  load_row(v + kr * s.D, kv_v, s.D, lane);
#pragma unroll
  for (int e = 0; e < kMaxPerLane; ++e) gk[e] = gv[e] = 0.f;
  for (int64_t b = b_first; b < b_last; ++b) {
    for (int64_t i = 0; i < s.Tq; ++i) {
      if (!prefix && !visible(s, b, h, i, j)) continue;
      const int64_t row = (b * s.H + h) * s.Tq + i;
      const T* qrow = q + row * s.D;
      const T* dorow = dout + row * s.D;
      const float p = __expf(row_dot(kv_k, qrow, s.D, lane) * s.scale - lse[row]);
      float dp = row_dot(kv_v, dorow, s.D, lane);
      float pd = p;
      if (s.dropout) {
        const bool kept = keep(row_key(s.key, row), col, s.thr);
        dp = kept ? dp * s.drop_scale : 0.f;
        pd = kept ? p * s.drop_scale : 0.f;
      }
      const float ds = p * (dp - delta[row]);
#pragma unroll
      for (int e = 0; e < kMaxPerLane; ++e) {
        const int64_t d = lane + 32 * e;
        if (d < s.D) {
          gv[e] += pd * to_f(dorow[d]);
          gk[e] += ds * to_f(qrow[d]);
        }
      }
    }
  }
#pragma unroll
  for (int e = 0; e < kMaxPerLane; ++e) {
    const int64_t d = lane + 32 * e;
    if (d < s.D) {
      dk[kr * s.D + d] = from_f<T>(gk[e] * s.scale);
      dv[kr * s.D + d] = from_f<T>(gv[e]);
    }
  }
}

unsigned blocks_for(int64_t rows) { return static_cast<unsigned>((rows + kWarps - 1) / kWarps); }

}  // namespace

struct PeftmedPrefixShape {  // the same layout as in prefix_attention_cuda.cpp
  int64_t B, H, Tq, Tk, P, D;
  float scale;
  uint32_t key, thr;
  float drop_scale;
  bool dropout, causal;
  const uint8_t* mask;
  int64_t smb, smh, smq, smk;
};

static Shape to_shape(const PeftmedPrefixShape& p) {
  return Shape{p.B, p.H, p.Tq, p.Tk, p.P, p.D, p.scale, p.key, p.thr, p.drop_scale, p.dropout, p.causal,
               p.mask, p.smb, p.smh, p.smq, p.smk};
}

cudaError_t peftmed_prefix_attention_forward(int dtype, const PeftmedPrefixShape& shape, const void* q, const void* k,
                                             const void* v, const void* pk, const void* pv, void* out, float* lse,
                                             cudaStream_t stream) {
  const Shape s = to_shape(shape);
  if (s.D > 32 * kMaxPerLane) return cudaErrorInvalidValue;
  const unsigned grid = blocks_for(s.B * s.H * s.Tq);
  if (grid == 0) return cudaSuccess;
#define LAUNCH(T)                                                                                              \
  fwd_kernel<T><<<grid, 32 * kWarps, 0, stream>>>(s, static_cast<const T*>(q), static_cast<const T*>(k),        \
                                                  static_cast<const T*>(v), static_cast<const T*>(pk),          \
                                                  static_cast<const T*>(pv), static_cast<T*>(out), lse)
  PEFTMED_DISPATCH(dtype, LAUNCH)
#undef LAUNCH
  return cudaGetLastError();
}

cudaError_t peftmed_prefix_attention_backward(int dtype, const PeftmedPrefixShape& shape, const void* q,
                                              const void* k, const void* v, const void* pk, const void* pv,
                                              const void* dout, const float* lse, const float* delta, void* dq,
                                              void* dk, void* dv, void* dpk, void* dpv, cudaStream_t stream) {
  const Shape s = to_shape(shape);
  if (s.D > 32 * kMaxPerLane) return cudaErrorInvalidValue;
  const unsigned gq = blocks_for(s.B * s.H * s.Tq), gk = blocks_for(s.B * s.H * s.Tk), gp = blocks_for(s.H * s.P);
#define LAUNCH(T)                                                                                                 \
  do {                                                                                                            \
    const T *q_ = static_cast<const T*>(q), *k_ = static_cast<const T*>(k), *v_ = static_cast<const T*>(v);        \
    const T *pk_ = static_cast<const T*>(pk), *pv_ = static_cast<const T*>(pv), *do_ = static_cast<const T*>(dout); \
    if (gq) dq_kernel<T><<<gq, 32 * kWarps, 0, stream>>>(s, q_, do_, lse, delta, k_, v_, pk_, pv_, static_cast<T*>(dq)); \
    if (gk) dkdv_kernel<T><<<gk, 32 * kWarps, 0, stream>>>(s, false, q_, do_, lse, delta, k_, v_,                 \
                                                            static_cast<T*>(dk), static_cast<T*>(dv));             \
    if (gp) dkdv_kernel<T><<<gp, 32 * kWarps, 0, stream>>>(s, true, q_, do_, lse, delta, pk_, pv_,                \
                                                            static_cast<T*>(dpk), static_cast<T*>(dpv));           \
  } while (0)
  PEFTMED_DISPATCH(dtype, LAUNCH)
#undef LAUNCH
  return cudaGetLastError();
}

// lora_linear on CPU:  y = x W^T + b + s * (dropout(x) A^T) B^T
//
// Every product goes to ATen's GEMM (MKL/oneDNN), each skinny one in the orientation that is fast on
// the CPU: the rank-r side is the *left* operand ((r, T) @ (T, n) rather than (n, T) @ (T, r)), which
// measured 2-4x faster for r = 8 at 512 x 768 than the textbook orientation. What is not a GEMM is the
// dropout, done here in one vectorised pass per use: the mask is never stored, each pass hashes
// (seed, row, col) -> keep with the arithmetic of peftmed/kernels/dropout.py (the same elements are
// dropped by every implementation), in forward and again in backward.
//
//   forward:  h = dropout(x)   xa = h A^T (T, r)   y = x W^T + b;  y += s xa B^T
//   backward: g = dy B (T, r)  dx = dy W;  dx += dropout'(s g A)   dA = s g^T h   dB = s dy^T xa
//
// Signatures match peftmed/kernels/lora_linear/reference.py.

#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <vector>

namespace {

inline uint32_t mix32(uint32_t h) {
  h ^= h >> 16;
  h *= 0x7feb352dU;
  h ^= h >> 15;
  h *= 0x846ca68bU;
  h ^= h >> 16;
  return h;
}

struct Dropout {
  uint32_t key;
  uint32_t threshold;  // drop when (hash >> 8) < threshold
  float scale;         // 1 / (1 - p)

  Dropout(double p, int64_t seed)
      : key(mix32(static_cast<uint32_t>(seed) ^ 0x9E3779B9U)),
        threshold(static_cast<uint32_t>(std::min<double>(std::nearbyint(p * 16777216.0), 16777216.0))),
        scale(static_cast<float>(1.0 / (1.0 - p))) {}

  // dst[row, :] (+)= src[row, :] * keep(row, :) * scale * factor, for rows [begin, end).  The column loop is
  // 32-bit so that it vectorises (16 hashes per AVX-512 instruction sequence).
  template <typename T, bool Accumulate>
  void rows(const T* src, T* dst, int64_t begin, int64_t end, int64_t cols, float factor) const {
    const uint32_t n = static_cast<uint32_t>(cols);
    const uint32_t thr = threshold;  // locals, not members read through `this`: the loop then vectorises
    const float keep_scale = scale * factor;
    for (int64_t r = begin; r < end; ++r) {
      const uint32_t rk = mix32(static_cast<uint32_t>(r) ^ key);
      const T* s = src + r * cols;
      T* d = dst + r * cols;
#pragma omp simd
      for (uint32_t i = 0; i < n; ++i) {
        const uint32_t u = mix32(rk + i * 0x9E3779B1U);
        const float m = (u >> 8) >= thr ? keep_scale : 0.0f;
        const float v = static_cast<float>(s[i]) * m;
        if constexpr (Accumulate) {
          d[i] = static_cast<T>(static_cast<float>(d[i]) + v);
        } else {
          d[i] = static_cast<T>(v);
        }
      }
    }
  }
};

// dst (+)= factor * dropout(src) with the mask of (p, seed); both 2-D contiguous, one shape and dtype.
template <bool Accumulate>
void apply_dropout(const at::Tensor& src, at::Tensor& dst, double p, int64_t seed, double factor = 1.0) {
  const Dropout drop(p, seed);
  const int64_t rows = src.size(0), cols = src.size(1);
  // about 64 K elements per task: enough work to amortise waking a thread
  const int64_t grain = std::max<int64_t>(1, 65536 / std::max<int64_t>(cols, 1));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, src.scalar_type(), "peftmed_lora_dropout", [&] {
    const scalar_t* s = src.data_ptr<scalar_t>();
    scalar_t* d = dst.data_ptr<scalar_t>();
    at::parallel_for(0, rows, grain, [&](int64_t b, int64_t e) { drop.rows<scalar_t, Accumulate>(s, d, b, e, cols, static_cast<float>(factor)); });
  });
}

at::Tensor dropped(const at::Tensor& x, double p, int64_t seed) {
  if (p == 0.0) return x;
  auto out = at::empty_like(x);
  apply_dropout<false>(x, out, p, seed);
  return out;
}

void check_inputs(const at::Tensor& x, const at::Tensor& a) {
  TORCH_CHECK(x.device().is_cpu(), "peftmed lora_linear (cpp): expected CPU tensors, got ", x.device());
  TORCH_CHECK(x.dim() == 2 && x.is_contiguous(), "peftmed lora_linear (cpp): x must be 2-D contiguous");
  TORCH_CHECK(a.dim() == 2 && a.is_contiguous(), "peftmed lora_linear (cpp): lora_a must be 2-D contiguous");
}

}  // namespace

std::vector<at::Tensor> forward(const at::Tensor& x, const at::Tensor& w, const c10::optional<at::Tensor>& bias,
                                const at::Tensor& a, const at::Tensor& b, double scaling, double p, int64_t seed) {
  check_inputs(x, a);
  const at::Tensor h = dropped(x, p, seed);
  const at::Tensor xa = at::mm(a, h.t()).t().contiguous();  // (T, r) from the fast (r, T) product
  at::Tensor y = bias.has_value() && bias->defined() ? at::addmm(*bias, x, w.t()) : at::mm(x, w.t());
  y.addmm_(xa, b.t(), 1.0, scaling);  // the LoRA term lands in y: no (T, out) temporary
  return {y, xa};
}

std::vector<at::Tensor> backward(const at::Tensor& dy, const at::Tensor& x, const at::Tensor& w, const at::Tensor& a,
                                 const at::Tensor& b, const at::Tensor& xa, double scaling, double p, int64_t seed,
                                 std::vector<bool> needs) {
  check_inputs(x, a);
  TORCH_CHECK(needs.size() == 5, "peftmed lora_linear (cpp): needs must have 5 entries");
  TORCH_CHECK(dy.dim() == 2 && dy.is_contiguous(), "peftmed lora_linear (cpp): dy must be 2-D contiguous");
  const bool need_dx = needs[0], need_dw = needs[1], need_dbias = needs[2], need_da = needs[3], need_db = needs[4];
  at::Tensor dx, dw, dbias, da, db;
  at::Tensor gt;  // (r, T) = B^T dy^T, unscaled
  if (need_dx || need_da) gt = at::mm(b.t(), dy.t());
  if (need_dx) {
    dx = at::mm(dy, w);
    if (p == 0.0) {
      dx.addmm_(gt.t(), a, 1.0, scaling);
    } else {
      // d dropout(x) / dx is the same mask and scale; s is applied in the same pass
      apply_dropout<true>(at::mm(gt.t(), a), dx, p, seed, scaling);
    }
  }
  if (need_da) da = at::mm(gt, dropped(x, p, seed)).mul_(scaling);  // (r, in)
  if (need_db) db = at::mm(xa.t(), dy).mul_(scaling).t().contiguous();  // (out, r) from the fast (r, out) product
  if (need_dw) dw = at::mm(dy.t(), x);
  if (need_dbias) dbias = dy.sum(0);
  return {dx, dw, dbias, da, db};
}

// the mask itself, for tests that check every implementation drops the same elements
at::Tensor keep_mask(int64_t seed, int64_t rows, int64_t cols, double p) {
  auto ones = at::ones({rows, cols}, at::TensorOptions().dtype(at::kFloat));
  return dropped(ones, p, seed).ne(0);
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "peftmed lora_linear CPU kernels";
  m.def("forward", &forward, "lora_linear forward -> (y, xa)");
  m.def("backward", &backward, "lora_linear backward -> (dx, dw, dbias, da, db)");
  m.def("keep_mask", &keep_mask, "dropout keep mask (rows, cols) for a seed");
}

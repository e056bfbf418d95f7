// lora_linear on CPU:  y = x W^T + b + s * (dropout(x) A^T) B^T
//
// The products go to ATen's GEMM (MKL), each skinny one in the orientation that is fast on the CPU:
// the rank-r side is the *left* operand ((r, T) @ (T, n) rather than (n, T) @ (T, r)), measured
// 2-4x faster for r = 8 at 512 x 768 than the textbook orientation.
//
//   forward:  xa = dropout(x) A^T (T, r)   y = x W^T + b;  y += s xa B^T
//   backward: gt = B^T dy^T (r, T)   dx = dy W;  dx += s dropout'(g A)   dA = s g^T dropout(x)
//             dB = s (xa^T dy)^T
//
// With dropout, everything the mask touches is one row pass (masked_xa, masked_backward): the mask
// is hashed per row from (seed, row, col) with the arithmetic of peftmed/kernels/dropout.py (every
// implementation drops the same elements), never stored, regenerated in backward, and no (T, in)
// temporary is allocated.
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

  // m[:] = keep(row, :) * scale for one row. The column loop is 32-bit and branch-free, with the
  // constants in locals (members read through `this` stopped gcc from vectorising it).
  void scales(int64_t r, float* m, int64_t cols) const {
    const uint32_t n = static_cast<uint32_t>(cols);
    const uint32_t thr = threshold;
    const float keep_scale = scale;
    const uint32_t rk = mix32(static_cast<uint32_t>(r) ^ key);
#pragma omp simd
    for (uint32_t i = 0; i < n; ++i) m[i] = (mix32(rk + i * 0x9E3779B1U) >> 8) >= thr ? keep_scale : 0.0f;
  }
};

// ---- dropout > 0: the masked parts fused into row passes, so no (T, in) temporary is allocated ----
// (a fresh 1.5 MB buffer costs its page faults on every call: in a training step, as much as the
// arithmetic it holds). Each thread owns its row buffers and its dA partial (partials of several
// threads side by side in one buffer share cache lines at the seams).

// xa[t, :] = (x[t, :] * keep * scale) A^T for every row t
template <typename T>
void masked_xa(const T* x, const float* a32, float* xa, int64_t rows, int64_t in, int64_t r, const Dropout& drop) {
  at::parallel_for(0, rows, 16, [&](int64_t begin, int64_t end) {
    std::vector<float> xd(in);
    for (int64_t t = begin; t < end; ++t) {
      drop.scales(t, xd.data(), in);
      const T* xr = x + t * in;
      float* xdp = xd.data();
#pragma omp simd
      for (int64_t i = 0; i < in; ++i) xdp[i] *= static_cast<float>(xr[i]);
      for (int64_t k = 0; k < r; ++k) {
        const float* ak = a32 + k * in;
        float acc = 0.f;
#pragma omp simd reduction(+ : acc)
        for (int64_t i = 0; i < in; ++i) acc += xdp[i] * ak[i];
        xa[t * r + k] = acc;
      }
    }
  });
}

// dx[t, :] += s * keep * scale * (g[t, :] A)   and   dA += g[t, :]^T (x[t, :] * keep * scale)
// with g = dy B given transposed, gt (r, T); dA (r, in) is returned unscaled by s
template <typename T>
void masked_backward(const T* x, const float* gt, const float* a32, T* dx, float* da, int64_t rows, int64_t in,
                     int64_t r, float scaling, const Dropout& drop) {
  const int64_t chunks = std::max<int64_t>(1, std::min<int64_t>(rows, at::get_num_threads()));
  std::vector<float> part(da != nullptr ? chunks * r * in : 0);
  at::parallel_for(0, chunks, 1, [&](int64_t cb, int64_t ce) {
    std::vector<float> m(in), acc(in), lpart(da != nullptr ? r * in : 0, 0.f);
    for (int64_t c = cb; c < ce; ++c) {
      std::fill(lpart.begin(), lpart.end(), 0.f);
      for (int64_t t = c * rows / chunks; t < (c + 1) * rows / chunks; ++t) {
        drop.scales(t, m.data(), in);
        float* mp = m.data();
        const T* xr = x + t * in;
        if (dx != nullptr) {
          float* ap = acc.data();
          std::fill(acc.begin(), acc.end(), 0.f);
          for (int64_t k = 0; k < r; ++k) {
            const float gk = gt[k * rows + t];
            const float* ak = a32 + k * in;
#pragma omp simd
            for (int64_t i = 0; i < in; ++i) ap[i] += gk * ak[i];
          }
          T* dxr = dx + t * in;
#pragma omp simd
          for (int64_t i = 0; i < in; ++i)
            dxr[i] = static_cast<T>(static_cast<float>(dxr[i]) + scaling * mp[i] * ap[i]);
        }
        if (da != nullptr) {
#pragma omp simd
          for (int64_t i = 0; i < in; ++i) mp[i] *= static_cast<float>(xr[i]);  // the dropped x row
          for (int64_t k = 0; k < r; ++k) {
            const float gk = gt[k * rows + t];
            float* pk = lpart.data() + k * in;
#pragma omp simd
            for (int64_t i = 0; i < in; ++i) pk[i] += gk * mp[i];
          }
        }
      }
      if (da != nullptr) std::copy(lpart.begin(), lpart.end(), part.begin() + c * r * in);
    }
  });
  if (da != nullptr) {  // stage 2: sum the per-thread partials
    std::copy(part.begin(), part.begin() + r * in, da);
    for (int64_t c = 1; c < chunks; ++c)
      for (int64_t j = 0; j < r * in; ++j) da[j] += part[c * r * in + j];
  }
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
  const int64_t rows = x.size(0), in = x.size(1), r = a.size(0);
  at::Tensor xa;
  if (p == 0.0) {
    xa = at::mm(a, x.t()).t().contiguous();  // (T, r) from the fast (r, T) product
  } else {
    auto a32 = a.to(at::kFloat).contiguous();
    auto xa32 = at::empty({rows, r}, x.options().dtype(at::kFloat));
    const Dropout drop(p, seed);
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "peftmed_lora_masked_xa", [&] {
      masked_xa<scalar_t>(x.data_ptr<scalar_t>(), a32.data_ptr<float>(), xa32.data_ptr<float>(), rows, in, r, drop);
    });
    xa = xa32.to(x.scalar_type());
  }
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
  if (need_dx) dx = at::mm(dy, w);
  if (p == 0.0) {
    if (need_dx) dx.addmm_(gt.t(), a, 1.0, scaling);
    if (need_da) da = at::mm(gt, x).mul_(scaling);  // (r, in)
  } else if (need_dx || need_da) {
    // one row pass: dx += s * mask * (g A) and dA = g^T dropout(x), the mask regenerated per row
    const int64_t rows = x.size(0), in = x.size(1), r = a.size(0);
    auto a32 = a.to(at::kFloat).contiguous();
    auto gt32 = gt.to(at::kFloat).contiguous();
    auto da32 = need_da ? at::empty({r, in}, x.options().dtype(at::kFloat)) : at::Tensor();
    const Dropout drop(p, seed);
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "peftmed_lora_masked_bwd", [&] {
      masked_backward<scalar_t>(x.data_ptr<scalar_t>(), gt32.data_ptr<float>(), a32.data_ptr<float>(),
                                need_dx ? dx.data_ptr<scalar_t>() : nullptr,
                                need_da ? da32.data_ptr<float>() : nullptr, rows, in, r,
                                static_cast<float>(scaling), drop);
    });
    if (need_da) da = da32.mul_(scaling).to(a.scalar_type());
  }
  if (need_db) db = at::mm(xa.t(), dy).mul_(scaling).t().contiguous();  // (out, r) from the fast (r, out) product
  if (need_dw) dw = at::mm(dy.t(), x);
  if (need_dbias) dbias = dy.sum(0);
  return {dx, dw, dbias, da, db};
}

// the mask itself, for tests that check every implementation drops the same elements
at::Tensor keep_mask(int64_t seed, int64_t rows, int64_t cols, double p) {
  auto m = at::empty({rows, cols}, at::TensorOptions().dtype(at::kFloat));
  const Dropout drop(p, seed);
  float* mp = m.data_ptr<float>();
  for (int64_t r = 0; r < rows; ++r) drop.scales(r, mp + r * cols, cols);
  return m.ne(0);
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "peftmed lora_linear CPU kernels";
  m.def("forward", &forward, "lora_linear forward -> (y, xa)");
  m.def("backward", &backward, "lora_linear backward -> (dx, dw, dbias, da, db)");
  m.def("keep_mask", &keep_mask, "dropout keep mask (rows, cols) for a seed");
}

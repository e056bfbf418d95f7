// lora_linear on CPU:  y = x W^T + b + s * (dropout(x) A^T) B^T
//
// The dense products go to ATen's GEMM (addmm folds the bias and the LoRA term into the output in
// place, so no (T, out) temporary is made). With dropout, the mask is never stored: one fused pass
// over x hashes (seed, row, col) -> keep (see peftmed/kernels/dropout.py, same arithmetic) and
// computes dropout(x) A^T; backward regenerates the mask in a second fused pass that adds the LoRA
// part of dx and accumulates dA in per-chunk fp32 partials, summed afterwards (two-stage reduction).
//
// Signatures match peftmed/kernels/lora_linear/reference.py.

#include <torch/extension.h>
#include <ATen/Parallel.h>

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
  bool active;         // p > 0; otherwise every scale is 1 and nothing is hashed

  Dropout(double p, int64_t seed)
      : key(mix32(static_cast<uint32_t>(seed) ^ 0x9E3779B9U)),
        threshold(static_cast<uint32_t>(std::min<double>(std::nearbyint(p * 16777216.0), 16777216.0))),
        scale(static_cast<float>(1.0 / (1.0 - p))),
        active(p > 0.0) {}

  // m[i] = scale if element (row, i) is kept else 0
  void row_scales(int64_t row, int64_t n, float* m) const {
    if (!active) {
      std::fill(m, m + n, 1.0f);
      return;
    }
    const uint32_t rk = mix32(static_cast<uint32_t>(row) ^ key);
#pragma omp simd
    for (int64_t i = 0; i < n; ++i) {
      const uint32_t u = mix32(rk + static_cast<uint32_t>(i) * 0x9E3779B1U);
      m[i] = (u >> 8) >= threshold ? scale : 0.0f;
    }
  }
};

// xa[t, :] = (x[t, :] * mask[t, :]) A^T  -- x (T, in), a (r, in), xa (T, r) float
template <typename T>
void dropout_down(const T* x, const T* a, float* xa, int64_t rows, int64_t in, int64_t r, const Dropout& drop) {
  std::vector<float> a32(a, a + r * in);  // converted once, read by every row
  at::parallel_for(0, rows, 16, [&](int64_t begin, int64_t end) {
    std::vector<float> xd(in);
    for (int64_t t = begin; t < end; ++t) {
      drop.row_scales(t, in, xd.data());
      const T* xr = x + t * in;
#pragma omp simd
      for (int64_t i = 0; i < in; ++i) xd[i] *= static_cast<float>(xr[i]);
      for (int64_t k = 0; k < r; ++k) {
        const float* ak = a32.data() + k * in;
        float acc = 0.f;
#pragma omp simd reduction(+ : acc)
        for (int64_t i = 0; i < in; ++i) acc += xd[i] * ak[i];
        xa[t * r + k] = acc;
      }
    }
  });
}

// dx[t, :] += mask * (gs[t, :] A);  da += gs^T (x * mask)  -- gs (T, r) float, already scaled by s
template <typename T>
void dropout_up_backward(const T* x, const T* a, const float* gs, T* dx, float* da, int64_t rows, int64_t in,
                         int64_t r, const Dropout& drop, bool need_dx, bool need_da) {
  std::vector<float> a32(a, a + r * in);
  const int64_t chunks = std::max<int64_t>(1, std::min<int64_t>(rows, 4 * at::get_num_threads()));
  std::vector<float> partial(need_da ? chunks * r * in : 0, 0.f);  // stage 1: one dA per chunk
  at::parallel_for(0, chunks, 1, [&](int64_t cb, int64_t ce) {
    std::vector<float> m(in), up(in), xd(in);
    for (int64_t c = cb; c < ce; ++c) {
      float* part = need_da ? partial.data() + c * r * in : nullptr;
      for (int64_t t = c * rows / chunks; t < (c + 1) * rows / chunks; ++t) {
        drop.row_scales(t, in, m.data());
        const float* g = gs + t * r;
        if (need_dx) {
          std::fill(up.begin(), up.end(), 0.f);
          for (int64_t k = 0; k < r; ++k) {
            const float gk = g[k];
            const float* ak = a32.data() + k * in;
#pragma omp simd
            for (int64_t i = 0; i < in; ++i) up[i] += gk * ak[i];
          }
          T* dxr = dx + t * in;
#pragma omp simd
          for (int64_t i = 0; i < in; ++i) dxr[i] = static_cast<T>(static_cast<float>(dxr[i]) + m[i] * up[i]);
        }
        if (need_da) {
          const T* xr = x + t * in;
#pragma omp simd
          for (int64_t i = 0; i < in; ++i) xd[i] = m[i] * static_cast<float>(xr[i]);
          for (int64_t k = 0; k < r; ++k) {
            const float gk = g[k];
            float* pk = part + k * in;
#pragma omp simd
            for (int64_t i = 0; i < in; ++i) pk[i] += gk * xd[i];
          }
        }
      }
    }
  });
  if (need_da) {  // stage 2: sum the chunk partials in fp32
    at::parallel_for(0, r * in, 1024, [&](int64_t b, int64_t e) {
      for (int64_t j = b; j < e; ++j) {
        float acc = 0.f;
        for (int64_t c = 0; c < chunks; ++c) acc += partial[c * r * in + j];
        da[j] = acc;
      }
    });
  }
}

void check_inputs(const at::Tensor& x, const at::Tensor& a) {
  TORCH_CHECK(x.device().is_cpu(), "peftmed lora_linear (cpp): expected CPU tensors, got ", x.device());
  TORCH_CHECK(x.dim() == 2 && x.is_contiguous(), "peftmed lora_linear (cpp): x must be 2-D contiguous");
  TORCH_CHECK(a.is_contiguous(), "peftmed lora_linear (cpp): lora_a must be contiguous");
}

}  // namespace

std::vector<at::Tensor> forward(const at::Tensor& x, const at::Tensor& w, const c10::optional<at::Tensor>& bias,
                                const at::Tensor& a, const at::Tensor& b, double scaling, double p, int64_t seed) {
  check_inputs(x, a);
  const int64_t rows = x.size(0), in = x.size(1), r = a.size(0);
  at::Tensor xa;
  if (p == 0.0) {
    xa = at::mm(x, a.t());
  } else {
    auto xa32 = at::empty({rows, r}, x.options().dtype(at::kFloat));
    const Dropout drop(p, seed);
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "lora_dropout_down", [&] {
      dropout_down<scalar_t>(x.data_ptr<scalar_t>(), a.data_ptr<scalar_t>(), xa32.data_ptr<float>(), rows, in, r, drop);
    });
    xa = xa32.to(x.scalar_type());
  }
  at::Tensor y = bias.has_value() && bias->defined() ? at::addmm(*bias, x, w.t()) : at::mm(x, w.t());
  y.addmm_(xa, b.t(), /*beta=*/1.0, /*alpha=*/scaling);
  return {y, xa};
}

std::vector<at::Tensor> backward(const at::Tensor& dy, const at::Tensor& x, const at::Tensor& w, const at::Tensor& a,
                                 const at::Tensor& b, const at::Tensor& xa, double scaling, double p, int64_t seed,
                                 std::vector<bool> needs) {
  check_inputs(x, a);
  TORCH_CHECK(needs.size() == 5, "peftmed lora_linear (cpp): needs must have 5 entries");
  const bool need_dx = needs[0], need_dw = needs[1], need_dbias = needs[2], need_da = needs[3], need_db = needs[4];
  at::Tensor dx, dw, dbias, da, db;
  at::Tensor gs;
  if (need_dx || need_da) gs = at::mm(dy, b).mul_(scaling);  // (T, r)
  if (need_dx) dx = at::mm(dy, w);
  if (need_dx || need_da) {
    // one pass over x and dx for both (with or without dropout) instead of two GEMMs reading x, dx
    const int64_t rows = x.size(0), in = x.size(1), r = a.size(0);
    auto gs32 = gs.to(at::kFloat).contiguous();
    auto da32 = need_da ? at::empty({r, in}, x.options().dtype(at::kFloat)) : at::Tensor();
    const Dropout drop(p, seed);
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "lora_dropout_backward", [&] {
      dropout_up_backward<scalar_t>(x.data_ptr<scalar_t>(), a.data_ptr<scalar_t>(), gs32.data_ptr<float>(),
                                    need_dx ? dx.data_ptr<scalar_t>() : nullptr,
                                    need_da ? da32.data_ptr<float>() : nullptr, rows, in, r, drop, need_dx, need_da);
    });
    if (need_da) da = da32.to(x.scalar_type());
  }
  if (need_db) db = at::mm(dy.t(), xa).mul_(scaling);
  if (need_dw) dw = at::mm(dy.t(), x);
  if (need_dbias) dbias = dy.sum(0);
  return {dx, dw, dbias, da, db};
}

// the mask itself, for tests that check every implementation drops the same elements
at::Tensor keep_mask(int64_t seed, int64_t rows, int64_t cols, double p) {
  auto out = at::empty({rows, cols}, at::TensorOptions().dtype(at::kFloat));
  const Dropout drop(p, seed);
  float* o = out.data_ptr<float>();
  at::parallel_for(0, rows, 16, [&](int64_t b, int64_t e) {
    for (int64_t t = b; t < e; ++t) drop.row_scales(t, cols, o + t * cols);
  });
  return out.ne(0);
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "peftmed lora_linear CPU kernels";
  m.def("forward", &forward, "lora_linear forward -> (y, xa)");
  m.def("backward", &backward, "lora_linear backward -> (dx, dw, dbias, da, db)");
  m.def("keep_mask", &keep_mask, "dropout keep mask (rows, cols) for a seed");
}

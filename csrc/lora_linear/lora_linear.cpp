// lora_linear on CPU:  y = x W^T + b + s * (dropout(x) A^T) B^T
//
// The two big products (x W^T + b, dy W) go to ATen's GEMM. Everything LoRA adds is done by ONE
// parallel pass over the rows after each of them (below): no (T, out) temporary, each activation row
// read once while it is in cache, and only two parallel regions per direction (the small skinny GEMMs
// this replaces each cost a parallel region, which is what hurts most on a busy 2-core machine).
// The dropout mask is never stored: the pass hashes (seed, row, col) -> keep with the arithmetic of
// peftmed/kernels/dropout.py, in forward and again in backward. dA and dB are reduced over rows in
// per-chunk fp32 partials, summed afterwards (two-stage reduction).
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

// Rows are processed RB at a time so that each row of A, B^T and of the dA/dB partials is loaded once
// per block rather than once per row (they are r x 768 floats each: L2, not L1); a short last block
// is padded with zero rows.
constexpr int64_t RB = 4;

// After y = x W^T + b (one GEMM), ONE parallel pass over the rows adds the LoRA term:
//   xa[t, :] = (x[t, :] * mask[t, :]) A^T          (r dot products per row)
//   y[t, :] += s * xa[t, :] B^T                      (r axpys per output row)
// a32 (r, in) and bt32 = B^T (r, out) are fp32 copies made once per call.
template <typename T>
void lora_forward_rows(const T* x, const float* a32, const float* bt32, T* y, T* xa, int64_t rows, int64_t in,
                       int64_t out, int64_t r, float scaling, const Dropout& drop) {
  const int64_t blocks = (rows + RB - 1) / RB;
  at::parallel_for(0, blocks, 4, [&](int64_t begin, int64_t end) {
    std::vector<float> xd(RB * in), yrow(RB * out), c(RB * r);
    for (int64_t blk = begin; blk < end; ++blk) {
      const int64_t t0 = blk * RB, nb = std::min(RB, rows - t0);
      std::fill(xd.begin(), xd.end(), 0.f);
      std::fill(yrow.begin(), yrow.end(), 0.f);
      for (int64_t j = 0; j < nb; ++j) {
        float* xj = xd.data() + j * in;
        const T* xr = x + (t0 + j) * in;
        drop.row_scales(t0 + j, in, xj);
#pragma omp simd
        for (int64_t i = 0; i < in; ++i) xj[i] *= static_cast<float>(xr[i]);
        const T* yr = y + (t0 + j) * out;
        float* yj = yrow.data() + j * out;
#pragma omp simd
        for (int64_t o = 0; o < out; ++o) yj[o] = static_cast<float>(yr[o]);
      }
      for (int64_t k = 0; k < r; ++k) {
        const float* ak = a32 + k * in;
        float s0 = 0.f, s1 = 0.f, s2 = 0.f, s3 = 0.f;
#pragma omp simd reduction(+ : s0, s1, s2, s3)
        for (int64_t i = 0; i < in; ++i) {
          s0 += xd[i] * ak[i];
          s1 += xd[in + i] * ak[i];
          s2 += xd[2 * in + i] * ak[i];
          s3 += xd[3 * in + i] * ak[i];
        }
        const float sums[RB] = {s0, s1, s2, s3};
        for (int64_t j = 0; j < RB; ++j) {
          const T v = static_cast<T>(sums[j]);
          if (j < nb) xa[(t0 + j) * r + k] = v;
          c[j * r + k] = scaling * static_cast<float>(v);  // the rounded xa, as backward's dB sees it
        }
      }
      for (int64_t k = 0; k < r; ++k) {
        const float* bk = bt32 + k * out;
        const float c0 = c[k], c1 = c[r + k], c2 = c[2 * r + k], c3 = c[3 * r + k];
#pragma omp simd
        for (int64_t o = 0; o < out; ++o) {
          yrow[o] += c0 * bk[o];
          yrow[out + o] += c1 * bk[o];
          yrow[2 * out + o] += c2 * bk[o];
          yrow[3 * out + o] += c3 * bk[o];
        }
      }
      for (int64_t j = 0; j < nb; ++j) {
        T* yr = y + (t0 + j) * out;
        const float* yj = yrow.data() + j * out;
#pragma omp simd
        for (int64_t o = 0; o < out; ++o) yr[o] = static_cast<T>(yj[o]);
      }
    }
  });
}

// After dx = dy W (one GEMM), ONE parallel pass over the rows does the rest of backward:
//   gs[t, :] = s * dy[t, :] B                        (r dot products per row)
//   dB^T    += xa[t, :]^T dy[t, :]                   (per-chunk fp32 partial)
//   dx[t, :] += mask * (gs[t, :] A)
//   dA      += gs[t, :]^T (x[t, :] * mask)           (per-chunk fp32 partial)
// The chunk partials are summed afterwards (stage 2 of the reduction over rows).
template <typename T>
void lora_backward_rows(const T* dy, const T* x, const T* xa, const float* a32, const float* bt32, T* dx, float* da,
                        float* dbt, int64_t rows, int64_t in, int64_t out, int64_t r, float scaling,
                        const Dropout& drop) {
  const bool need_dx = dx != nullptr, need_da = da != nullptr, need_db = dbt != nullptr;
  const int64_t blocks = (rows + RB - 1) / RB;
  const int64_t chunks = std::max<int64_t>(1, std::min<int64_t>(blocks, at::get_num_threads()));
  std::vector<float> part_a(need_da ? chunks * r * in : 0, 0.f), part_b(need_db ? chunks * r * out : 0, 0.f);
  at::parallel_for(0, chunks, 1, [&](int64_t cb, int64_t ce) {
    std::vector<float> dyr(RB * out), m(RB * in), xd(RB * in), g(RB * r), xak(RB * r);
    for (int64_t ch = cb; ch < ce; ++ch) {
      for (int64_t blk = ch * blocks / chunks; blk < (ch + 1) * blocks / chunks; ++blk) {
        const int64_t t0 = blk * RB, nb = std::min(RB, rows - t0);
        std::fill(dyr.begin(), dyr.end(), 0.f);
        std::fill(m.begin(), m.end(), 0.f);
        std::fill(xd.begin(), xd.end(), 0.f);
        std::fill(xak.begin(), xak.end(), 0.f);
        for (int64_t j = 0; j < nb; ++j) {
          const T* src = dy + (t0 + j) * out;
          float* dj = dyr.data() + j * out;
#pragma omp simd
          for (int64_t o = 0; o < out; ++o) dj[o] = static_cast<float>(src[o]);
          for (int64_t k = 0; k < r; ++k) xak[j * r + k] = static_cast<float>(xa[(t0 + j) * r + k]);
          if (need_dx || need_da) {
            float* mj = m.data() + j * in;
            drop.row_scales(t0 + j, in, mj);
            if (need_da) {
              const T* xr = x + (t0 + j) * in;
              float* xj = xd.data() + j * in;
#pragma omp simd
              for (int64_t i = 0; i < in; ++i) xj[i] = mj[i] * static_cast<float>(xr[i]);
            }
          }
        }
        for (int64_t k = 0; k < r; ++k) {
          const float* bk = bt32 + k * out;
          float* pbk = need_db ? part_b.data() + (ch * r + k) * out : nullptr;
          const float x0 = xak[k], x1 = xak[r + k], x2 = xak[2 * r + k], x3 = xak[3 * r + k];
          float s0 = 0.f, s1 = 0.f, s2 = 0.f, s3 = 0.f;
          if (need_db) {
#pragma omp simd reduction(+ : s0, s1, s2, s3)
            for (int64_t o = 0; o < out; ++o) {
              const float d0 = dyr[o], d1 = dyr[out + o], d2 = dyr[2 * out + o], d3 = dyr[3 * out + o];
              s0 += d0 * bk[o];
              s1 += d1 * bk[o];
              s2 += d2 * bk[o];
              s3 += d3 * bk[o];
              pbk[o] += x0 * d0 + x1 * d1 + x2 * d2 + x3 * d3;
            }
          } else {
#pragma omp simd reduction(+ : s0, s1, s2, s3)
            for (int64_t o = 0; o < out; ++o) {
              s0 += dyr[o] * bk[o];
              s1 += dyr[out + o] * bk[o];
              s2 += dyr[2 * out + o] * bk[o];
              s3 += dyr[3 * out + o] * bk[o];
            }
          }
          g[k] = scaling * s0;
          g[r + k] = scaling * s1;
          g[2 * r + k] = scaling * s2;
          g[3 * r + k] = scaling * s3;
        }
        if (need_dx) {
          for (int64_t j = 0; j < nb; ++j) {
            const float* gj = g.data() + j * r;
            const float* mj = m.data() + j * in;
            T* dxr = dx + (t0 + j) * in;
#pragma omp simd
            for (int64_t i = 0; i < in; ++i) {
              float acc = 0.f;
              for (int64_t k = 0; k < r; ++k) acc += gj[k] * a32[k * in + i];
              dxr[i] = static_cast<T>(static_cast<float>(dxr[i]) + mj[i] * acc);
            }
          }
        }
        if (need_da) {
          for (int64_t k = 0; k < r; ++k) {
            float* pak = part_a.data() + (ch * r + k) * in;
            const float g0 = g[k], g1 = g[r + k], g2 = g[2 * r + k], g3 = g[3 * r + k];
#pragma omp simd
            for (int64_t i = 0; i < in; ++i)
              pak[i] += g0 * xd[i] + g1 * xd[in + i] + g2 * xd[2 * in + i] + g3 * xd[3 * in + i];
          }
        }
      }
    }
  });
  // stage 2: sum the chunk partials (chunks = threads: a few (r, in) and (r, out) rows)
  if (need_da) {
    std::copy(part_a.begin(), part_a.begin() + r * in, da);
    for (int64_t c = 1; c < chunks; ++c)
      for (int64_t j = 0; j < r * in; ++j) da[j] += part_a[c * r * in + j];
  }
  if (need_db) {
    for (int64_t j = 0; j < r * out; ++j) {
      float acc = 0.f;
      for (int64_t c = 0; c < chunks; ++c) acc += part_b[c * r * out + j];
      dbt[j] = scaling * acc;
    }
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
  const int64_t rows = x.size(0), in = x.size(1), out = w.size(0), r = a.size(0);
  at::Tensor y = bias.has_value() && bias->defined() ? at::addmm(*bias, x, w.t()) : at::mm(x, w.t());
  auto xa = at::empty({rows, r}, x.options());
  auto a32 = a.to(at::kFloat).contiguous();
  auto bt32 = b.t().to(at::kFloat).contiguous();  // (r, out)
  const Dropout drop(p, seed);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "lora_forward_rows", [&] {
    lora_forward_rows<scalar_t>(x.data_ptr<scalar_t>(), a32.data_ptr<float>(), bt32.data_ptr<float>(),
                                y.data_ptr<scalar_t>(), xa.data_ptr<scalar_t>(), rows, in, out, r,
                                static_cast<float>(scaling), drop);
  });
  return {y, xa};
}

std::vector<at::Tensor> backward(const at::Tensor& dy, const at::Tensor& x, const at::Tensor& w, const at::Tensor& a,
                                 const at::Tensor& b, const at::Tensor& xa, double scaling, double p, int64_t seed,
                                 std::vector<bool> needs) {
  check_inputs(x, a);
  TORCH_CHECK(needs.size() == 5, "peftmed lora_linear (cpp): needs must have 5 entries");
  TORCH_CHECK(dy.is_contiguous() && xa.is_contiguous(), "peftmed lora_linear (cpp): dy and xa must be contiguous");
  const bool need_dx = needs[0], need_dw = needs[1], need_dbias = needs[2], need_da = needs[3], need_db = needs[4];
  const int64_t rows = x.size(0), in = x.size(1), out = w.size(0), r = a.size(0);
  at::Tensor dx, dw, dbias, da, db;
  if (need_dx) dx = at::mm(dy, w);
  if (need_dx || need_da || need_db) {
    auto a32 = a.to(at::kFloat).contiguous();
    auto bt32 = b.t().to(at::kFloat).contiguous();  // (r, out)
    auto da32 = need_da ? at::empty({r, in}, x.options().dtype(at::kFloat)) : at::Tensor();
    auto dbt32 = need_db ? at::empty({r, out}, x.options().dtype(at::kFloat)) : at::Tensor();
    const Dropout drop(p, seed);
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "lora_backward_rows", [&] {
      lora_backward_rows<scalar_t>(dy.data_ptr<scalar_t>(), x.data_ptr<scalar_t>(), xa.data_ptr<scalar_t>(),
                                   a32.data_ptr<float>(), bt32.data_ptr<float>(),
                                   need_dx ? dx.data_ptr<scalar_t>() : nullptr,
                                   need_da ? da32.data_ptr<float>() : nullptr,
                                   need_db ? dbt32.data_ptr<float>() : nullptr, rows, in, out, r,
                                   static_cast<float>(scaling), drop);
    });
    if (need_da) da = da32.to(a.scalar_type());
    if (need_db) db = dbt32.t().to(b.scalar_type()).contiguous();
  }
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

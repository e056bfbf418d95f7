// layer_norm on CPU (last dimension, with weight and bias).
//
// forward: one row per iteration (a row of a transformer's activations fits in L1): two-pass mean
// and variance in fp32, y written in the input dtype, mean and rstd saved in fp32.
// backward: ONE pass over the rows gives dx and, per chunk of rows, fp32 partial sums of dgamma and
// dbeta (stage 1); the chunk partials are then summed (stage 2). No (rows, N) temporary is made.
//
// Signatures match peftmed/kernels/layer_norm/reference.py.

#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <cmath>
#include <type_traits>
#include <vector>

namespace {

template <typename T>
void forward_rows(const T* x, const T* w, const T* b, T* y, float* mean, float* rstd, int64_t rows, int64_t n,
                  float eps) {
  std::vector<float> w32(w, w + n), b32(b, b + n);
  at::parallel_for(0, rows, 8, [&](int64_t begin, int64_t end) {
    std::vector<float> row(n);
    for (int64_t r = begin; r < end; ++r) {
      const T* xr = x + r * n;
      float sum = 0.f;
      const float* src = row.data();
      if constexpr (std::is_same_v<T, float>) {
        src = xr;  // fp32 rows are read in place; other dtypes are converted once into `row`
#pragma omp simd reduction(+ : sum)
        for (int64_t i = 0; i < n; ++i) sum += src[i];
      } else {
#pragma omp simd reduction(+ : sum)
        for (int64_t i = 0; i < n; ++i) {
          row[i] = static_cast<float>(xr[i]);
          sum += row[i];
        }
      }
      const float mu = sum / n;
      float sq = 0.f;
#pragma omp simd reduction(+ : sq)
      for (int64_t i = 0; i < n; ++i) sq += (src[i] - mu) * (src[i] - mu);
      const float rs = 1.0f / std::sqrt(sq / n + eps);
      T* yr = y + r * n;
#pragma omp simd
      for (int64_t i = 0; i < n; ++i) yr[i] = static_cast<T>((src[i] - mu) * rs * w32[i] + b32[i]);
      mean[r] = mu;
      rstd[r] = rs;
    }
  });
}

// One row at a time, two sweeps over it and no stores between them: the first sweep only reduces
// (sum g and sum g * xhat, with g = dy * gamma and xhat recomputed from x, mean, rstd); the second,
// with the row now in L1, writes dx and adds dy * xhat and dy into this chunk's fp32 dgamma/dbeta
// partials (stage 1). The chunk partials are summed at the end (stage 2). fp32 rows are read in
// place; other dtypes are converted once into fp32 row buffers.
template <typename T>
void backward_rows(const T* dy, const T* x, const T* w, const float* mean, const float* rstd, T* dx, float* dw,
                   float* db, int64_t rows, int64_t n) {
  std::vector<float> w32(w, w + n);
  const float* wv = w32.data();
  const bool need_dx = dx != nullptr, need_dwb = dw != nullptr || db != nullptr;
  const int64_t chunks = std::max<int64_t>(1, std::min<int64_t>(rows, at::get_num_threads()));
  std::vector<float> part_w(need_dwb ? chunks * n : 0, 0.f), part_b(need_dwb ? chunks * n : 0, 0.f);
  const float inv_n = 1.0f / static_cast<float>(n);
  at::parallel_for(0, chunks, 1, [&](int64_t cb, int64_t ce) {
    std::vector<float> xbuf, dbuf;
    if constexpr (!std::is_same_v<T, float>) {
      xbuf.resize(n);
      dbuf.resize(n);
    }
    // this thread's partials live in memory it allocated itself, copied out once at the end
    std::vector<float> lw(need_dwb ? n : 0), lb(need_dwb ? n : 0);
    for (int64_t c = cb; c < ce; ++c) {
      float* pw = lw.data();
      float* pb = lb.data();
      std::fill(lw.begin(), lw.end(), 0.f);
      std::fill(lb.begin(), lb.end(), 0.f);
      for (int64_t r = c * rows / chunks; r < (c + 1) * rows / chunks; ++r) {
        const float* xr;
        const float* dyr;
        if constexpr (std::is_same_v<T, float>) {
          xr = x + r * n;
          dyr = dy + r * n;
        } else {
          for (int64_t i = 0; i < n; ++i) {
            xbuf[i] = static_cast<float>(x[r * n + i]);
            dbuf[i] = static_cast<float>(dy[r * n + i]);
          }
          xr = xbuf.data();
          dyr = dbuf.data();
        }
        const float mu = mean[r], rs = rstd[r];
        if (need_dx) {
          float s_gx = 0.f, s_g = 0.f;
#pragma omp simd reduction(+ : s_gx, s_g)
          for (int64_t i = 0; i < n; ++i) {
            const float g = dyr[i] * wv[i];
            s_gx += g * ((xr[i] - mu) * rs);
            s_g += g;
          }
          const float c1 = s_gx * inv_n, c2 = s_g * inv_n;
          T* dxr = dx + r * n;
#pragma omp simd
          for (int64_t i = 0; i < n; ++i) {
            const float xh = (xr[i] - mu) * rs;
            dxr[i] = static_cast<T>(rs * (dyr[i] * wv[i] - c2 - xh * c1));
          }
        }
        // a sweep of its own (the row is in L1): fused with the dx sweep above it measured 2x slower
        if (need_dwb) {
#pragma omp simd
          for (int64_t i = 0; i < n; ++i) {
            const float d = dyr[i];
            pw[i] += d * ((xr[i] - mu) * rs);
            pb[i] += d;
          }
        }
      }
      if (need_dwb) {
        std::copy(lw.begin(), lw.end(), part_w.begin() + c * n);
        std::copy(lb.begin(), lb.end(), part_b.begin() + c * n);
      }
    }
  });
  if (need_dwb) {  // stage 2: sum the chunk partials
    for (int64_t c = 1; c < chunks; ++c) {
#pragma omp simd
      for (int64_t i = 0; i < n; ++i) {
        part_w[i] += part_w[c * n + i];
        part_b[i] += part_b[c * n + i];
      }
    }
    if (dw) std::copy(part_w.begin(), part_w.begin() + n, dw);
    if (db) std::copy(part_b.begin(), part_b.begin() + n, db);
  }
}

void check(const at::Tensor& x, const char* what) {
  TORCH_CHECK(x.device().is_cpu(), "peftmed layer_norm (cpp): expected CPU tensors, got ", x.device());
  TORCH_CHECK(x.dim() == 2 && x.is_contiguous(), "peftmed layer_norm (cpp): ", what, " must be 2-D contiguous");
}

}  // namespace

std::vector<at::Tensor> forward(const at::Tensor& x, const at::Tensor& w, const at::Tensor& b, double eps) {
  check(x, "x");
  const int64_t rows = x.size(0), n = x.size(1);
  auto y = at::empty_like(x);
  auto mean = at::empty({rows}, x.options().dtype(at::kFloat));
  auto rstd = at::empty({rows}, x.options().dtype(at::kFloat));
  auto wc = w.contiguous(), bc = b.contiguous();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "peftmed_layer_norm_fwd", [&] {
    forward_rows<scalar_t>(x.data_ptr<scalar_t>(), wc.data_ptr<scalar_t>(), bc.data_ptr<scalar_t>(),
                           y.data_ptr<scalar_t>(), mean.data_ptr<float>(), rstd.data_ptr<float>(), rows, n,
                           static_cast<float>(eps));
  });
  return {y, mean, rstd};
}

std::vector<at::Tensor> backward(const at::Tensor& dy, const at::Tensor& x, const at::Tensor& w,
                                 const at::Tensor& mean, const at::Tensor& rstd, std::vector<bool> needs) {
  check(x, "x");
  check(dy, "dy");
  TORCH_CHECK(needs.size() == 3, "peftmed layer_norm (cpp): needs must have 3 entries");
  const int64_t rows = x.size(0), n = x.size(1);
  at::Tensor dx = needs[0] ? at::empty_like(x) : at::Tensor();
  at::Tensor dw32 = needs[1] ? at::empty({n}, x.options().dtype(at::kFloat)) : at::Tensor();
  at::Tensor db32 = needs[2] ? at::empty({n}, x.options().dtype(at::kFloat)) : at::Tensor();
  auto wc = w.contiguous();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "peftmed_layer_norm_bwd", [&] {
    backward_rows<scalar_t>(dy.data_ptr<scalar_t>(), x.data_ptr<scalar_t>(), wc.data_ptr<scalar_t>(),
                            mean.data_ptr<float>(), rstd.data_ptr<float>(),
                            needs[0] ? dx.data_ptr<scalar_t>() : nullptr,
                            needs[1] ? dw32.data_ptr<float>() : nullptr,
                            needs[2] ? db32.data_ptr<float>() : nullptr, rows, n);
  });
  at::Tensor dw = needs[1] ? dw32.to(w.scalar_type()) : at::Tensor();
  at::Tensor db = needs[2] ? db32.to(w.scalar_type()) : at::Tensor();
  return {dx, dw, db};
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "peftmed layer_norm CPU kernels";
  m.def("forward", &forward, "layer_norm forward -> (y, mean, rstd)");
  m.def("backward", &backward, "layer_norm backward -> (dx, dw, db)");
}

// Python binding of the CUDA lora_linear: cuBLAS (through ATen) for the dense products, the kernels
// in lora_linear.cu for everything that touches the dropout mask. Same signatures as the CPU op
// plus the CUDA stream (an int from torch.cuda.current_stream().cuda_stream), so the .cu file needs
// no c10/cuda headers. Only compiled where torch has CUDA.

#include <torch/extension.h>
#include <cuda_runtime.h>

#include <cmath>
#include <cstdint>
#include <vector>

cudaError_t peftmed_lora_dropout_down(int dtype, const void* x, const void* a, void* xa, int64_t rows, int64_t in,
                                      int r, uint32_t key, uint32_t threshold, float scale, cudaStream_t stream);
cudaError_t peftmed_lora_dropout_dx(int dtype, const float* gs, const void* a, void* dx, int64_t rows, int64_t in,
                                    int r, uint32_t key, uint32_t threshold, float scale, cudaStream_t stream);
cudaError_t peftmed_lora_dropout_da(int dtype, const float* gs, const void* x, float* partial, int64_t rows,
                                    int64_t in, int r, int64_t splits, uint32_t key, uint32_t threshold, float scale,
                                    cudaStream_t stream);

namespace {

uint32_t mix32(uint32_t h) {
  h ^= h >> 16;
  h *= 0x7feb352dU;
  h ^= h >> 15;
  h *= 0x846ca68bU;
  h ^= h >> 16;
  return h;
}

struct Dropout {
  uint32_t key, threshold;
  float scale;
  Dropout(double p, int64_t seed)
      : key(mix32(static_cast<uint32_t>(seed) ^ 0x9E3779B9U)),
        threshold(static_cast<uint32_t>(std::min<double>(std::nearbyint(p * 16777216.0), 16777216.0))),
        scale(static_cast<float>(1.0 / (1.0 - p))) {}
};

int dtype_code(const at::Tensor& t) {
  switch (t.scalar_type()) {
    case at::kFloat: return 0;
    case at::kHalf: return 1;
    case at::kBFloat16: return 2;
    default: TORCH_CHECK(false, "peftmed lora_linear (cuda): unsupported dtype ", t.scalar_type());
  }
}

void check(cudaError_t err, const char* what) {
  TORCH_CHECK(err == cudaSuccess, "peftmed lora_linear (cuda): ", what, " failed: ", cudaGetErrorString(err));
}

}  // namespace

std::vector<at::Tensor> forward(const at::Tensor& x, const at::Tensor& w, const c10::optional<at::Tensor>& bias,
                                const at::Tensor& a, const at::Tensor& b, double scaling, double p, int64_t seed,
                                int64_t stream) {
  TORCH_CHECK(x.is_cuda() && x.is_contiguous() && a.is_contiguous(), "peftmed lora_linear (cuda): contiguous CUDA inputs");
  at::Tensor xa;
  if (p == 0.0) {
    xa = at::mm(x, a.t());
  } else {
    xa = at::empty({x.size(0), a.size(0)}, x.options());
    const Dropout d(p, seed);
    check(peftmed_lora_dropout_down(dtype_code(x), x.data_ptr(), a.data_ptr(), xa.data_ptr(), x.size(0), x.size(1),
                                    static_cast<int>(a.size(0)), d.key, d.threshold, d.scale,
                                    reinterpret_cast<cudaStream_t>(stream)),
          "dropout_down");
  }
  at::Tensor y = bias.has_value() && bias->defined() ? at::addmm(*bias, x, w.t()) : at::mm(x, w.t());
  y.addmm_(xa, b.t(), 1.0, scaling);
  return {y, xa};
}

std::vector<at::Tensor> backward(const at::Tensor& dy, const at::Tensor& x, const at::Tensor& w, const at::Tensor& a,
                                 const at::Tensor& b, const at::Tensor& xa, double scaling, double p, int64_t seed,
                                 std::vector<bool> needs, int64_t stream) {
  const bool need_dx = needs[0], need_dw = needs[1], need_dbias = needs[2], need_da = needs[3], need_db = needs[4];
  at::Tensor dx, dw, dbias, da, db, gs;
  if (need_dx || need_da) gs = at::mm(dy, b).mul_(scaling);
  if (need_dx) dx = at::mm(dy, w);
  if (p == 0.0) {
    if (need_dx) dx.addmm_(gs, a);
    if (need_da) da = at::mm(gs.t(), x);
  } else if (need_dx || need_da) {
    const Dropout d(p, seed);
    auto gs32 = gs.to(at::kFloat).contiguous();
    const int64_t rows = x.size(0), in = x.size(1);
    const int r = static_cast<int>(a.size(0));
    auto s = reinterpret_cast<cudaStream_t>(stream);
    if (need_dx)
      check(peftmed_lora_dropout_dx(dtype_code(x), gs32.data_ptr<float>(), a.data_ptr(), dx.data_ptr(), rows, in, r,
                                    d.key, d.threshold, d.scale, s),
            "dropout_dx");
    if (need_da) {
      const int64_t splits = std::max<int64_t>(1, std::min<int64_t>(rows, 64));
      auto partial = at::empty({splits, r, in}, x.options().dtype(at::kFloat));
      check(peftmed_lora_dropout_da(dtype_code(x), gs32.data_ptr<float>(), x.data_ptr(), partial.data_ptr<float>(),
                                    rows, in, r, splits, d.key, d.threshold, d.scale, s),
            "dropout_da");
      da = partial.sum(0).to(x.scalar_type());  // stage 2 of the fp32 reduction
    }
  }
  if (need_db) db = at::mm(dy.t(), xa).mul_(scaling);
  if (need_dw) dw = at::mm(dy.t(), x);
  if (need_dbias) dbias = dy.sum(0);
  return {dx, dw, dbias, da, db};
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "peftmed lora_linear CUDA kernels";
  m.def("forward", &forward, "lora_linear forward -> (y, xa)");
  m.def("backward", &backward, "lora_linear backward -> (dx, dw, dbias, da, db)");
}

// Python binding of the CUDA layer_norm (kernels in layer_norm.cu). Same signatures as the CPU op plus
// the CUDA stream as an int (torch.cuda.current_stream().cuda_stream). Only compiled where torch has CUDA.

#include <torch/extension.h>
#include <cuda_runtime.h>

#include <vector>

cudaError_t peftmed_ln_forward(int dtype, const void* x, const void* w, const void* b, void* y, float* mean,
                               float* rstd, int64_t rows, int64_t n, float eps, cudaStream_t stream);
cudaError_t peftmed_ln_backward(int dtype, const void* dy, const void* x, const void* w, const float* mean,
                                const float* rstd, void* dx, void* dw, void* db, float* part_w, float* part_b,
                                int64_t rows, int64_t n, int64_t blocks, cudaStream_t stream);

namespace {

int dtype_code(const at::Tensor& t) {
  switch (t.scalar_type()) {
    case at::kFloat: return 0;
    case at::kHalf: return 1;
    case at::kBFloat16: return 2;
    default: TORCH_CHECK(false, "peftmed layer_norm (cuda): unsupported dtype ", t.scalar_type());
  }
}

void check(cudaError_t err, const char* what) {
  TORCH_CHECK(err == cudaSuccess, "peftmed layer_norm (cuda): ", what, " failed: ", cudaGetErrorString(err));
}

}  // namespace

std::vector<at::Tensor> forward(const at::Tensor& x, const at::Tensor& w, const at::Tensor& b, double eps,
                                int64_t stream) {
  TORCH_CHECK(x.is_cuda() && x.dim() == 2 && x.is_contiguous(), "peftmed layer_norm (cuda): 2-D contiguous CUDA x");
  const int64_t rows = x.size(0), n = x.size(1);
  auto y = at::empty_like(x);
  auto mean = at::empty({rows}, x.options().dtype(at::kFloat));
  auto rstd = at::empty({rows}, x.options().dtype(at::kFloat));
  auto wc = w.contiguous(), bc = b.contiguous();
  check(peftmed_ln_forward(dtype_code(x), x.data_ptr(), wc.data_ptr(), bc.data_ptr(), y.data_ptr(),
                           mean.data_ptr<float>(), rstd.data_ptr<float>(), rows, n, static_cast<float>(eps),
                           reinterpret_cast<cudaStream_t>(stream)),
        "forward");
  return {y, mean, rstd};
}

std::vector<at::Tensor> backward(const at::Tensor& dy, const at::Tensor& x, const at::Tensor& w,
                                 const at::Tensor& mean, const at::Tensor& rstd, std::vector<bool> needs,
                                 int64_t stream) {
  TORCH_CHECK(dy.is_contiguous() && x.is_contiguous(), "peftmed layer_norm (cuda): contiguous dy and x");
  const int64_t rows = x.size(0), n = x.size(1);
  int sms = 0;
  cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, x.get_device());
  const int64_t blocks = std::max<int64_t>(1, std::min<int64_t>(rows, 4 * static_cast<int64_t>(sms)));
  auto part_w = at::empty({blocks, n}, x.options().dtype(at::kFloat));
  auto part_b = at::empty({blocks, n}, x.options().dtype(at::kFloat));
  at::Tensor dx = needs[0] ? at::empty_like(x) : at::Tensor();
  at::Tensor dw = needs[1] ? at::empty_like(w) : at::Tensor();
  at::Tensor db = needs[2] ? at::empty_like(w) : at::Tensor();
  auto wc = w.contiguous();
  check(peftmed_ln_backward(dtype_code(x), dy.data_ptr(), x.data_ptr(), wc.data_ptr(), mean.data_ptr<float>(),
                            rstd.data_ptr<float>(), needs[0] ? dx.data_ptr() : nullptr,
                            needs[1] ? dw.data_ptr() : nullptr, needs[2] ? db.data_ptr() : nullptr,
                            part_w.data_ptr<float>(), part_b.data_ptr<float>(), rows, n, blocks,
                            reinterpret_cast<cudaStream_t>(stream)),
        "backward");
  return {dx, dw, db};
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "peftmed layer_norm CUDA kernels";
  m.def("forward", &forward, "layer_norm forward -> (y, mean, rstd)");
  m.def("backward", &backward, "layer_norm backward -> (dx, dw, db)");
}

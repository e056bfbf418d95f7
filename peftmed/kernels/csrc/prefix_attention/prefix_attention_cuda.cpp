// Python binding of the CUDA prefix_attention (kernels in prefix_attention.cu). Same signatures as
// peftmed/kernels/prefix_attention/reference.py plus the CUDA stream as an int. Only compiled where
// torch has CUDA.

#include <torch/extension.h>
#include <cuda_runtime.h>

#include <cmath>
#include <vector>

struct PeftmedPrefixShape {
  int64_t B, H, Tq, Tk, P, D;
  float scale;
  uint32_t key, thr;
  float drop_scale;
  bool dropout, causal;
  const uint8_t* mask;
  int64_t smb, smh, smq, smk;
};

cudaError_t peftmed_prefix_attention_forward(int dtype, const PeftmedPrefixShape& shape, const void* q, const void* k,
                                             const void* v, const void* pk, const void* pv, void* out, float* lse,
                                             cudaStream_t stream);
cudaError_t peftmed_prefix_attention_backward(int dtype, const PeftmedPrefixShape& shape, const void* q,
                                              const void* k, const void* v, const void* pk, const void* pv,
                                              const void* dout, const float* lse, const float* delta, void* dq,
                                              void* dk, void* dv, void* dpk, void* dpv, cudaStream_t stream);

namespace {

int dtype_code(const at::Tensor& t) {
  switch (t.scalar_type()) {
    case at::kFloat: return 0;
    case at::kHalf: return 1;
    case at::kBFloat16: return 2;
    default: TORCH_CHECK(false, "peftmed prefix_attention (cuda): unsupported dtype ", t.scalar_type());
  }
}

void check(cudaError_t err, const char* what) {
  TORCH_CHECK(err == cudaSuccess, "peftmed prefix_attention (cuda): ", what, " failed: ", cudaGetErrorString(err));
}

uint32_t mix32(uint32_t h) {  // peftmed/kernels/dropout.py's mix32
  h ^= h >> 16;
  h *= 0x7feb352dU;
  h ^= h >> 15;
  h *= 0x846ca68bU;
  h ^= h >> 16;
  return h;
}

// the mask stays alive in `holder` (a uint8 view of the bool mask) while the kernels run
PeftmedPrefixShape make_shape(const at::Tensor& q, const at::Tensor& k, const at::Tensor& pk,
                              const c10::optional<at::Tensor>& mask, bool causal, c10::optional<double> scale,
                              double p, int64_t seed, at::Tensor& holder) {
  TORCH_CHECK(q.is_cuda() && q.is_contiguous() && k.is_contiguous() && pk.is_contiguous(),
              "peftmed prefix_attention (cuda): contiguous CUDA tensors");
  PeftmedPrefixShape s{};
  s.B = q.size(0), s.H = q.size(1), s.Tq = q.size(2), s.D = q.size(3), s.Tk = k.size(2), s.P = pk.size(1);
  s.scale = static_cast<float>(scale.has_value() ? *scale : 1.0 / std::sqrt(static_cast<double>(s.D)));
  s.dropout = p > 0.0;
  s.causal = causal;
  s.key = mix32(static_cast<uint32_t>(seed & 0xFFFFFFFF) ^ 0x9E3779B9U);
  s.thr = static_cast<uint32_t>(std::llround(p * (1 << 24)));
  s.drop_scale = static_cast<float>(1.0 / (1.0 - p));
  if (mask.has_value()) {
    holder = mask->to(at::kByte);  // bool -> uint8 (a view of the same bytes is not guaranteed)
    int64_t* strides[4] = {&s.smb, &s.smh, &s.smq, &s.smk};
    for (int d = 0; d < 4; ++d) *strides[d] = holder.size(d) == 1 ? 0 : holder.stride(d);
    s.mask = holder.data_ptr<uint8_t>();
  }
  return s;
}

}  // namespace

std::vector<at::Tensor> forward(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& pk,
                                const at::Tensor& pv, const c10::optional<at::Tensor>& mask, bool causal,
                                c10::optional<double> scale, double p, int64_t seed, int64_t stream) {
  at::Tensor holder;
  const auto s = make_shape(q, k, pk, mask, causal, scale, p, seed, holder);
  auto out = at::empty_like(q);
  auto lse = at::empty({s.B, s.H, s.Tq}, q.options().dtype(at::kFloat));
  check(peftmed_prefix_attention_forward(dtype_code(q), s, q.data_ptr(), k.data_ptr(), v.data_ptr(), pk.data_ptr(),
                                         pv.data_ptr(), out.data_ptr(), lse.data_ptr<float>(),
                                         reinterpret_cast<cudaStream_t>(stream)),
        "forward");
  return {out, lse};
}

std::vector<at::Tensor> backward(const at::Tensor& dout, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                 const at::Tensor& pk, const at::Tensor& pv, const c10::optional<at::Tensor>& mask,
                                 bool causal, c10::optional<double> scale, double p, int64_t seed,
                                 const at::Tensor& out, const at::Tensor& lse, int64_t stream) {
  at::Tensor holder;
  const auto s = make_shape(q, k, pk, mask, causal, scale, p, seed, holder);
  auto delta = (dout.to(at::kFloat) * out.to(at::kFloat)).sum(-1).contiguous();  // rowsum(dO * O)
  auto lse_c = lse.contiguous();
  auto dq = at::empty_like(q), dk = at::empty_like(k), dv = at::empty_like(v);
  auto dpk = at::empty_like(pk), dpv = at::empty_like(pv);
  check(peftmed_prefix_attention_backward(dtype_code(q), s, q.data_ptr(), k.data_ptr(), v.data_ptr(), pk.data_ptr(),
                                          pv.data_ptr(), dout.data_ptr(), lse_c.data_ptr<float>(),
                                          delta.data_ptr<float>(), dq.data_ptr(), dk.data_ptr(), dv.data_ptr(),
                                          dpk.data_ptr(), dpv.data_ptr(), reinterpret_cast<cudaStream_t>(stream)),
        "backward");
  return {dq, dk, dv, dpk, dpv};
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "peftmed prefix_attention CUDA kernels";
  m.def("forward", &forward, "prefix_attention forward -> (out, lse)");
  m.def("backward", &backward, "prefix_attention backward -> (dq, dk, dv, dprefix_k, dprefix_v)");
}

// Torch binding of the fused GSPN-2 kernels. Shapes and dtypes are checked in Python
// (gspn_diffusers/ops/validation.py); here only what the kernels themselves rely on is asserted.
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/extension.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <vector>

#include "gspn_api.h"

namespace {

using at::Tensor;

template <typename T>
const T* ptr(const Tensor& t) { return reinterpret_cast<const T*>(t.data_ptr()); }
template <typename T>
T* mut_ptr(Tensor& t) { return reinterpret_cast<T*>(t.data_ptr()); }

// gates, lam and u may be views with a larger batch stride; inside one batch item they must be dense.
int64_t batch_stride(const Tensor& t, const char* name) {
  const int64_t inner = t[0].numel();
  TORCH_CHECK(t.is_cuda() && (t.size(0) == 1 || t.stride(0) >= inner) && t[0].is_contiguous(), "gspn: ", name,
              " must be a CUDA tensor, contiguous inside each batch item");
  return t.size(0) == 1 ? inner : t.stride(0);
}

bool aligned16(std::initializer_list<const Tensor*> tensors) {
  for (const Tensor* t : tensors)
    if (t->defined() && t->numel() && reinterpret_cast<uintptr_t>(t->data_ptr()) % 16 != 0) return false;
  return true;
}

gspn::Shape make_shape(const Tensor& x, const Tensor& gates, const Tensor& lam, const c10::optional<Tensor>& u,
                       int64_t chunk) {
  gspn::Shape s;
  s.B = int(x.size(0));
  s.C = int(x.size(1));
  s.H = int(x.size(2));
  s.W = int(x.size(3));
  s.G = int(gates.size(3));
  s.chunk = int(std::min<int64_t>(chunk, 1 << 30));
  TORCH_CHECK(std::max(s.H, s.W) <= gspn::kMaxLine, "gspn_propagate: the CUDA kernels scan lines of at most ",
              gspn::kMaxLine, " positions, got H=", s.H, ", W=", s.W, "; use backend=\"reference\"");
  s.gates_batch_stride = batch_stride(gates, "gates");
  s.lam_batch_stride = batch_stride(lam, "lam");
  s.u_batch_stride = u ? batch_stride(*u, "u") : 0;
  return s;
}

void check_cuda(const Tensor& t, const char* name) {  // dense tensors: x, gy, the state
  TORCH_CHECK(t.is_cuda() && t.is_contiguous(), "gspn: ", name, " must be a contiguous CUDA tensor");
}

template <typename Fn>
void dispatch(at::ScalarType dtype, Fn&& fn) {
  switch (dtype) {
    case at::kFloat: fn(float{}); break;
    case at::kHalf: fn(__half{}); break;
    case at::kBFloat16: fn(__nv_bfloat16{}); break;
    default: TORCH_CHECK(false, "gspn_propagate: the CUDA kernels take float32, float16 or bfloat16, got ", dtype);
  }
}

// The current stream, and one from torch's pool for the column scans (gspn::Streams).
gspn::Streams streams_for(const Tensor& x) {
  return {at::cuda::getCurrentCUDAStream(), at::cuda::getStreamFromPool(false, x.device().index())};
}

// Scratch for the staged tap weights (gspn_api.h: staged_taps), or an empty tensor.
Tensor taps_scratch(const gspn::Shape& s, const Tensor& x) {
  const auto f32 = x.options().dtype(at::kFloat);
  return gspn::staged_taps(s) ? at::empty({s.B, 4, 2, s.G, s.H, s.W}, f32) : at::empty({0}, f32);
}
float* data_or_null(Tensor& t) { return t.numel() ? mut_ptr<float>(t) : nullptr; }

void check_launch(cudaError_t err) {
  TORCH_CHECK(err == cudaSuccess, "gspn_propagate: kernel launch failed: ", cudaGetErrorString(err));
}

std::vector<Tensor> forward(const Tensor& x, const Tensor& gates, const Tensor& lam, const c10::optional<Tensor>& u,
                            int64_t chunk, bool save_state) {
  check_cuda(x, "x");
  const c10::cuda::CUDAGuard guard(x.device());
  const gspn::Shape s = make_shape(x, gates, lam, u, chunk);
  Tensor y = at::empty({s.B, 4, s.C, s.H, s.W}, x.options());
  const auto f32 = x.options().dtype(at::kFloat);
  Tensor h = save_state ? at::empty(y.sizes(), f32) : at::empty({0}, f32);
  Tensor taps = taps_scratch(s, x);
  const gspn::Streams streams = streams_for(x);
  dispatch(x.scalar_type(), [&](auto tag) {
    using T = decltype(tag);
    const bool aligned = aligned16({&x, &gates, &lam, u ? &*u : &x, &y, &h});
    check_launch(gspn::launch_forward<T>(ptr<T>(x), ptr<T>(gates), ptr<T>(lam), u ? ptr<T>(*u) : nullptr,
                                         mut_ptr<T>(y), data_or_null(h), data_or_null(taps), s, aligned, streams));
  });
  return {y, h};
}

std::vector<Tensor> backward(const Tensor& gy, const Tensor& x, const Tensor& gates, const Tensor& lam,
                             const c10::optional<Tensor>& u, const Tensor& state, int64_t chunk) {
  for (auto* t : {&gy, &x, &state}) check_cuda(*t, "gy, x and state");
  const c10::cuda::CUDAGuard guard(x.device());
  const gspn::Shape s = make_shape(x, gates, lam, u, chunk);
  TORCH_CHECK(state.numel() == gy.numel() && state.scalar_type() == at::kFloat,
              "gspn: the forward state was not saved; run the forward with grad enabled");
  const auto f32 = x.options().dtype(at::kFloat);
  Tensor gh = at::empty({s.B, 4, s.C, s.H, s.W}, f32);  // the adjoint state, scratch
  Tensor gx = at::empty({s.B, s.C, s.H, s.W}, x.options());
  const bool summed = gspn::gate_gradients_in_float32(s);
  Tensor ggates = at::empty({s.B, 4, 3, s.G, s.H, s.W}, summed ? f32 : gates.options().dtype(x.scalar_type()));
  Tensor glam = at::empty({s.B, 4, s.C, s.H, s.W}, lam.options());
  Tensor gu = u ? at::empty({s.B, 4, s.C, s.H, s.W}, u->options()) : at::empty({0}, x.options());
  Tensor taps = taps_scratch(s, x);
  const auto stream = at::cuda::getCurrentCUDAStream();
  dispatch(x.scalar_type(), [&](auto tag) {
    using T = decltype(tag);
    const bool aligned = aligned16({&gy, &gates, u ? &*u : &gy, &gh});  // what the adjoint scan stages
    check_launch(gspn::launch_backward<T>(ptr<T>(gy), ptr<T>(x), ptr<T>(gates), ptr<T>(lam),
                                          u ? ptr<T>(*u) : nullptr, ptr<float>(state), mut_ptr<float>(gh),
                                          mut_ptr<T>(gx), ggates.data_ptr(), mut_ptr<T>(glam),
                                          u ? mut_ptr<T>(gu) : nullptr, data_or_null(taps), s, aligned, stream));
  });
  return {gx, ggates.to(gates.scalar_type()), glam, gu};
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "Fused GSPN-2 line-scan propagation kernels";
  m.def("forward", &forward, "GSPN-2 forward: (y, state)");
  m.def("backward", &backward, "GSPN-2 backward: (gx, ggates, glam, gu)");
}

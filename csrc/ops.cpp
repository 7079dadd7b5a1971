// The svdkern op schemas (declared once, here), the Autocast kernels, and the
// Python module stub `svdkern._C` whose import loads this library.
//
// Kernels per dispatch key live elsewhere: CPU in cpu/kernels.cpp, autograd
// in autograd.cpp, CUDA (Triton) and fake kernels in svdkern/ops.py.
#include <Python.h>

#include <ATen/autocast_mode.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/library.h>

extern "C" {
// Importing svdkern._C runs this library's static initializers, which register the ops.
PyMODINIT_FUNC PyInit__C(void) {
  static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module);
}
}

TORCH_LIBRARY(svdkern, m) {
  m.def("compose(Tensor U, Tensor s, Tensor V) -> Tensor");
  m.def("compose_backward(Tensor grad_W, Tensor U, Tensor s, Tensor V) -> (Tensor, Tensor, Tensor)");
  // The grouped ops produce packed buffers (packed.h): one tensor per output, so no output
  // aliases another. compose_grouped (CompositeImplicitAutograd, autograd.cpp) returns the
  // layers' views of compose_grouped_packed's buffer W = [W_0, W_1, ...] (each m×n row-major).
  m.def("compose_grouped(Tensor[] Us, Tensor[] ss, Tensor[] Vs) -> Tensor[]");
  m.def("compose_grouped_packed(Tensor[] Us, Tensor[] ss, Tensor[] Vs) -> Tensor");
  // grad_W is packed like W; returns (dF, ds): dF = [dU_0, ..., dU_last, dV_0, ..., dV_last]
  // (the layout of the packed factors), ds = [ds_0, ds_1, ...].
  m.def(
      "compose_grouped_backward(Tensor grad_W, Tensor[] Us, Tensor[] ss, Tensor[] Vs)"
      " -> (Tensor, Tensor)");
  m.def("lowrank_linear(Tensor x, Tensor U, Tensor s, Tensor V, Tensor? bias=None) -> Tensor");
  // The forward used under autograd also returns xv = x·V (rows×r) for the backward to
  // reuse, or an empty tensor where the kernel recomputes it on chip (Triton).
  m.def(
      "lowrank_linear_forward(Tensor x, Tensor U, Tensor s, Tensor V, Tensor? bias=None)"
      " -> (Tensor, Tensor)");
  m.def(
      "lowrank_linear_backward(Tensor grad_y, Tensor x, Tensor U, Tensor s, Tensor V,"
      " Tensor xv, bool bias_grad) -> (Tensor, Tensor, Tensor, Tensor, Tensor)");
  m.def("orth_loss(Tensor[] mats) -> Tensor");
  // The forward used under autograd also returns the Gram residuals Rᵢ = MᵢᵀMᵢ − I (rᵢ×rᵢ,
  // fp32, packed), so the backward 4·M·R/r² costs one GEMM per matrix instead of two.
  // The backward returns the packed gradients [dM_0, dM_1, ...].
  m.def("orth_loss_forward(Tensor[] mats) -> (Tensor, Tensor)");
  m.def("orth_loss_backward(Tensor grad, Tensor[] mats, Tensor residuals) -> Tensor");
  m.def("sparsity_loss(Tensor[] svals, str kind) -> Tensor");
  // Returns the packed gradients [ds_0, ds_1, ...].
  m.def("sparsity_loss_backward(Tensor grad, Tensor[] svals, str kind) -> Tensor");
}

namespace svdkern {
namespace {

// Under torch.autocast the matmul-like ops run in the autocast dtype, as
// torch.matmul does; the loss ops have no autocast kernel, so they run in the
// dtype of their inputs (fp32 parameters stay fp32) and return fp32.
template <c10::DeviceType device>
struct Autocast {
  static constexpr c10::DispatchKey key = device == c10::DeviceType::CUDA
                                              ? c10::DispatchKey::AutocastCUDA
                                              : c10::DispatchKey::AutocastCPU;

  static at::Tensor cast(const at::Tensor& t) {
    return at::autocast::cached_cast(at::autocast::get_autocast_dtype(device), t, device);
  }

  static std::vector<at::Tensor> cast(at::TensorList ts) {
    std::vector<at::Tensor> out;
    out.reserve(ts.size());
    for (const auto& t : ts) out.push_back(cast(t));
    return out;
  }

  static at::Tensor compose(const at::Tensor& U, const at::Tensor& s, const at::Tensor& V) {
    c10::impl::ExcludeDispatchKeyGuard no_autocast(key);
    static auto op = c10::Dispatcher::singleton()
                         .findSchemaOrThrow("svdkern::compose", "")
                         .typed<at::Tensor(const at::Tensor&, const at::Tensor&,
                                           const at::Tensor&)>();
    return op.call(cast(U), cast(s), cast(V));
  }

  // compose_grouped (composite) reaches this through compose_grouped_packed.
  static at::Tensor compose_grouped_packed(at::TensorList Us, at::TensorList ss,
                                           at::TensorList Vs) {
    c10::impl::ExcludeDispatchKeyGuard no_autocast(key);
    static auto op = c10::Dispatcher::singleton()
                         .findSchemaOrThrow("svdkern::compose_grouped_packed", "")
                         .typed<at::Tensor(at::TensorList, at::TensorList, at::TensorList)>();
    return op.call(cast(Us), cast(ss), cast(Vs));
  }

  static at::Tensor lowrank_linear(const at::Tensor& x, const at::Tensor& U, const at::Tensor& s,
                                   const at::Tensor& V, const std::optional<at::Tensor>& bias) {
    c10::impl::ExcludeDispatchKeyGuard no_autocast(key);
    static auto op = c10::Dispatcher::singleton()
                         .findSchemaOrThrow("svdkern::lowrank_linear", "")
                         .typed<at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                           const at::Tensor&, const std::optional<at::Tensor>&)>();
    std::optional<at::Tensor> b;
    if (bias.has_value() && bias->defined()) b = cast(*bias);
    return op.call(cast(x), cast(U), cast(s), cast(V), b);
  }
};

}  // namespace
}  // namespace svdkern

TORCH_LIBRARY_IMPL(svdkern, AutocastCUDA, m) {
  using A = svdkern::Autocast<c10::DeviceType::CUDA>;
  m.impl("compose", &A::compose);
  m.impl("compose_grouped_packed", &A::compose_grouped_packed);
  m.impl("lowrank_linear", &A::lowrank_linear);
}

TORCH_LIBRARY_IMPL(svdkern, AutocastCPU, m) {
  using A = svdkern::Autocast<c10::DeviceType::CPU>;
  m.impl("compose", &A::compose);
  m.impl("compose_grouped_packed", &A::compose_grouped_packed);
  m.impl("lowrank_linear", &A::lowrank_linear);
}

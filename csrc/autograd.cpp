// Autograd of the svdkern ops, registered at the Autograd key.
//
// Each forward calls the op below autograd and each backward calls the op's
// backward op, both through typed dispatcher handles, so whichever kernel is
// registered for the tensors' device (C++ on CPU, Triton on CUDA, Triton on
// CPU in interpreter mode) serves both directions. Double backward is not
// supported: the backward ops have no autograd of their own.
//
// The grouped ops' kernels return packed buffers (packed.h); the per-layer
// tensors are ATen views of them taken here, outside the ops: the forward's
// by compose_grouped (CompositeImplicitAutograd), the gradients' by the
// backward functions below.
#include <torch/autograd.h>
#include <torch/library.h>

#include "packed.h"

namespace svdkern {
namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;
using Tensor = at::Tensor;
using TensorVec = std::vector<at::Tensor>;

template <typename Signature>
c10::TypedOperatorHandle<Signature> op_handle(const char* name) {
  return c10::Dispatcher::singleton().findSchemaOrThrow(name, "").typed<Signature>();
}

// Splits a flat gradient list into consecutive chunks of the given sizes.
std::vector<TensorVec> split(const variable_list& flat, std::initializer_list<size_t> sizes) {
  std::vector<TensorVec> out;
  size_t at = 0;
  for (size_t n : sizes) {
    out.emplace_back(flat.begin() + at, flat.begin() + at + n);
    at += n;
  }
  return out;
}

class Compose : public torch::autograd::Function<Compose> {
 public:
  static Tensor forward(AutogradContext* ctx, const Tensor& U, const Tensor& s, const Tensor& V) {
    at::AutoDispatchBelowADInplaceOrView guard;
    static auto op = op_handle<Tensor(const Tensor&, const Tensor&, const Tensor&)>("svdkern::compose");
    ctx->save_for_backward({U, s, V});
    return op.call(U, s, V);
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    static auto op = op_handle<std::tuple<Tensor, Tensor, Tensor>(
        const Tensor&, const Tensor&, const Tensor&, const Tensor&)>("svdkern::compose_backward");
    const auto saved = ctx->get_saved_variables();
    auto [dU, ds, dV] = op.call(grads[0], saved[0], saved[1], saved[2]);
    return {dU, ds, dV};
  }
};

// Autograd of compose_grouped_packed. The layers' W_l are views of its one output (taken by
// compose_grouped below with split_with_sizes), so their gradients reach this backward
// packed by split_with_sizes' backward: one copy, as packing them for the kernel costs.
class ComposeGroupedPacked : public torch::autograd::Function<ComposeGroupedPacked> {
 public:
  static Tensor forward(AutogradContext* ctx, at::TensorList Us, at::TensorList ss,
                        at::TensorList Vs) {
    at::AutoDispatchBelowADInplaceOrView guard;
    static auto op = op_handle<Tensor(at::TensorList, at::TensorList, at::TensorList)>(
        "svdkern::compose_grouped_packed");
    variable_list saved(Us.begin(), Us.end());
    saved.insert(saved.end(), ss.begin(), ss.end());
    saved.insert(saved.end(), Vs.begin(), Vs.end());
    ctx->save_for_backward(saved);
    ctx->saved_data["n"] = static_cast<int64_t>(Us.size());
    return op.call(Us, ss, Vs);
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    static auto op = op_handle<std::tuple<Tensor, Tensor>(const Tensor&, at::TensorList,
                                                          at::TensorList, at::TensorList)>(
        "svdkern::compose_grouped_backward");
    const size_t n = static_cast<size_t>(ctx->saved_data["n"].toInt());
    const auto parts = split(ctx->get_saved_variables(), {n, n, n});
    const auto &Us = parts[0], &ss = parts[1], &Vs = parts[2];
    auto [dF, ds] = op.call(grads[0], Us, ss, Vs);
    // dF holds [dU_0, ..., dU_last, dV_0, ..., dV_last]; ds holds [ds_0, ds_1, ...].
    variable_list out = unpack(dF, shapes_of(Us));
    const auto dss = unpack(ds, shapes_of(ss));
    const auto dVs = unpack(dF, shapes_of(Vs), total_numel(Us));
    out.insert(out.end(), dss.begin(), dss.end());
    out.insert(out.end(), dVs.begin(), dVs.end());
    return out;
  }
};

class LowrankLinear : public torch::autograd::Function<LowrankLinear> {
 public:
  static Tensor forward(AutogradContext* ctx, const Tensor& x, const Tensor& U, const Tensor& s,
                        const Tensor& V, const std::optional<Tensor>& bias) {
    at::AutoDispatchBelowADInplaceOrView guard;
    static auto op = op_handle<std::tuple<Tensor, Tensor>(
        const Tensor&, const Tensor&, const Tensor&, const Tensor&, const std::optional<Tensor>&)>(
        "svdkern::lowrank_linear_forward");
    auto [y, xv] = op.call(x, U, s, V, bias);
    ctx->save_for_backward({x, U, s, V, xv});
    ctx->saved_data["has_bias"] = bias.has_value() && bias->defined();
    return y;
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    static auto op = op_handle<std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor>(
        const Tensor&, const Tensor&, const Tensor&, const Tensor&, const Tensor&, const Tensor&,
        bool)>("svdkern::lowrank_linear_backward");
    const auto saved = ctx->get_saved_variables();
    const bool has_bias = ctx->saved_data["has_bias"].toBool();
    const bool bias_grad = has_bias && ctx->needs_input_grad(4);
    auto [dx, dU, ds, dV, dbias] =
        op.call(grads[0], saved[0], saved[1], saved[2], saved[3], saved[4], bias_grad);
    return {dx, dU, ds, dV, bias_grad ? dbias : Tensor()};
  }
};

class OrthLoss : public torch::autograd::Function<OrthLoss> {
 public:
  static Tensor forward(AutogradContext* ctx, at::TensorList mats) {
    at::AutoDispatchBelowADInplaceOrView guard;
    static auto op = op_handle<std::tuple<Tensor, Tensor>(at::TensorList)>(
        "svdkern::orth_loss_forward");
    auto [loss, residuals] = op.call(mats);
    variable_list saved(mats.begin(), mats.end());
    saved.push_back(residuals);
    ctx->save_for_backward(saved);
    return loss;
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    static auto op = op_handle<Tensor(const Tensor&, at::TensorList, const Tensor&)>(
        "svdkern::orth_loss_backward");
    auto saved = ctx->get_saved_variables();
    const Tensor residuals = saved.back();
    saved.pop_back();
    return unpack(op.call(grads[0], saved, residuals), shapes_of(saved));
  }
};

class SparsityLoss : public torch::autograd::Function<SparsityLoss> {
 public:
  static Tensor forward(AutogradContext* ctx, at::TensorList svals, c10::string_view kind) {
    at::AutoDispatchBelowADInplaceOrView guard;
    static auto op =
        op_handle<Tensor(at::TensorList, c10::string_view)>("svdkern::sparsity_loss");
    ctx->save_for_backward(variable_list(svals.begin(), svals.end()));
    ctx->saved_data["kind"] = std::string(kind);
    return op.call(svals, kind);
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    static auto op = op_handle<Tensor(const Tensor&, at::TensorList, c10::string_view)>(
        "svdkern::sparsity_loss_backward");
    const std::string kind = ctx->saved_data["kind"].toStringRef();
    const auto svals = ctx->get_saved_variables();
    variable_list out = unpack(op.call(grads[0], svals, kind), shapes_of(svals));
    out.emplace_back();  // no gradient for kind
    return out;
  }
};

Tensor compose_autograd(const Tensor& U, const Tensor& s, const Tensor& V) {
  return Compose::apply(U, s, V);
}

Tensor compose_grouped_packed_autograd(at::TensorList Us, at::TensorList ss,
                                       at::TensorList Vs) {
  return ComposeGroupedPacked::apply(Us, ss, Vs);
}

// compose_grouped = the layers' views of compose_grouped_packed (CompositeImplicitAutograd).
// split_with_sizes gives autograd one backward node for all layers (a single cat of their
// gradients, zeros for unused layers) and torch.compile plain view ops to trace.
TensorVec compose_grouped_views(at::TensorList Us, at::TensorList ss, at::TensorList Vs) {
  static auto op = op_handle<Tensor(at::TensorList, at::TensorList, at::TensorList)>(
      "svdkern::compose_grouped_packed");
  const Tensor W = op.call(Us, ss, Vs);  // checks the lists before they are read below
  std::vector<c10::SymInt> sizes;
  sizes.reserve(Us.size());
  for (size_t i = 0; i < Us.size(); ++i) sizes.push_back(Us[i].sym_size(0) * Vs[i].sym_size(0));
  TensorVec out = W.split_with_sizes_symint(sizes);
  for (size_t i = 0; i < Us.size(); ++i) {
    out[i] = out[i].view_symint({Us[i].sym_size(0), Vs[i].sym_size(0)});
  }
  return out;
}

Tensor lowrank_linear_autograd(const Tensor& x, const Tensor& U, const Tensor& s, const Tensor& V,
                               const std::optional<Tensor>& bias) {
  return LowrankLinear::apply(x, U, s, V, bias);
}

Tensor orth_loss_autograd(at::TensorList mats) { return OrthLoss::apply(mats); }

Tensor sparsity_loss_autograd(at::TensorList svals, c10::string_view kind) {
  return SparsityLoss::apply(svals, kind);
}

}  // namespace
}  // namespace svdkern

TORCH_LIBRARY_IMPL(svdkern, Autograd, m) {
  m.impl("compose", &svdkern::compose_autograd);
  m.impl("compose_grouped_packed", &svdkern::compose_grouped_packed_autograd);
  m.impl("lowrank_linear", &svdkern::lowrank_linear_autograd);
  m.impl("orth_loss", &svdkern::orth_loss_autograd);
  m.impl("sparsity_loss", &svdkern::sparsity_loss_autograd);
}

TORCH_LIBRARY_IMPL(svdkern, CompositeImplicitAutograd, m) {
  m.impl("compose_grouped", &svdkern::compose_grouped_views);
}

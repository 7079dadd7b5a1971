// Autograd of the svdkern ops, registered at the Autograd key.
//
// Each forward calls the op below autograd and each backward calls the op's
// backward op, both through typed dispatcher handles, so whichever kernel is
// registered for the tensors' device (C++ on CPU, Triton on CUDA, Triton on
// CPU in interpreter mode) serves both directions. Double backward is not
// supported: the backward ops have no autograd of their own.
#include <torch/autograd.h>
#include <torch/library.h>

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

class ComposeGrouped : public torch::autograd::Function<ComposeGrouped> {
 public:
  static variable_list forward(AutogradContext* ctx, at::TensorList Us, at::TensorList ss,
                               at::TensorList Vs) {
    at::AutoDispatchBelowADInplaceOrView guard;
    static auto op = op_handle<TensorVec(at::TensorList, at::TensorList, at::TensorList)>(
        "svdkern::compose_grouped");
    variable_list saved(Us.begin(), Us.end());
    saved.insert(saved.end(), ss.begin(), ss.end());
    saved.insert(saved.end(), Vs.begin(), Vs.end());
    ctx->save_for_backward(saved);
    ctx->saved_data["n"] = static_cast<int64_t>(Us.size());
    return op.call(Us, ss, Vs);
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    static auto op = op_handle<std::tuple<TensorVec, TensorVec, TensorVec>(
        at::TensorList, at::TensorList, at::TensorList, at::TensorList)>(
        "svdkern::compose_grouped_backward");
    const size_t n = static_cast<size_t>(ctx->saved_data["n"].toInt());
    const auto parts = split(ctx->get_saved_variables(), {n, n, n});
    const auto &Us = parts[0], &ss = parts[1], &Vs = parts[2];
    TensorVec grad_Ws(n);
    for (size_t i = 0; i < n; ++i) {
      grad_Ws[i] = grads[i].defined() ? grads[i]
                                      : at::zeros({Us[i].size(0), Vs[i].size(0)}, Us[i].options());
    }
    auto [dUs, dss, dVs] = op.call(grad_Ws, Us, ss, Vs);
    variable_list out(dUs.begin(), dUs.end());
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
    static auto op = op_handle<std::tuple<Tensor, TensorVec>(at::TensorList)>(
        "svdkern::orth_loss_forward");
    auto [loss, residuals] = op.call(mats);
    variable_list saved(mats.begin(), mats.end());
    saved.insert(saved.end(), residuals.begin(), residuals.end());
    ctx->save_for_backward(saved);
    return loss;
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    static auto op = op_handle<TensorVec(const Tensor&, at::TensorList, at::TensorList)>(
        "svdkern::orth_loss_backward");
    const auto saved = ctx->get_saved_variables();
    const size_t n = saved.size() / 2;
    const auto parts = split(saved, {n, n});
    return op.call(grads[0], parts[0], parts[1]);
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
    static auto op = op_handle<TensorVec(const Tensor&, at::TensorList, c10::string_view)>(
        "svdkern::sparsity_loss_backward");
    const std::string kind = ctx->saved_data["kind"].toStringRef();
    variable_list out = op.call(grads[0], ctx->get_saved_variables(), kind);
    out.emplace_back();  // no gradient for kind
    return out;
  }
};

Tensor compose_autograd(const Tensor& U, const Tensor& s, const Tensor& V) {
  return Compose::apply(U, s, V);
}

TensorVec compose_grouped_autograd(at::TensorList Us, at::TensorList ss, at::TensorList Vs) {
  return ComposeGrouped::apply(Us, ss, Vs);
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
  m.impl("compose_grouped", &svdkern::compose_grouped_autograd);
  m.impl("lowrank_linear", &svdkern::lowrank_linear_autograd);
  m.impl("orth_loss", &svdkern::orth_loss_autograd);
  m.impl("sparsity_loss", &svdkern::sparsity_loss_autograd);
}

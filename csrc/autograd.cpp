// Autograd of the svdkern ops, registered at the Autograd key.
//
// Each forward calls the op below autograd and each backward calls the op's
// backward op, both through typed dispatcher handles, so whichever kernel is
// registered for the tensors' device (C++ on CPU, Triton on CUDA, Triton on
// CPU in interpreter mode) serves both directions. The ops support first
// derivatives only: the backward ops have no autograd of their own, so a
// backward run with create_graph=True returns gradients whose own backward
// raises an error naming the op (first_order_only below) rather than a second
// derivative that would be silently wrong or missing.
//
// The grouped ops' kernels return packed buffers (packed.h); the per-layer
// tensors are ATen views of them taken here, outside the ops: the forward's
// by compose_grouped (CompositeImplicitAutograd), the gradients' by the
// backward functions below.
#include <torch/autograd.h>
#include <torch/csrc/autograd/functions/basic_ops.h>
#include <torch/library.h>

#include <algorithm>
#include <memory>
#include <string>
#include <type_traits>
#include <utility>

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

bool requires_grad(const Tensor& t) { return t.defined() && t.requires_grad(); }

// Autograd nodes are held by std::shared_ptr up to torch 2.11 and by c10::intrusive_ptr in later
// versions: the holder is whatever create_gradient_edge takes, and make_node builds one.
template <typename F>
struct second_parameter;
template <typename R, typename A, typename B>
struct second_parameter<R (*)(A, B)> {
  using type = std::decay_t<B>;
};
using NodeHolder =
    typename second_parameter<decltype(&torch::autograd::create_gradient_edge)>::type;

template <typename N, typename... Args>
NodeHolder make_node(Args&&... args) {
  if constexpr (std::is_same_v<NodeHolder, std::shared_ptr<torch::autograd::Node>>) {
    return std::make_shared<N>(std::forward<Args>(args)...);
  } else {
    return c10::make_intrusive<N>(std::forward<Args>(args)...);
  }
}

// The gradients `out` that a backward of `op` computed (below autograd). Under create_graph=True
// (grad mode on during the backward) with anything differentiable among the upstream
// gradients and the saved inputs, each gradient gets as grad_fn an Error node whose edges lead
// to those inputs: differentiating a gradient again reaches the node, which raises naming the
// op. Without create_graph the gradients are returned as they are.
variable_list first_order_only(const char* op, const variable_list& upstream,
                               const variable_list& saved, variable_list out) {
  if (!at::GradMode::is_enabled() ||
      (std::none_of(upstream.begin(), upstream.end(), requires_grad) &&
       std::none_of(saved.begin(), saved.end(), requires_grad))) {
    return out;
  }
  auto error = make_node<torch::autograd::Error>(
      std::string("svdkern::") + op +
          " supports first derivatives only: its backward is not differentiable, so a second "
          "derivative through it (differentiating a gradient computed with create_graph=True) "
          "is not supported",
      torch::autograd::collect_next_edges(upstream, saved));
  variable_list result;
  result.reserve(out.size());
  for (const auto& t : out) {
    if (!t.defined()) {
      error->add_input_metadata(torch::autograd::Node::undefined_input());
      result.emplace_back();
      continue;
    }
    Tensor grad = t.detach();
    torch::autograd::create_gradient_edge(grad, error);
    result.push_back(std::move(grad));
  }
  return result;
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
    variable_list out;
    {
      const at::NoGradGuard no_grad;
      auto [dU, ds, dV] = op.call(grads[0], saved[0], saved[1], saved[2]);
      out = {dU, ds, dV};
    }
    return first_order_only("compose", grads, saved, std::move(out));
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
    const auto saved = ctx->get_saved_variables();
    const auto parts = split(saved, {n, n, n});
    const auto &Us = parts[0], &ss = parts[1], &Vs = parts[2];
    variable_list out;
    {
      const at::NoGradGuard no_grad;
      auto [dF, ds] = op.call(grads[0], Us, ss, Vs);
      // dF holds [dU_0, ..., dU_last, dV_0, ..., dV_last]; ds holds [ds_0, ds_1, ...].
      out = unpack(dF, shapes_of(Us));
      const auto dss = unpack(ds, shapes_of(ss));
      const auto dVs = unpack(dF, shapes_of(Vs), total_numel(Us));
      out.insert(out.end(), dss.begin(), dss.end());
      out.insert(out.end(), dVs.begin(), dVs.end());
    }
    return first_order_only("compose_grouped", grads, saved, std::move(out));
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
    variable_list out;
    {
      const at::NoGradGuard no_grad;
      auto [dx, dU, ds, dV, dbias] =
          op.call(grads[0], saved[0], saved[1], saved[2], saved[3], saved[4], bias_grad);
      out = {dx, dU, ds, dV, bias_grad ? dbias : Tensor()};
    }
    return first_order_only("lowrank_linear", grads, saved, std::move(out));
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
    const auto saved = ctx->get_saved_variables();
    const variable_list mats(saved.begin(), saved.end() - 1);
    variable_list out;
    {
      const at::NoGradGuard no_grad;
      out = unpack(op.call(grads[0], mats, saved.back()), shapes_of(mats));
    }
    return first_order_only("orth_loss", grads, mats, std::move(out));
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
    variable_list out;
    {
      const at::NoGradGuard no_grad;
      out = unpack(op.call(grads[0], svals, kind), shapes_of(svals));
    }
    out.emplace_back();  // no gradient for kind
    return first_order_only("sparsity_loss", grads, svals, std::move(out));
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

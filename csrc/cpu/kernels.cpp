// CPU kernels of the svdkern ops, written with ATen.
//
// The fused structure of the GPU kernels holds here too: compose's backward
// forms dW·V once and derives dU and ds from it; lowrank_linear's backward
// forms dy·U once for dU's partner, ds and dx; the grouped ops loop over
// their lists inside one op call. Losses accumulate in fp32 (fp64 for fp64).
#include <ATen/ATen.h>
#include <torch/library.h>

#include "checks.h"

namespace svdkern {
namespace {

// Reductions of half-precision products accumulate in fp32, then return to the input dtype.
at::Tensor colsum(const at::Tensor& t, at::ScalarType out) {
  return t.sum(0, /*keepdim=*/false, loss_dtype(t.scalar_type())).to(out);
}

at::Tensor compose_cpu(const at::Tensor& U, const at::Tensor& s, const at::Tensor& V) {
  check_factors("compose", U, s, V);
  return at::mm(U * s, V.t());
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> compose_backward_cpu(const at::Tensor& grad_W,
                                                                    const at::Tensor& U,
                                                                    const at::Tensor& s,
                                                                    const at::Tensor& V) {
  check_factors("compose_backward", U, s, V);
  TORCH_CHECK_VALUE(grad_W.dim() == 2 && grad_W.size(0) == U.size(0) && grad_W.size(1) == V.size(0),
                    "compose_backward: grad_W must have shape (", U.size(0), ", ", V.size(0),
                    "), got ", grad_W.sizes());
  const at::Tensor G = at::mm(grad_W, V);  // m×r, shared by dU and ds
  at::Tensor dU = G * s;
  at::Tensor ds = colsum(U * G, s.scalar_type());
  at::Tensor dV = at::mm(grad_W.t(), U) * s;
  return {dU, ds, dV};
}

std::vector<at::Tensor> compose_grouped_cpu(at::TensorList Us, at::TensorList ss,
                                            at::TensorList Vs) {
  check_grouped("compose_grouped", Us, ss, Vs);
  std::vector<at::Tensor> Ws;
  Ws.reserve(Us.size());
  for (size_t i = 0; i < Us.size(); ++i) Ws.push_back(at::mm(Us[i] * ss[i], Vs[i].t()));
  return Ws;
}

std::tuple<std::vector<at::Tensor>, std::vector<at::Tensor>, std::vector<at::Tensor>>
compose_grouped_backward_cpu(at::TensorList grad_Ws, at::TensorList Us, at::TensorList ss,
                             at::TensorList Vs) {
  check_grouped("compose_grouped_backward", Us, ss, Vs);
  TORCH_CHECK_VALUE(grad_Ws.size() == Us.size(), "compose_grouped_backward: grad_Ws must have ",
                    Us.size(), " tensors (one per layer), got ", grad_Ws.size());
  std::vector<at::Tensor> dUs, dss, dVs;
  for (size_t i = 0; i < Us.size(); ++i) {
    auto [dU, ds, dV] = compose_backward_cpu(grad_Ws[i], Us[i], ss[i], Vs[i]);
    dUs.push_back(dU);
    dss.push_back(ds);
    dVs.push_back(dV);
  }
  return {dUs, dss, dVs};
}

at::Tensor lowrank_linear_cpu(const at::Tensor& x, const at::Tensor& U, const at::Tensor& s,
                              const at::Tensor& V, const std::optional<at::Tensor>& bias) {
  check_lowrank_input("lowrank_linear", x, U, s, V, bias);
  const at::Tensor x2 = x.reshape({-1, x.size(-1)});
  const at::Tensor t = at::mm(x2, V) * s;  // rows×r
  at::Tensor y = (bias.has_value() && bias->defined()) ? at::addmm(*bias, t, U.t())
                                                        : at::mm(t, U.t());
  std::vector<int64_t> shape(x.sizes().begin(), x.sizes().end());
  shape.back() = U.size(0);
  return y.view(shape);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> lowrank_linear_backward_cpu(
    const at::Tensor& grad_y, const at::Tensor& x, const at::Tensor& U, const at::Tensor& s,
    const at::Tensor& V, bool bias_grad) {
  check_lowrank_input("lowrank_linear_backward", x, U, s, V, std::nullopt);
  TORCH_CHECK_VALUE(grad_y.dim() == x.dim() && grad_y.size(-1) == U.size(0),
                    "lowrank_linear_backward: grad_y must have shape (..., ", U.size(0),
                    ") matching x of shape ", x.sizes(), ", got ", grad_y.sizes());
  const at::Tensor x2 = x.reshape({-1, x.size(-1)});
  const at::Tensor g = grad_y.reshape({-1, U.size(0)});
  const at::Tensor t = at::mm(x2, V);  // rows×r
  const at::Tensor gu = at::mm(g, U);  // rows×r, shared by ds and dx/dV
  at::Tensor dU = at::mm(g.t(), t * s);
  at::Tensor ds = colsum(t * gu, s.scalar_type());
  const at::Tensor dt = gu * s;
  at::Tensor dx = at::mm(dt, V.t()).view(x.sizes());
  at::Tensor dV = at::mm(x2.t(), dt);
  at::Tensor dbias = bias_grad ? colsum(g, U.scalar_type()) : at::empty({0}, U.options());
  return {dx, dU, ds, dV, dbias};
}

// Loss Σ ‖MᵀM − I‖²_F / r² and the residuals R = MᵀM − I, in the accumulation dtype.
std::tuple<at::Tensor, std::vector<at::Tensor>> orth_loss_forward_cpu(at::TensorList mats) {
  check_mats("orth_loss", mats);
  const auto acc = loss_dtype(mats[0].scalar_type());
  at::Tensor total = at::zeros({}, mats[0].options().dtype(acc));
  std::vector<at::Tensor> residuals;
  residuals.reserve(mats.size());
  for (const auto& M : mats) {
    const at::Tensor A = M.to(acc);
    const int64_t r = A.size(1);
    at::Tensor R = at::mm(A.t(), A);
    R.diagonal().sub_(1);
    total += R.square().sum() / static_cast<double>(r * r);
    residuals.push_back(R);
  }
  return {total, residuals};
}

at::Tensor orth_loss_cpu(at::TensorList mats) { return std::get<0>(orth_loss_forward_cpu(mats)); }

std::vector<at::Tensor> orth_loss_backward_cpu(const at::Tensor& grad, at::TensorList mats,
                                               at::TensorList residuals) {
  check_mats("orth_loss_backward", mats);
  TORCH_CHECK_VALUE(residuals.size() == mats.size(), "orth_loss_backward: residuals must have ",
                    mats.size(), " tensors (one per matrix), got ", residuals.size());
  std::vector<at::Tensor> out;
  out.reserve(mats.size());
  for (size_t i = 0; i < mats.size(); ++i) {
    const at::Tensor& R = residuals[i];
    const double r = static_cast<double>(mats[i].size(1));
    const at::Tensor scale = grad.to(R.scalar_type()) * (4.0 / (r * r));
    out.push_back((at::mm(mats[i].to(R.scalar_type()), R) * scale).to(mats[i].scalar_type()));
  }
  return out;
}

// l1 = ‖s‖₁ and l2 = max(‖s‖₂, tiny): a zero vector has Hoyer measure 0 and zero gradient.
std::pair<at::Tensor, at::Tensor> norms(const at::Tensor& a) {
  const double tiny = a.scalar_type() == at::kDouble ? std::numeric_limits<double>::min()
                                                     : std::numeric_limits<float>::min();
  return {a.abs().sum(), at::linalg_vector_norm(a).clamp_min(tiny)};
}

at::Tensor sparsity_loss_cpu(at::TensorList svals, c10::string_view kind) {
  const Sparsity k = check_svals("sparsity_loss", svals, kind);
  at::Tensor total = at::zeros({}, svals[0].options().dtype(loss_dtype(svals[0].scalar_type())));
  for (const auto& s : svals) {
    const at::Tensor a = s.to(total.scalar_type());
    auto [l1, l2] = norms(a);
    switch (k) {
      case Sparsity::L1: total += l1; break;
      case Sparsity::Hoyer: total += l1 / l2; break;
      case Sparsity::HoyerSquare: total += (l1 / l2).square(); break;
    }
  }
  return total;
}

std::vector<at::Tensor> sparsity_loss_backward_cpu(const at::Tensor& grad, at::TensorList svals,
                                                   c10::string_view kind) {
  const Sparsity k = check_svals("sparsity_loss_backward", svals, kind);
  std::vector<at::Tensor> out;
  out.reserve(svals.size());
  for (const auto& s : svals) {
    const at::Tensor a = s.to(loss_dtype(s.scalar_type()));
    const at::Tensor g = grad.to(a.scalar_type());
    const at::Tensor sign = a.sign();
    at::Tensor d;
    if (k == Sparsity::L1) {
      d = sign;
    } else {
      auto [l1, l2] = norms(a);
      // d(l1/l2) = (sign − s·(l1/l2)/l2)/l2, ordered so no power of l2 underflows;
      // hoyer_square = (l1/l2)², so d = 2·(l1/l2)·d(l1/l2).
      const at::Tensor h = l1 / l2;
      const at::Tensor dh = (sign - a * (h / l2)) / l2;
      d = k == Sparsity::Hoyer ? dh : dh * (2 * h);
    }
    out.push_back((d * g).to(s.scalar_type()));
  }
  return out;
}

}  // namespace
}  // namespace svdkern

TORCH_LIBRARY_IMPL(svdkern, CPU, m) {
  m.impl("compose", &svdkern::compose_cpu);
  m.impl("compose_backward", &svdkern::compose_backward_cpu);
  m.impl("compose_grouped", &svdkern::compose_grouped_cpu);
  m.impl("compose_grouped_backward", &svdkern::compose_grouped_backward_cpu);
  m.impl("lowrank_linear", &svdkern::lowrank_linear_cpu);
  m.impl("lowrank_linear_backward", &svdkern::lowrank_linear_backward_cpu);
  m.impl("orth_loss", &svdkern::orth_loss_cpu);
  m.impl("orth_loss_forward", &svdkern::orth_loss_forward_cpu);
  m.impl("orth_loss_backward", &svdkern::orth_loss_backward_cpu);
  m.impl("sparsity_loss", &svdkern::sparsity_loss_cpu);
  m.impl("sparsity_loss_backward", &svdkern::sparsity_loss_backward_cpu);
}

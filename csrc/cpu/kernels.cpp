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

// Inside a kernel the ATen calls run in the dtypes this kernel chose: an active
// torch.autocast must not turn an fp32 Gram or GEMM into a bf16 one.
struct NoAutocast {
  c10::impl::ExcludeDispatchKeyGuard guard{c10::autocast_dispatch_keyset};
};

// Reductions of half-precision products accumulate in fp32, then return to the input dtype.
at::Tensor colsum(const at::Tensor& t, at::ScalarType out) {
  return t.sum(0, /*keepdim=*/false, loss_dtype(t.scalar_type())).to(out);
}

// compose and its backward on checked inputs; the single and grouped kernels share them.
at::Tensor compose_unchecked(const at::Tensor& U, const at::Tensor& s, const at::Tensor& V) {
  return at::mm(U * s, V.t());
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> compose_backward_unchecked(
    const at::Tensor& grad_W, const at::Tensor& U, const at::Tensor& s, const at::Tensor& V) {
  TORCH_CHECK_VALUE(grad_W.dim() == 2 && grad_W.size(0) == U.size(0) && grad_W.size(1) == V.size(0),
                    "compose_backward: grad_W must have shape (", U.size(0), ", ", V.size(0),
                    "), got ", grad_W.sizes());
  const at::Tensor G = at::mm(grad_W, V);  // m×r, shared by dU and ds
  at::Tensor dU = G * s;
  at::Tensor ds = colsum(U * G, s.scalar_type());
  at::Tensor dV = at::mm(grad_W.t(), U) * s;
  return {dU, ds, dV};
}

at::Tensor compose_cpu(const at::Tensor& U, const at::Tensor& s, const at::Tensor& V) {
  check_factors("compose", U, s, V);
  const NoAutocast no_autocast;
  return compose_unchecked(U, s, V);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> compose_backward_cpu(const at::Tensor& grad_W,
                                                                    const at::Tensor& U,
                                                                    const at::Tensor& s,
                                                                    const at::Tensor& V) {
  check_factors("compose_backward", U, s, V);
  const NoAutocast no_autocast;
  return compose_backward_unchecked(grad_W, U, s, V);
}

std::vector<at::Tensor> compose_grouped_cpu(at::TensorList Us, at::TensorList ss,
                                            at::TensorList Vs) {
  check_grouped("compose_grouped", Us, ss, Vs);
  const NoAutocast no_autocast;
  std::vector<at::Tensor> Ws;
  Ws.reserve(Us.size());
  for (size_t i = 0; i < Us.size(); ++i) Ws.push_back(compose_unchecked(Us[i], ss[i], Vs[i]));
  return Ws;
}

std::tuple<std::vector<at::Tensor>, std::vector<at::Tensor>, std::vector<at::Tensor>>
compose_grouped_backward_cpu(at::TensorList grad_Ws, at::TensorList Us, at::TensorList ss,
                             at::TensorList Vs) {
  check_grouped("compose_grouped_backward", Us, ss, Vs);
  const NoAutocast no_autocast;
  TORCH_CHECK_VALUE(grad_Ws.size() == Us.size(), "compose_grouped_backward: grad_Ws must have ",
                    Us.size(), " tensors (one per layer), got ", grad_Ws.size());
  std::vector<at::Tensor> dUs, dss, dVs;
  for (size_t i = 0; i < Us.size(); ++i) {
    auto [dU, ds, dV] = compose_backward_unchecked(grad_Ws[i], Us[i], ss[i], Vs[i]);
    dUs.push_back(dU);
    dss.push_back(ds);
    dVs.push_back(dV);
  }
  return {dUs, dss, dVs};
}

// y = ((x·V)·diag(s))·Uᵀ + bias and xv = x·V (rows×r), which the backward reuses.
std::tuple<at::Tensor, at::Tensor> lowrank_linear_forward_cpu(const at::Tensor& x, const at::Tensor& U,
                                                              const at::Tensor& s, const at::Tensor& V,
                                                              const std::optional<at::Tensor>& bias) {
  check_lowrank_input("lowrank_linear", x, U, s, V, bias);
  const NoAutocast no_autocast;
  const at::Tensor x2 = x.reshape({-1, x.size(-1)});
  at::Tensor xv = at::mm(x2, V);
  const at::Tensor t = xv * s;
  at::Tensor y = (bias.has_value() && bias->defined()) ? at::addmm(*bias, t, U.t())
                                                        : at::mm(t, U.t());
  std::vector<int64_t> shape(x.sizes().begin(), x.sizes().end());
  shape.back() = U.size(0);
  return {y.view(shape), xv};
}

at::Tensor lowrank_linear_cpu(const at::Tensor& x, const at::Tensor& U, const at::Tensor& s,
                              const at::Tensor& V, const std::optional<at::Tensor>& bias) {
  return std::get<0>(lowrank_linear_forward_cpu(x, U, s, V, bias));
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> lowrank_linear_backward_cpu(
    const at::Tensor& grad_y, const at::Tensor& x, const at::Tensor& U, const at::Tensor& s,
    const at::Tensor& V, const at::Tensor& xv, bool bias_grad) {
  check_lowrank_input("lowrank_linear_backward", x, U, s, V, std::nullopt);
  const NoAutocast no_autocast;
  TORCH_CHECK_VALUE(grad_y.dim() == x.dim() && grad_y.size(-1) == U.size(0),
                    "lowrank_linear_backward: grad_y must have shape (..., ", U.size(0),
                    ") matching x of shape ", x.sizes(), ", got ", grad_y.sizes());
  const at::Tensor x2 = x.reshape({-1, x.size(-1)});
  const at::Tensor g = grad_y.reshape({-1, U.size(0)});
  const bool reuse = xv.dim() == 2 && xv.size(0) == x2.size(0) && xv.size(1) == U.size(1);
  const at::Tensor t = reuse ? xv : at::mm(x2, V);  // rows×r
  const at::Tensor gu = at::mm(g, U);  // rows×r, shared by ds and dx/dV
  at::Tensor dU = at::mm(g.t(), t * s);
  at::Tensor ds = colsum(t * gu, s.scalar_type());
  const at::Tensor dt = gu * s;
  at::Tensor dx = at::mm(dt, V.t()).view(x.sizes());
  at::Tensor dV = at::mm(x2.t(), dt);
  at::Tensor dbias = bias_grad ? colsum(g, U.scalar_type()) : at::empty({0}, U.options());
  return {dx, dU, ds, dV, dbias};
}

// The losses are many small reductions: each matrix costs one GEMM and each vector one
// pass in plain loops, instead of a chain of ATen calls per matrix or vector.

// Loss Σ ‖MᵀM − I‖²_F / r² and the residuals R = MᵀM − I, in the accumulation dtype.
std::tuple<at::Tensor, std::vector<at::Tensor>> orth_loss_forward_cpu(at::TensorList mats) {
  check_mats("orth_loss", mats);
  const NoAutocast no_autocast;
  const auto acc = loss_dtype(mats[0].scalar_type());
  double total = 0.0;
  std::vector<at::Tensor> residuals;
  residuals.reserve(mats.size());
  for (const auto& M : mats) {
    const at::Tensor A = M.to(acc);
    const int64_t r = A.size(1);
    at::Tensor R = at::mm(A.t(), A);  // contiguous r×r
    double sq = 0.0;
    AT_DISPATCH_FLOATING_TYPES(R.scalar_type(), "orth_loss", [&] {
      scalar_t* p = R.data_ptr<scalar_t>();
      for (int64_t i = 0; i < r; ++i) p[i * r + i] -= 1;
      for (int64_t i = 0; i < r * r; ++i) sq += static_cast<double>(p[i]) * p[i];
    });
    total += sq / static_cast<double>(r * r);
    residuals.push_back(std::move(R));
  }
  return {at::scalar_tensor(total, mats[0].options().dtype(acc)), residuals};
}

at::Tensor orth_loss_cpu(at::TensorList mats) { return std::get<0>(orth_loss_forward_cpu(mats)); }

std::vector<at::Tensor> orth_loss_backward_cpu(const at::Tensor& grad, at::TensorList mats,
                                               at::TensorList residuals) {
  check_mats("orth_loss_backward", mats);
  const NoAutocast no_autocast;
  TORCH_CHECK_VALUE(residuals.size() == mats.size(), "orth_loss_backward: residuals must have ",
                    mats.size(), " tensors (one per matrix), got ", residuals.size());
  const double g = grad.item<double>();
  std::vector<at::Tensor> out;
  out.reserve(mats.size());
  for (size_t i = 0; i < mats.size(); ++i) {
    const at::Tensor& R = residuals[i];
    const double r = static_cast<double>(mats[i].size(1));
    at::Tensor dM = at::mm(mats[i].to(R.scalar_type()), R).mul_(g * 4.0 / (r * r));
    out.push_back(dM.to(mats[i].scalar_type()));
  }
  return out;
}

// Per vector: l1 = ‖s‖₁ and l2 = max(‖s‖₂, tiny), so a zero vector has Hoyer measure 0 and
// zero gradient. `a` is contiguous in the accumulation dtype.
template <typename scalar_t>
std::pair<double, double> norms(const scalar_t* a, int64_t n) {
  double l1 = 0.0, sq = 0.0;
  for (int64_t i = 0; i < n; ++i) {
    l1 += std::abs(static_cast<double>(a[i]));
    sq += static_cast<double>(a[i]) * a[i];
  }
  return {l1, std::max(std::sqrt(sq), static_cast<double>(std::numeric_limits<scalar_t>::min()))};
}

at::Tensor sparsity_loss_cpu(at::TensorList svals, c10::string_view kind) {
  const Sparsity k = check_svals("sparsity_loss", svals, kind);
  const NoAutocast no_autocast;
  const auto acc = loss_dtype(svals[0].scalar_type());
  double total = 0.0;
  for (const auto& s : svals) {
    const at::Tensor a = s.to(acc).contiguous();
    AT_DISPATCH_FLOATING_TYPES(acc, "sparsity_loss", [&] {
      const auto [l1, l2] = norms(a.const_data_ptr<scalar_t>(), a.numel());
      const double h = l1 / l2;
      total += k == Sparsity::L1 ? l1 : (k == Sparsity::Hoyer ? h : h * h);
    });
  }
  return at::scalar_tensor(total, svals[0].options().dtype(acc));
}

std::vector<at::Tensor> sparsity_loss_backward_cpu(const at::Tensor& grad, at::TensorList svals,
                                                   c10::string_view kind) {
  const Sparsity k = check_svals("sparsity_loss_backward", svals, kind);
  const NoAutocast no_autocast;
  const auto acc = loss_dtype(svals[0].scalar_type());
  const double g = grad.item<double>();
  std::vector<at::Tensor> out;
  out.reserve(svals.size());
  for (const auto& s : svals) {
    const at::Tensor a = s.to(acc).contiguous();
    at::Tensor d = at::empty_like(a);
    AT_DISPATCH_FLOATING_TYPES(acc, "sparsity_loss_backward", [&] {
      const scalar_t* pa = a.const_data_ptr<scalar_t>();
      scalar_t* pd = d.data_ptr<scalar_t>();
      const int64_t n = a.numel();
      // l1: sign(s). hoyer: d(l1/l2) = (sign − s·(l1/l2)/l2)/l2, ordered so no power of l2
      // underflows. hoyer_square = (l1/l2)², so d = 2·(l1/l2)·d(l1/l2).
      const auto [l1, l2] = k == Sparsity::L1 ? std::pair<double, double>{0.0, 1.0} : norms(pa, n);
      const double h = l1 / l2;
      const double outer = g * (k == Sparsity::HoyerSquare ? 2 * h : 1.0);
      for (int64_t i = 0; i < n; ++i) {
        const double x = pa[i];
        const double sign = static_cast<double>((x > 0) - (x < 0));
        pd[i] = static_cast<scalar_t>(k == Sparsity::L1 ? g * sign
                                                        : outer * (sign - x * (h / l2)) / l2);
      }
    });
    out.push_back(d.to(s.scalar_type()));
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
  m.impl("lowrank_linear_forward", &svdkern::lowrank_linear_forward_cpu);
  m.impl("lowrank_linear_backward", &svdkern::lowrank_linear_backward_cpu);
  m.impl("orth_loss", &svdkern::orth_loss_cpu);
  m.impl("orth_loss_forward", &svdkern::orth_loss_forward_cpu);
  m.impl("orth_loss_backward", &svdkern::orth_loss_backward_cpu);
  m.impl("sparsity_loss", &svdkern::sparsity_loss_cpu);
  m.impl("sparsity_loss_backward", &svdkern::sparsity_loss_backward_cpu);
}

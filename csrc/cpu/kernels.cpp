// CPU kernels of the svdkern ops, written with ATen.
//
// The fused structure of the GPU kernels holds here too: compose's backward
// forms dW·V once and derives dU and ds from it; lowrank_linear's backward
// forms dy·U once for dU's partner, ds and dx; the grouped ops loop over
// their lists inside one op call and write each result into its slot of one
// packed output (packed.h), as the GPU kernels do. Losses accumulate in fp32
// (fp64 for fp64).
#include <ATen/ATen.h>
#include <torch/library.h>

#include "checks.h"
#include "packed.h"

namespace svdkern {
namespace {

// Inside a kernel the ATen calls run in the dtypes this kernel chose: an active
// torch.autocast must not turn an fp32 Gram or GEMM into a bf16 one. They also run below
// autograd: the backward ops (no autograd of their own) may be called on tensors that
// require grad, and the kernels write into packed outputs with out= ATen calls.
struct NoAutocast {
  c10::impl::ExcludeDispatchKeyGuard guard{c10::autocast_dispatch_keyset};
  at::AutoDispatchBelowADInplaceOrView below_autograd;
};

// Reductions of half-precision products accumulate in fp32, then return to the input dtype.
at::Tensor colsum(const at::Tensor& t, at::ScalarType out) {
  return t.sum(0, /*keepdim=*/false, loss_dtype(t.scalar_type())).to(out);
}

// The next `shape` slot of the packed buffer `flat`, starting at element `pos` (advanced).
at::Tensor slot(const at::Tensor& flat, int64_t& pos, at::IntArrayRef shape) {
  const int64_t n = c10::multiply_integers(shape);
  at::Tensor view = flat.narrow(0, pos, n).view(shape);
  pos += n;
  return view;
}

// A loss summed in double, as a 0-d tensor of the loss dtype `opts`. A sum beyond fp32's range
// becomes ±inf (IEEE rounding, as an fp32 accumulation gives), where at::scalar_tensor would
// refuse to narrow it.
at::Tensor loss_scalar(double total, const at::TensorOptions& opts) {
  const bool narrow = opts.dtype() == at::kFloat;
  return at::scalar_tensor(narrow ? static_cast<double>(static_cast<float>(total)) : total, opts);
}

int64_t numel_of(at::TensorList ts) {
  int64_t n = 0;
  for (const auto& t : ts) n += t.numel();
  return n;
}

// compose and its backward on checked inputs, written into given (contiguous) outputs; the
// single and grouped kernels share them.
void compose_into(at::Tensor W, const at::Tensor& U, const at::Tensor& s, const at::Tensor& V) {
  at::mm_out(W, U * s, V.t());
}

void compose_backward_into(const at::Tensor& grad_W, const at::Tensor& U, const at::Tensor& s,
                           const at::Tensor& V, at::Tensor dU, at::Tensor ds, at::Tensor dV) {
  const at::Tensor G = at::mm(grad_W, V);  // m×r, shared by dU and ds
  at::mul_out(dU, G, s);
  ds.copy_(colsum(U * G, s.scalar_type()));
  at::mm_out(dV, grad_W.t(), U);
  dV.mul_(s);
}

at::Tensor compose_cpu(const at::Tensor& U, const at::Tensor& s, const at::Tensor& V) {
  check_factors("compose", U, s, V);
  const NoAutocast no_autocast;
  at::Tensor W = at::empty({U.size(0), V.size(0)}, U.options());
  compose_into(W, U, s, V);
  return W;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> compose_backward_cpu(const at::Tensor& grad_W,
                                                                    const at::Tensor& U,
                                                                    const at::Tensor& s,
                                                                    const at::Tensor& V) {
  check_factors("compose_backward", U, s, V);
  const NoAutocast no_autocast;
  TORCH_CHECK_VALUE(grad_W.dim() == 2 && grad_W.size(0) == U.size(0) && grad_W.size(1) == V.size(0),
                    "compose_backward: grad_W must have shape (", U.size(0), ", ", V.size(0),
                    "), got ", grad_W.sizes());
  at::Tensor dU = at::empty({U.size(0), U.size(1)}, U.options());
  at::Tensor ds = at::empty({s.size(0)}, s.options());
  at::Tensor dV = at::empty({V.size(0), V.size(1)}, V.options());
  compose_backward_into(grad_W, U, s, V, dU, ds, dV);
  return {dU, ds, dV};
}

// W = [W_0, W_1, ...], each W_l = (U_l·diag(s_l))·V_lᵀ (m_l×n_l row-major).
at::Tensor compose_grouped_packed_cpu(at::TensorList Us, at::TensorList ss, at::TensorList Vs) {
  check_grouped("compose_grouped", Us, ss, Vs);
  const NoAutocast no_autocast;
  int64_t total = 0;
  for (size_t i = 0; i < Us.size(); ++i) total += Us[i].size(0) * Vs[i].size(0);
  at::Tensor W = at::empty({total}, Us[0].options());
  int64_t pos = 0;
  for (size_t i = 0; i < Us.size(); ++i) {
    compose_into(slot(W, pos, {Us[i].size(0), Vs[i].size(0)}), Us[i], ss[i], Vs[i]);
  }
  return W;
}

// grad_W packed like W; returns dF = [dU_0, ..., dU_last, dV_0, ..., dV_last], ds = [ds_0, ...].
std::tuple<at::Tensor, at::Tensor> compose_grouped_backward_cpu(const at::Tensor& grad_W,
                                                                at::TensorList Us,
                                                                at::TensorList ss,
                                                                at::TensorList Vs) {
  check_grouped("compose_grouped_backward", Us, ss, Vs);
  const NoAutocast no_autocast;
  int64_t total_w = 0;
  for (size_t i = 0; i < Us.size(); ++i) total_w += Us[i].size(0) * Vs[i].size(0);
  TORCH_CHECK_VALUE(grad_W.dim() == 1 && grad_W.size(0) == total_w,
                    "compose_grouped_backward: grad_W must be the packed gradient of all layers, "
                    "shape (",
                    total_w, ",) (the sum of m·n over layers), got ", grad_W.sizes());
  check_same("compose_grouped_backward", "Us[0]", Us[0], "grad_W", grad_W);
  const at::Tensor g = grad_W.contiguous();
  at::Tensor dF = at::empty({numel_of(Us) + numel_of(Vs)}, Us[0].options());
  at::Tensor ds = at::empty({numel_of(ss)}, ss[0].options());
  int64_t pos_g = 0, pos_u = 0, pos_v = numel_of(Us), pos_s = 0;
  for (size_t i = 0; i < Us.size(); ++i) {
    const at::Tensor gw = slot(g, pos_g, {Us[i].size(0), Vs[i].size(0)});
    compose_backward_into(gw, Us[i], ss[i], Vs[i], slot(dF, pos_u, Us[i].sizes()),
                          slot(ds, pos_s, ss[i].sizes()), slot(dF, pos_v, Vs[i].sizes()));
  }
  return {dF, ds};
}

// The rows of x (..., n): the product of its leading sizes (reshape(-1, n) cannot infer it
// when n = 0).
int64_t rows_of(const at::Tensor& x) {
  return c10::multiply_integers(x.sizes().slice(0, x.dim() - 1));
}

// y = ((x·V)·diag(s))·Uᵀ + bias and xv = x·V (rows×r), which the backward reuses.
std::tuple<at::Tensor, at::Tensor> lowrank_linear_forward_cpu(const at::Tensor& x, const at::Tensor& U,
                                                              const at::Tensor& s, const at::Tensor& V,
                                                              const std::optional<at::Tensor>& bias) {
  check_lowrank_input("lowrank_linear", x, U, s, V, bias);
  const NoAutocast no_autocast;
  const at::Tensor x2 = x.reshape({rows_of(x), x.size(-1)});
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
  const at::Tensor x2 = x.reshape({rows_of(x), x.size(-1)});
  const at::Tensor g = grad_y.reshape({x2.size(0), U.size(0)});
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

// Loss Σ ‖MᵀM − I‖²_F / r² and the residuals R = MᵀM − I (packed), in the accumulation dtype.
std::tuple<at::Tensor, at::Tensor> orth_loss_forward_cpu(at::TensorList mats) {
  check_mats("orth_loss", mats);
  const NoAutocast no_autocast;
  const auto acc = loss_dtype(mats[0].scalar_type());
  double total = 0.0;
  int64_t total_r2 = 0;
  for (const auto& M : mats) total_r2 += M.size(1) * M.size(1);
  at::Tensor residuals = at::empty({total_r2}, mats[0].options().dtype(acc));
  int64_t pos = 0;
  for (const auto& M : mats) {
    const at::Tensor A = M.to(acc);
    const int64_t r = A.size(1);
    at::Tensor R = slot(residuals, pos, {r, r});  // contiguous r×r
    at::mm_out(R, A.t(), A);
    // Σ (R_ij / r)² rather than Σ R_ij² / r²: R_ij² can overflow where the loss does not.
    const double inv_r = 1.0 / static_cast<double>(r);
    AT_DISPATCH_FLOATING_TYPES(R.scalar_type(), "orth_loss", [&] {
      scalar_t* p = R.data_ptr<scalar_t>();
      for (int64_t i = 0; i < r; ++i) p[i * r + i] -= 1;
      for (int64_t i = 0; i < r * r; ++i) {
        const double x = static_cast<double>(p[i]) * inv_r;
        total += x * x;
      }
    });
  }
  return {loss_scalar(total, mats[0].options().dtype(acc)), residuals};
}

at::Tensor orth_loss_cpu(at::TensorList mats) { return std::get<0>(orth_loss_forward_cpu(mats)); }

// [dM_0, dM_1, ...] packed, dM = grad·4·M·R/r², from the packed residuals of the forward.
at::Tensor orth_loss_backward_cpu(const at::Tensor& grad, at::TensorList mats,
                                  const at::Tensor& residuals) {
  check_mats("orth_loss_backward", mats);
  const NoAutocast no_autocast;
  int64_t total_r2 = 0;
  for (const auto& M : mats) total_r2 += M.size(1) * M.size(1);
  TORCH_CHECK_VALUE(residuals.dim() == 1 && residuals.size(0) == total_r2,
                    "orth_loss_backward: residuals must be the packed r×r residuals of all "
                    "matrices, shape (",
                    total_r2, ",), got ", residuals.sizes());
  const at::Tensor res = residuals.contiguous();
  const double g = grad.item<double>();
  at::Tensor out = at::empty({numel_of(mats)}, mats[0].options());
  int64_t pos_r = 0, pos_m = 0;
  for (const auto& M : mats) {
    const int64_t r = M.size(1);
    const at::Tensor R = slot(res, pos_r, {r, r});
    const double r2 = static_cast<double>(r * r);
    slot(out, pos_m, M.sizes()).copy_(at::mm(M.to(R.scalar_type()), R).mul_(g * 4.0 / r2));
  }
  return out;
}

// ‖s‖₁ of a (contiguous, in the accumulation dtype).
template <typename scalar_t>
double l1_norm(const scalar_t* a, int64_t n) {
  double l1 = 0.0;
  for (int64_t i = 0; i < n; ++i) l1 += std::abs(static_cast<double>(a[i]));
  return l1;
}

// The norms of t = s / scale, scale = ‖s‖_∞ (1 for a zero vector): the Hoyer measures are
// scale invariant, h(s) = ‖t‖₁/‖t‖₂, and t's sums neither overflow nor underflow whatever the
// magnitude of s. l2 = max(‖t‖₂, tiny) (‖t‖₂ ≥ 1 unless s = 0), so a zero vector has Hoyer
// measure 0 and zero gradient. A NaN or an infinity in s gives NaN, as in the reference.
struct Scaled {
  double scale, l1, l2;
};

template <typename scalar_t>
Scaled scaled_norms(const scalar_t* a, int64_t n) {
  double amax = 0.0;
  for (int64_t i = 0; i < n; ++i) amax = std::max(amax, std::abs(static_cast<double>(a[i])));
  const double scale = amax > 0 ? amax : 1.0;
  double l1 = 0.0, sq = 0.0;
  for (int64_t i = 0; i < n; ++i) {
    const double t = static_cast<double>(a[i]) / scale;
    l1 += std::abs(t);
    sq += t * t;
  }
  const double tiny = std::numeric_limits<scalar_t>::min();
  return {scale, l1, std::max(std::sqrt(sq), tiny)};
}

at::Tensor sparsity_loss_cpu(at::TensorList svals, c10::string_view kind) {
  const Sparsity k = check_svals("sparsity_loss", svals, kind);
  const NoAutocast no_autocast;
  const auto acc = loss_dtype(svals[0].scalar_type());
  double total = 0.0;
  for (const auto& s : svals) {
    const at::Tensor a = s.to(acc).contiguous();
    AT_DISPATCH_FLOATING_TYPES(acc, "sparsity_loss", [&] {
      const scalar_t* pa = a.const_data_ptr<scalar_t>();
      if (k == Sparsity::L1) {
        total += l1_norm(pa, a.numel());
      } else {
        const Scaled t = scaled_norms(pa, a.numel());
        const double h = t.l1 / t.l2;
        total += k == Sparsity::Hoyer ? h : h * h;
      }
    });
  }
  return loss_scalar(total, svals[0].options().dtype(acc));
}

// [ds_0, ds_1, ...] packed.
at::Tensor sparsity_loss_backward_cpu(const at::Tensor& grad, at::TensorList svals,
                                      c10::string_view kind) {
  const Sparsity k = check_svals("sparsity_loss_backward", svals, kind);
  const NoAutocast no_autocast;
  const auto acc = loss_dtype(svals[0].scalar_type());
  const double g = grad.item<double>();
  at::Tensor out = at::empty({numel_of(svals)}, svals[0].options());
  int64_t pos = 0;
  for (const auto& s : svals) {
    const at::Tensor a = s.to(acc).contiguous();
    at::Tensor d = at::empty_like(a);
    AT_DISPATCH_FLOATING_TYPES(acc, "sparsity_loss_backward", [&] {
      const scalar_t* pa = a.const_data_ptr<scalar_t>();
      scalar_t* pd = d.data_ptr<scalar_t>();
      const int64_t n = a.numel();
      // l1: sign(s). hoyer, on t = s/scale: dh/ds = (sign − t·(l1/l2)/l2)/l2 / scale with the
      // norms of t, ordered so no power of l2 underflows. hoyer_square = h², so d = 2h·dh/ds.
      const Scaled t = k == Sparsity::L1 ? Scaled{1.0, 0.0, 1.0} : scaled_norms(pa, n);
      const double l2 = t.l2;
      const double h = t.l1 / l2;
      const double outer = g * (k == Sparsity::HoyerSquare ? 2 * h : 1.0) / t.scale;
      for (int64_t i = 0; i < n; ++i) {
        const double x = pa[i] / t.scale;
        const double sign = static_cast<double>((x > 0) - (x < 0));
        pd[i] = static_cast<scalar_t>(k == Sparsity::L1 ? g * sign
                                                        : outer * (sign - x * (h / l2)) / l2);
      }
    });
    slot(out, pos, s.sizes()).copy_(d);
  }
  return out;
}

}  // namespace
}  // namespace svdkern

TORCH_LIBRARY_IMPL(svdkern, CPU, m) {
  m.impl("compose", &svdkern::compose_cpu);
  m.impl("compose_backward", &svdkern::compose_backward_cpu);
  m.impl("compose_grouped_packed", &svdkern::compose_grouped_packed_cpu);
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

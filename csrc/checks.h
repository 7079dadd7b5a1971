// Input checks of the svdkern ops. Each failure names the op, the argument,
// what it got and what was expected; shape errors raise ValueError and dtype
// errors TypeError in Python (TORCH_CHECK_VALUE / TORCH_CHECK_TYPE).
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include <string>
#include <string_view>

namespace svdkern {

inline bool is_float(const at::Tensor& t) {
  const auto st = t.scalar_type();
  return st == at::kFloat || st == at::kDouble || st == at::kHalf || st == at::kBFloat16;
}

inline void check_tensor(std::string_view op, const std::string& name, const at::Tensor& t,
                         int64_t ndim, std::string_view what) {
  TORCH_CHECK_VALUE(t.defined(), op, ": ", name, " must be a tensor, got None");
  TORCH_CHECK_VALUE(t.dim() == ndim, op, ": ", name, " must be a ", ndim, "-D tensor ", what,
                    ", got shape ", t.sizes());
  TORCH_CHECK_TYPE(is_float(t), op, ": ", name,
                   " must be a floating-point tensor (float32, float64, float16, bfloat16), "
                   "got dtype ",
                   t.scalar_type());
}

inline void check_same(std::string_view op, const std::string& ref_name, const at::Tensor& ref,
                       const std::string& name, const at::Tensor& t) {
  TORCH_CHECK_TYPE(t.scalar_type() == ref.scalar_type(), op, ": ", name, " has dtype ",
                   t.scalar_type(), " but ", ref_name, " has dtype ", ref.scalar_type(),
                   "; all inputs must share one dtype");
  TORCH_CHECK_VALUE(t.device() == ref.device(), op, ": ", name, " is on ", t.device(), " but ",
                    ref_name, " is on ", ref.device(), "; all inputs must be on one device");
}

// U (m×r), s (r,), V (n×r), one floating dtype and device, r ≥ 1.
inline void check_factors(std::string_view op, const at::Tensor& U, const at::Tensor& s,
                          const at::Tensor& V) {
  check_tensor(op, "U", U, 2, "(m, r)");
  check_tensor(op, "s", s, 1, "(r,)");
  check_tensor(op, "V", V, 2, "(n, r)");
  const int64_t r = U.size(1);
  TORCH_CHECK_VALUE(r >= 1, op, ": rank must be >= 1, got U of shape ", U.sizes());
  TORCH_CHECK_VALUE(s.size(0) == r, op, ": s must have shape (", r, ",) to match U of shape ",
                    U.sizes(), ", got shape ", s.sizes());
  TORCH_CHECK_VALUE(V.size(1) == r, op, ": V must have ", r, " columns to match U of shape ",
                    U.sizes(), ", got shape ", V.sizes());
  check_same(op, "U", U, "s", s);
  check_same(op, "U", U, "V", V);
}

inline void check_nonempty(std::string_view op, std::string_view name, size_t size) {
  TORCH_CHECK_VALUE(size > 0, op, ": ", name,
                    " must be a non-empty list of tensors, got an empty list");
}

inline void check_grouped(std::string_view op, at::TensorList Us, at::TensorList ss,
                          at::TensorList Vs) {
  check_nonempty(op, "Us", Us.size());
  TORCH_CHECK_VALUE(Us.size() == ss.size() && Us.size() == Vs.size(), op,
                    ": Us, ss and Vs must have the same length, got ", Us.size(), ", ", ss.size(),
                    ", ", Vs.size());
  for (size_t i = 0; i < Us.size(); ++i) {
    const std::string layer = std::string(op) + "[" + std::to_string(i) + "]";
    check_factors(layer, Us[i], ss[i], Vs[i]);
    if (i > 0) check_same(op, "Us[0]", Us[0], "Us[" + std::to_string(i) + "]", Us[i]);
  }
}

inline void check_lowrank_input(std::string_view op, const at::Tensor& x, const at::Tensor& U,
                                const at::Tensor& s, const at::Tensor& V,
                                const std::optional<at::Tensor>& bias) {
  check_factors(op, U, s, V);
  TORCH_CHECK_VALUE(x.defined() && x.dim() >= 1, op,
                    ": x must be a tensor of shape (..., n), got shape ",
                    x.defined() ? x.sizes() : at::IntArrayRef{});
  TORCH_CHECK_VALUE(x.size(-1) == V.size(0), op, ": x must have last dimension ", V.size(0),
                    " (the rows of V of shape ", V.sizes(), "), got shape ", x.sizes());
  check_same(op, "U", U, "x", x);
  if (bias.has_value() && bias->defined()) {
    check_tensor(op, "bias", *bias, 1, "(m,)");
    TORCH_CHECK_VALUE(bias->size(0) == U.size(0), op, ": bias must have shape (", U.size(0),
                      ",) to match U of shape ", U.sizes(), ", got shape ", bias->sizes());
    check_same(op, "U", U, "bias", *bias);
  }
}

inline void check_mats(std::string_view op, at::TensorList mats) {
  check_nonempty(op, "mats", mats.size());
  for (size_t i = 0; i < mats.size(); ++i) {
    const std::string name = "mats[" + std::to_string(i) + "]";
    check_tensor(op, name, mats[i], 2, "(k, r)");
    TORCH_CHECK_VALUE(mats[i].size(1) >= 1, op, ": ", name,
                      " must have at least one column, got ", mats[i].sizes());
    if (i > 0) check_same(op, "mats[0]", mats[0], name, mats[i]);
  }
}

enum class Sparsity { L1, Hoyer, HoyerSquare };

inline Sparsity parse_kind(std::string_view op, std::string_view kind) {
  if (kind == "l1") return Sparsity::L1;
  if (kind == "hoyer") return Sparsity::Hoyer;
  if (kind == "hoyer_square") return Sparsity::HoyerSquare;
  TORCH_CHECK_VALUE(false, op, ": kind must be one of ('l1', 'hoyer', 'hoyer_square'), got '",
                    kind, "'");
}

inline Sparsity check_svals(std::string_view op, at::TensorList svals, std::string_view kind) {
  const Sparsity k = parse_kind(op, kind);
  check_nonempty(op, "svals", svals.size());
  for (size_t i = 0; i < svals.size(); ++i) {
    const std::string name = "svals[" + std::to_string(i) + "]";
    check_tensor(op, name, svals[i], 1, "(r,)");
    TORCH_CHECK_VALUE(svals[i].size(0) >= 1, op, ": ", name,
                      " must have at least one element, got ", svals[i].sizes());
    if (i > 0) check_same(op, "svals[0]", svals[0], name, svals[i]);
  }
  return k;
}

// The dtype losses accumulate and return in: fp64 for fp64 inputs, else fp32.
inline at::ScalarType loss_dtype(at::ScalarType st) {
  return st == at::kDouble ? at::kDouble : at::kFloat;
}

}  // namespace svdkern

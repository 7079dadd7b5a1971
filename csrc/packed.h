// Packed buffers of the grouped ops: tensors of several shapes stored row-major, back to
// back, in one flat 1-D tensor (one allocation, one kernel launch writes all of them).
//
// The grouped ops return such buffers rather than lists of views into one buffer: an
// operator's outputs must not alias each other (PyTorch's custom-op contract, checked by
// torch.library.opcheck). The per-tensor views are taken outside the ops, by ATen view
// ops that autograd and torch.compile know (split_with_sizes, narrow, view).
#pragma once

#include <ATen/ATen.h>

#include <vector>

namespace svdkern {

// Shapes as SymInts: under torch.compile the autograd code runs on symbolic sizes.
using Shape = std::vector<c10::SymInt>;

// Row-major views of `shapes`, consecutive in the 1-D `flat` from element `start`.
inline std::vector<at::Tensor> unpack(const at::Tensor& flat, const std::vector<Shape>& shapes,
                                      c10::SymInt start = 0) {
  std::vector<at::Tensor> out;
  out.reserve(shapes.size());
  for (const auto& shape : shapes) {
    c10::SymInt n = 1;
    for (const auto& d : shape) n = n * d;
    out.push_back(flat.narrow_symint(0, start, n).view_symint(shape));
    start = start + n;
  }
  return out;
}

inline std::vector<Shape> shapes_of(at::TensorList ts) {
  std::vector<Shape> out;
  out.reserve(ts.size());
  for (const auto& t : ts) out.emplace_back(t.sym_sizes().begin(), t.sym_sizes().end());
  return out;
}

inline c10::SymInt total_numel(at::TensorList ts) {
  c10::SymInt n = 0;
  for (const auto& t : ts) n = n + t.sym_numel();
  return n;
}

}  // namespace svdkern

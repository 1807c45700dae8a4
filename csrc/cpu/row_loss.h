// What the CPU cross-entropy and binary cross-entropy share under common/row_loss_launch.h:
// allocation and the two reductions over rows. The reductions run here on the host rather than
// as torch ops: at small sizes their dispatch costs as much as the kernel.
#pragma once

#include <ATen/ATen.h>

#include <cstdlib>
#include <cstring>

#include "common/row_loss_args.h"
#include "cpu/alloc.h"

namespace fastcore_train::cpu {

struct RowLossDevice {
  struct Guard {
    explicit Guard(const at::Tensor&) {}
  };

  static at::Tensor alloc(at::IntArrayRef sizes, const at::TensorOptions& options) {
    return empty_large(sizes, options);
  }

  static double count(const RowCount& c) {
    if (c.target == nullptr) return static_cast<double>(c.fixed);
    const int64_t* b = c.target_b != nullptr ? c.target_b : c.target;
    int64_t n = 0;
    for (int64_t i = 0; i < c.rows; ++i) {
      n += c.target[i] != c.ignore_index && b[i] != c.ignore_index;
    }
    return static_cast<double>(n);
  }

  // Summed in float64 in row order; a mean of no rows is 0/0 = NaN, as in torch.
  static at::Tensor reduce(const at::Tensor& rows, const RowCount& c, bool mean) {
    at::Tensor loss = at::empty({}, rows.options());
    AT_DISPATCH_FLOATING_TYPES(rows.scalar_type(), "row_loss_reduce", [&] {
      const scalar_t* r = rows.const_data_ptr<scalar_t>();
      double total = 0.0;
      for (int64_t i = 0, n = rows.numel(); i < n; ++i) total += r[i];
      *loss.mutable_data_ptr<scalar_t>() =
          static_cast<scalar_t>(mean ? total / count(c) : total);
    });
    return loss;
  }

  static at::Tensor scale_grad(const at::Tensor& grad_loss, const RowCount& c,
                               at::ScalarType acc) {
    return at::scalar_tensor(grad_loss.item<double>() / count(c),
                             grad_loss.options().dtype(acc));
  }

  // Non-temporal stores pay off once the output is far larger than the last-level cache, where
  // a normal store's read-for-ownership doubles the traffic. FASTCORE_TRAIN_NT_STORES=0
  // disables them.
  static bool stream_stores_for(int64_t rows, int64_t classes, at::ScalarType dtype) {
    constexpr size_t kMinBytes = size_t(64) << 20;
    const size_t nbytes = static_cast<size_t>(rows * classes) * c10::elementSize(dtype);
    const char* env = std::getenv("FASTCORE_TRAIN_NT_STORES");
    return nbytes >= kMinBytes && (env == nullptr || std::strcmp(env, "0") != 0);
  }
};

}  // namespace fastcore_train::cpu

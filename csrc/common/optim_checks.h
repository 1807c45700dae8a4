// Input checks of the fused optimizer ops (grad_stats_, fused_adamw_, fused_sgd_) shared by
// the CPU and CUDA implementations, and the layout staging both use. The messages match
// fastcore_train/ops/optim_step.py word for word, so both backends say the same.
#pragma once

#include <ATen/ATen.h>
#include <c10/util/Exception.h>

#include <algorithm>
#include <optional>
#include <string>
#include <utility>
#include <vector>

#include "common/py_dtype.h"

namespace fastcore_train {

inline bool optim_dtype_ok(at::ScalarType t) {
  return t == at::kFloat || t == at::kHalf || t == at::kBFloat16;
}

// A named list of float32 state tensors, one per param (exp_avgs, masters, ...); an optional
// list may instead be empty.
struct StateList {
  const char* name;
  at::TensorList tensors;
  bool optional = false;
};

// The tensors an op writes must not share memory: the CPU kernel would update a shared tensor
// twice in sequence and the CUDA kernel from two blocks at once (a race). A parameter listed twice
// (and so sharing its state) is the usual cause.
inline void check_distinct_writes(
    const char* op, const std::vector<std::pair<const char*, at::TensorList>>& lists) {
  struct Entry {
    const void* ptr;
    size_t order;  // position in the concatenated lists
    const char* name;
    size_t index;
  };
  std::vector<Entry> seen;
  for (const auto& [name, tensors] : lists) {
    for (size_t i = 0; i < tensors.size(); ++i) {
      if (tensors[i].numel() > 0) seen.push_back({tensors[i].data_ptr(), seen.size(), name, i});
    }
  }
  std::sort(seen.begin(), seen.end(), [](const Entry& a, const Entry& b) {
    return a.ptr < b.ptr || (a.ptr == b.ptr && a.order < b.order);
  });
  for (size_t k = 1; k < seen.size(); ++k) {
    const Entry& a = seen[k - 1];
    const Entry& b = seen[k];
    // a float32 param that is its own master (p.float() returns p) gets the same value written
    // twice by the same thread: harmless
    if (a.index == b.index && std::string(a.name) == "params" &&
        std::string(b.name) == "masters") {
      continue;
    }
    TORCH_CHECK_VALUE(a.ptr != b.ptr, op, ": ", a.name, "[", a.index, "] and ", b.name, "[",
                      b.index, "] are the same memory; each parameter needs tensors of its own "
                      "(is a parameter listed twice?)");
  }
}

// params/grads: float32, float16 or bfloat16, grads dense and of their param's dtype and shape;
// every state list float32 with one tensor per param of its shape (or empty if optional);
// everything on one device.
inline void check_optim_lists(const char* op, at::TensorList params, at::TensorList grads,
                              std::initializer_list<StateList> states) {
  const size_t n = params.size();
  TORCH_CHECK_VALUE(grads.size() == n, op, ": got ", n, " params but ", grads.size(), " grads");
  for (const auto& s : states) {
    TORCH_CHECK_VALUE(s.tensors.size() == n || (s.optional && s.tensors.empty()), op, ": got ",
                      n, " params but ", s.tensors.size(), " ", s.name);
  }
  if (n == 0) return;
  const at::Device device = params[0].device();
  auto check_device = [&](const at::Tensor& t, const char* name, size_t i) {
    TORCH_CHECK_VALUE(t.device() == device, op, ": ", name, "[", i, "] is on ", t.device(),
                      " but params[0] is on ", device, "; all tensors must be on one device");
  };
  for (size_t i = 0; i < n; ++i) {
    const at::Tensor& p = params[i];
    const at::Tensor& g = grads[i];
    TORCH_CHECK_TYPE(g.layout() == at::kStrided, op, ": grads[", i,
                     "] is sparse; fused optimizers need dense gradients");
    TORCH_CHECK_TYPE(optim_dtype_ok(p.scalar_type()), op, ": params[", i,
                     "] must be float32, float16 or bfloat16, got ", py_dtype(p.scalar_type()));
    TORCH_CHECK_TYPE(g.scalar_type() == p.scalar_type(), op, ": grads[", i, "] is ",
                     py_dtype(g.scalar_type()), " but params[", i, "] is ",
                     py_dtype(p.scalar_type()));
    TORCH_CHECK_VALUE(g.sizes() == p.sizes(), op, ": grads[", i, "] has shape ", g.sizes(),
                      " but params[", i, "] has shape ", p.sizes());
    check_device(p, "params", i);
    check_device(g, "grads", i);
    for (const auto& s : states) {
      if (s.tensors.empty()) continue;
      const at::Tensor& t = s.tensors[i];
      TORCH_CHECK_TYPE(t.scalar_type() == at::kFloat, op, ": ", s.name, "[", i,
                       "] must be torch.float32, got ", py_dtype(t.scalar_type()));
      TORCH_CHECK_VALUE(t.sizes() == p.sizes(), op, ": ", s.name, "[", i, "] has shape ",
                        t.sizes(), " but params[", i, "] has shape ", p.sizes());
      check_device(t, s.name, i);
    }
  }
  std::vector<std::pair<const char*, at::TensorList>> written{{"params", params}};
  for (const auto& s : states) written.emplace_back(s.name, s.tensors);
  check_distinct_writes(op, written);
}

// A one-element float32 tensor (scale, found-inf flag, squared norm, lr, step) on `device`,
// the device of `ref` ("params[0]" or "grads[0]").
inline void check_optim_scalar(const char* op, const std::string& name, const at::Tensor& t,
                               const at::Device& device, const char* ref = "params[0]") {
  TORCH_CHECK_TYPE(t.scalar_type() == at::kFloat, op, ": ", name,
                   " must be a torch.float32 tensor, got ", py_dtype(t.scalar_type()));
  TORCH_CHECK_VALUE(t.numel() == 1, op, ": ", name, " must have one element, got ", t.numel());
  TORCH_CHECK_VALUE(t.device() == device, op, ": ", name, " is on ", t.device(), " but ", ref,
                    " is on ", device, "; all tensors must be on one device");
}

inline void check_optional_scalar(const char* op, const char* name,
                                  const std::optional<at::Tensor>& t, const at::Device& device,
                                  const char* ref = "params[0]") {
  if (t.has_value()) check_optim_scalar(op, name, *t, device, ref);
}

inline void check_optim_scalars(const char* op, at::TensorList params,
                                const std::optional<at::Tensor>& lr_tensor,
                                const std::optional<at::Tensor>& grad_scale,
                                const std::optional<at::Tensor>& found_inf,
                                const std::optional<at::Tensor>& sq_norm,
                                double max_grad_norm) {
  TORCH_CHECK_VALUE(max_grad_norm <= 0.0 || sq_norm.has_value(), op,
                    ": max_grad_norm > 0 needs sq_norm (from grad_stats_)");
  if (params.empty()) return;
  const at::Device device = params[0].device();
  check_optional_scalar(op, "lr_tensor", lr_tensor, device);
  check_optional_scalar(op, "grad_scale", grad_scale, device);
  check_optional_scalar(op, "found_inf", found_inf, device);
  check_optional_scalar(op, "sq_norm", sq_norm, device);
}

// grad_stats_: dense float32/float16/bfloat16 grads and the outputs on one device.
inline void check_grad_stats_inputs(const char* op, at::TensorList grads,
                                    const std::optional<at::Tensor>& found_inf,
                                    const std::optional<at::Tensor>& sq_norm) {
  if (grads.empty()) return;
  const at::Device device = grads[0].device();
  for (size_t i = 0; i < grads.size(); ++i) {
    const at::Tensor& g = grads[i];
    TORCH_CHECK_TYPE(g.layout() == at::kStrided, op, ": grads[", i,
                     "] is sparse; fused optimizers need dense gradients");
    TORCH_CHECK_TYPE(optim_dtype_ok(g.scalar_type()), op, ": grads[", i,
                     "] must be float32, float16 or bfloat16, got ", py_dtype(g.scalar_type()));
    TORCH_CHECK_VALUE(g.device() == device, op, ": grads[", i, "] is on ", g.device(),
                      " but grads[0] is on ", device, "; all tensors must be on one device");
  }
  check_optional_scalar(op, "found_inf", found_inf, device, "grads[0]");
  check_optional_scalar(op, "sq_norm", sq_norm, device, "grads[0]");
}

// fused_adamw_'s steps: one float32 scalar per param.
inline void check_optim_steps(const char* op, at::TensorList params, at::TensorList steps) {
  TORCH_CHECK_VALUE(steps.size() == params.size(), op, ": got ", params.size(),
                    " params but ", steps.size(), " steps");
  for (size_t i = 0; i < steps.size(); ++i) {
    check_optim_scalar(op, "steps[" + std::to_string(i) + "]", steps[i], params[0].device());
  }
  check_distinct_writes(op, {{"steps", steps}});
}

// fused_adamw_'s max_exp_avg_sqs: one per param with amsgrad (checked with the other state
// lists), none without.
inline void check_amsgrad_args(const char* op, at::TensorList max_exp_avg_sqs, bool amsgrad) {
  TORCH_CHECK_VALUE(amsgrad || max_exp_avg_sqs.empty(), op,
                    ": max_exp_avg_sqs must be empty when amsgrad is False, got ",
                    max_exp_avg_sqs.size());
}

// The EMA of the weights: ema_steps (float32 scalars counting each EMA's updates) with emas,
// none without; emas themselves are checked with the other state lists.
inline void check_ema_args(const char* op, at::TensorList params, at::TensorList steps,
                           at::TensorList emas, at::TensorList ema_steps, double ema_decay) {
  if (emas.empty()) {
    TORCH_CHECK_VALUE(ema_steps.empty(), op, ": ema_steps must be empty without emas, got ",
                      ema_steps.size());
    return;
  }
  TORCH_CHECK_VALUE(ema_decay >= 0.0 && ema_decay <= 1.0, op,
                    ": ema_decay must be in [0, 1], got ", ema_decay);
  TORCH_CHECK_VALUE(ema_steps.size() == params.size(), op, ": got ", params.size(),
                    " params but ", ema_steps.size(), " ema_steps");
  for (size_t i = 0; i < ema_steps.size(); ++i) {
    check_optim_scalar(op, "ema_steps[" + std::to_string(i) + "]", ema_steps[i],
                       params[0].device());
  }
  check_distinct_writes(op, {{"steps", steps}, {"ema_steps", ema_steps}});
}

// fused_sgd_'s hyperparameters, buffers and buffer step counts.
inline void check_sgd_args(const char* op, at::TensorList params, at::TensorList buffers,
                           at::TensorList steps, double momentum, double dampening,
                           bool nesterov) {
  TORCH_CHECK_VALUE(!nesterov || (momentum > 0.0 && dampening == 0.0), op,
                    ": nesterov needs momentum > 0 and dampening 0");
  if (momentum == 0.0) {
    TORCH_CHECK_VALUE(buffers.empty(), op,
                      ": momentum_buffers must be empty when momentum is 0, got ",
                      buffers.size());
    TORCH_CHECK_VALUE(steps.empty(), op, ": steps must be empty when momentum is 0, got ",
                      steps.size());
  } else {
    TORCH_CHECK_VALUE(buffers.size() == params.size(), op, ": got ", params.size(),
                      " params but ", buffers.size(), " momentum_buffers");
    TORCH_CHECK_VALUE(steps.empty() || steps.size() == params.size(), op, ": got ",
                      params.size(), " params but ", steps.size(), " steps");
    for (size_t i = 0; i < steps.size(); ++i) {
      check_optim_scalar(op, "steps[" + std::to_string(i) + "]", steps[i], params[0].device());
    }
    check_distinct_writes(op, {{"steps", steps}});
  }
}

// The kernels treat the tensors of one parameter (param, grad, state) as flat arrays indexed
// alike, which needs one dense layout shared by all of them. The usual case (state created with
// preserve_format, grads following the param's layout) passes through untouched; any other
// tensor is staged through a copy in the param's layout (contiguous when the param itself has
// gaps or overlaps), and staged tensors the op writes are copied back by finish().
class LayoutStager {
 public:
  // Returns `t` or a staged copy laid out like `ref` (a tensor returned by reference()).
  at::Tensor stage(const at::Tensor& ref, const at::Tensor& t, bool written) {
    if (t.is_non_overlapping_and_dense() && t.strides() == ref.strides()) return t;
    at::Tensor copy = at::empty_like(ref, t.options()).copy_(t);
    if (written) writeback_.emplace_back(t, copy);
    return copy;
  }
  // The layout of a parameter's group: the param itself when dense, else a contiguous copy.
  at::Tensor reference(const at::Tensor& param, bool written) {
    if (param.is_non_overlapping_and_dense()) return param;
    at::Tensor copy = param.contiguous();
    if (written) writeback_.emplace_back(param, copy);
    return copy;
  }
  void finish() {
    for (auto& [dst, src] : writeback_) dst.copy_(src);
    writeback_.clear();
  }

 private:
  std::vector<std::pair<at::Tensor, at::Tensor>> writeback_;
};

}  // namespace fastcore_train

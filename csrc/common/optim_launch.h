// The fused optimizer operators (grad_stats_, fused_adamw_, fused_sgd_), written once for every
// device: argument checks, layout staging, the overflow skip and the order of work; the device
// supplies the kernels.
//
//   struct Device {
//     using Guard = ...;  // makes the params' device current (nothing on the CPU)
//     // Whether the step is skipped for overflow, known on the host without a sync: the CPU
//     // reads found_inf (ordinary memory); a GPU returns false and its kernels read the flag.
//     static bool skip_on_host(const Opt& found_inf);
//     static void grad_stats(const std::vector<at::Tensor>& grads,   // dense, non-empty
//                            const Opt& found_inf, const Opt& sq_norm);
//     static void adamw(const UpdateCall& call, const AdamWArgs& a);
//     static void sgd(const UpdateCall& call, const SGDArgs& a);
//     // step += 1 for each tensor, after the update kernels read the old values, unless
//     // found_inf is set (read on the device by a GPU).
//     static void increment(at::TensorList steps, const Opt& found_inf);
//   };
//
// A kernel sees each parameter as flat arrays indexed alike: the param, its grad and state are
// staged into one dense layout (LayoutStager, common/optim_checks.h) before the kernels run,
// and what they wrote is copied back after. Parameters with no elements never reach a kernel.
// Steps and EMA counts stay device tensors: the CPU kernels read them from memory, the CUDA
// kernels on the device, so a step never synchronises the host.
#pragma once

#include <ATen/ATen.h>

#include <optional>
#include <vector>

#include "common/optim_checks.h"

namespace fastcore_train::optim_impl {

using Opt = std::optional<at::Tensor>;

// One parameter's tensors, staged. Undefined when the update does not use them.
struct ParamTensors {
  at::Tensor param, grad;
  at::Tensor master;                  // fp32 master weight
  at::Tensor state0, state1, state2;  // AdamW: exp_avg, exp_avg_sq, max_exp_avg_sq; SGD: buffer
  at::Tensor step;                    // AdamW's step; SGD's buffer step (may be undefined)
  at::Tensor ema, ema_step;           // the EMA of the weight and its update count
};

// What every update kernel reads besides its hyperparameters.
struct UpdateCall {
  std::vector<ParamTensors> params;  // non-empty params only, in order
  double lr = 0.0;
  const float* lr_tensor = nullptr;  // replaces lr when given (device memory)
  const float* grad_scale = nullptr;
  const float* found_inf = nullptr;
  const float* sq_norm = nullptr;
  double max_grad_norm = 0.0;
  bool maximize = false;
  double ema_decay = 0.0;
  bool ema_warmup = false;
};

struct AdamWArgs {
  double beta1, beta2, eps, weight_decay;
  bool amsgrad;
};

struct SGDArgs {
  double momentum, dampening, weight_decay;
  bool nesterov;
};

inline const float* scalar_ptr(const Opt& t) {
  return t.has_value() ? t->const_data_ptr<float>() : nullptr;
}

// A staged float32 tensor's data for a kernel; null when the update does not use it.
inline float* float_ptr(const at::Tensor& t) { return t.defined() ? t.data_ptr<float>() : nullptr; }

inline const float* const_float_ptr(const at::Tensor& t) {
  return t.defined() ? t.const_data_ptr<float>() : nullptr;
}

// Stages every non-empty parameter with the named lists (an empty list: not used).
struct ParamLists {
  at::TensorList params, grads, masters, state0, state1, state2, steps, emas, ema_steps;
};

inline std::vector<ParamTensors> stage_params(const ParamLists& l, LayoutStager& stager) {
  std::vector<ParamTensors> out;
  out.reserve(l.params.size());
  for (size_t i = 0; i < l.params.size(); ++i) {
    if (l.params[i].numel() == 0) continue;
    ParamTensors t;
    t.param = stager.reference(l.params[i], /*written=*/true);
    auto stage = [&](at::TensorList list, bool written) {
      return list.empty() ? at::Tensor() : stager.stage(t.param, list[i], written);
    };
    t.grad = stage(l.grads, false);
    t.master = stage(l.masters, true);
    t.state0 = stage(l.state0, true);
    t.state1 = stage(l.state1, true);
    t.state2 = stage(l.state2, true);
    t.ema = stage(l.emas, true);
    if (!l.steps.empty()) t.step = l.steps[i];
    if (!l.ema_steps.empty()) t.ema_step = l.ema_steps[i];
    out.push_back(std::move(t));
  }
  return out;
}

inline UpdateCall make_call(double lr, const Opt& lr_tensor, const Opt& grad_scale,
                            const Opt& found_inf, const Opt& sq_norm, double max_grad_norm,
                            bool maximize, double ema_decay, bool ema_warmup) {
  UpdateCall c;
  c.lr = lr;
  c.lr_tensor = scalar_ptr(lr_tensor);
  c.grad_scale = scalar_ptr(grad_scale);
  c.found_inf = scalar_ptr(found_inf);
  c.sq_norm = scalar_ptr(sq_norm);
  c.max_grad_norm = max_grad_norm;
  c.maximize = maximize;
  c.ema_decay = ema_decay;
  c.ema_warmup = ema_warmup;
  return c;
}

template <class Device>
void grad_stats(at::TensorList grads, const Opt& found_inf, const Opt& sq_norm) {
  check_grad_stats_inputs("grad_stats_", grads, found_inf, sq_norm);
  if (!found_inf.has_value() && !sq_norm.has_value()) return;
  std::vector<at::Tensor> dense;  // read only: a dense grad in any layout will do
  for (const at::Tensor& g : grads) {
    if (g.numel() > 0) dense.push_back(g.is_non_overlapping_and_dense() ? g : g.contiguous());
  }
  if (dense.empty()) return;
  typename Device::Guard guard(dense[0]);
  Device::grad_stats(dense, found_inf, sq_norm);
}

template <class Device>
void fused_adamw(at::TensorList params, at::TensorList grads, at::TensorList exp_avgs,
                 at::TensorList exp_avg_sqs, at::TensorList max_exp_avg_sqs,
                 at::TensorList masters, at::TensorList steps, double lr, const Opt& lr_tensor,
                 double beta1, double beta2, double eps, double weight_decay, bool amsgrad,
                 bool maximize, const Opt& grad_scale, const Opt& found_inf,
                 const Opt& sq_norm, double max_grad_norm, at::TensorList emas,
                 at::TensorList ema_steps, double ema_decay, bool ema_warmup) {
  constexpr const char* op = "fused_adamw_";
  check_amsgrad_args(op, max_exp_avg_sqs, amsgrad);
  check_optim_lists(op, params, grads,
                    {{"exp_avgs", exp_avgs}, {"exp_avg_sqs", exp_avg_sqs},
                     {"max_exp_avg_sqs", max_exp_avg_sqs, /*optional=*/!amsgrad},
                     {"masters", masters, /*optional=*/true},
                     {"emas", emas, /*optional=*/true}});
  check_optim_steps(op, params, steps);
  check_ema_args(op, params, steps, emas, ema_steps, ema_decay);
  check_optim_scalars(op, params, lr_tensor, grad_scale, found_inf, sq_norm, max_grad_norm);
  if (params.empty() || Device::skip_on_host(found_inf)) return;
  typename Device::Guard guard(params[0]);

  LayoutStager stager;
  UpdateCall call = make_call(lr, lr_tensor, grad_scale, found_inf, sq_norm, max_grad_norm,
                              maximize, ema_decay, ema_warmup);
  call.params = stage_params({params, grads, masters, exp_avgs, exp_avg_sqs,
                              amsgrad ? max_exp_avg_sqs : at::TensorList(), steps, emas,
                              ema_steps},
                             stager);
  if (!call.params.empty()) {
    Device::adamw(call, AdamWArgs{beta1, beta2, eps, weight_decay, amsgrad});
  }
  stager.finish();
  Device::increment(steps, found_inf);
  Device::increment(ema_steps, found_inf);
}

template <class Device>
void fused_sgd(at::TensorList params, at::TensorList grads, at::TensorList momentum_buffers,
               at::TensorList masters, at::TensorList steps, double lr, const Opt& lr_tensor,
               double momentum, double dampening, bool nesterov, bool maximize,
               double weight_decay, const Opt& grad_scale, const Opt& found_inf,
               const Opt& sq_norm, double max_grad_norm, at::TensorList emas,
               at::TensorList ema_steps, double ema_decay, bool ema_warmup) {
  constexpr const char* op = "fused_sgd_";
  check_sgd_args(op, params, momentum_buffers, steps, momentum, dampening, nesterov);
  check_optim_lists(op, params, grads,
                    {{"momentum_buffers", momentum_buffers, /*optional=*/true},
                     {"masters", masters, /*optional=*/true},
                     {"emas", emas, /*optional=*/true}});
  check_ema_args(op, params, steps, emas, ema_steps, ema_decay);
  check_optim_scalars(op, params, lr_tensor, grad_scale, found_inf, sq_norm, max_grad_norm);
  if (params.empty() || Device::skip_on_host(found_inf)) return;
  typename Device::Guard guard(params[0]);

  LayoutStager stager;
  UpdateCall call = make_call(lr, lr_tensor, grad_scale, found_inf, sq_norm, max_grad_norm,
                              maximize, ema_decay, ema_warmup);
  call.params = stage_params({params, grads, masters,
                              momentum != 0.0 ? momentum_buffers : at::TensorList(), {}, {},
                              steps, emas, ema_steps},
                             stager);
  if (!call.params.empty()) {
    Device::sgd(call, SGDArgs{momentum, dampening, weight_decay, nesterov});
  }
  stager.finish();
  Device::increment(steps, found_inf);
  Device::increment(ema_steps, found_inf);
}

}  // namespace fastcore_train::optim_impl

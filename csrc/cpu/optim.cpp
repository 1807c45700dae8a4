// CPU implementation of fastcore_train::grad_stats_, fused_adamw_ and fused_sgd_: checks,
// per-tensor scalars (bias corrections from each step), layout staging, dispatch to the per-ISA
// kernels (cpu/kernels/optim_kernel.cpp).
//
// The device-side flags (found_inf, grad_scale, sq_norm, lr, steps) are read here directly:
// on the CPU a "device tensor" is ordinary memory, so skipping on overflow costs no sync.
#include <ATen/ATen.h>
#include <torch/library.h>

#include <cmath>
#include <vector>

#include "common/optim_checks.h"
#include "common/optim_math.h"
#include "cpu/isa.h"
#include "cpu/kernels/optim_kernel.h"

namespace fastcore_train {
namespace {

using Opt = std::optional<at::Tensor>;

const float* scalar_ptr(const Opt& t) {
  return t.has_value() ? t->const_data_ptr<float>() : nullptr;
}

bool skipped(const Opt& found_inf) {
  return found_inf.has_value() && *found_inf->const_data_ptr<float>() != 0.f;
}

float grad_mul(const Opt& grad_scale, const Opt& sq_norm, double max_grad_norm) {
  return optim_math::grad_multiplier<optim_math::HostFloatOps>(
      scalar_ptr(grad_scale), scalar_ptr(sq_norm), max_grad_norm);
}

// Builds the kernel's view of each parameter, staging tensors whose layout differs from their
// param's (see LayoutStager). Empty params get no slot.
struct Slots {
  LayoutStager stager;
  std::vector<at::Tensor> keep;  // staged tensors alive until the kernel returns
  std::vector<cpu::ParamSlot> slots;

  cpu::ParamSlot& add(const at::Tensor& param, const at::Tensor& grad, const at::Tensor* master,
                      const at::Tensor* state0, const at::Tensor* state1,
                      const at::Tensor* state2, const at::Tensor* ema) {
    at::Tensor p = stager.reference(param, true);
    at::Tensor g = stager.stage(p, grad, false);
    cpu::ParamSlot s;
    s.param = p.data_ptr();
    s.grad = g.const_data_ptr();
    s.numel = p.numel();
    s.dtype = p.scalar_type();
    auto state = [&](const at::Tensor* t) -> float* {
      if (t == nullptr) return nullptr;
      at::Tensor x = stager.stage(p, *t, true);
      keep.push_back(x);
      return x.data_ptr<float>();
    };
    s.master = state(master);
    s.state0 = state(state0);
    s.state1 = state(state1);
    s.state2 = state(state2);
    s.ema = state(ema);
    keep.push_back(p);
    keep.push_back(g);
    slots.push_back(s);
    return slots.back();
  }
};

// The slot's EMA, the constants from its update count (read here: CPU memory).
void set_ema(cpu::ParamSlot& s, at::TensorList ema_steps, size_t i, double ema_decay,
             bool ema_warmup) {
  if (s.ema == nullptr) return;
  const optim_math::EmaConsts c =
      optim_math::ema_consts(ema_decay, ema_warmup, *ema_steps[i].const_data_ptr<float>());
  s.ema_coeff = c.coeff;
  s.ema_small = c.small;
  s.ema_copy = c.copy;
}

void grad_stats_cpu(at::TensorList grads, const Opt& found_inf, const Opt& sq_norm) {
  check_grad_stats_inputs("grad_stats_", grads, found_inf, sq_norm);
  if (!found_inf.has_value() && !sq_norm.has_value()) return;
  std::vector<at::Tensor> keep;
  std::vector<cpu::GradView> views;
  for (const at::Tensor& g : grads) {
    if (g.numel() == 0) continue;
    at::Tensor x = g.is_non_overlapping_and_dense() ? g : g.contiguous();
    views.push_back({x.const_data_ptr(), x.numel(), x.scalar_type()});
    keep.push_back(std::move(x));
  }
  cpu::GradStatsParams p;
  p.grads = views.data();
  p.count = static_cast<int64_t>(views.size());
  p.want_norm = sq_norm.has_value();
  FT_ISA_CALL(grad_stats_kernel, p);
  if (found_inf.has_value() && p.found_nonfinite) *found_inf->data_ptr<float>() = 1.f;
  if (sq_norm.has_value()) *sq_norm->data_ptr<float>() += static_cast<float>(p.sq_norm);
}

void fused_adamw_cpu(at::TensorList params, at::TensorList grads, at::TensorList exp_avgs,
                     at::TensorList exp_avg_sqs, at::TensorList max_exp_avg_sqs,
                     at::TensorList masters, at::TensorList steps, double lr,
                     const Opt& lr_tensor, double beta1, double beta2, double eps,
                     double weight_decay, bool amsgrad, bool maximize, const Opt& grad_scale,
                     const Opt& found_inf, const Opt& sq_norm, double max_grad_norm,
                     at::TensorList emas, at::TensorList ema_steps, double ema_decay,
                     bool ema_warmup) {
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
  if (params.empty() || skipped(found_inf)) return;

  const double lr_v = lr_tensor.has_value() ? *lr_tensor->const_data_ptr<float>() : lr;
  cpu::AdamWKernelParams k;
  k.grad_mul = grad_mul(grad_scale, sq_norm, max_grad_norm);
  if (maximize) k.grad_mul = -k.grad_mul;
  k.has_decay = weight_decay != 0.0;
  // the constants every tensor shares (the step-dependent ones are per slot, below)
  const optim_math::AdamWConsts<float> c0 =
      optim_math::adamw_consts(lr_v, beta1, beta2, eps, weight_decay, 0.f);
  k.decay = c0.decay;
  k.lerp_small = optim_math::adamw_lerp_small(beta1);
  k.lerp_weight = c0.lerp_weight;
  k.beta2 = c0.beta2;
  k.one_minus_beta2 = c0.one_minus_beta2;
  k.eps = c0.eps;
  k.amsgrad = amsgrad;

  Slots slots;
  std::vector<float*> step_ptrs;
  for (size_t i = 0; i < params.size(); ++i) {
    float* step = steps[i].data_ptr<float>();
    step_ptrs.push_back(step);
    if (params[i].numel() == 0) continue;
    const optim_math::AdamWConsts<float> c =
        optim_math::adamw_consts(lr_v, beta1, beta2, eps, weight_decay, *step);
    cpu::ParamSlot& s = slots.add(params[i], grads[i], masters.empty() ? nullptr : &masters[i],
                                  &exp_avgs[i], &exp_avg_sqs[i],
                                  amsgrad ? &max_exp_avg_sqs[i] : nullptr,
                                  emas.empty() ? nullptr : &emas[i]);
    set_ema(s, ema_steps, i, ema_decay, ema_warmup);
    s.neg_step_size = c.neg_step_size;
    s.bc2_sqrt = c.bc2_sqrt;
  }
  k.slots = slots.slots.data();
  k.count = static_cast<int64_t>(slots.slots.size());
  FT_ISA_CALL(adamw_kernel, k);
  slots.stager.finish();
  for (float* step : step_ptrs) *step += 1.f;
  for (const at::Tensor& step : ema_steps) *step.data_ptr<float>() += 1.f;
}

void fused_sgd_cpu(at::TensorList params, at::TensorList grads, at::TensorList momentum_buffers,
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
  if (params.empty() || skipped(found_inf)) return;

  const double lr_v = lr_tensor.has_value() ? *lr_tensor->const_data_ptr<float>() : lr;
  cpu::SGDKernelParams k;
  k.grad_mul = grad_mul(grad_scale, sq_norm, max_grad_norm);
  if (maximize) k.grad_mul = -k.grad_mul;
  k.has_decay = weight_decay != 0.0;
  k.weight_decay = static_cast<float>(weight_decay);
  k.has_momentum = momentum != 0.0;
  k.momentum = static_cast<float>(momentum);
  k.one_minus_dampening = static_cast<float>(1.0 - dampening);
  k.nesterov = nesterov;
  k.neg_lr = static_cast<float>(-lr_v);

  Slots slots;
  for (size_t i = 0; i < params.size(); ++i) {
    if (params[i].numel() == 0) continue;
    cpu::ParamSlot& s = slots.add(params[i], grads[i], masters.empty() ? nullptr : &masters[i],
                                  k.has_momentum ? &momentum_buffers[i] : nullptr, nullptr,
                                  nullptr, emas.empty() ? nullptr : &emas[i]);
    set_ema(s, ema_steps, i, ema_decay, ema_warmup);
    // A buffer that has taken no step yet becomes d (torch: buf = clone(d)).
    s.first = !steps.empty() && *steps[i].const_data_ptr<float>() == 0.f;
  }
  k.slots = slots.slots.data();
  k.count = static_cast<int64_t>(slots.slots.size());
  FT_ISA_CALL(sgd_kernel, k);
  slots.stager.finish();
  for (const at::Tensor& step : steps) *step.data_ptr<float>() += 1.f;
  for (const at::Tensor& step : ema_steps) *step.data_ptr<float>() += 1.f;
}

}  // namespace

TORCH_LIBRARY_IMPL(fastcore_train, CPU, m) {
  m.impl("grad_stats_", &grad_stats_cpu);
  m.impl("fused_adamw_", &fused_adamw_cpu);
  m.impl("fused_sgd_", &fused_sgd_cpu);
}

// A sparse gradient sends the call to the SparseCPU key; the same functions reject it with
// the error of csrc/common/optim_checks.h rather than the dispatcher's "could not run".
TORCH_LIBRARY_IMPL(fastcore_train, SparseCPU, m) {
  m.impl("grad_stats_", &grad_stats_cpu);
  m.impl("fused_adamw_", &fused_adamw_cpu);
  m.impl("fused_sgd_", &fused_sgd_cpu);
}

}  // namespace fastcore_train

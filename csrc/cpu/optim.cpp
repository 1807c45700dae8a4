// CPU kernels of fastcore_train::grad_stats_, fused_adamw_ and fused_sgd_: the
// device-independent logic (checks, staging, the overflow skip) lives in
// common/optim_launch.h; this file derives the per-tensor constants and calls the per-ISA
// kernels (cpu/kernels/optim_kernel.cpp).
//
// The device-side flags (found_inf, grad_scale, sq_norm, lr, steps) are read here directly:
// on the CPU a "device tensor" is ordinary memory, so skipping on overflow costs no sync.
#include <ATen/ATen.h>
#include <torch/library.h>

#include <vector>

#include "common/optim_launch.h"
#include "common/optim_math.h"
#include "cpu/isa.h"
#include "cpu/kernels/optim_kernel.h"

namespace fastcore_train {
namespace {

using optim_impl::Opt;
using optim_impl::ParamTensors;
using optim_impl::UpdateCall;

using optim_impl::float_ptr;

// The kernel's view of one staged parameter; the EMA constants from its update count.
cpu::ParamSlot make_slot(const ParamTensors& t, const UpdateCall& call) {
  cpu::ParamSlot s;
  s.param = t.param.data_ptr();
  s.grad = t.grad.const_data_ptr();
  s.numel = t.param.numel();
  s.dtype = t.param.scalar_type();
  s.master = float_ptr(t.master);
  s.state0 = float_ptr(t.state0);
  s.state1 = float_ptr(t.state1);
  s.state2 = float_ptr(t.state2);
  s.ema = float_ptr(t.ema);
  if (s.ema != nullptr) {
    const optim_math::EmaConsts c = optim_math::ema_consts(
        call.ema_decay, call.ema_warmup, *t.ema_step.const_data_ptr<float>());
    s.ema_coeff = c.coeff;
    s.ema_small = c.small;
    s.ema_copy = c.copy;
  }
  return s;
}

double lr_of(const UpdateCall& call) {
  return call.lr_tensor != nullptr ? *call.lr_tensor : call.lr;
}

// 1/scale times the clip coefficient, negated to maximize (exact: g * -m == (-g) * m).
float grad_mul(const UpdateCall& call) {
  const float m = optim_math::grad_multiplier<optim_math::HostFloatOps>(
      call.grad_scale, call.sq_norm, call.max_grad_norm);
  return call.maximize ? -m : m;
}

struct CpuOptim {
  struct Guard {
    explicit Guard(const at::Tensor&) {}
  };

  static bool skip_on_host(const Opt& found_inf) {
    return found_inf.has_value() && *found_inf->const_data_ptr<float>() != 0.f;
  }

  static void grad_stats(const std::vector<at::Tensor>& grads, const Opt& found_inf,
                         const Opt& sq_norm) {
    std::vector<cpu::GradView> views;
    for (const at::Tensor& g : grads) {
      views.push_back({g.const_data_ptr(), g.numel(), g.scalar_type()});
    }
    cpu::GradStatsParams p;
    p.grads = views.data();
    p.count = static_cast<int64_t>(views.size());
    p.want_norm = sq_norm.has_value();
    FT_ISA_CALL(grad_stats_kernel, p);
    if (found_inf.has_value() && p.found_nonfinite) *found_inf->data_ptr<float>() = 1.f;
    if (sq_norm.has_value()) *sq_norm->data_ptr<float>() += static_cast<float>(p.sq_norm);
  }

  static void adamw(const UpdateCall& call, const optim_impl::AdamWArgs& a) {
    const double lr = lr_of(call);
    cpu::AdamWKernelParams k;
    k.grad_mul = grad_mul(call);
    k.has_decay = a.weight_decay != 0.0;
    // the constants every tensor shares (the step-dependent ones are per slot, below)
    const optim_math::AdamWConsts<float> c0 =
        optim_math::adamw_consts(lr, a.beta1, a.beta2, a.eps, a.weight_decay, 0.f);
    k.decay = c0.decay;
    k.lerp_small = optim_math::adamw_lerp_small(a.beta1);
    k.lerp_weight = c0.lerp_weight;
    k.beta2 = c0.beta2;
    k.one_minus_beta2 = c0.one_minus_beta2;
    k.eps = c0.eps;
    k.amsgrad = a.amsgrad;
    std::vector<cpu::ParamSlot> slots;
    for (const ParamTensors& t : call.params) {
      cpu::ParamSlot s = make_slot(t, call);
      const optim_math::AdamWConsts<float> c = optim_math::adamw_consts(
          lr, a.beta1, a.beta2, a.eps, a.weight_decay, *t.step.const_data_ptr<float>());
      s.neg_step_size = c.neg_step_size;
      s.bc2_sqrt = c.bc2_sqrt;
      slots.push_back(s);
    }
    k.slots = slots.data();
    k.count = static_cast<int64_t>(slots.size());
    FT_ISA_CALL(adamw_kernel, k);
  }

  static void sgd(const UpdateCall& call, const optim_impl::SGDArgs& a) {
    cpu::SGDKernelParams k;
    k.grad_mul = grad_mul(call);
    k.has_decay = a.weight_decay != 0.0;
    k.weight_decay = static_cast<float>(a.weight_decay);
    k.has_momentum = a.momentum != 0.0;
    k.momentum = static_cast<float>(a.momentum);
    k.one_minus_dampening = static_cast<float>(1.0 - a.dampening);
    k.nesterov = a.nesterov;
    k.neg_lr = static_cast<float>(-lr_of(call));
    std::vector<cpu::ParamSlot> slots;
    for (const ParamTensors& t : call.params) {
      cpu::ParamSlot s = make_slot(t, call);
      // A buffer that has taken no step yet becomes d (torch: buf = clone(d)).
      s.first = t.step.defined() && *t.step.const_data_ptr<float>() == 0.f;
      slots.push_back(s);
    }
    k.slots = slots.data();
    k.count = static_cast<int64_t>(slots.size());
    FT_ISA_CALL(sgd_kernel, k);
  }

  // Reached only when the step was not skipped (skip_on_host returned false).
  static void increment(at::TensorList steps, const Opt&) {
    for (const at::Tensor& step : steps) *step.data_ptr<float>() += 1.f;
  }
};

namespace impl = optim_impl;

}  // namespace

TORCH_LIBRARY_IMPL(fastcore_train, CPU, m) {
  m.impl("grad_stats_", &impl::grad_stats<CpuOptim>);
  m.impl("fused_adamw_", &impl::fused_adamw<CpuOptim>);
  m.impl("fused_sgd_", &impl::fused_sgd<CpuOptim>);
}

// A sparse gradient sends the call to the SparseCPU key; the same functions reject it with
// the error of csrc/common/optim_checks.h rather than the dispatcher's "could not run".
TORCH_LIBRARY_IMPL(fastcore_train, SparseCPU, m) {
  m.impl("grad_stats_", &impl::grad_stats<CpuOptim>);
  m.impl("fused_adamw_", &impl::fused_adamw<CpuOptim>);
  m.impl("fused_sgd_", &impl::fused_sgd<CpuOptim>);
}

}  // namespace fastcore_train

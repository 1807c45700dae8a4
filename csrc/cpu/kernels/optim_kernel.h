// Raw-pointer interface of the CPU fused-optimizer kernels, compiled once per ISA.
// Kept free of at::Tensor so the per-ISA translation units stay small.
#pragma once

#include <c10/core/ScalarType.h>

#include <cstdint>

#include "cpu/isa.h"

namespace fastcore_train::cpu {

// Elements per work item: parallel work is split into (tensor, chunk) items.
constexpr int64_t kOptimChunk = int64_t(1) << 16;

struct GradView {
  const void* data = nullptr;  // dense, `numel` elements of `dtype`
  int64_t numel = 0;
  c10::ScalarType dtype = c10::ScalarType::Float;
};

struct GradStatsParams {
  const GradView* grads = nullptr;
  int64_t count = 0;
  bool want_norm = false;
  // outputs
  bool found_nonfinite = false;
  double sq_norm = 0.0;  // per-chunk float32 sums, added in chunk order (deterministic)
};

// One parameter and its state, all `numel` elements laid out alike.
struct ParamSlot {
  void* param = nullptr;       // dtype `dtype`
  const void* grad = nullptr;  // dtype `dtype`
  float* master = nullptr;     // null: the update runs on `param` itself
  float* state0 = nullptr;     // exp_avg, or the momentum buffer (null without momentum)
  float* state1 = nullptr;     // exp_avg_sq
  float* state2 = nullptr;     // max_exp_avg_sq (AdamW with amsgrad)
  int64_t numel = 0;
  c10::ScalarType dtype = c10::ScalarType::Float;
  float bc2_sqrt = 1.f;        // AdamW: sqrt(1 - beta2^step)
  float neg_step_size = 0.f;   // AdamW: -lr / (1 - beta1^step)
  bool first = false;          // SGD: the momentum buffer's first step (it becomes d)
  float* ema = nullptr;        // the EMA of the weight (null: none), see optim_math::ema_update
  float ema_coeff = 0.f;
  bool ema_small = true;
  bool ema_copy = false;
};

struct AdamWKernelParams {
  const ParamSlot* slots = nullptr;
  int64_t count = 0;
  float grad_mul = 1.f;  // 1/scale times the clip coefficient, negated to maximize
  float decay = 1.f;     // 1 - lr*wd
  float lerp_weight = 0.1f;
  float beta2 = 0.999f;
  float one_minus_beta2 = 0.001f;
  float eps = 1e-8f;
  bool has_decay = false;
  bool lerp_small = true;
  bool amsgrad = false;  // slots carry state2
};

struct SGDKernelParams {
  const ParamSlot* slots = nullptr;
  int64_t count = 0;
  float grad_mul = 1.f;
  float weight_decay = 0.f;
  float momentum = 0.f;
  float one_minus_dampening = 1.f;
  float neg_lr = 0.f;
  bool has_decay = false;
  bool has_momentum = false;
  bool nesterov = false;
};

}  // namespace fastcore_train::cpu

FT_ISA_DECLARE(void, grad_stats_kernel, (GradStatsParams& p))
FT_ISA_DECLARE(void, adamw_kernel, (const AdamWKernelParams& p))
FT_ISA_DECLARE(void, sgd_kernel, (const SGDKernelParams& p))

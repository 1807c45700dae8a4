// Per-element update rules of the fused optimizers, written once and instantiated for the CPU
// (float for tails, at::vec::Vectorized<float> for the body) and for CUDA (float).
//
// The operations and their rounding are those of torch.optim's single-tensor CPU path, so that
// float32 results agree with torch.optim.AdamW / SGD to an ulp of the update:
//   AdamW:  w  = w * (1 - lr*wd)                      (param.mul_, decoupled decay)
//           m  = fma(1 - beta1, g - m, m)             (exp_avg.lerp_: ATen's lerp is an FMA)
//           v  = fma((1 - beta2)*g, g, v*beta2)       (exp_avg_sq.mul_().addcmul_())
//           u  = amsgrad ? (vmax = max(vmax, v)) : v  (torch.maximum, NaN propagates)
//           w  = w + (-step_size*m) / (sqrt(u)/sqrt(bc2) + eps)  (addcdiv_, step_size = lr/bc1)
//   SGD:    d  = fma(w, wd, g)                        (grad.add(param, alpha=wd))
//           b  = first ? d                            (torch's first step: buf = clone(d))
//                      : fma(d, 1 - dampening, b*momentum)  (buf.mul_().add_(d, alpha=1-damp))
//           d  = nesterov ? fma(b, momentum, d) : b   (grad.add(buf, alpha=momentum))
//           w  = fma(d, -lr, w)                       (param.add_(d, alpha=-lr))
// maximize (g <- -g) is folded into the gradient multiplier by the callers: negation is exact,
// so g * (-mul) rounds exactly like torch's (-g) * mul.
// On the CPU the results are bit-identical to torch.optim.SGD and to the vectorised body of
// torch.optim.AdamW(fused=True) (its scalar remainder of each thread's chunk computes in double
// and may differ by an ulp); the single-tensor AdamW differs by an ulp of the update where its
// vectorised sqrt is not correctly rounded (ours is).
//
// `Ops` supplies, for the element type F: fma(a, b, c) = a*b + c rounded once; mul(a, b), a
// product rounded on its own, which the compiler must not fuse into a following addition (GCC
// and nvcc contract a*b + c into an FMA by default, which would round differently from torch's
// separate ops); div and sqrt, correctly rounded (nvcc's --use_fast_math would otherwise
// approximate them); max(a, b), NaN when either is NaN (torch.maximum).
#pragma once

#include <c10/macros/Macros.h>

#ifndef __CUDACC__
#include <cmath>
#endif

namespace fastcore_train::optim_math {

template <typename F>
struct AdamWConsts {
  F decay;          // 1 - lr*wd
  F lerp_weight;    // 1 - beta1, or (1 - beta1) - 1 when that is >= 0.5 (ATen's lerp)
  F beta2;
  F one_minus_beta2;
  F bc2_sqrt;       // sqrt(1 - beta2^step)
  F eps;
  F neg_step_size;  // -lr / (1 - beta1^step)
};

// 1 - beta1 < 0.5: ATen's lerp steps from the start (else from the end, see adamw_update).
C10_HOST_DEVICE inline bool adamw_lerp_small(double beta1) {
  const float w1 = static_cast<float>(1.0 - beta1);
  return (w1 < 0.f ? -w1 : w1) < 0.5f;
}

// The constants of one tensor's AdamW step, computed once for both devices: in double from the
// incremented step, as torch.optim.AdamW computes them in Python, each rounded once to float.
// `step` is the tensor's count before this step.
C10_HOST_DEVICE inline AdamWConsts<float> adamw_consts(double lr, double beta1, double beta2,
                                                      double eps, double weight_decay,
                                                      float step) {
  const double t = static_cast<double>(step + 1.f);
#ifdef __CUDA_ARCH__
  // The GPU's double pow is not correctly rounded (2 ulp) and its sqrt is, so sqrt is the
  // closer match to torch's `bias_correction2 ** 0.5` (glibc's pow, within 0.52 ulp).
  const double bc1 = 1.0 - ::pow(beta1, t);
  const double bc2 = 1.0 - ::pow(beta2, t);
  const double bc2_sqrt = ::sqrt(bc2);
#else
  const double bc1 = 1.0 - std::pow(beta1, t);
  const double bc2 = 1.0 - std::pow(beta2, t);
  const double bc2_sqrt = std::pow(bc2, 0.5);  // exactly torch's `bias_correction2 ** 0.5`
#endif
  const float w1 = static_cast<float>(1.0 - beta1);
  AdamWConsts<float> c;
  c.decay = static_cast<float>(1.0 - lr * weight_decay);
  c.lerp_weight = adamw_lerp_small(beta1) ? w1 : w1 - 1.f;
  c.beta2 = static_cast<float>(beta2);
  c.one_minus_beta2 = static_cast<float>(1.0 - beta2);
  c.bc2_sqrt = static_cast<float>(bc2_sqrt);
  c.eps = static_cast<float>(eps);
  c.neg_step_size = static_cast<float>(-(lr / bc1));
  return c;
}

struct AdamWFlags {
  bool decay;       // weight_decay != 0
  bool lerp_small;  // 1 - beta1 < 0.5
  bool amsgrad;     // vmax (max_exp_avg_sq) exists and normalises the step
};

// `vmax` is only read and written with f.amsgrad.
template <typename Ops, typename F>
C10_HOST_DEVICE inline void adamw_update(F& w, F& m, F& v, F& vmax, const F& g,
                                         const AdamWConsts<F>& c, AdamWFlags f) {
  if (f.decay) w = Ops::mul(w, c.decay);
  // ATen's lerp(start, end, weight): small weights step from start, large ones from end.
  m = Ops::fma(c.lerp_weight, g - m, f.lerp_small ? m : g);
  v = Ops::fma(c.one_minus_beta2 * g, g, v * c.beta2);
  if (f.amsgrad) vmax = Ops::max(vmax, v);
  const F denom = Ops::div(Ops::sqrt(f.amsgrad ? vmax : v), c.bc2_sqrt) + c.eps;
  w = w + Ops::div(Ops::mul(c.neg_step_size, m), denom);
}

template <typename F>
struct SGDConsts {
  F weight_decay;
  F momentum;
  F one_minus_dampening;
  F neg_lr;
};

struct SGDFlags {
  bool decay;     // weight_decay != 0
  bool momentum;  // momentum != 0 (a buffer exists)
  bool nesterov;
  bool first;     // the buffer's first step: it becomes d, whatever it holds
};

template <typename Ops, typename F>
C10_HOST_DEVICE inline void sgd_update(F& w, F& buf, const F& g, const SGDConsts<F>& c,
                                       SGDFlags f) {
  F d = f.decay ? Ops::fma(w, c.weight_decay, g) : g;
  if (f.momentum) {
    // fma(d, 1, x) == x + d exactly, so dampening 0 costs nothing and rounds as before
    buf = f.first ? d : Ops::fma(d, c.one_minus_dampening, Ops::mul(buf, c.momentum));
    d = f.nesterov ? Ops::fma(buf, c.momentum, d) : buf;
  }
  w = Ops::fma(d, c.neg_lr, w);
}

// EMA of the weights, torch.optim.swa_utils.get_ema_multi_avg_fn's update
//   ema = lerp(ema, w, 1 - decay_t)        (torch._foreach_lerp_(emas, params, 1 - decay))
// on the updated float32 weight w, with ATen's lerp as for AdamW's first moment: the weight
// rounded to float, then fma(weight, w - ema, ema) when |weight| < 0.5, else
// fma(weight - 1, w - ema, w). `count` is the number of EMA updates before this one:
//   count == 0: ema = w, a copy, as AveragedModel.update_parameters when n_averaged == 0 and
//               timm's ModelEmaV3 (decay 0 at its step 1);
//   warmup:     decay_t = min(decay, 1 - (1 + count)^(-2/3)), timm's ModelEmaV3 use_warmup with
//               its defaults (warmup_gamma 1, warmup_power 2/3, min_decay 0) at timm's step
//               count + 1 (timm's num_updates after this optimizer step), in double as timm
//               computes it in Python.
struct EmaConsts {
  float coeff;  // 1 - decay_t rounded to float, minus 1 when that is >= 0.5
  bool small;   // |1 - decay_t| < 0.5: step from the EMA (else from w)
  bool copy;    // the first update
};

C10_HOST_DEVICE inline EmaConsts ema_consts(double decay, bool warmup, float count) {
  double d = decay;
  if (warmup) {
#ifdef __CUDA_ARCH__
    const double w = 1.0 - ::pow(1.0 + static_cast<double>(count), -(2.0 / 3.0));
#else
    const double w = 1.0 - std::pow(1.0 + static_cast<double>(count), -(2.0 / 3.0));
#endif
    d = w < d ? w : d;
  }
  const float weight = static_cast<float>(1.0 - d);
  EmaConsts c;
  c.small = (weight < 0.f ? -weight : weight) < 0.5f;
  c.coeff = c.small ? weight : weight - 1.f;
  c.copy = count == 0.f;
  return c;
}

template <typename Ops, typename F>
C10_HOST_DEVICE inline void ema_update(F& e, const F& w, const F& coeff, bool small, bool copy) {
  e = copy ? w : Ops::fma(coeff, w - e, small ? e : w);
}

// The multiplier applied to every gradient: 1/scale times torch.nn.utils.clip_grad_norm_'s
// coefficient min(1, max_norm / (norm + 1e-6)), where norm = sqrt(sq_norm)/scale is the norm of
// the unscaled gradients. A NaN norm propagates as in clip_grad_norm_. For a power-of-two scale,
// g * (inv_scale * coef) rounds exactly like unscaling first and clipping after.
template <typename Ops>
C10_HOST_DEVICE inline float grad_multiplier(const float* grad_scale, const float* sq_norm,
                                             double max_grad_norm) {
  const float inv_scale = grad_scale != nullptr ? Ops::div(1.0f, *grad_scale) : 1.0f;
  if (max_grad_norm <= 0.0 || sq_norm == nullptr) return inv_scale;
  const float norm = Ops::mul(Ops::sqrt(*sq_norm), inv_scale);
  const float coef = Ops::div(static_cast<float>(max_grad_norm), norm + 1e-6f);
  return Ops::mul(inv_scale, (coef < 1.0f || coef != coef) ? coef : 1.0f);
}

#ifndef __CUDACC__
// Ops for float on the host (kernel tails, launchers). std::fma is one instruction in the
// AVX2/AVX-512 builds, matching at::vec::fmadd there.
struct HostFloatOps {
  static float fma(float a, float b, float c) { return std::fma(a, b, c); }
  static float mul(float a, float b) {
    float r = a * b;
#if defined(__GNUC__) && (defined(__x86_64__) || defined(__i386__))
    asm("" : "+x"(r));  // an opaque copy: nothing can be fused across it
#elif defined(__GNUC__)
    asm("" : "+m"(r));
#endif
    return r;
  }
  static float sqrt(float x) { return std::sqrt(x); }
  static float div(float a, float b) { return a / b; }
  static float max(float a, float b) { return (a > b || a != a) ? a : b; }
};
#endif

}  // namespace fastcore_train::optim_math

// Every fastcore_train operator schema, in one place. Device files (cpu/*.cpp, cuda/*.cu)
// only add implementations with TORCH_LIBRARY_IMPL; autograd and fake (meta) kernels are
// registered from Python (fastcore_train/ops/) with torch.library.
#include <torch/extension.h>

#include "cpu/alloc.h"
#include "cpu/isa.h"

TORCH_LIBRARY(fastcore_train, m) {
  // Label-smoothed cross-entropy, one or two targets (mixup). Returns the loss, reduced as
  // torch does (reduction: 0 none, 1 mean over rows not ignored, 2 sum; torch's at::Reduction),
  // and per-row stats (B, 2), the only thing backward needs: the row max m and
  // log(sum_j exp(z_j - m)), kept apart so that large logits keep their precision (NaN in the
  // second column for a row whose loss is NaN: a NaN or +inf logit, or only -inf ones; zeros for
  // ignored rows). Both are in the accumulation dtype (float32, or float64 for float64 logits).
  // target, target_b: int64 or uint8 class indices.
  // lam: per-row weight of `target` (shape (B,)); when absent, lam_scalar is used.
  m.def(
      "cross_entropy(Tensor logits, Tensor target, Tensor? target_b, Tensor? lam, "
      "float lam_scalar, float label_smoothing, int ignore_index, int reduction) -> "
      "(Tensor, Tensor)");
  m.def(
      "cross_entropy_backward(Tensor grad_loss, Tensor logits, Tensor target, "
      "Tensor? target_b, Tensor? lam, float lam_scalar, Tensor stats, float label_smoothing, "
      "int ignore_index, int reduction) -> Tensor");

  // Binary cross-entropy with logits against label-smoothed one-hot targets, one or two targets
  // (mixup): torch's binary_cross_entropy_with_logits(logits, q, pos_weight=pos_weight) with
  // q = lam * q(target) + (1 - lam) * q(target_b), q(y) = on at column y and off = eps / C
  // elsewhere, on = 1 - eps + off (timm's smoothing); q is never built. target, target_b: int64
  // or uint8 class indices in [0, C). lam: per-row weight of `target` (shape (B,)); when absent,
  // lam_scalar is used. pos_weight: (C,) float, absent means 1. reduction: 0 none (the (B, C)
  // elementwise loss), 1 mean over B x C, 2 sum (torch's at::Reduction). The loss is in the
  // accumulation dtype (float32, or float64 for float64 logits). Backward needs nothing saved:
  // it recomputes from the logits.
  m.def(
      "binary_cross_entropy(Tensor logits, Tensor target, Tensor? target_b, Tensor? lam, "
      "float lam_scalar, float label_smoothing, Tensor? pos_weight, int reduction) -> Tensor");
  m.def(
      "binary_cross_entropy_backward(Tensor grad_loss, Tensor logits, Tensor target, "
      "Tensor? target_b, Tensor? lam, float lam_scalar, float label_smoothing, "
      "Tensor? pos_weight, int reduction) -> Tensor");

  // Mixed-precision fused optimizer step (fastcore_train/optim), two passes.
  // Pass 1 reads every gradient once and writes nothing else: it sets found_inf to 1 when an
  // element is inf or NaN (it never clears it) and adds the sum of squares of all elements
  // (float32 accumulation) to sq_norm. Either output may be absent. Scalars are float32,
  // one element, on the gradients' device.
  m.def("grad_stats_(Tensor[] grads, Tensor(a!)? found_inf, Tensor(b!)? sq_norm) -> ()");
  // Pass 2, AdamW with torch.optim.AdamW's maths (decoupled weight decay, bias corrections,
  // amsgrad, maximize). Each gradient is multiplied by 1/grad_scale and, when max_grad_norm > 0,
  // by the clip coefficient min(1, max_grad_norm / (sqrt(sq_norm)/grad_scale + 1e-6)), and
  // negated with maximize; grads are never written. With `masters` (float32, one per param) the
  // update runs on the master and the param receives it rounded to its dtype; with `masters`
  // empty it runs on the param itself. Moments and steps are float32; each step is incremented
  // by one. max_exp_avg_sqs: one per param with amsgrad, empty without. When found_inf is
  // non-zero nothing at all is written. lr_tensor, when given, replaces lr.
  // emas (float32, one per param, or empty): the EMA of each updated float32 weight, in the same
  // pass (ema = lerp(ema, w, 1 - decay_t), torch's get_ema_multi_avg_fn); ema_steps (float32
  // scalars) count each EMA's updates: at 0 the EMA becomes w, and with ema_warmup decay_t is
  // timm's ModelEmaV3 warmup (csrc/common/optim_math.h, ema_consts); incremented unless skipped.
  m.def(
      "fused_adamw_(Tensor(a!)[] params, Tensor[] grads, Tensor(b!)[] exp_avgs, "
      "Tensor(c!)[] exp_avg_sqs, Tensor(f!)[] max_exp_avg_sqs, Tensor(d!)[] masters, "
      "Tensor(e!)[] steps, float lr, Tensor? lr_tensor, float beta1, float beta2, float eps, "
      "float weight_decay, bool amsgrad, bool maximize, Tensor? grad_scale, Tensor? found_inf, "
      "Tensor? sq_norm, float max_grad_norm, Tensor(g!)[] emas, Tensor(h!)[] ema_steps, "
      "float ema_decay, bool ema_warmup) -> ()");
  // Pass 2, SGD with torch.optim.SGD's maths (coupled weight decay, momentum with dampening,
  // optional Nesterov, maximize). momentum_buffers is empty when momentum == 0. `steps` (float32
  // scalars) counts each buffer's steps: a buffer at step 0 becomes the gradient itself (torch's
  // first step: buf = d, undampened), and each count is incremented unless the step is skipped.
  // Without `steps` every buffer is taken as started, so a new one must be zeros, which equals
  // torch's first step only when dampening is 0. Scaling, clipping, masters, the EMA and
  // skipping as for fused_adamw_.
  m.def(
      "fused_sgd_(Tensor(a!)[] params, Tensor[] grads, Tensor(b!)[] momentum_buffers, "
      "Tensor(d!)[] masters, Tensor(e!)[] steps, float lr, Tensor? lr_tensor, float momentum, "
      "float dampening, bool nesterov, bool maximize, float weight_decay, Tensor? grad_scale, "
      "Tensor? found_inf, Tensor? sq_norm, float max_grad_norm, Tensor(g!)[] emas, "
      "Tensor(h!)[] ema_steps, float ema_decay, bool ema_warmup) -> ()");

  // The blends' mutating forms follow torch's naming: op.out writes `out`, op_ writes its first
  // argument. They return nothing (torch's return `out`; a custom op that returns an alias of
  // a written input cannot be functionalized by torch.compile); the Python entry points
  // return the written tensor as torch's do.
  //
  // Mixup blend: lam * x + (1 - lam) * x[perm] over the batch (dim 0) of x, any shape and
  // layout. lam: per-sample weights (shape (B,)); when absent, lam_scalar is used. perm must be
  // a permutation of range(B); in place, an involution (perm[perm[i]] == i).
  m.def("mixup(Tensor x, Tensor perm, Tensor? lam, float lam_scalar) -> Tensor");
  m.def("mixup.out(Tensor x, Tensor perm, Tensor? lam, float lam_scalar, Tensor(a!) out) -> ()");
  m.def("mixup_(Tensor(a!) x, Tensor perm, Tensor? lam, float lam_scalar) -> ()");
  // d x[j] = lam_j * grad[j] + (1 - lam_i) * grad[i] with perm[i] = j.
  m.def("mixup_backward(Tensor grad, Tensor perm, Tensor? lam, float lam_scalar) -> Tensor");
  // Cutmix paste of (B, C, H, W) x: box (y0, y1, x0, x1) of x[perm[i]] into x[i]. boxes: per-
  // sample boxes (B, 4); when absent, `box` (4 ints) for every sample.
  m.def("cutmix(Tensor x, Tensor perm, Tensor? boxes, int[] box) -> Tensor");
  m.def("cutmix.out(Tensor x, Tensor perm, Tensor? boxes, int[] box, Tensor(a!) out) -> ()");
  m.def("cutmix_(Tensor(a!) x, Tensor perm, Tensor? boxes, int[] box) -> ()");
  m.def("cutmix_backward(Tensor grad, Tensor perm, Tensor? boxes, int[] box) -> Tensor");

  // Fused uint8 normalize + mixup of a (B, C, H, W) uint8 batch x (NCHW or channels_last), in
  // out_dtype (float32, bfloat16 or float16), with norm(v) = (float(v) - mean[c]) / std[c]
  // (mean, std: (C,) float32, 0-255 scale): lam * norm(x) + (1 - lam) * norm(x[perm]), lam per
  // sample (shape (B,)) or lam_scalar; with perm absent, norm(x) alone. Not differentiable.
  m.def(
      "normalize_mixup(Tensor x, Tensor? perm, Tensor? lam, float lam_scalar, Tensor mean, "
      "Tensor std, ScalarType out_dtype) -> Tensor");
  m.def(
      "normalize_mixup.out(Tensor x, Tensor? perm, Tensor? lam, float lam_scalar, Tensor mean, "
      "Tensor std, ScalarType out_dtype, Tensor(a!) out) -> ()");
  // Fused uint8 normalize + cutmix: norm(x[perm[i]]) inside box_i, norm(x[i]) outside; boxes
  // and box as for cutmix.
  m.def(
      "normalize_cutmix(Tensor x, Tensor perm, Tensor? boxes, int[] box, Tensor mean, "
      "Tensor std, ScalarType out_dtype) -> Tensor");
  m.def(
      "normalize_cutmix.out(Tensor x, Tensor perm, Tensor? boxes, int[] box, Tensor mean, "
      "Tensor std, ScalarType out_dtype, Tensor(a!) out) -> ()");
}

namespace {

bool compiled_with_cuda() {
#ifdef FASTCORE_TRAIN_WITH_CUDA
  return true;
#else
  return false;
#endif
}

}  // namespace

namespace fastcore_train {
const char* build_info();  // build_info.cpp
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "fastcore_train compiled kernels (operators live in torch.ops.fastcore_train)";
  m.def("compiled_with_cuda", &compiled_with_cuda);
  m.def("build_info", [] { return std::string(fastcore_train::build_info()); },
        "What this build was made against: 'FASTCORE_TRAIN_BUILD_INFO|torch=...|cuda=...|END'.");
  m.def("cpu_capability", [] { return fastcore_train::cpu::isa_name(fastcore_train::cpu::isa()); },
        "The CPU kernel build in use: default, avx2 or avx512.");
  m.def("best_cpu_capability",
        [] { return fastcore_train::cpu::isa_name(fastcore_train::cpu::best_isa()); });
  m.def("_set_cpu_capability", [](const std::string& name) {
    fastcore_train::cpu::set_isa(name.c_str());
  }, "Force a CPU kernel build ('' restores automatic choice). For tests.");
  m.def("empty_cache", &fastcore_train::cpu::release_cached_blocks,
        "Frees the cached large CPU output blocks not in use; returns the bytes freed.");
  m.def("cached_bytes", &fastcore_train::cpu::cached_block_bytes,
        "Bytes held by cached large CPU output blocks not in use.");
  m.def("cache_stats", &fastcore_train::cpu::large_block_stats,
        "The large-output cache: cached/in-use/limit bytes, hits, misses, evictions.");
  m.def("_empty_large", &fastcore_train::cpu::empty_large_bytes,
        "A uint8 CPU tensor of n bytes from the large-output allocator (tests).");
}

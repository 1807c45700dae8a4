// Every fastcore_train operator schema, in one place. Device files (cpu/*.cpp, cuda/*.cu)
// only add implementations with TORCH_LIBRARY_IMPL; autograd and fake (meta) kernels are
// registered from Python (fastcore_train/ops/) with torch.library.
#include <torch/extension.h>

#include "cpu/isa.h"

TORCH_LIBRARY(fastcore_train, m) {
  // Label-smoothed cross-entropy, one or two targets (mixup). Returns the per-row loss and
  // the per-row log-sum-exp (the only thing backward needs), both in the accumulation dtype
  // (float32, or float64 for float64 logits). Reduction is left to the caller.
  // lam: per-row weight of `target` (float32, shape (B,)); when absent, lam_scalar is used.
  m.def(
      "cross_entropy(Tensor logits, Tensor target, Tensor? target_b, Tensor? lam, "
      "float lam_scalar, float label_smoothing, int ignore_index) -> (Tensor, Tensor)");
  m.def(
      "cross_entropy_backward(Tensor grad_loss, Tensor logits, Tensor target, "
      "Tensor? target_b, Tensor? lam, float lam_scalar, Tensor lse, float label_smoothing, "
      "int ignore_index) -> Tensor");
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

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "fastcore_train compiled kernels (operators live in torch.ops.fastcore_train)";
  m.def("compiled_with_cuda", &compiled_with_cuda);
  m.def("cpu_capability", [] { return fastcore_train::cpu::isa_name(fastcore_train::cpu::isa()); },
        "The CPU kernel build in use: default, avx2 or avx512.");
  m.def("best_cpu_capability",
        [] { return fastcore_train::cpu::isa_name(fastcore_train::cpu::best_isa()); });
  m.def("_set_cpu_capability", [](const std::string& name) {
    fastcore_train::cpu::set_isa(name.c_str());
  }, "Force a CPU kernel build ('' restores automatic choice). For tests.");
}

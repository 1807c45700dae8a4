// Autograd kernels of the fused optimizer ops. The ops have no derivative; what they owe autograd
// is what torch's own in-place ops give it: the version counter of every tensor the schema marks
// as written (Tensor(a!), Tensor(a!)[], Tensor(a!)?) is bumped after the call, so a graph that
// saved a parameter before optimizer.step() raises "modified by an inplace operation" in
// backward instead of silently using the new values. (Registered at the Autograd key because
// torch's fallback for custom ops there dispatches past ADInplaceOrView, where built-in ops
// bump versions.) With grad mode on, writing a tensor that requires grad is refused, as torch
// refuses in-place ops on leaves that require grad: the optimizer steps under torch.no_grad().
//
// One boxed kernel serves every op: it reads the alias annotations of the op's schema.
#include <ATen/core/LegacyTypeDispatch.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <ATen/core/grad_mode.h>
#include <ATen/core/stack.h>
#include <torch/csrc/autograd/variable.h>
#include <torch/library.h>

#include <vector>

namespace fastcore_train {
namespace {

void written_tensors_bump_versions(const c10::OperatorHandle& op, c10::DispatchKeySet keys,
                                   torch::jit::Stack* stack) {
  const auto& args = op.schema().arguments();
  const size_t n = args.size();
  const size_t first = stack->size() - n;
  std::vector<at::Tensor> written;
  for (size_t i = 0; i < n; ++i) {
    const c10::AliasInfo* alias = args[i].alias_info();
    if (alias == nullptr || !alias->isWrite()) continue;
    const c10::IValue& v = (*stack)[first + i];
    if (v.isTensor()) {
      written.push_back(v.toTensor());
    } else if (v.isTensorList()) {
      for (const at::Tensor& t : v.toTensorList()) written.push_back(t);
    }  // None: an absent optional output
  }
  if (at::GradMode::is_enabled()) {
    for (const at::Tensor& t : written) {
      TORCH_CHECK(!(t.defined() && t.requires_grad()), op.schema().name(),
                  " writes its tensors in place and has no derivative, but one of them requires "
                  "grad while grad mode is enabled; call it under torch.no_grad() (as "
                  "optimizer.step() does)");
    }
  }
  {
    at::AutoDispatchBelowADInplaceOrView guard;
    op.redispatchBoxed(keys & c10::after_ADInplaceOrView_keyset, stack);
  }
  // Only after a successful call: a refused call (bad input) has written nothing.
  for (const at::Tensor& t : written) {
    if (t.defined()) torch::autograd::impl::bump_version(t);
  }
}

}  // namespace

TORCH_LIBRARY_IMPL(fastcore_train, Autograd, m) {
  for (const char* name : {"grad_stats_", "fused_adamw_", "fused_sgd_"}) {
    m.impl(name, torch::CppFunction::makeFromBoxedFunction<&written_tensors_bump_versions>());
  }
}

}  // namespace fastcore_train

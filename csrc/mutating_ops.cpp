// The autograd contract of the mutating operators (mixup_out, mixup_inplace, cutmix_out,
// cutmix_inplace), kept as torch keeps it for its own out= and in-place ops. Both kernels are
// device independent and read the written arguments from the schema (Tensor(a!), Tensor(a!)?
// or Tensor(a!)[]), so another mutating op can register them as they are.
//
// Autograd: an out= function is not differentiable, so with grad mode on, torch refuses the
// call when any argument (the out tensor included) requires grad rather than write a tensor
// that autograd tracks; the same refusal, in torch's words, as ops/mixup.py gives.
//
// ADInplaceOrView: torch bumps the version of every tensor an op writes, so that autograd
// refuses a backward that saved the tensor before the write ("... has been modified by an
// inplace operation") instead of silently using the new values. A custom operator has no such
// kernel (the key falls through), hence this one: the op runs below ADInplaceOrView, then each
// written tensor's version goes up by one, after the write as in torch (an op that throws on
// bad input leaves the versions alone). Under torch.compile the schema's (a!) is what makes the
// mutation visible to the compiler; these kernels serve eager calls.
#include <ATen/core/dispatch/Dispatcher.h>
#include <c10/core/GradMode.h>
#include <c10/core/impl/LocalDispatchKeySet.h>
#include <torch/csrc/autograd/variable.h>
#include <torch/library.h>

#include <string>
#include <vector>

namespace fastcore_train {
namespace {

// Calls f on every tensor of the stack's top `n` entries (the arguments of an op) for which
// pick(argument index) holds.
template <class Pick, class F>
void for_each_tensor_arg(const c10::FunctionSchema& schema, const torch::jit::Stack& stack,
                         Pick pick, F f) {
  const auto& args = schema.arguments();
  const size_t first = stack.size() - args.size();
  for (size_t i = 0; i < args.size(); ++i) {
    if (!pick(args[i])) continue;
    const c10::IValue& v = stack[first + i];
    if (v.isTensor()) {
      f(v.toTensor());
    } else if (v.isTensorList()) {
      for (const at::Tensor& t : v.toTensorList()) f(t);
    }
  }
}

// "mixup_out" -> "mixup": the function the user called with out=.
std::string public_name(const c10::OperatorHandle& op) {
  std::string name = op.schema().name();
  name = name.substr(name.find("::") + 2);
  for (const char* suffix : {"_out", "_inplace"}) {
    const std::string s(suffix);
    if (name.size() > s.size() && name.compare(name.size() - s.size(), s.size(), s) == 0) {
      return name.substr(0, name.size() - s.size());
    }
  }
  return name;
}

void refuse_grad_then_run(const c10::OperatorHandle& op, c10::DispatchKeySet keys,
                          torch::jit::Stack* stack) {
  if (c10::GradMode::is_enabled()) {
    bool any = false;
    for_each_tensor_arg(op.schema(), *stack, [](const c10::Argument&) { return true; },
                        [&](const at::Tensor& t) { any = any || (t.defined() && t.requires_grad()); });
    TORCH_CHECK(!any, public_name(op),
                "(): functions with out=... arguments don't support automatic differentiation, "
                "but one of the arguments requires grad.");
  }
  at::AutoDispatchBelowAutograd below;
  op.redispatchBoxed(keys & c10::after_autograd_keyset, stack);
}

void run_then_bump_written(const c10::OperatorHandle& op, c10::DispatchKeySet keys,
                           torch::jit::Stack* stack) {
  // The call consumes the stack: keep the written tensors first.
  std::vector<at::Tensor> written;
  for_each_tensor_arg(
      op.schema(), *stack,
      [](const c10::Argument& a) { return a.alias_info() != nullptr && a.alias_info()->isWrite(); },
      [&](const at::Tensor& t) { written.push_back(t); });
  {
    // Tensor ops inside the kernel (layout copies, a fallback copy_ into out) are then neither
    // recorded by autograd nor counted as extra writes, as in torch's own kernels.
    at::AutoDispatchBelowADInplaceOrView below;
    op.redispatchBoxed(keys & c10::after_ADInplaceOrView_keyset, stack);
  }
  for (const at::Tensor& t : written) {
    if (t.defined()) torch::autograd::impl::bump_version(t);
  }
}

constexpr const char* kMutatingOps[] = {"mixup_out", "mixup_inplace", "cutmix_out",
                                        "cutmix_inplace"};

}  // namespace

TORCH_LIBRARY_IMPL(fastcore_train, Autograd, m) {
  for (const char* name : kMutatingOps) {
    m.impl(name, torch::CppFunction::makeFromBoxedFunction<&refuse_grad_then_run>());
  }
}

TORCH_LIBRARY_IMPL(fastcore_train, ADInplaceOrView, m) {
  for (const char* name : kMutatingOps) {
    m.impl(name, torch::CppFunction::makeFromBoxedFunction<&run_then_bump_written>());
  }
}

}  // namespace fastcore_train

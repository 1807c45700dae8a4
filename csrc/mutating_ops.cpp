// The autograd contract of every mutating operator -- the blends' out= and in-place forms
// (mixup.out, mixup_, cutmix.out, cutmix_, normalize_mixup.out, normalize_cutmix.out: torch's
// naming, op.out and op_) and the optimizer passes (grad_stats_,
// fused_adamw_, fused_sgd_) -- kept as torch keeps it for its own out= and in-place ops. The
// kernels are device independent and read the written arguments from the schema (Tensor(a!),
// Tensor(a!)? or Tensor(a!)[]), so a new mutating op only adds its name below.
//
// Autograd: none of these ops is differentiable. An out= function refuses, with grad mode on,
// any argument that requires grad (the out tensor included) rather than write a tensor that
// autograd tracks -- torch's rule, in torch's words, as ops/mixup.py gives it. The optimizer
// passes refuse to write a tensor that requires grad with grad mode on, as torch refuses
// in-place ops on such leaves: optimizer.step() runs under torch.no_grad().
//
// ADInplaceOrView: torch bumps the version of every tensor an op writes, so that autograd
// refuses a backward that saved the tensor before the write ("... has been modified by an
// inplace operation") instead of silently using the new values. A custom operator has no such
// kernel (the key falls through), hence this one: the op runs below ADInplaceOrView, then each
// written tensor's version goes up by one, after the write as in torch (an op that throws on
// bad input leaves the versions alone). Under torch.compile the schema's (a!) is what makes the
// mutation visible to the compiler; these kernels serve eager calls.
#include <ATen/core/LegacyTypeDispatch.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <c10/core/GradMode.h>
#include <c10/core/impl/LocalDispatchKeySet.h>
#include <torch/csrc/autograd/variable.h>
#include <torch/library.h>

#include <iterator>
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

// "mixup.out" / "mixup_" -> "mixup": the function the user called with out=. The schema's
// name carries no overload name, so only the in-place form's underscore is left to strip.
std::string public_name(const c10::OperatorHandle& op) {
  std::string name = op.schema().name();
  name = name.substr(name.find("::") + 2);
  if (name.size() > 1 && name.back() == '_') name.pop_back();
  return name;
}

bool is_written(const c10::Argument& a) {
  return a.alias_info() != nullptr && a.alias_info()->isWrite();
}

bool any_requires_grad(const c10::OperatorHandle& op, const torch::jit::Stack& stack,
                       bool written_only) {
  bool any = false;
  for_each_tensor_arg(op.schema(), stack,
                      [&](const c10::Argument& a) { return !written_only || is_written(a); },
                      [&](const at::Tensor& t) { any = any || (t.defined() && t.requires_grad()); });
  return any;
}

void below_autograd(const c10::OperatorHandle& op, c10::DispatchKeySet keys,
                    torch::jit::Stack* stack) {
  at::AutoDispatchBelowAutograd below;
  op.redispatchBoxed(keys & c10::after_autograd_keyset, stack);
}

// mixup.out & co: torch's out= rule
void refuse_grad_then_run(const c10::OperatorHandle& op, c10::DispatchKeySet keys,
                          torch::jit::Stack* stack) {
  TORCH_CHECK(!(c10::GradMode::is_enabled() && any_requires_grad(op, *stack, false)),
              public_name(op),
              "(): functions with out=... arguments don't support automatic differentiation, "
              "but one of the arguments requires grad.");
  below_autograd(op, keys, stack);
}

// the optimizer passes: no in-place write to a tensor autograd tracks
void refuse_tracked_writes_then_run(const c10::OperatorHandle& op, c10::DispatchKeySet keys,
                                    torch::jit::Stack* stack) {
  TORCH_CHECK(!(c10::GradMode::is_enabled() && any_requires_grad(op, *stack, true)),
              op.schema().name(),
              " writes its tensors in place and has no derivative, but one of them requires "
              "grad while grad mode is enabled; call it under torch.no_grad() (as "
              "optimizer.step() does)");
  below_autograd(op, keys, stack);
}

void run_then_bump_written(const c10::OperatorHandle& op, c10::DispatchKeySet keys,
                           torch::jit::Stack* stack) {
  // The call consumes the stack: keep the written tensors first.
  std::vector<at::Tensor> written;
  for_each_tensor_arg(op.schema(), *stack, is_written,
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

constexpr const char* kOutOps[] = {"mixup.out",          "mixup_",
                                   "cutmix.out",         "cutmix_",
                                   "normalize_mixup.out", "normalize_cutmix.out"};
constexpr const char* kOptimizerOps[] = {"grad_stats_", "fused_adamw_", "fused_sgd_"};

}  // namespace

TORCH_LIBRARY_IMPL(fastcore_train, Autograd, m) {
  for (const char* name : kOutOps) {
    m.impl(name, torch::CppFunction::makeFromBoxedFunction<&refuse_grad_then_run>());
  }
  for (const char* name : kOptimizerOps) {
    m.impl(name, torch::CppFunction::makeFromBoxedFunction<&refuse_tracked_writes_then_run>());
  }
}

TORCH_LIBRARY_IMPL(fastcore_train, ADInplaceOrView, m) {
  for (const auto& names : {std::vector<const char*>(std::begin(kOutOps), std::end(kOutOps)),
                            std::vector<const char*>(std::begin(kOptimizerOps),
                                                     std::end(kOptimizerOps))}) {
    for (const char* name : names) {
      m.impl(name, torch::CppFunction::makeFromBoxedFunction<&run_then_bump_written>());
    }
  }
}

}  // namespace fastcore_train

// Python's spelling of a dtype ("torch.float32"), so that error messages read the same from the
// C++ checks and the Python reference. One definition for every translation unit (two inline
// definitions with different bodies would break the one-definition rule).
#pragma once

#include <c10/core/ScalarType.h>

#include <string>

namespace fastcore_train {

inline std::string py_dtype(at::ScalarType t) {
  switch (t) {
    case at::kFloat: return "torch.float32";
    case at::kDouble: return "torch.float64";
    case at::kHalf: return "torch.float16";
    case at::kBFloat16: return "torch.bfloat16";
    case at::kLong: return "torch.int64";
    case at::kInt: return "torch.int32";
    case at::kShort: return "torch.int16";
    case at::kChar: return "torch.int8";
    case at::kByte: return "torch.uint8";
    case at::kBool: return "torch.bool";
    case at::kComplexFloat: return "torch.complex64";
    case at::kComplexDouble: return "torch.complex128";
    default: return std::string("torch.") + c10::toString(t);
  }
}

}  // namespace fastcore_train

// What this build of _C was made against (torch, CUDA, CPU ISAs), embedded as a string that
// fastcore_train/_build.py reads from the library file *before* loading it: loading a build made
// for another torch can crash the process, so the check cannot wait for the import.
// The header is generated per build by _build.py (setup.py, JIT builds) or by CMakeLists.txt.
#if __has_include("fastcore_train_build_info.h")
#include "fastcore_train_build_info.h"
#else
#define FASTCORE_TRAIN_BUILD_INFO "FASTCORE_TRAIN_BUILD_INFO|torch=unknown|END"
#endif

namespace fastcore_train {

// `used`: nothing in the library reads it through a symbol, the file scan does.
extern "C" __attribute__((used)) const char fastcore_train_build_info[] =
    FASTCORE_TRAIN_BUILD_INFO;

const char* build_info() { return fastcore_train_build_info; }

}  // namespace fastcore_train

// CUDA kernels of fastcore_train::grad_stats_, fused_adamw_ and fused_sgd_; the
// device-independent logic (checks, staging, order of work) lives in common/optim_launch.h.
//
// Multi-tensor apply: the tensors are packed, up to kMaxTensors per launch, into a struct
// passed as a kernel argument (pointers, sizes and the prefix sum of their chunk counts; under
// 4 KiB, so any driver accepts it). Each block handles one chunk of kChunk elements of one
// tensor and finds that tensor by binary search over the prefix sums.
//
// Nothing here reads a device value on the host: found_inf, grad_scale, sq_norm, lr and the
// steps are read by the kernels, so a step, skipped or not, never synchronises the host.
// The update rules are the ones of the CPU kernels (common/optim_math.h), with correctly
// rounded division and square root whatever --use_fast_math says.
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include <cmath>
#include <vector>

#include "common/optim_launch.h"
#include "common/optim_math.h"
#include "cuda/common.cuh"

namespace fastcore_train {
namespace {

using optim_impl::Opt;

constexpr int kThreads = 512;
constexpr int64_t kChunk = 16384;  // elements per block
constexpr int kMaxTensors = 40;    // per launch; keeps ParamPack near 3.5 KiB
constexpr int kMaxSteps = 256;     // steps incremented per launch of increment_steps_kernel

struct DeviceOps {
  __host__ __device__ static float fma(float a, float b, float c) {
#ifdef __CUDA_ARCH__
    return __fmaf_rn(a, b, c);
#else
    return std::fma(a, b, c);
#endif
  }
  __host__ __device__ static float mul(float a, float b) {
#ifdef __CUDA_ARCH__
    return __fmul_rn(a, b);  // never contracted into an FMA
#else
    return a * b;
#endif
  }
  __host__ __device__ static float sqrt(float x) {
#ifdef __CUDA_ARCH__
    return __fsqrt_rn(x);
#else
    return std::sqrt(x);
#endif
  }
  __host__ __device__ static float div(float a, float b) {
#ifdef __CUDA_ARCH__
    return __fdiv_rn(a, b);
#else
    return a / b;
#endif
  }
  // torch.maximum: NaN when either is NaN (fmaxf would return the other one)
  __host__ __device__ static float max(float a, float b) { return (a > b || a != a) ? a : b; }
};

// Kernel-argument packs. Tensors with no elements are never packed, so chunk_start is strictly
// increasing and chunk_start[count] is the number of blocks.
struct StatsPack {
  const void* data[kMaxTensors];
  int64_t numel[kMaxTensors];
  int64_t chunk_start[kMaxTensors + 1];
  int8_t dtype[kMaxTensors];  // 0 float32, 1 float16, 2 bfloat16
  int count;
};

struct ParamPack {
  void* param[kMaxTensors];
  const void* grad[kMaxTensors];
  float* master[kMaxTensors];  // null without master weights
  float* state0[kMaxTensors];  // exp_avg / momentum buffer (null without momentum)
  float* state1[kMaxTensors];  // exp_avg_sq
  float* state2[kMaxTensors];  // max_exp_avg_sq (AdamW with amsgrad)
  const float* step[kMaxTensors];  // AdamW's steps; SGD's buffer steps, or null
  float* ema[kMaxTensors];              // the EMA of the weight, null without
  const float* ema_step[kMaxTensors];   // its update count, null without
  int64_t numel[kMaxTensors];
  int64_t chunk_start[kMaxTensors + 1];
  int count;
};

struct StepPack {
  float* step[kMaxSteps];
  int count;
};

// Device-side scalars shared by the update kernels.
struct UpdateScalars {
  const float* lr_tensor;  // replaces lr when not null
  const float* grad_scale;
  const float* found_inf;
  const float* sq_norm;
  double lr;
  double max_grad_norm;
  bool maximize;
  // AdamW
  double beta1, beta2, weight_decay, eps;
  bool lerp_small;
  // SGD
  float momentum;
  float one_minus_dampening;
  bool nesterov;
  // the EMA of the weights
  double ema_decay;
  bool ema_warmup;
};

// Both are passed by value as kernel arguments, which must stay within 4 KiB.
static_assert(sizeof(ParamPack) + sizeof(UpdateScalars) <= 4096, "kernel arguments too large");

__device__ __forceinline__ bool skip_step(const float* found_inf) {
  return found_inf != nullptr && *found_inf != 0.f;
}

// The last tensor whose first chunk is at or before `block`.
__device__ __forceinline__ int find_tensor(const int64_t* chunk_start, int count, int64_t block) {
  int lo = 0, hi = count - 1;
  while (lo < hi) {
    const int mid = (lo + hi + 1) / 2;
    if (chunk_start[mid] <= block) {
      lo = mid;
    } else {
      hi = mid - 1;
    }
  }
  return lo;
}

__device__ __forceinline__ int64_t chunk_end(int64_t begin, int64_t numel) {
  return begin + kChunk < numel ? begin + kChunk : numel;
}

// inf and NaN have an all-ones exponent; a bit test is immune to fast-math assumptions.
__device__ __forceinline__ bool non_finite(float x) {
  return (__float_as_uint(x) & 0x7f800000u) == 0x7f800000u;
}

// ---- pass 1 ----

// 16-byte vector loads after the chunk's misaligned head (a read-only pass: nothing else to align).
template <typename T>
__device__ void stats_range(const T* x, int64_t begin, int64_t end, float& sq, bool& bad) {
  constexpr int VEC = 16 / sizeof(T);
  const T* xs = x + begin;
  auto add = [&](float v) {
    bad |= non_finite(v);
    sq += v * v;
  };
  gpu::for_each_in_row<VEC>(
      xs, end - begin, [&](int64_t j) { add(static_cast<float>(xs[j])); },
      [&](int64_t j) {
        const gpu::Pack<T, VEC> p = gpu::load_pack<VEC>(xs + j);
#pragma unroll
        for (int k = 0; k < VEC; ++k) add(static_cast<float>(p.v[k]));
      });
}

__global__ void grad_stats_kernel(const StatsPack pack, float* found_inf, float* partials,
                                  int64_t partial_offset) {
  const int64_t block = blockIdx.x;
  const int t = find_tensor(pack.chunk_start, pack.count, block);
  const int64_t begin = (block - pack.chunk_start[t]) * kChunk;
  const int64_t end = chunk_end(begin, pack.numel[t]);
  float sq = 0.f;
  bool bad = false;
  switch (pack.dtype[t]) {
    case 0: stats_range(static_cast<const float*>(pack.data[t]), begin, end, sq, bad); break;
    case 1: stats_range(static_cast<const c10::Half*>(pack.data[t]), begin, end, sq, bad); break;
    default:
      stats_range(static_cast<const c10::BFloat16*>(pack.data[t]), begin, end, sq, bad);
  }
  // Every writer stores the same value, so the race is benign.
  if (bad && found_inf != nullptr) *found_inf = 1.f;
  if (partials != nullptr) {
    const float total = gpu::block_sum(sq);
    if (threadIdx.x == 0) partials[partial_offset + block] = total;
  }
}

// One block adds the per-chunk partial sums in a fixed order (float64) to sq_norm.
__global__ void sum_partials_kernel(const float* partials, int64_t n, float* sq_norm) {
  double acc = 0.0;
  for (int64_t i = threadIdx.x; i < n; i += blockDim.x) acc += partials[i];
  const double total = gpu::block_sum(acc);
  if (threadIdx.x == 0) *sq_norm += static_cast<float>(total);
}

// ---- pass 2 ----

struct BlockRange {
  int t;
  int64_t begin, end;
};

__device__ __forceinline__ BlockRange block_range(const ParamPack& pack) {
  BlockRange r;
  const int64_t block = blockIdx.x;
  r.t = find_tensor(pack.chunk_start, pack.count, block);
  r.begin = (block - pack.chunk_start[r.t]) * kChunk;
  r.end = chunk_end(r.begin, pack.numel[r.t]);
  return r;
}

// The block's EMA constants (thread 0; optim_math::ema_consts, shared with the CPU).
__device__ __forceinline__ optim_math::EmaConsts block_ema_consts(const ParamPack& pack, int t,
                                                                  const UpdateScalars& s) {
  return pack.ema[t] != nullptr
             ? optim_math::ema_consts(s.ema_decay, s.ema_warmup, *pack.ema_step[t])
             : optim_math::EmaConsts{0.f, true, false};
}

// kAmsgrad is a per-call option; as a template argument it leaves the usual loop unchanged.
template <typename T, bool kMaster, bool kAmsgrad>
__global__ void adamw_kernel(const ParamPack pack, const UpdateScalars s) {
  if (skip_step(s.found_inf)) return;
  const BlockRange r = block_range(pack);
  // Per-tensor constants (optim_math::adamw_consts, shared with the CPU), once per block.
  __shared__ optim_math::AdamWConsts<float> c;
  __shared__ float mul;
  __shared__ optim_math::EmaConsts ec;
  if (threadIdx.x == 0) {
    ec = block_ema_consts(pack, r.t, s);
    const double lr = s.lr_tensor != nullptr ? static_cast<double>(*s.lr_tensor) : s.lr;
    c = optim_math::adamw_consts(lr, s.beta1, s.beta2, s.eps, s.weight_decay,
                                 *pack.step[r.t]);
    const float gm = optim_math::grad_multiplier<DeviceOps>(s.grad_scale, s.sq_norm,
                                                            s.max_grad_norm);
    mul = s.maximize ? -gm : gm;  // exact: g * -gm == (-g) * gm
  }
  __syncthreads();
  const optim_math::AdamWFlags f{s.weight_decay != 0.0, s.lerp_small, kAmsgrad};
  const T* g = static_cast<const T*>(pack.grad[r.t]);
  T* p = static_cast<T*>(pack.param[r.t]);
  float* w = pack.master[r.t];
  float* m = pack.state0[r.t];
  float* v = pack.state1[r.t];
  float* vmax = pack.state2[r.t];  // null without amsgrad
  float* e = pack.ema[r.t];        // null without EMA
  const optim_math::AdamWConsts<float> cc = c;
  const optim_math::EmaConsts ecc = ec;
  const float gm = mul;
  for (int64_t i = r.begin + threadIdx.x; i < r.end; i += blockDim.x) {
    const float gi = DeviceOps::mul(static_cast<float>(g[i]), gm);
    float wi = kMaster ? w[i] : static_cast<float>(p[i]);
    float mi = m[i];
    float vi = v[i];
    float xi = kAmsgrad ? vmax[i] : 0.f;
    optim_math::adamw_update<DeviceOps>(wi, mi, vi, xi, gi, cc, f);
    if (e != nullptr) {
      float ei = ecc.copy ? 0.f : e[i];
      optim_math::ema_update<DeviceOps>(ei, wi, ecc.coeff, ecc.small, ecc.copy);
      e[i] = ei;
    }
    m[i] = mi;
    v[i] = vi;
    if (kAmsgrad) vmax[i] = xi;
    if (kMaster) w[i] = wi;
    p[i] = static_cast<T>(wi);
  }
}

// One block's elements; kFirst (a buffer's first step, once per parameter) is a template
// argument so the usual loop is unchanged.
template <typename T, bool kMaster, bool kFirst>
__device__ void sgd_range(T* p, const T* g, float* w, float* b, float* e, int64_t begin,
                          int64_t end, float gm, const optim_math::SGDConsts<float>& c,
                          optim_math::SGDFlags f, optim_math::EmaConsts ec) {
  f.first = kFirst;
  for (int64_t i = begin + threadIdx.x; i < end; i += blockDim.x) {
    const float gi = DeviceOps::mul(static_cast<float>(g[i]), gm);
    float wi = kMaster ? w[i] : static_cast<float>(p[i]);
    float bi = f.momentum && !kFirst ? b[i] : 0.f;
    optim_math::sgd_update<DeviceOps>(wi, bi, gi, c, f);
    if (e != nullptr) {
      float ei = ec.copy ? 0.f : e[i];
      optim_math::ema_update<DeviceOps>(ei, wi, ec.coeff, ec.small, ec.copy);
      e[i] = ei;
    }
    if (f.momentum) b[i] = bi;
    if (kMaster) w[i] = wi;
    p[i] = static_cast<T>(wi);
  }
}

template <typename T, bool kMaster>
__global__ void sgd_kernel(const ParamPack pack, const UpdateScalars s) {
  if (skip_step(s.found_inf)) return;
  const BlockRange r = block_range(pack);
  __shared__ optim_math::SGDConsts<float> c;
  __shared__ float mul;
  __shared__ bool first;
  __shared__ optim_math::EmaConsts ec;
  if (threadIdx.x == 0) {
    ec = block_ema_consts(pack, r.t, s);
    const double lr = s.lr_tensor != nullptr ? static_cast<double>(*s.lr_tensor) : s.lr;
    c.weight_decay = static_cast<float>(s.weight_decay);
    c.momentum = s.momentum;
    c.one_minus_dampening = s.one_minus_dampening;
    c.neg_lr = static_cast<float>(-lr);
    const float gm = optim_math::grad_multiplier<DeviceOps>(s.grad_scale, s.sq_norm,
                                                            s.max_grad_norm);
    mul = s.maximize ? -gm : gm;
    // a buffer at step 0 becomes d (torch's first step); no steps: every buffer has started
    first = pack.step[r.t] != nullptr && *pack.step[r.t] == 0.f;
  }
  __syncthreads();
  const optim_math::SGDFlags f{s.weight_decay != 0.0, s.momentum != 0.f, s.nesterov, false};
  const T* g = static_cast<const T*>(pack.grad[r.t]);
  T* p = static_cast<T*>(pack.param[r.t]);
  float* w = pack.master[r.t];
  float* b = pack.state0[r.t];
  float* e = pack.ema[r.t];
  const optim_math::SGDConsts<float> cc = c;
  if (first) {
    sgd_range<T, kMaster, true>(p, g, w, b, e, r.begin, r.end, mul, cc, f, ec);
  } else {
    sgd_range<T, kMaster, false>(p, g, w, b, e, r.begin, r.end, mul, cc, f, ec);
  }
}

// Runs after every update kernel of the call (stream order), which read the old steps.
__global__ void increment_steps_kernel(const StepPack pack, const float* found_inf) {
  if (skip_step(found_inf)) return;
  if (static_cast<int>(threadIdx.x) < pack.count) *pack.step[threadIdx.x] += 1.f;
}

// ---- launchers ----

using optim_impl::ParamTensors;
using optim_impl::UpdateCall;

int8_t dtype_code(at::ScalarType t) {
  return t == at::kFloat ? 0 : (t == at::kHalf ? 1 : 2);
}

int64_t chunks_of(int64_t numel) { return (numel + kChunk - 1) / kChunk; }

using optim_impl::const_float_ptr;
using optim_impl::float_ptr;

UpdateScalars scalars_of(const UpdateCall& call) {
  UpdateScalars s{};
  s.lr_tensor = call.lr_tensor;
  s.grad_scale = call.grad_scale;
  s.found_inf = call.found_inf;
  s.sq_norm = call.sq_norm;
  s.lr = call.lr;
  s.max_grad_norm = call.max_grad_norm;
  s.maximize = call.maximize;
  s.ema_decay = call.ema_decay;
  s.ema_warmup = call.ema_warmup;
  return s;
}

using UpdateKernel = void (*)(ParamPack, UpdateScalars);

// Groups the staged parameters by dtype and launches `kernel_for(dtype, has_master)` on packs
// of kMaxTensors.
template <typename KernelFor>
void launch_updates(const UpdateCall& call, const UpdateScalars& s, KernelFor kernel_for) {
  cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  const bool has_master = call.params.front().master.defined();
  for (at::ScalarType dtype : {at::kFloat, at::kHalf, at::kBFloat16}) {
    ParamPack pack{};
    auto launch = [&]() {
      const int64_t blocks = pack.chunk_start[pack.count];
      kernel_for(dtype, has_master)<<<static_cast<unsigned>(blocks), kThreads, 0, stream>>>(pack,
                                                                                            s);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
      pack = ParamPack{};
    };
    for (const ParamTensors& t : call.params) {
      if (t.param.scalar_type() != dtype) continue;
      const int k = pack.count;
      pack.param[k] = t.param.data_ptr();
      pack.grad[k] = t.grad.const_data_ptr();
      pack.master[k] = float_ptr(t.master);
      pack.state0[k] = float_ptr(t.state0);
      pack.state1[k] = float_ptr(t.state1);
      pack.state2[k] = float_ptr(t.state2);
      pack.step[k] = const_float_ptr(t.step);
      pack.ema[k] = float_ptr(t.ema);
      pack.ema_step[k] = const_float_ptr(t.ema_step);
      pack.numel[k] = t.param.numel();
      pack.chunk_start[k + 1] = pack.chunk_start[k] + chunks_of(t.param.numel());
      pack.count = k + 1;
      if (pack.count == kMaxTensors) launch();
    }
    if (pack.count > 0) launch();
  }
}

template <bool kAmsgrad>
UpdateKernel adamw_kernel_for(at::ScalarType dtype, bool master) {
  switch (dtype) {
    case at::kFloat:
      return master ? &adamw_kernel<float, true, kAmsgrad>
                    : &adamw_kernel<float, false, kAmsgrad>;
    case at::kHalf:
      return master ? &adamw_kernel<c10::Half, true, kAmsgrad>
                    : &adamw_kernel<c10::Half, false, kAmsgrad>;
    default:
      return master ? &adamw_kernel<c10::BFloat16, true, kAmsgrad>
                    : &adamw_kernel<c10::BFloat16, false, kAmsgrad>;
  }
}

UpdateKernel sgd_kernel_for(at::ScalarType dtype, bool master) {
  switch (dtype) {
    case at::kFloat: return master ? &sgd_kernel<float, true> : &sgd_kernel<float, false>;
    case at::kHalf: return master ? &sgd_kernel<c10::Half, true> : &sgd_kernel<c10::Half, false>;
    default:
      return master ? &sgd_kernel<c10::BFloat16, true> : &sgd_kernel<c10::BFloat16, false>;
  }
}

struct CudaOptim {
  using Guard = gpu::DeviceGuard;

  // found_inf is read by the kernels: nothing is known on the host without a sync.
  static bool skip_on_host(const Opt&) { return false; }

  static void grad_stats(const std::vector<at::Tensor>& grads, const Opt& found_inf,
                         const Opt& sq_norm) {
    cudaStream_t stream = at::cuda::getCurrentCUDAStream();
    int64_t total_chunks = 0;
    for (const at::Tensor& g : grads) total_chunks += chunks_of(g.numel());
    at::Tensor partials;
    if (sq_norm.has_value()) {
      partials = at::empty({total_chunks}, grads[0].options().dtype(at::kFloat));
    }
    float* partials_ptr = sq_norm.has_value() ? partials.data_ptr<float>() : nullptr;
    float* found_ptr = found_inf.has_value() ? found_inf->data_ptr<float>() : nullptr;

    StatsPack pack{};
    int64_t offset = 0;
    auto launch = [&]() {
      const int64_t blocks = pack.chunk_start[pack.count];
      grad_stats_kernel<<<static_cast<unsigned>(blocks), kThreads, 0, stream>>>(
          pack, found_ptr, partials_ptr, offset);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
      offset += blocks;
      pack = StatsPack{};
    };
    for (const at::Tensor& g : grads) {
      const int i = pack.count;
      pack.data[i] = g.const_data_ptr();
      pack.numel[i] = g.numel();
      pack.dtype[i] = dtype_code(g.scalar_type());
      pack.chunk_start[i + 1] = pack.chunk_start[i] + chunks_of(g.numel());
      pack.count = i + 1;
      if (pack.count == kMaxTensors) launch();
    }
    if (pack.count > 0) launch();
    if (sq_norm.has_value()) {
      sum_partials_kernel<<<1, kThreads, 0, stream>>>(partials_ptr, total_chunks,
                                                      sq_norm->data_ptr<float>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
  }

  static void adamw(const UpdateCall& call, const optim_impl::AdamWArgs& a) {
    UpdateScalars s = scalars_of(call);
    s.beta1 = a.beta1;
    s.beta2 = a.beta2;
    s.weight_decay = a.weight_decay;
    s.eps = a.eps;
    s.lerp_small = optim_math::adamw_lerp_small(a.beta1);
    launch_updates(call, s, a.amsgrad ? adamw_kernel_for<true> : adamw_kernel_for<false>);
  }

  static void sgd(const UpdateCall& call, const optim_impl::SGDArgs& a) {
    UpdateScalars s = scalars_of(call);
    s.weight_decay = a.weight_decay;
    s.momentum = static_cast<float>(a.momentum);
    s.one_minus_dampening = static_cast<float>(1.0 - a.dampening);
    s.nesterov = a.nesterov;
    launch_updates(call, s, sgd_kernel_for);
  }

  // Runs after the update kernels (stream order), which read the old steps.
  static void increment(at::TensorList steps, const Opt& found_inf) {
    cudaStream_t stream = at::cuda::getCurrentCUDAStream();
    const float* found = optim_impl::scalar_ptr(found_inf);
    StepPack pack{};
    auto launch = [&]() {
      increment_steps_kernel<<<1, kMaxSteps, 0, stream>>>(pack, found);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
      pack = StepPack{};
    };
    for (const at::Tensor& step : steps) {
      pack.step[pack.count++] = step.data_ptr<float>();
      if (pack.count == kMaxSteps) launch();
    }
    if (pack.count > 0) launch();
  }
};

namespace impl = optim_impl;

}  // namespace

TORCH_LIBRARY_IMPL(fastcore_train, CUDA, m) {
  m.impl("grad_stats_", &impl::grad_stats<CudaOptim>);
  m.impl("fused_adamw_", &impl::fused_adamw<CudaOptim>);
  m.impl("fused_sgd_", &impl::fused_sgd<CudaOptim>);
}

// A sparse gradient sends the call to the SparseCUDA key; the same functions reject it with
// the error of csrc/common/optim_checks.h rather than the dispatcher's "could not run".
TORCH_LIBRARY_IMPL(fastcore_train, SparseCUDA, m) {
  m.impl("grad_stats_", &impl::grad_stats<CudaOptim>);
  m.impl("fused_adamw_", &impl::fused_adamw<CudaOptim>);
  m.impl("fused_sgd_", &impl::fused_sgd<CudaOptim>);
}

}  // namespace fastcore_train

// CPU implementation of mask2former::frozen_bn_act / frozen_bn_act_ (schemas in library.cpp):
// inference batch norm with fixed statistics, optionally followed by a residual add and a ReLU,
// in one pass over memory instead of the three (batch_norm, add_, relu_) of the plain path.
//
//   x, residual, output   (N, C, H, W) float32, contiguous; or channel-blocked (N, C / B, H, W, B)
//                         (oneDNN's nChw<B>c layout: channel cb * B + j at [n, cb, h, w, j])
//   weight, bias, running_mean, running_var   (C,) float32
//
// Per channel, exactly as ATen's inference batch_norm (see frozen_bn_cpu_kernel.h):
//   alpha = 1 / sqrt(var + (float)eps) * weight,  beta = fma(-mean, alpha, bias)
//   y = fma(x, alpha, beta) [+ residual] [ReLU]
// The kernel is compiled once per instruction set and picked at run time (cpu_isa.h).
#include "cpu_isa.h"

#include <ATen/Parallel.h>
#include <ATen/MemoryOverlap.h>
#include <ATen/ops/empty_like.h>
#include <c10/util/Exception.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <optional>
#include <utility>
#include <vector>

#if M2F_CPU_MULTI_ISA
#include <immintrin.h>
#endif

namespace mask2former {

#define M2F_VEC_BYTES 16
namespace bn_generic {
#include "frozen_bn_cpu_kernel.h"
}  // namespace bn_generic
#undef M2F_VEC_BYTES

#if M2F_CPU_MULTI_ISA
#pragma GCC push_options
#pragma GCC target("avx2,fma")
#define M2F_VEC_BYTES 32
namespace bn_avx2 {
#include "frozen_bn_cpu_kernel.h"
}  // namespace bn_avx2
#undef M2F_VEC_BYTES
#pragma GCC pop_options

#pragma GCC push_options
#pragma GCC target("avx512f,avx512vl,avx512dq,avx512bw,avx2,fma")
#define M2F_VEC_BYTES 64
namespace bn_avx512 {
#include "frozen_bn_cpu_kernel.h"
}  // namespace bn_avx512
#undef M2F_VEC_BYTES
#pragma GCC pop_options
#endif

namespace {

bn_generic::PlanesFn pick(Isa isa, bool residual, bool relu) {
#if M2F_CPU_MULTI_ISA
  if (isa == Isa::kAvx512) return bn_avx512::pick_planes(residual, relu);
  if (isa == Isa::kAvx2) return bn_avx2::pick_planes(residual, relu);
#endif
  return bn_generic::pick_planes(residual, relu);
}

void check_tensor(const at::Tensor& t, const char* arg, const char* op_name) {
  TORCH_CHECK_VALUE(t.scalar_type() == at::kFloat, op_name, ": ", arg, " must be float32; got ", t.scalar_type());
  TORCH_CHECK(t.device().is_cpu(), op_name, ": ", arg, " must be a CPU tensor; got ", t.device());
  TORCH_CHECK(t.is_contiguous(), op_name, ": ", arg, " must be contiguous (call .contiguous()); got shape ",
              t.sizes(), " with strides ", t.strides());
}

void check_inputs(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& bias,
                  const at::Tensor& running_mean, const at::Tensor& running_var,
                  const std::optional<at::Tensor>& residual, const char* op_name) {
  TORCH_CHECK_VALUE(x.dim() == 4 || x.dim() == 5, op_name,
                    ": x must be (N, C, H, W) or channel-blocked (N, C/B, H, W, B); got shape ", x.sizes());
  check_tensor(x, "x", op_name);
  const int64_t C = x.dim() == 5 ? x.size(1) * x.size(4) : x.size(1);
  const std::pair<const at::Tensor*, const char*> params[] = {
      {&weight, "weight"}, {&bias, "bias"}, {&running_mean, "running_mean"}, {&running_var, "running_var"}};
  for (const auto& [t, arg] : params) {
    TORCH_CHECK_VALUE(t->dim() == 1 && t->size(0) == C, op_name, ": ", arg, " must be (C,) with C=", C,
                      "; got shape ", t->sizes());
    check_tensor(*t, arg, op_name);
  }
  if (residual.has_value()) {
    TORCH_CHECK_VALUE(residual->sizes() == x.sizes(), op_name, ": residual must have x's shape ", x.sizes(),
                      "; got shape ", residual->sizes());
    check_tensor(*residual, "residual", op_name);
  }
}

// Writes frozen_bn_act(x, ...) into out (which may be x).
void run(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& bias, const at::Tensor& running_mean,
         const at::Tensor& running_var, double eps, const std::optional<at::Tensor>& residual, bool relu,
         const at::Tensor& out) {
  const int64_t B = x.dim() == 5 ? x.size(4) : 1;
  const int64_t N = x.size(0), C = x.size(1) * B, HW = x.size(2) * x.size(3);
  if (x.numel() == 0) return;
  // Per-channel terms in ATen's order of operations (see the file comment).
  const float feps = static_cast<float>(eps);
  const float* w = weight.const_data_ptr<float>();
  const float* b = bias.const_data_ptr<float>();
  const float* mean = running_mean.const_data_ptr<float>();
  const float* var = running_var.const_data_ptr<float>();
  std::vector<float> alpha(static_cast<size_t>(C)), beta(static_cast<size_t>(C));
  for (int64_t c = 0; c < C; ++c) {
    const float invstd = 1.0f / std::sqrt(var[c] + feps);
    alpha[c] = invstd * w[c];
    beta[c] = std::fma(-mean[c], alpha[c], b[c]);
  }
  const auto fn = pick(active_isa(), residual.has_value(), relu);
  const float* xp = x.const_data_ptr<float>();
  const float* rp = residual.has_value() ? residual->const_data_ptr<float>() : nullptr;
  float* yp = out.mutable_data_ptr<float>();
  const float* ap = alpha.data();
  const float* bp = beta.data();
  // A task covers whole planes and at least 32768 elements (ATen's grain for elementwise ops):
  // smaller work is not worth waking threads for.
  const int64_t grain = std::max<int64_t>(1, 32768 / std::max<int64_t>(HW * B, 1));
  at::parallel_for(0, N * (C / B), grain,
                   [&](int64_t begin, int64_t end) { fn(xp, rp, yp, ap, bp, C, B, HW, begin, end); });
}

}  // namespace

at::Tensor frozen_bn_act_cpu(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& bias,
                             const at::Tensor& running_mean, const at::Tensor& running_var, double eps,
                             const std::optional<at::Tensor>& residual, bool relu) {
  check_inputs(x, weight, bias, running_mean, running_var, residual, "mask2former::frozen_bn_act");
  at::Tensor out = at::empty_like(x);
  run(x, weight, bias, running_mean, running_var, eps, residual, relu, out);
  return out;
}

void frozen_bn_act_cpu_(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& bias,
                         const at::Tensor& running_mean, const at::Tensor& running_var, double eps,
                         const std::optional<at::Tensor>& residual, bool relu) {
  constexpr const char* op = "mask2former::frozen_bn_act_";
  check_inputs(x, weight, bias, running_mean, running_var, residual, op);
  // Same-index reads before writes are fine; a shifted overlap would read updated values.
  if (residual.has_value()) at::assert_no_partial_overlap(x, *residual);
  run(x, weight, bias, running_mean, running_var, eps, residual, relu, x);
}

}  // namespace mask2former

TORCH_LIBRARY_IMPL(mask2former, CPU, m) {
  m.impl("frozen_bn_act", &mask2former::frozen_bn_act_cpu);
  m.impl("frozen_bn_act_", &mask2former::frozen_bn_act_cpu_);
}

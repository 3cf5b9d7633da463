// Operator schemas of the mask2former library (every op: ms_deform_attn*, frozen_bn_act*) and the
// input checks every ms_deform_attn backend shares.
//
// The schemas live here, device kernels register themselves next to their code:
//   ms_deform_attn_cpu.cpp   TORCH_LIBRARY_IMPL(mask2former, CPU, ...)
//   ms_deform_attn_cuda.cu   TORCH_LIBRARY_IMPL(mask2former, CUDA, ...)   (when built)
//   frozen_bn_cpu.cpp        TORCH_LIBRARY_IMPL(mask2former, CPU, ...)    (frozen_bn_act, CPU only)
// Fake (meta) kernels and the autograd formula are registered from Python
// (mask2former/ops/_registration.py), which set_python_module below points to.
#include "ms_deform_attn.h"

#include <ATen/TensorUtils.h>
#include <c10/util/Exception.h>
#include <torch/library.h>

#include <sstream>

namespace mask2former {
namespace {

std::string shape_str(const at::Tensor& t) {
  std::ostringstream os;
  os << t.sizes();
  return os.str();
}

void check_contiguous(const at::Tensor& t, const char* arg, const char* op_name) {
  TORCH_CHECK(t.is_contiguous(), op_name, ": ", arg, " must be contiguous (call .contiguous()); got shape ",
              shape_str(t), " with strides ", t.strides());
}

}  // namespace

void check_ms_deform_attn_inputs(
    const at::Tensor& value,
    const at::Tensor& spatial_shapes,
    const at::Tensor& level_start_index,
    const at::Tensor& sampling_locations,
    const at::Tensor& attention_weights,
    const char* op_name,
    const char* locations_arg) {
  TORCH_CHECK_VALUE(value.dim() == 4, op_name, ": value must be (N, S, M, D); got shape ", shape_str(value));
  TORCH_CHECK_VALUE(spatial_shapes.dim() == 2 && spatial_shapes.size(1) == 2, op_name,
                    ": spatial_shapes must be (L, 2); got shape ", shape_str(spatial_shapes));
  const int64_t L = spatial_shapes.size(0);
  TORCH_CHECK_VALUE(level_start_index.dim() == 1 && level_start_index.size(0) == L, op_name,
                    ": level_start_index must be (L,) with L=", L, "; got shape ", shape_str(level_start_index));
  TORCH_CHECK_VALUE(spatial_shapes.scalar_type() == at::kLong && level_start_index.scalar_type() == at::kLong,
                    op_name, ": spatial_shapes and level_start_index must be int64; got ",
                    spatial_shapes.scalar_type(), " and ", level_start_index.scalar_type());
  const int64_t N = value.size(0), M = value.size(2);
  TORCH_CHECK_VALUE(sampling_locations.dim() == 6 && sampling_locations.size(0) == N &&
                        sampling_locations.size(2) == M && sampling_locations.size(3) == L &&
                        sampling_locations.size(5) == 2,
                    op_name, ": ", locations_arg, " must be (N, Lq, M, L, P, 2) with N=", N, ", M=", M, ", L=", L,
                    "; got shape ", shape_str(sampling_locations));
  const int64_t Lq = sampling_locations.size(1), P = sampling_locations.size(4);
  TORCH_CHECK_VALUE(attention_weights.sizes() == at::IntArrayRef({N, Lq, M, L, P}), op_name,
                    ": attention_weights must be (N, Lq, M, L, P) = [", N, ", ", Lq, ", ", M, ", ", L, ", ", P,
                    "]; got shape ", shape_str(attention_weights));
  TORCH_CHECK_VALUE(at::isFloatingType(value.scalar_type()), op_name,
                    ": value must be a floating-point tensor; got ", value.scalar_type());
  TORCH_CHECK_VALUE(value.scalar_type() == sampling_locations.scalar_type() &&
                        value.scalar_type() == attention_weights.scalar_type(),
                    op_name, ": value, ", locations_arg, " and attention_weights must share a dtype; got ",
                    value.scalar_type(), ", ", sampling_locations.scalar_type(), ", ",
                    attention_weights.scalar_type());
  TORCH_CHECK(value.device() == sampling_locations.device() && value.device() == attention_weights.device(),
              op_name, ": value, ", locations_arg, " and attention_weights must be on one device; got ",
              value.device(), ", ", sampling_locations.device(), ", ", attention_weights.device());
  check_contiguous(value, "value", op_name);
  check_contiguous(sampling_locations, locations_arg, op_name);
  check_contiguous(attention_weights, "attention_weights", op_name);
  check_contiguous(spatial_shapes, "spatial_shapes", op_name);
  check_contiguous(level_start_index, "level_start_index", op_name);
}

void check_ms_deform_attn_offsets_inputs(
    const at::Tensor& value,
    const at::Tensor& spatial_shapes,
    const at::Tensor& level_start_index,
    const at::Tensor& reference_points,
    const at::Tensor& sampling_offsets,
    const at::Tensor& attention_weights,
    const char* op_name) {
  check_ms_deform_attn_inputs(value, spatial_shapes, level_start_index, sampling_offsets, attention_weights, op_name,
                              "sampling_offsets");
  const int64_t N = value.size(0), Lq = sampling_offsets.size(1), L = spatial_shapes.size(0);
  TORCH_CHECK_VALUE(reference_points.sizes() == at::IntArrayRef({N, Lq, L, 2}), op_name,
                    ": reference_points must be (N, Lq, L, 2) = [", N, ", ", Lq, ", ", L,
                    ", 2] (any strides, e.g. an expanded view); got shape ", shape_str(reference_points));
  TORCH_CHECK_VALUE(reference_points.scalar_type() == value.scalar_type(), op_name,
                    ": reference_points must have value's dtype ", value.scalar_type(), "; got ",
                    reference_points.scalar_type());
  TORCH_CHECK(reference_points.device() == value.device(), op_name, ": reference_points must be on ",
              value.device(), " (the device of value); got ", reference_points.device());
}

void check_level_metadata(
    const at::Tensor& spatial_shapes_cpu,
    const at::Tensor& level_start_index_cpu,
    int64_t S,
    const char* op_name) {
  const int64_t L = spatial_shapes_cpu.size(0);
  const int64_t* hw = spatial_shapes_cpu.data_ptr<int64_t>();
  const int64_t* start = level_start_index_cpu.data_ptr<int64_t>();
  int64_t total = 0;
  for (int64_t l = 0; l < L; ++l) {
    const int64_t h = hw[2 * l], w = hw[2 * l + 1];
    TORCH_CHECK_VALUE(h >= 0 && w >= 0, op_name, ": spatial_shapes[", l, "] = (", h, ", ", w,
                      ") must be non-negative");
    total += h * w;
  }
  TORCH_CHECK_VALUE(total == S, op_name, ": value has S=", S, " positions but spatial_shapes sum to ", total);
  for (int64_t l = 0; l < L; ++l) {
    const int64_t size = hw[2 * l] * hw[2 * l + 1];
    TORCH_CHECK_VALUE(start[l] >= 0 && start[l] + size <= S, op_name, ": level ", l, " (start ", start[l],
                      ", size ", hw[2 * l], "x", hw[2 * l + 1], ") lies outside value's S=", S, " positions");
  }
}

}  // namespace mask2former

TORCH_LIBRARY(mask2former, m) {
  // Fake kernels and autograd are registered by this Python module.
  m.set_python_module("mask2former.ops._registration");
  m.def(
      "ms_deform_attn(Tensor value, Tensor spatial_shapes, Tensor level_start_index, "
      "Tensor sampling_locations, Tensor attention_weights) -> Tensor",
      {at::Tag::pt2_compliant_tag});
  m.def(
      "ms_deform_attn_backward(Tensor grad_output, Tensor value, Tensor spatial_shapes, "
      "Tensor level_start_index, Tensor sampling_locations, Tensor attention_weights) "
      "-> (Tensor grad_value, Tensor grad_sampling_locations, Tensor grad_attention_weights)",
      {at::Tag::pt2_compliant_tag});
  // Inference-only forward (no autograd) that takes the locations as reference_points (N, Lq, L, 2),
  // any strides, plus sampling_offsets (N, Lq, M, L, P, 2) in pixels of each level, and computes
  // reference + offset / (W_l, H_l) on the fly: bitwise ms_deform_attn of those locations.
  m.def(
      "ms_deform_attn_offsets(Tensor value, Tensor spatial_shapes, Tensor level_start_index, "
      "Tensor reference_points, Tensor sampling_offsets, Tensor attention_weights) -> Tensor",
      {at::Tag::pt2_compliant_tag});
  // Inference-only FrozenBatchNorm2d (+ residual) (+ ReLU) in one pass; no autograd. The
  // trailing-underscore variant writes into x and returns nothing (functionalization does not
  // support custom ops whose outputs alias inputs).
  m.def(
      "frozen_bn_act(Tensor x, Tensor weight, Tensor bias, Tensor running_mean, Tensor running_var, "
      "float eps, Tensor? residual=None, bool relu=False) -> Tensor",
      {at::Tag::pt2_compliant_tag});
  m.def(
      "frozen_bn_act_(Tensor(a!) x, Tensor weight, Tensor bias, Tensor running_mean, Tensor running_var, "
      "float eps, Tensor? residual=None, bool relu=False) -> ()",
      {at::Tag::pt2_compliant_tag});
  // Diagnostics for `python -m mask2former.ops info`.
  m.def("_cpu_isa() -> str", &mask2former::ms_deform_attn_cpu_isa);
}

#ifdef M2F_AOT_BUILD_ID
// Ahead-of-time builds (setup.py, M2F_BUILD_OPS=1) define M2F_AOT_BUILD_ID, a hash of csrc/, the
// flags and the torch / Python versions, and M2F_AOT_CUDA_ARCHS when they include the CUDA kernel
// (mask2former/ops/backend/aot.py). The loader reads this string from the file before loading it,
// so a library built from other sources or for another torch is never loaded (its TORCH_LIBRARY
// would take the namespace that the JIT build falls back to).
#ifndef M2F_AOT_CUDA_ARCHS
#define M2F_AOT_CUDA_ARCHS none
#endif
#define M2F_STRINGIFY_(x) #x
#define M2F_STRINGIFY(x) M2F_STRINGIFY_(x)
extern "C" C10_EXPORT const char m2f_aot_build_id[] =
    "m2f_aot_build_id=" M2F_STRINGIFY(M2F_AOT_BUILD_ID) ";cuda_archs=" M2F_STRINGIFY(M2F_AOT_CUDA_ARCHS) ";";
#endif

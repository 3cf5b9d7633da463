// CPU implementation of mask2former::ms_deform_attn, its backward and the inference-only
// mask2former::ms_deform_attn_offsets.
//
// Portability: the kernels in ms_deform_attn_cpu_kernel.h are compiled once per instruction
// set and picked at run time (see cpu_isa.h).
#include "cpu_isa.h"
#include "ms_deform_attn.h"
#include "ms_deform_attn_cpu_args.h"

#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/zeros.h>
#include <ATen/ops/zeros_like.h>
#include <c10/util/Exception.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <string>
#include <vector>

namespace mask2former {

// Baseline: 16-byte vectors (SSE2 on x86-64, NEON on arm64).
#define M2F_VEC_BYTES 16
namespace cpu_generic {
#include "ms_deform_attn_cpu_kernel.h"
}  // namespace cpu_generic
#undef M2F_VEC_BYTES

#if M2F_CPU_MULTI_ISA
#pragma GCC push_options
#pragma GCC target("avx2,fma")
#define M2F_VEC_BYTES 32
namespace cpu_avx2 {
#include "ms_deform_attn_cpu_kernel.h"
}  // namespace cpu_avx2
#undef M2F_VEC_BYTES
#pragma GCC pop_options

#pragma GCC push_options
#pragma GCC target("avx512f,avx512vl,avx512dq,avx512bw,avx2,fma")
#define M2F_VEC_BYTES 64
namespace cpu_avx512 {
#include "ms_deform_attn_cpu_kernel.h"
}  // namespace cpu_avx512
#undef M2F_VEC_BYTES
#pragma GCC pop_options
#endif

namespace {

template <typename T>
using KernelFn = void (*)(const MSDAArgs<T>&, int64_t, int64_t);

template <typename T>
struct Kernels;

#if M2F_CPU_MULTI_ISA
#define M2F_PICK(isa, fn)                                   \
  ((isa) == Isa::kAvx512 ? &cpu_avx512::fn                  \
   : (isa) == Isa::kAvx2 ? &cpu_avx2::fn                    \
                         : &cpu_generic::fn)
#else
#define M2F_PICK(isa, fn) (&cpu_generic::fn)
#endif

template <>
struct Kernels<float> {
  static KernelFn<float> forward(Isa isa) { return M2F_PICK(isa, forward_f32); }
  static KernelFn<float> forward_offsets(Isa isa) { return M2F_PICK(isa, forward_offsets_f32); }
  static KernelFn<float> backward(Isa isa) { return M2F_PICK(isa, backward_f32); }
};
template <>
struct Kernels<double> {
  static KernelFn<double> forward(Isa isa) { return M2F_PICK(isa, forward_f64); }
  static KernelFn<double> forward_offsets(Isa isa) { return M2F_PICK(isa, forward_offsets_f64); }
  static KernelFn<double> backward(Isa isa) { return M2F_PICK(isa, backward_f64); }
};
#undef M2F_PICK

void check_cpu(const at::Tensor& t, const char* arg, const char* op_name) {
  TORCH_CHECK(t.device().is_cpu(), op_name, ": ", arg, " must be a CPU tensor for the CPU kernel; got ",
              t.device());
}

template <typename T>
MSDAArgs<T> make_args(
    const at::Tensor& value,
    const at::Tensor& spatial_shapes,
    const at::Tensor& level_start_index,
    const at::Tensor& sampling_locations,
    const at::Tensor& attention_weights) {
  MSDAArgs<T> a;
  a.N = value.size(0);
  a.S = value.size(1);
  a.M = value.size(2);
  a.D = value.size(3);
  a.Lq = sampling_locations.size(1);
  a.L = sampling_locations.size(3);
  a.P = sampling_locations.size(4);
  // value given as (N, S, M, D)
  a.batch_stride = a.S * a.M * a.D;
  a.head_stride = a.D;
  a.row_stride = a.M * a.D;
  a.value = value.const_data_ptr<T>();
  a.spatial_shapes = spatial_shapes.const_data_ptr<int64_t>();
  a.level_start_index = level_start_index.const_data_ptr<int64_t>();
  a.sampling_locations = sampling_locations.const_data_ptr<T>();
  a.attention_weights = attention_weights.const_data_ptr<T>();
  return a;
}

void check_all(
    const at::Tensor& value,
    const at::Tensor& spatial_shapes,
    const at::Tensor& level_start_index,
    const at::Tensor& sampling_locations,
    const at::Tensor& attention_weights,
    const char* op_name) {
  check_ms_deform_attn_inputs(value, spatial_shapes, level_start_index, sampling_locations, attention_weights,
                              op_name);
  check_cpu(value, "value", op_name);
  check_cpu(spatial_shapes, "spatial_shapes", op_name);
  check_cpu(level_start_index, "level_start_index", op_name);
  check_level_metadata(spatial_shapes, level_start_index, value.size(1), op_name);
}

}  // namespace

std::string ms_deform_attn_cpu_isa() { return isa_name(active_isa()); }

at::Tensor ms_deform_attn_forward_cpu(
    const at::Tensor& value,
    const at::Tensor& spatial_shapes,
    const at::Tensor& level_start_index,
    const at::Tensor& sampling_locations,
    const at::Tensor& attention_weights) {
  constexpr const char* op = "mask2former::ms_deform_attn";
  check_all(value, spatial_shapes, level_start_index, sampling_locations, attention_weights, op);
  const int64_t N = value.size(0), M = value.size(2), D = value.size(3);
  const int64_t Lq = sampling_locations.size(1);
  auto output = at::empty({N, Lq, M * D}, value.options());
  const Isa isa = active_isa();
  AT_DISPATCH_FLOATING_TYPES(value.scalar_type(), "ms_deform_attn_forward_cpu", [&] {
    auto a = make_args<scalar_t>(value, spatial_shapes, level_start_index, sampling_locations, attention_weights);
    a.output = output.mutable_data_ptr<scalar_t>();
    const auto fn = Kernels<scalar_t>::forward(isa);
    // One item = one query of one image (all heads); a few dozen make a worthwhile task.
    at::parallel_for(0, N * Lq, 16, [&](int64_t begin, int64_t end) { fn(a, begin, end); });
  });
  return output;
}

at::Tensor ms_deform_attn_offsets_forward_cpu(
    const at::Tensor& value,
    const at::Tensor& spatial_shapes,
    const at::Tensor& level_start_index,
    const at::Tensor& reference_points,
    const at::Tensor& sampling_offsets,
    const at::Tensor& attention_weights) {
  constexpr const char* op = "mask2former::ms_deform_attn_offsets";
  check_ms_deform_attn_offsets_inputs(value, spatial_shapes, level_start_index, reference_points, sampling_offsets,
                                      attention_weights, op);
  check_cpu(value, "value", op);
  check_cpu(spatial_shapes, "spatial_shapes", op);
  check_cpu(level_start_index, "level_start_index", op);
  check_level_metadata(spatial_shapes, level_start_index, value.size(1), op);
  const int64_t N = value.size(0), M = value.size(2), D = value.size(3);
  const int64_t Lq = sampling_offsets.size(1);
  auto output = at::empty({N, Lq, M * D}, value.options());
  const Isa isa = active_isa();
  AT_DISPATCH_FLOATING_TYPES(value.scalar_type(), "ms_deform_attn_offsets_forward_cpu", [&] {
    // sampling_offsets take the place of sampling_locations (same shape); the kernel reads them
    // through a.sampling_offsets only.
    auto a = make_args<scalar_t>(value, spatial_shapes, level_start_index, sampling_offsets, attention_weights);
    a.sampling_locations = nullptr;
    a.sampling_offsets = sampling_offsets.const_data_ptr<scalar_t>();
    a.reference_points = reference_points.const_data_ptr<scalar_t>();
    for (int i = 0; i < 4; ++i) a.ref_strides[i] = reference_points.stride(i);
    a.output = output.mutable_data_ptr<scalar_t>();
    const auto fn = Kernels<scalar_t>::forward_offsets(isa);
    at::parallel_for(0, N * Lq, 16, [&](int64_t begin, int64_t end) { fn(a, begin, end); });
  });
  return output;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> ms_deform_attn_backward_cpu(
    const at::Tensor& grad_output,
    const at::Tensor& value,
    const at::Tensor& spatial_shapes,
    const at::Tensor& level_start_index,
    const at::Tensor& sampling_locations,
    const at::Tensor& attention_weights) {
  constexpr const char* op = "mask2former::ms_deform_attn_backward";
  check_all(value, spatial_shapes, level_start_index, sampling_locations, attention_weights, op);
  const int64_t N = value.size(0), M = value.size(2), D = value.size(3);
  const int64_t Lq = sampling_locations.size(1);
  TORCH_CHECK_VALUE(grad_output.sizes() == at::IntArrayRef({N, Lq, M * D}), op,
                    ": grad_output must be (N, Lq, M * D) = [", N, ", ", Lq, ", ", M * D, "]; got shape ",
                    grad_output.sizes());
  TORCH_CHECK_VALUE(grad_output.scalar_type() == value.scalar_type(), op, ": grad_output must have dtype ",
                    value.scalar_type(), "; got ", grad_output.scalar_type());
  check_cpu(grad_output, "grad_output", op);
  TORCH_CHECK(grad_output.is_contiguous(), op, ": grad_output must be contiguous (call .contiguous())");

  // Heads-major copies of value and grad_value, (N, M, S, D): see backward_items.
  const bool heads_major = M > 1;  // with one head both layouts are the same
  const at::Tensor value_hm = heads_major ? value.transpose(1, 2).contiguous() : value;
  auto grad_value_hm = at::zeros_like(value_hm);
  auto grad_locations = at::empty_like(sampling_locations);
  auto grad_weights = at::empty_like(attention_weights);
  // Race-free split (see backward_items): one item per (n, m) owns grad_value[n, :, m, :].
  // Only when that gives fewer items than threads are the queries also split, each extra
  // slice into its own zeroed copy of grad_value, summed at the end.
  const int64_t threads = at::get_num_threads();
  int64_t q_chunks = 1;
  if (N * M > 0 && N * M < threads && !at::in_parallel_region())
    q_chunks = std::min<int64_t>((threads + N * M - 1) / (N * M), std::max<int64_t>(Lq, 1));
  at::Tensor grad_value_extra;
  if (q_chunks > 1) grad_value_extra = at::zeros({q_chunks - 1, value_hm.numel()}, value.options());
  const Isa isa = active_isa();
  AT_DISPATCH_FLOATING_TYPES(value.scalar_type(), "ms_deform_attn_backward_cpu", [&] {
    auto a = make_args<scalar_t>(value, spatial_shapes, level_start_index, sampling_locations, attention_weights);
    a.value = value_hm.const_data_ptr<scalar_t>();
    if (heads_major) {
      a.batch_stride = M * a.S * D;
      a.head_stride = a.S * D;
      a.row_stride = D;
    }
    a.grad_output = grad_output.const_data_ptr<scalar_t>();
    a.grad_value = grad_value_hm.mutable_data_ptr<scalar_t>();
    a.q_chunks = q_chunks;
    a.grad_value_extra = q_chunks > 1 ? grad_value_extra.mutable_data_ptr<scalar_t>() : nullptr;
    a.grad_sampling_locations = grad_locations.mutable_data_ptr<scalar_t>();
    a.grad_attention_weights = grad_weights.mutable_data_ptr<scalar_t>();
    const auto fn = Kernels<scalar_t>::backward(isa);
    at::parallel_for(0, q_chunks * N * M, 1, [&](int64_t begin, int64_t end) { fn(a, begin, end); });
  });
  if (q_chunks > 1) grad_value_hm.view({-1}).add_(grad_value_extra.sum(0));
  at::Tensor grad_value = heads_major ? grad_value_hm.transpose(1, 2).contiguous() : grad_value_hm;
  return {grad_value, grad_locations, grad_weights};
}

}  // namespace mask2former

TORCH_LIBRARY_IMPL(mask2former, CPU, m) {
  m.impl("ms_deform_attn", &mask2former::ms_deform_attn_forward_cpu);
  m.impl("ms_deform_attn_backward", &mask2former::ms_deform_attn_backward_cpu);
  m.impl("ms_deform_attn_offsets", &mask2former::ms_deform_attn_offsets_forward_cpu);
}

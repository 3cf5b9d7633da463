// Multi-scale deformable attention: declarations shared by the op registration
// (library.cpp) and the device kernels (ms_deform_attn_cpu.cpp, and
// ms_deform_attn_cuda.cu when CUDA is built).
//
// Shapes (see mask2former/ops/ms_deform_attn.py):
//   value               (N, S, M, D)        S = sum_l H_l * W_l
//   spatial_shapes      (L, 2)  int64       (H_l, W_l)
//   level_start_index   (L,)    int64       offset of level l in S
//   sampling_locations  (N, Lq, M, L, P, 2) normalised (x, y); outside [0, 1] reads zeros
//   attention_weights   (N, Lq, M, L, P)
//   output              (N, Lq, M * D)
#pragma once

#include <ATen/core/Tensor.h>

#include <tuple>

namespace mask2former {

// Ranks, sizes, dtypes, devices and contiguity of the five inputs; device independent and
// never reads tensor data. Raises c10::Error (ValueError / RuntimeError in Python) naming the
// offending argument and the expected shape. locations_arg names the fourth argument in the
// messages (ms_deform_attn_offsets passes its sampling_offsets, which have the same shape).
void check_ms_deform_attn_inputs(
    const at::Tensor& value,
    const at::Tensor& spatial_shapes,
    const at::Tensor& level_start_index,
    const at::Tensor& sampling_locations,
    const at::Tensor& attention_weights,
    const char* op_name,
    const char* locations_arg = "sampling_locations");

// The same for ms_deform_attn_offsets: sampling_offsets as sampling_locations above, and
// reference_points (N, Lq, L, 2) of value's dtype and device, with any strides.
void check_ms_deform_attn_offsets_inputs(
    const at::Tensor& value,
    const at::Tensor& spatial_shapes,
    const at::Tensor& level_start_index,
    const at::Tensor& reference_points,
    const at::Tensor& sampling_offsets,
    const at::Tensor& attention_weights,
    const char* op_name);

// Contents of spatial_shapes / level_start_index (host tensors): every level must lie inside
// [0, S) and the level sizes must sum to S. Kernels index value with these numbers, so they
// are checked before any memory is touched.
void check_level_metadata(
    const at::Tensor& spatial_shapes_cpu,
    const at::Tensor& level_start_index_cpu,
    int64_t S,
    const char* op_name);

at::Tensor ms_deform_attn_forward_cpu(
    const at::Tensor& value,
    const at::Tensor& spatial_shapes,
    const at::Tensor& level_start_index,
    const at::Tensor& sampling_locations,
    const at::Tensor& attention_weights);

// ms_deform_attn of the locations reference_points[:, :, None, :, None, :] + sampling_offsets /
// (W_l, H_l), computed in the kernel (inference only, no autograd). reference_points (N, Lq, L, 2)
// with any strides; sampling_offsets (N, Lq, M, L, P, 2) contiguous, in pixels of each level.
at::Tensor ms_deform_attn_offsets_forward_cpu(
    const at::Tensor& value,
    const at::Tensor& spatial_shapes,
    const at::Tensor& level_start_index,
    const at::Tensor& reference_points,
    const at::Tensor& sampling_offsets,
    const at::Tensor& attention_weights);

// Returns (grad_value, grad_sampling_locations, grad_attention_weights).
std::tuple<at::Tensor, at::Tensor, at::Tensor> ms_deform_attn_backward_cpu(
    const at::Tensor& grad_output,
    const at::Tensor& value,
    const at::Tensor& spatial_shapes,
    const at::Tensor& level_start_index,
    const at::Tensor& sampling_locations,
    const at::Tensor& attention_weights);

// Name of the instruction set the CPU kernels run with ("avx512", "avx2" or "generic").
std::string ms_deform_attn_cpu_isa();

// CUDA kernels (ms_deform_attn_cuda.cu, only in builds with CUDA). value, sampling_locations,
// attention_weights (and grad_output) on one CUDA device; spatial_shapes / level_start_index on
// the host (validated with check_level_metadata) or on that device (read by the kernel, no sync).
// dtypes float32, float64, float16, bfloat16.
at::Tensor ms_deform_attn_forward_cuda(
    const at::Tensor& value,
    const at::Tensor& spatial_shapes,
    const at::Tensor& level_start_index,
    const at::Tensor& sampling_locations,
    const at::Tensor& attention_weights);

std::tuple<at::Tensor, at::Tensor, at::Tensor> ms_deform_attn_backward_cuda(
    const at::Tensor& grad_output,
    const at::Tensor& value,
    const at::Tensor& spatial_shapes,
    const at::Tensor& level_start_index,
    const at::Tensor& sampling_locations,
    const at::Tensor& attention_weights);

}  // namespace mask2former

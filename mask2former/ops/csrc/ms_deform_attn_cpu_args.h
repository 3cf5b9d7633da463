// Raw-pointer view of one ms_deform_attn call, shared by every instruction-set variant of
// the CPU kernels (ms_deform_attn_cpu_kernel.h). See ms_deform_attn.h for the shapes.
#pragma once

#include <cstdint>

namespace mask2former {

template <typename T>
struct MSDAArgs {
  int64_t N, S, M, D, Lq, L, P;
  // value (and grad_value) element (n, s, m, d) is at
  //   n * batch_stride + m * head_stride + s * row_stride + d
  // i.e. rows of D channels are contiguous. Forward reads value as given, (N, S, M, D):
  // (S*M*D, D, M*D). Backward works on a heads-major copy, (N, M, S, D): (M*S*D, S*D, D).
  int64_t batch_stride, head_stride, row_stride;
  const T* value;
  const int64_t* spatial_shapes;     // (L, 2) as (H, W)
  const int64_t* level_start_index;  // (L,)
  const T* sampling_locations;       // (N, Lq, M, L, P, 2), contiguous
  const T* attention_weights;        // (N, Lq, M, L, P), contiguous
  // forward from offsets (ms_deform_attn_offsets), used instead of sampling_locations:
  //   location[n, q, m, l, p] = reference_points[n, q, l] + sampling_offsets[n, q, m, l, p] / (W_l, H_l)
  const T* reference_points = nullptr;  // (N, Lq, L, 2), any strides (in elements) ...
  int64_t ref_strides[4] = {0, 0, 0, 0};  // ... given here, e.g. 0 for an expanded dim
  const T* sampling_offsets = nullptr;  // (N, Lq, M, L, P, 2), contiguous
  // forward
  T* output = nullptr;  // (N, Lq, M, D), contiguous
  // backward
  const T* grad_output = nullptr;        // (N, Lq, M, D), contiguous
  T* grad_value = nullptr;               // laid out like value; zero on entry
  int64_t q_chunks = 1;                  // queries are split into this many slices ...
  T* grad_value_extra = nullptr;         // ... slices 1.. accumulate here (q_chunks - 1 copies)
  T* grad_sampling_locations = nullptr;  // (N, Lq, M, L, P, 2), contiguous
  T* grad_attention_weights = nullptr;   // (N, Lq, M, L, P), contiguous
};

}  // namespace mask2former

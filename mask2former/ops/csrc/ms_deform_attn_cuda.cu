// CUDA implementation of mask2former::ms_deform_attn and its backward.
//
// Shapes and sampling semantics: see ms_deform_attn.h (bilinear, zero padding, pixel
// coordinate = location * size - 0.5, i.e. grid_sample with align_corners=False).
// dtypes: float32, float64, float16, bfloat16; arithmetic is done in float32 (float64 for
// double inputs).
//
// Work decomposition
// ------------------
// A "row" is one (n, q, m) triple: it owns the D output channels out[n, q, m*D : (m+1)*D].
// The D channels are cut into `chunks` slices of VEC contiguous elements (VEC * sizeof(T) <= 16
// bytes, so one slice is one vector load), VEC being the widest that divides D and keeps the
// pointers aligned.
//
// Forward: one thread per (row, slice). Consecutive threads take consecutive slices of a row,
//   so the reads of one value row (the D channels of a corner pixel, contiguous in (N, S, M, D))
//   are coalesced; every thread of a row recomputes the same bilinear weights (a few flops,
//   their inputs are broadcast loads) and accumulates its slice over the L * P samples in
//   registers, then writes it once. No atomics, no shared memory except the level table.
//
// Backward: one group of G lanes of a warp per row, G = the power of two >= chunks, capped at 32
//   (lanes loop over slices when chunks > 32). Per sample every lane
//     * computes the bilinear corners (same as the forward),
//     * reads its slice of the four corner rows and forms partial dot products <g, v_c> with its
//       slice of grad_output (held in registers),
//     * adds a * w_c * g to its slice of grad_value[corner] with atomicAdd,
//   then the group sums three linear combinations of the partial dots with __shfl_xor_sync
//   (the attention-weight gradient and the two location gradients) and lane 0 writes them.
//   For a sample with attention weight a, corners c with bilinear weights w_c, cell fractions
//   (fx, fy) and level size (H, W):
//     grad_attention   = sum_c w_c <g, v_c>
//     grad_location.x  = a * W * ((1 - fy) (<g,v_01> - <g,v_00>) + fy (<g,v_11> - <g,v_10>))
//     grad_location.y  = a * H * ((1 - fx) (<g,v_10> - <g,v_00>) + fx (<g,v_11> - <g,v_01>))
//
// grad_value accumulation for float16 / bfloat16: into a zeroed float32 buffer with float32
// atomics, cast to the input dtype at the end. Adding straight into half / bfloat16 storage
// (atomicAdd on __half2 / __nv_bfloat162) would round after every one of the many additions a
// value row receives (up to 4 corners x every query and point that lands near that pixel):
// with bfloat16's 8-bit mantissa the error grows with the number of contributions, and the
// result depends on their (atomic, hence arbitrary) order far more than in float32. The float32 buffer costs 4 bytes
// per value element of temporary memory and one cast kernel, and gives gradients as accurate
// as the float32 path; on sm_90+ the float32 atomics are issued as 8/16-byte vector atomics
// (atomicAdd(float2*/float4*)). float32 / float64 inputs add into grad_value directly.
// Atomics make grad_value non-deterministic in the last bits (summation order), like any
// atomics-based scatter; the other two gradients are deterministic.
//
// Level metadata (spatial_shapes, level_start_index)
// --------------------------------------------------
// Either on the host or on value's device. Host tensors are validated on the host
// (check_level_metadata, clear errors) and passed by value in the kernel arguments (up to
// kInlineLevels levels; more are copied to the device asynchronously through pinned memory).
// Device tensors are read by the kernel itself: no device->host copy and no stream
// synchronisation. They cannot be validated without a sync, so each block checks every level
// when it loads the table into shared memory, and a level that does not fit inside value's S
// positions (or has a non-positive size) is treated as empty: its samples read zeros and get
// zero gradients instead of reading out of bounds. (The Python entry point still validates
// device metadata unless the compiled CUDA op takes the call; see ms_deform_attn.py.)
//
// Headers: only c10/cuda and the CUDA runtime, not ATen/cuda/CUDAContext.h, which pulls in the
// cuBLAS / cuSPARSE / cuSOLVER headers that a minimal CUDA toolkit (just nvcc + cudart) lacks.
// The stream is c10::cuda::getCurrentCUDAStream(), the function at::cuda::getCurrentCUDAStream
// names.
//
// Sizes: every index and offset is int64 and the kernels use grid-stride loops, so there is no
// limit on N, Lq, S or the batch beyond memory.
#include "ms_deform_attn.h"

#include <ATen/Dispatch.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/zeros.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAFunctions.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Exception.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include <cuda_runtime.h>

#include <algorithm>
#include <array>
#include <atomic>
#include <cstdint>
#include <type_traits>

namespace mask2former {
namespace {

constexpr int kThreads = 256;
// Levels passed by value in the kernel arguments when the level tensors are on the host.
constexpr int kInlineLevels = 16;
// Upper bound on L (the level table is staged in shared memory, 24 bytes per level).
constexpr int64_t kMaxLevels = 1024;

// The level table as the kernels receive it: either inline values or device pointers.
struct LevelTable {
  int64_t L;
  const int64_t* shapes;  // (L, 2) on the device, or nullptr: use the inline arrays
  const int64_t* starts;  // (L,) on the device
  int64_t h[kInlineLevels];
  int64_t w[kInlineLevels];
  int64_t start[kInlineLevels];
};

// Copies the level table into shared memory as (H, W, start) triples, blanking out levels that
// do not fit in [0, S) (see the header comment). Must be reached by every thread of the block.
__device__ __forceinline__ void stage_levels(const LevelTable& t, int64_t S, int64_t* table) {
  for (int64_t l = threadIdx.x; l < t.L; l += blockDim.x) {
    int64_t h, w, st;
    if (t.shapes != nullptr) {
      h = t.shapes[2 * l];
      w = t.shapes[2 * l + 1];
      st = t.starts[l];
    } else {
      h = t.h[l];
      w = t.w[l];
      st = t.start[l];
    }
    const bool ok = h > 0 && w > 0 && st >= 0 && st <= S && h <= (S - st) / w;
    table[3 * l] = ok ? h : 0;
    table[3 * l + 1] = ok ? w : 0;
    table[3 * l + 2] = ok ? st : 0;
  }
  __syncthreads();
}

template <typename T>
struct Acc {
  using type = float;
};
template <>
struct Acc<double> {
  using type = double;
};

// VEC contiguous elements moved with one load / store instruction.
template <typename T, int VEC>
struct alignas(sizeof(T) * VEC) Pack {
  T v[VEC];
};

template <typename T, int VEC, typename A>
__device__ __forceinline__ void load_pack(const T* p, A (&out)[VEC]) {
  const Pack<T, VEC> pk = *reinterpret_cast<const Pack<T, VEC>*>(p);
#pragma unroll
  for (int k = 0; k < VEC; ++k) out[k] = static_cast<A>(pk.v[k]);
}

template <typename T, int VEC, typename A>
__device__ __forceinline__ void store_pack(T* p, const A (&in)[VEC]) {
  Pack<T, VEC> pk;
#pragma unroll
  for (int k = 0; k < VEC; ++k) pk.v[k] = static_cast<T>(in[k]);
  *reinterpret_cast<Pack<T, VEC>*>(p) = pk;
}

// dst[0:VEC] += src[0:VEC] atomically per element (vector atomics where the GPU has them);
// dst is aligned to VEC floats (the buffer is freshly allocated and offsets are multiples of VEC).
template <int VEC>
__device__ __forceinline__ void atomic_add_slice(float* dst, const float (&src)[VEC]) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  constexpr bool kVector = VEC % 2 == 0;
#else
  constexpr bool kVector = false;
#endif
  if constexpr (kVector && VEC % 4 == 0) {
#pragma unroll
    for (int k = 0; k < VEC; k += 4)
      atomicAdd(reinterpret_cast<float4*>(dst + k), make_float4(src[k], src[k + 1], src[k + 2], src[k + 3]));
  } else if constexpr (kVector) {
#pragma unroll
    for (int k = 0; k < VEC; k += 2) atomicAdd(reinterpret_cast<float2*>(dst + k), make_float2(src[k], src[k + 1]));
  } else {
#pragma unroll
    for (int k = 0; k < VEC; ++k) atomicAdd(dst + k, src[k]);
  }
}

template <int VEC>
__device__ __forceinline__ void atomic_add_slice(double* dst, const double (&src)[VEC]) {
#pragma unroll
  for (int k = 0; k < VEC; ++k) atomicAdd(dst + k, src[k]);
}

// One bilinear sample: the in-bounds corners and their weights. Returns false when the sample
// lies entirely outside its level (then it contributes nothing). Corner order: (y0, x0),
// (y0, x0 + 1), (y0 + 1, x0), (y0 + 1, x0 + 1); row[c] is the pixel index inside S.
template <typename A>
struct Sample {
  int64_t row[4];
  A w[4];
  bool ok[4];
  A fx, fy;
};

template <typename A>
__device__ __forceinline__ bool locate(A x, A y, int64_t H, int64_t W, int64_t start, Sample<A>& s) {
  const A fw = static_cast<A>(W), fh = static_cast<A>(H);
  const A px = x * fw - A(0.5);
  const A py = y * fh - A(0.5);
  // Also false for NaN, and keeps the float -> integer conversion in range. H = W = 0 (empty
  // or blanked-out level) always fails.
  if (!(px > A(-1) && py > A(-1) && px < fw && py < fh)) return false;
  const A x0f = floor(px), y0f = floor(py);
  const int64_t x0 = static_cast<int64_t>(x0f), y0 = static_cast<int64_t>(y0f);
  const A fx = px - x0f, fy = py - y0f;
  s.fx = fx;
  s.fy = fy;
  s.w[0] = (A(1) - fy) * (A(1) - fx);
  s.w[1] = (A(1) - fy) * fx;
  s.w[2] = fy * (A(1) - fx);
  s.w[3] = fy * fx;
  const bool x0_in = x0 >= 0, x1_in = x0 + 1 < W, y0_in = y0 >= 0, y1_in = y0 + 1 < H;
  s.ok[0] = y0_in && x0_in;
  s.ok[1] = y0_in && x1_in;
  s.ok[2] = y1_in && x0_in;
  s.ok[3] = y1_in && x1_in;
  const int64_t base = start + y0 * W + x0;
  s.row[0] = base;
  s.row[1] = base + 1;
  s.row[2] = base + W;
  s.row[3] = base + W + 1;
  return true;
}

struct Dims {
  int64_t S, M, D, Lq, L, P;
  int64_t rows;    // N * Lq * M
  int64_t chunks;  // D / VEC
};

// ------------------------------------------------------------------------------------ forward
template <typename T, int VEC>
__global__ void __launch_bounds__(kThreads) msda_forward_kernel(
    const T* __restrict__ value,
    const T* __restrict__ locations,
    const T* __restrict__ weights,
    T* __restrict__ output,
    const LevelTable levels,
    const Dims d) {
  using A = typename Acc<T>::type;
  extern __shared__ int64_t level_table[];
  stage_levels(levels, d.S, level_table);

  const int64_t LP = d.L * d.P;
  const int64_t pixel_stride = d.M * d.D;  // between value[n, s, m] and value[n, s + 1, m]
  const int64_t total = d.rows * d.chunks;
  const int64_t step = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t idx = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; idx < total; idx += step) {
    const int64_t row = idx / d.chunks;
    const int64_t channel = (idx - row * d.chunks) * VEC;
    const int64_t m = row % d.M;
    const int64_t n = row / (d.Lq * d.M);
    // value[n, 0, m, channel]
    const T* head = value + (n * d.S * d.M + m) * d.D + channel;
    const T* loc = locations + row * LP * 2;
    const T* aw = weights + row * LP;

    A acc[VEC];
#pragma unroll
    for (int k = 0; k < VEC; ++k) acc[k] = A(0);

    for (int64_t l = 0; l < d.L; ++l) {
      const int64_t H = level_table[3 * l], W = level_table[3 * l + 1], start = level_table[3 * l + 2];
      for (int64_t p = 0; p < d.P; ++p) {
        const int64_t i = l * d.P + p;
        Sample<A> s;
        if (!locate(static_cast<A>(loc[2 * i]), static_cast<A>(loc[2 * i + 1]), H, W, start, s)) continue;
        const A a = static_cast<A>(aw[i]);
#pragma unroll
        for (int c = 0; c < 4; ++c) {
          if (!s.ok[c]) continue;
          A v[VEC];
          load_pack<T, VEC>(head + s.row[c] * pixel_stride, v);
          const A wc = a * s.w[c];
#pragma unroll
          for (int k = 0; k < VEC; ++k) acc[k] += wc * v[k];
        }
      }
    }
    store_pack<T, VEC>(output + row * d.D + channel, acc);
  }
}

// ----------------------------------------------------------------------------------- backward
// GV: element type of the grad_value accumulation buffer (float for float / half / bfloat16,
// double for double). kOneSlice: chunks <= G, every lane owns at most one slice, whose
// grad_output values then stay in registers for the whole row.
template <typename T, typename GV, int VEC, bool kOneSlice>
__global__ void __launch_bounds__(kThreads) msda_backward_kernel(
    const T* __restrict__ grad_output,
    const T* __restrict__ value,
    const T* __restrict__ locations,
    const T* __restrict__ weights,
    GV* __restrict__ grad_value,
    T* __restrict__ grad_locations,
    T* __restrict__ grad_weights,
    const LevelTable levels,
    const Dims d,
    const int log2_group) {
  using A = typename Acc<T>::type;
  static_assert(std::is_same<A, GV>::value, "accumulate grad_value in the arithmetic type");
  extern __shared__ int64_t level_table[];
  stage_levels(levels, d.S, level_table);

  const int group = 1 << log2_group;  // lanes per row, a power of two <= 32
  const int lane = threadIdx.x & (group - 1);
  const int warp_lane = threadIdx.x & 31;
  // Lanes of this warp that form our group (blockDim.x is a multiple of 32).
  const unsigned mask = group == 32 ? 0xffffffffu : (((1u << group) - 1u) << (warp_lane & ~(group - 1)));

  const int64_t LP = d.L * d.P;
  const int64_t pixel_stride = d.M * d.D;
  const int64_t step = static_cast<int64_t>(gridDim.x) * blockDim.x;  // a multiple of group
  for (int64_t idx = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;; idx += step) {
    const int64_t row = idx >> log2_group;  // the same for the whole group
    if (row >= d.rows) break;
    const int64_t m = row % d.M;
    const int64_t n = row / (d.Lq * d.M);
    const int64_t head_offset = (n * d.S * d.M + m) * d.D;  // element (n, 0, m, 0)
    const T* vhead = value + head_offset;
    GV* gvhead = grad_value + head_offset;
    const T* g_row = grad_output + row * d.D;
    const T* loc = locations + row * LP * 2;
    const T* aw = weights + row * LP;
    T* gloc = grad_locations + row * LP * 2;
    T* gaw = grad_weights + row * LP;

    A g_reg[VEC];
    const bool has_slice = lane < d.chunks;
    if constexpr (kOneSlice) {
      if (has_slice) {
        load_pack<T, VEC>(g_row + lane * VEC, g_reg);
      } else {
#pragma unroll
        for (int k = 0; k < VEC; ++k) g_reg[k] = A(0);
      }
    }

    for (int64_t l = 0; l < d.L; ++l) {
      const int64_t H = level_table[3 * l], W = level_table[3 * l + 1], start = level_table[3 * l + 2];
      for (int64_t p = 0; p < d.P; ++p) {
        const int64_t i = l * d.P + p;
        Sample<A> s;
        // Uniform across the group: all its lanes read the same location.
        if (!locate(static_cast<A>(loc[2 * i]), static_cast<A>(loc[2 * i + 1]), H, W, start, s)) {
          if (lane == 0) {
            gloc[2 * i] = T(0);
            gloc[2 * i + 1] = T(0);
            gaw[i] = T(0);
          }
          continue;
        }
        const A a = static_cast<A>(aw[i]);
        A dot[4] = {A(0), A(0), A(0), A(0)};
        for (int64_t slice = lane; slice < d.chunks; slice += group) {
          const int64_t channel = slice * VEC;
          A g[VEC];
          if constexpr (kOneSlice) {
#pragma unroll
            for (int k = 0; k < VEC; ++k) g[k] = g_reg[k];
          } else {
            load_pack<T, VEC>(g_row + channel, g);
          }
#pragma unroll
          for (int c = 0; c < 4; ++c) {
            if (!s.ok[c]) continue;
            const int64_t off = s.row[c] * pixel_stride + channel;
            A v[VEC];
            load_pack<T, VEC>(vhead + off, v);
            const A wc = a * s.w[c];
            A add[VEC];
#pragma unroll
            for (int k = 0; k < VEC; ++k) {
              dot[c] += g[k] * v[k];
              add[k] = wc * g[k];
            }
            atomic_add_slice<VEC>(gvhead + off, add);
          }
          if constexpr (kOneSlice) break;  // lane + group >= chunks
        }
        // Three linear combinations of the dots, summed over the group.
        A r_w = s.w[0] * dot[0] + s.w[1] * dot[1] + s.w[2] * dot[2] + s.w[3] * dot[3];
        A r_x = (A(1) - s.fy) * (dot[1] - dot[0]) + s.fy * (dot[3] - dot[2]);
        A r_y = (A(1) - s.fx) * (dot[2] - dot[0]) + s.fx * (dot[3] - dot[1]);
        for (int offset = group >> 1; offset > 0; offset >>= 1) {
          r_w += __shfl_xor_sync(mask, r_w, offset, group);
          r_x += __shfl_xor_sync(mask, r_x, offset, group);
          r_y += __shfl_xor_sync(mask, r_y, offset, group);
        }
        if (lane == 0) {
          gaw[i] = static_cast<T>(r_w);
          gloc[2 * i] = static_cast<T>(a * static_cast<A>(W) * r_x);
          gloc[2 * i + 1] = static_cast<T>(a * static_cast<A>(H) * r_y);
        }
      }
    }
  }
}

// ------------------------------------------------------------------------------------ host side
bool aligned(const void* p, int64_t bytes) { return reinterpret_cast<uintptr_t>(p) % bytes == 0; }

// Widest VEC (elements per slice, at most 16 bytes) that divides D and suits every pointer.
template <typename T>
int pick_vec(int64_t D, std::initializer_list<const void*> ptrs) {
  int vec = static_cast<int>(16 / sizeof(T));
  while (vec > 1) {
    bool ok = D % vec == 0;
    for (const void* p : ptrs) ok = ok && aligned(p, vec * static_cast<int64_t>(sizeof(T)));
    if (ok) break;
    vec /= 2;
  }
  return vec;
}

int64_t multiprocessors() {
  static std::array<std::atomic<int>, 64> cache{};  // 0 = not queried yet
  const int dev = c10::cuda::current_device();
  if (dev >= 0 && dev < static_cast<int>(cache.size())) {
    if (const int n = cache[dev].load(std::memory_order_relaxed)) return n;
  }
  int n = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&n, cudaDevAttrMultiProcessorCount, dev));
  if (dev >= 0 && dev < static_cast<int>(cache.size())) cache[dev].store(n, std::memory_order_relaxed);
  return n;
}

int64_t grid_for(int64_t threads) {
  const int64_t sms = multiprocessors();
  // Enough blocks for a few waves at full occupancy; the grid-stride loops cover the rest.
  const int64_t cap = sms * (2048 / kThreads) * 4;
  return std::max<int64_t>(1, std::min<int64_t>((threads + kThreads - 1) / kThreads, cap));
}

void check_cuda(const at::Tensor& t, const at::Device& device, const char* arg, const char* op_name) {
  TORCH_CHECK(t.device() == device, op_name, ": ", arg, " must be on ", device, " (the device of value); got ",
              t.device());
}

// Validates everything, and builds the level table (keeping any device copy alive in `keep`).
LevelTable prepare(
    const at::Tensor& value,
    const at::Tensor& spatial_shapes,
    const at::Tensor& level_start_index,
    const at::Tensor& sampling_locations,
    const at::Tensor& attention_weights,
    const char* op_name,
    at::Tensor keep[2]) {
  check_ms_deform_attn_inputs(value, spatial_shapes, level_start_index, sampling_locations, attention_weights,
                              op_name);
  TORCH_CHECK(value.is_cuda(), op_name, ": value must be a CUDA tensor for the CUDA kernel; got ", value.device());
  const at::Device device = value.device();
  check_cuda(sampling_locations, device, "sampling_locations", op_name);
  check_cuda(attention_weights, device, "attention_weights", op_name);
  const bool host_levels = spatial_shapes.is_cpu() && level_start_index.is_cpu();
  if (!host_levels) {
    TORCH_CHECK(spatial_shapes.device() == device && level_start_index.device() == device, op_name,
                ": spatial_shapes and level_start_index must both be on the CPU or both on ", device,
                " (the device of value); got ", spatial_shapes.device(), " and ", level_start_index.device());
  }
  const int64_t L = spatial_shapes.size(0);
  TORCH_CHECK_VALUE(L <= kMaxLevels, op_name, ": at most ", kMaxLevels, " levels are supported; got ", L);

  LevelTable t{};
  t.L = L;
  if (host_levels) {
    check_level_metadata(spatial_shapes, level_start_index, value.size(1), op_name);
    if (L <= kInlineLevels) {
      const int64_t* hw = spatial_shapes.const_data_ptr<int64_t>();
      const int64_t* st = level_start_index.const_data_ptr<int64_t>();
      for (int64_t l = 0; l < L; ++l) {
        t.h[l] = hw[2 * l];
        t.w[l] = hw[2 * l + 1];
        t.start[l] = st[l];
      }
      t.shapes = nullptr;
      t.starts = nullptr;
      return t;
    }
    // Many levels: asynchronous copy through pinned memory (the caching host allocator keeps
    // the staging buffer alive until the copy has run), no synchronisation.
    keep[0] = spatial_shapes.pin_memory().to(device, /*non_blocking=*/true);
    keep[1] = level_start_index.pin_memory().to(device, /*non_blocking=*/true);
  } else {
    keep[0] = spatial_shapes;
    keep[1] = level_start_index;
  }
  t.shapes = keep[0].const_data_ptr<int64_t>();
  t.starts = keep[1].const_data_ptr<int64_t>();
  return t;
}

Dims make_dims(const at::Tensor& value, const at::Tensor& sampling_locations, int vec) {
  Dims d;
  d.S = value.size(1);
  d.M = value.size(2);
  d.D = value.size(3);
  d.Lq = sampling_locations.size(1);
  d.L = sampling_locations.size(3);
  d.P = sampling_locations.size(4);
  d.rows = value.size(0) * d.Lq * d.M;
  d.chunks = d.D / vec;
  return d;
}

size_t table_bytes(int64_t L) { return static_cast<size_t>(3 * L) * sizeof(int64_t); }

template <typename T, int VEC>
void launch_forward(const at::Tensor& value, const at::Tensor& loc, const at::Tensor& attw, at::Tensor& out,
                    const LevelTable& t) {
  const Dims d = make_dims(value, loc, VEC);
  const int64_t total = d.rows * d.chunks;
  if (total == 0) return;
  msda_forward_kernel<T, VEC><<<grid_for(total), kThreads, table_bytes(d.L), c10::cuda::getCurrentCUDAStream()>>>(
      value.const_data_ptr<T>(), loc.const_data_ptr<T>(), attw.const_data_ptr<T>(), out.mutable_data_ptr<T>(), t,
      d);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <typename T, typename GV, int VEC>
void launch_backward(const at::Tensor& grad_output, const at::Tensor& value, const at::Tensor& loc,
                     const at::Tensor& attw, at::Tensor& grad_value_acc, at::Tensor& grad_loc, at::Tensor& grad_attw,
                     const LevelTable& t) {
  const Dims d = make_dims(value, loc, VEC);
  if (d.rows == 0) return;
  int log2_group = 0;
  while ((int64_t{1} << log2_group) < d.chunks && log2_group < 5) ++log2_group;
  const int64_t threads = d.rows << log2_group;
  const bool one_slice = d.chunks <= (int64_t{1} << log2_group);
  auto kernel = one_slice ? msda_backward_kernel<T, GV, VEC, true> : msda_backward_kernel<T, GV, VEC, false>;
  kernel<<<grid_for(threads), kThreads, table_bytes(d.L), c10::cuda::getCurrentCUDAStream()>>>(
      grad_output.const_data_ptr<T>(), value.const_data_ptr<T>(), loc.const_data_ptr<T>(), attw.const_data_ptr<T>(),
      grad_value_acc.mutable_data_ptr<GV>(), grad_loc.mutable_data_ptr<T>(), grad_attw.mutable_data_ptr<T>(), t, d,
      log2_group);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// Calls fn.template operator()<VEC>() for the runtime vec, instantiating only VEC values whose
// slice fits in 16 bytes for T.
template <typename T, typename Fn>
void with_vec(int vec, Fn&& fn) {
  switch (vec) {
    case 8:
      if constexpr (sizeof(T) <= 2) return fn(std::integral_constant<int, 8>{});
      break;
    case 4:
      if constexpr (sizeof(T) <= 4) return fn(std::integral_constant<int, 4>{});
      break;
    case 2:
      return fn(std::integral_constant<int, 2>{});
    default:
      return fn(std::integral_constant<int, 1>{});
  }
  TORCH_INTERNAL_ASSERT(false, "unsupported vector width ", vec);
}

}  // namespace

at::Tensor ms_deform_attn_forward_cuda(
    const at::Tensor& value,
    const at::Tensor& spatial_shapes,
    const at::Tensor& level_start_index,
    const at::Tensor& sampling_locations,
    const at::Tensor& attention_weights) {
  constexpr const char* op = "mask2former::ms_deform_attn";
  at::Tensor keep[2];
  const LevelTable t =
      prepare(value, spatial_shapes, level_start_index, sampling_locations, attention_weights, op, keep);
  const c10::cuda::CUDAGuard guard(value.device());
  const int64_t N = value.size(0), M = value.size(2), D = value.size(3);
  const int64_t Lq = sampling_locations.size(1);
  auto output = at::empty({N, Lq, M * D}, value.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, value.scalar_type(), "ms_deform_attn_forward_cuda", [&] {
    const int vec = pick_vec<scalar_t>(D, {value.const_data_ptr(), output.const_data_ptr()});
    with_vec<scalar_t>(vec, [&](auto v) {
      launch_forward<scalar_t, decltype(v)::value>(value, sampling_locations, attention_weights, output, t);
    });
  });
  return output;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> ms_deform_attn_backward_cuda(
    const at::Tensor& grad_output,
    const at::Tensor& value,
    const at::Tensor& spatial_shapes,
    const at::Tensor& level_start_index,
    const at::Tensor& sampling_locations,
    const at::Tensor& attention_weights) {
  constexpr const char* op = "mask2former::ms_deform_attn_backward";
  at::Tensor keep[2];
  const LevelTable t =
      prepare(value, spatial_shapes, level_start_index, sampling_locations, attention_weights, op, keep);
  const int64_t N = value.size(0), M = value.size(2), D = value.size(3);
  const int64_t Lq = sampling_locations.size(1);
  TORCH_CHECK_VALUE(grad_output.sizes() == at::IntArrayRef({N, Lq, M * D}), op,
                    ": grad_output must be (N, Lq, M * D) = [", N, ", ", Lq, ", ", M * D, "]; got shape ",
                    grad_output.sizes());
  TORCH_CHECK_VALUE(grad_output.scalar_type() == value.scalar_type(), op, ": grad_output must have dtype ",
                    value.scalar_type(), "; got ", grad_output.scalar_type());
  check_cuda(grad_output, value.device(), "grad_output", op);
  TORCH_CHECK(grad_output.is_contiguous(), op, ": grad_output must be contiguous (call .contiguous()); got strides ",
              grad_output.strides());
  const c10::cuda::CUDAGuard guard(value.device());

  // float32 accumulation buffer for half / bfloat16 (see the header comment).
  const bool reduced = value.scalar_type() == at::kHalf || value.scalar_type() == at::kBFloat16;
  at::Tensor grad_value_acc =
      at::zeros(value.sizes(), value.options().dtype(reduced ? at::kFloat : value.scalar_type()));
  auto grad_locations = at::empty_like(sampling_locations);
  auto grad_weights = at::empty_like(attention_weights);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, value.scalar_type(), "ms_deform_attn_backward_cuda", [&] {
    using GV = typename Acc<scalar_t>::type;
    const int vec = pick_vec<scalar_t>(D, {value.const_data_ptr(), grad_output.const_data_ptr()});
    with_vec<scalar_t>(vec, [&](auto v) {
      launch_backward<scalar_t, GV, decltype(v)::value>(grad_output, value, sampling_locations, attention_weights,
                                                        grad_value_acc, grad_locations, grad_weights, t);
    });
  });
  at::Tensor grad_value = reduced ? grad_value_acc.to(value.scalar_type()) : grad_value_acc;
  return {grad_value, grad_locations, grad_weights};
}

}  // namespace mask2former

TORCH_LIBRARY_IMPL(mask2former, CUDA, m) {
  m.impl("ms_deform_attn", &mask2former::ms_deform_attn_forward_cuda);
  m.impl("ms_deform_attn_backward", &mask2former::ms_deform_attn_backward_cuda);
}

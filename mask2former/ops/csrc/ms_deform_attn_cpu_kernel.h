// CPU kernels of multi-scale deformable attention, written against raw pointers only.
//
// NO include guard on purpose: ms_deform_attn_cpu.cpp includes this file once per instruction
// set, each time inside its own namespace and under a `#pragma GCC target(...)`, so the same
// source is compiled for the portable baseline and for AVX2 / AVX-512 and picked at run time.
// It must therefore not include headers itself (the includer provides <cmath>, <cstdint>,
// <vector> and ms_deform_attn_cpu_args.h before opening the namespace).
//
// Vectorisation: every inner loop runs over the D channels of one (n, s, m) row of value,
// which are contiguous. For the common head sizes (compile-time D = DC, a multiple of the
// vector width) the rows are handled as explicit GCC/Clang vectors of M2F_VEC_BYTES bytes
// (set by the includer: 16 for the SSE2 baseline, 32 for AVX2, 64 for AVX-512) with the
// accumulators in registers. Left to itself, GCC -O3 unroll-and-jammed the loop over corners
// into a scalar loop here, which made the forward ~4x slower. Other D (and compilers without vector
// extensions) use plain loops with `#pragma omp simd`.

#if defined(__GNUC__) || defined(__clang__)
template <typename T, int Bytes>
struct VecOf {
  typedef T type __attribute__((vector_size(Bytes)));
  static constexpr int kWidth = Bytes / sizeof(T);
  static inline type load(const T* p) {
    type v;
    __builtin_memcpy(&v, p, sizeof(type));  // unaligned load
    return v;
  }
  static inline void store(T* p, type v) { __builtin_memcpy(p, &v, sizeof(type)); }
  static inline type splat(T x) { return type{} + x; }
  // Horizontal sum as a tree (add the two halves until 16 bytes are left), not a serial chain.
  static inline T sum(type v) {
    if constexpr (Bytes > 16) {
      using Half = VecOf<T, Bytes / 2>;
      typename Half::type lo, hi;
      __builtin_memcpy(&lo, &v, sizeof(lo));
      __builtin_memcpy(&hi, reinterpret_cast<const char*>(&v) + sizeof(lo), sizeof(hi));
      return Half::sum(lo + hi);
    } else {
      T s = T(0);
      for (int i = 0; i < kWidth; ++i) s += v[i];
      return s;
    }
  }
};
template <typename T>
using Vec = VecOf<T, M2F_VEC_BYTES>;
// Whether rows of DC channels are handled as whole vectors.
template <typename T, int DC>
constexpr bool use_vec() { return DC > 0 && DC % Vec<T>::kWidth == 0; }
#else
template <typename T, int DC>
constexpr bool use_vec() { return false; }
#endif

// One bilinear sample split into its (up to) four in-bounds corners.
//   off[c]  element offset of the corner row relative to value[n, 0, m, 0]
//   w[c]    bilinear weight of the corner (without the attention weight)
//   ok[c]   whether the corner lies inside the level (zero padding outside)
// Corner order: (y0, x0), (y0, x0 + 1), (y0 + 1, x0), (y0 + 1, x0 + 1).
template <typename T>
struct Corners {
  int64_t off[4];
  T w[4];
  bool ok[4];
  T fx, fy;  // fractional position inside the cell, for the location gradient
  T scale_x, scale_y;  // W and H of the level (d px / d x, d py / d y); set by the backward
};

// Returns false when the sample is entirely outside the level (its value and gradients are 0).
// Pixel coordinates follow grid_sample(align_corners=False): px = x * W - 0.5.
template <typename T>
inline bool make_corners(T x, T y, int64_t H, int64_t W, int64_t start, int64_t row_stride, Corners<T>& c) {
  const T px = x * static_cast<T>(W) - T(0.5);
  const T py = y * static_cast<T>(H) - T(0.5);
  // Written so that NaN fails too; also keeps the float -> int conversion below in range.
  if (!(px > T(-1) && py > T(-1) && px < static_cast<T>(W) && py < static_cast<T>(H))) return false;
  const T x0f = std::floor(px), y0f = std::floor(py);
  const int64_t x0 = static_cast<int64_t>(x0f), y0 = static_cast<int64_t>(y0f);
  const T fx = px - x0f, fy = py - y0f;
  c.fx = fx;
  c.fy = fy;
  c.w[0] = (T(1) - fy) * (T(1) - fx);
  c.w[1] = (T(1) - fy) * fx;
  c.w[2] = fy * (T(1) - fx);
  c.w[3] = fy * fx;
  const bool x0_in = x0 >= 0, x1_in = x0 + 1 < W, y0_in = y0 >= 0, y1_in = y0 + 1 < H;
  c.ok[0] = y0_in && x0_in;
  c.ok[1] = y0_in && x1_in;
  c.ok[2] = y1_in && x0_in;
  c.ok[3] = y1_in && x1_in;
  const int64_t base = (start + y0 * W + x0) * row_stride;
  c.off[0] = base;
  c.off[1] = base + row_stride;
  c.off[2] = base + W * row_stride;
  c.off[3] = base + (W + 1) * row_stride;
  return true;
}

// out[0:D] = sum_j wts[j] * vbase[offs[j] : offs[j] + D]
template <typename T, int DC>
inline void accumulate_rows(const T* __restrict vbase, const int64_t* offs, const T* wts, int64_t k,
                            T* __restrict out, int64_t D_rt) {
#if defined(__GNUC__) || defined(__clang__)
  if constexpr (use_vec<T, DC>()) {
    using V = Vec<T>;
    constexpr int NV = DC / V::kWidth;
    typename V::type acc[NV];
    for (int i = 0; i < NV; ++i) acc[i] = V::splat(T(0));
    for (int64_t j = 0; j < k; ++j) {
      const T* v = vbase + offs[j];
      const typename V::type w = V::splat(wts[j]);
      for (int i = 0; i < NV; ++i) acc[i] += w * V::load(v + i * V::kWidth);
    }
    for (int i = 0; i < NV; ++i) V::store(out + i * V::kWidth, acc[i]);
    return;
  }
#endif
  const int64_t D = DC > 0 ? DC : D_rt;
  // Accumulate in the output row itself (it stays in L1).
#pragma omp simd
  for (int64_t d = 0; d < D; ++d) out[d] = T(0);
  for (int64_t j = 0; j < k; ++j) {
    const T* __restrict v = vbase + offs[j];
    const T w = wts[j];
#pragma omp simd
    for (int64_t d = 0; d < D; ++d) out[d] += w * v[d];
  }
}

// ---------------------------------------------------------------------------------------------
// Forward. Work items are (n, q) pairs, item = n * Lq + q; each writes out[n, q, :, :] only.
// For every head the in-bounds corners of its L * P samples are collected first (scalar
// index/weight arithmetic), then accumulated row by row (vector FMAs over D).
//
// kOffsets (ms_deform_attn_offsets): the locations are not read from memory but computed per
// head as reference + offset / (W_l, H_l), the expression the Python side would evaluate with
// torch: an IEEE division (not a multiplication by the reciprocal, which rounds differently)
// and then an addition, each rounded to T. Everything after that is this same code, so the
// output is bitwise what ms_deform_attn gives for torch's locations, without the two
// (N, Lq, M, L, P, 2) temporaries and their passes over memory.

template <typename T, int DC, bool kOffsets>
void forward_items(const MSDAArgs<T>& a, int64_t begin, int64_t end) {
  const int64_t D = DC > 0 ? DC : a.D;
  const int64_t M = a.M, L = a.L, P = a.P, LP = a.L * a.P;
  const int64_t row_stride = a.row_stride;
  std::vector<int64_t> offs(static_cast<size_t>(LP * 4));
  std::vector<T> wts(static_cast<size_t>(LP * 4));
  // kOffsets: one head's offsets are (L, P, 2); the divisor and the reference coordinate of each
  // of those 2LP numbers are laid out the same way, so the locations are one flat loop that
  // vectorises.
  const size_t loc_len = kOffsets ? static_cast<size_t>(LP * 2) : 0;
  std::vector<T> divisor(loc_len), ref_rep(loc_len), loc_buf(loc_len);
  if constexpr (kOffsets) {
    for (int64_t l = 0; l < L; ++l) {
      for (int64_t p = 0; p < P; ++p) {
        divisor[2 * (l * P + p)] = static_cast<T>(a.spatial_shapes[2 * l + 1]);  // x / W
        divisor[2 * (l * P + p) + 1] = static_cast<T>(a.spatial_shapes[2 * l]);  // y / H
      }
    }
  }
  for (int64_t item = begin; item < end; ++item) {
    const int64_t n = item / a.Lq;
    if constexpr (kOffsets) {
      const int64_t q = item - n * a.Lq;
      const int64_t* st = a.ref_strides;
      const T* ref = a.reference_points + n * st[0] + q * st[1];
      for (int64_t l = 0; l < L; ++l) {
        const T rx = ref[l * st[2]], ry = ref[l * st[2] + st[3]];
        for (int64_t p = 0; p < P; ++p) {
          ref_rep[2 * (l * P + p)] = rx;
          ref_rep[2 * (l * P + p) + 1] = ry;
        }
      }
    }
    for (int64_t m = 0; m < M; ++m) {
      const int64_t row = item * M + m;  // index of (n, q, m)
      const T* loc;
      if constexpr (kOffsets) {
        const T* __restrict off = a.sampling_offsets + row * LP * 2;
        const T* __restrict rr = ref_rep.data();
        const T* __restrict dv = divisor.data();
        T* __restrict lb = loc_buf.data();
        for (int64_t i = 0; i < 2 * LP; ++i) lb[i] = rr[i] + off[i] / dv[i];
        loc = lb;
      } else {
        loc = a.sampling_locations + row * LP * 2;
      }
      const T* aw = a.attention_weights + row * LP;
      const T* __restrict vbase = a.value + n * a.batch_stride + m * a.head_stride;
      int64_t k = 0;
      for (int64_t l = 0; l < L; ++l) {
        const int64_t H = a.spatial_shapes[2 * l], W = a.spatial_shapes[2 * l + 1];
        const int64_t start = a.level_start_index[l];
        for (int64_t p = 0; p < P; ++p) {
          const int64_t i = l * P + p;
          Corners<T> c;
          if (!make_corners(loc[2 * i], loc[2 * i + 1], H, W, start, row_stride, c)) continue;
          for (int j = 0; j < 4; ++j) {
            if (c.ok[j]) {
              offs[k] = c.off[j];
              wts[k] = aw[i] * c.w[j];
              ++k;
            }
          }
        }
      }
      T* __restrict out = a.output + row * D;
      accumulate_rows<T, DC>(vbase, offs.data(), wts.data(), k, out, D);
    }
  }
}

// ---------------------------------------------------------------------------------------------
// Backward. Work items are (chunk k, n, m) triples, item = (k * N + n) * M + m: item handles
// the queries of chunk k (a.q_chunks equal slices of Lq) for head m of image n. Its grad_value
// rows (n, s, m, :) go to copy k of grad_value (copy 0 is grad_value itself, copies 1.. are
// a.grad_value_extra), so no two items write the same memory: no atomics, and the result is
// deterministic. The caller zero-initialises the copies and sums them afterwards; it uses
// more than one chunk only when N * M is smaller than the number of threads.
// value / grad_value are best given heads-major, (N, M, S, D): one item then reads and writes
// a contiguous S x D block instead of rows M * D apart (whose 4 KiB-periodic addresses also
// crowd a few L1 sets); measured ~15% faster including the two transposes.
//
// For a sample with attention weight a and corners c with bilinear weights w_c:
//   out              += a * sum_c w_c v_c
//   grad_value[c]    += a * w_c * g                            (g = grad_output row)
//   grad_attention    = sum_c w_c <g, v_c>
//   grad_location.x   = a * W * ((1 - fy) (<g,v_01> - <g,v_00>) + fy (<g,v_11> - <g,v_10>))
//   grad_location.y   = a * H * ((1 - fx) (<g,v_10> - <g,v_00>) + fx (<g,v_11> - <g,v_01>))
// (dpx/dx = W and dpy/dy = H; corners outside the level contribute v_c = 0).

// Returns <g, v>; adds scale * g to gv. g, v, gv are rows of D channels.
template <typename T, int DC>
inline T dot_and_scatter(const T* __restrict g, const T* __restrict v, T* __restrict gv, T scale, int64_t D_rt) {
#if defined(__GNUC__) || defined(__clang__)
  if constexpr (use_vec<T, DC>()) {
    using V = Vec<T>;
    constexpr int NV = DC / V::kWidth;
    const typename V::type s = V::splat(scale);
    typename V::type dot = V::splat(T(0));
    for (int i = 0; i < NV; ++i) {
      const typename V::type gi = V::load(g + i * V::kWidth);
      dot += gi * V::load(v + i * V::kWidth);
      V::store(gv + i * V::kWidth, V::load(gv + i * V::kWidth) + s * gi);
    }
    return V::sum(dot);
  }
#endif
  const int64_t D = DC > 0 ? DC : D_rt;
  T dot = T(0);
#pragma omp simd reduction(+ : dot)
  for (int64_t d = 0; d < D; ++d) {
    dot += g[d] * v[d];
    gv[d] += scale * g[d];
  }
  return dot;
}

template <typename T, int DC>
void backward_items(const MSDAArgs<T>& a, int64_t begin, int64_t end) {
  const int64_t D = DC > 0 ? DC : a.D;
  const int64_t N = a.N, M = a.M, L = a.L, P = a.P, LP = a.L * a.P;
  const int64_t row_stride = a.row_stride;
  std::vector<Corners<T>> corners(static_cast<size_t>(LP));
  std::vector<char> inside(static_cast<size_t>(LP));
  for (int64_t item = begin; item < end; ++item) {
    const int64_t m = item % M, n = (item / M) % N, chunk = item / (M * N);
    const int64_t q_begin = a.Lq * chunk / a.q_chunks, q_end = a.Lq * (chunk + 1) / a.q_chunks;
    T* grad_value = chunk == 0 ? a.grad_value : a.grad_value_extra + (chunk - 1) * N * a.S * M * D;
    const int64_t head_offset = n * a.batch_stride + m * a.head_stride;
    const T* __restrict vbase = a.value + head_offset;
    T* __restrict gvbase = grad_value + head_offset;
    for (int64_t q = q_begin; q < q_end; ++q) {
      const int64_t row = (n * a.Lq + q) * M + m;  // index of (n, q, m)
      const T* __restrict g = a.grad_output + row * D;
      const T* loc = a.sampling_locations + row * LP * 2;
      const T* aw = a.attention_weights + row * LP;
      T* gloc = a.grad_sampling_locations + row * LP * 2;
      T* gaw = a.grad_attention_weights + row * LP;
#if defined(__GNUC__) || defined(__clang__)
      // Consecutive queries of one head are M rows apart, a stride the hardware prefetcher
      // follows poorly: fetch the per-query inputs a few queries ahead (measured ~18% faster).
      if (q + 4 < q_end) {
        const int64_t ahead = row + 4 * M;
        const char* pl = reinterpret_cast<const char*>(a.sampling_locations + ahead * LP * 2);
        for (int64_t b = 0; b < LP * 2 * static_cast<int64_t>(sizeof(T)); b += 64) __builtin_prefetch(pl + b);
        __builtin_prefetch(a.attention_weights + ahead * LP);
        __builtin_prefetch(a.grad_output + ahead * D);
      }
#endif
      // Phase 1: resolve all L * P samples of this query and start loading their value and
      // grad_value rows, so phase 2 finds them in cache (a few % faster than doing both per
      // sample).
      for (int64_t l = 0; l < L; ++l) {
        const int64_t H = a.spatial_shapes[2 * l], W = a.spatial_shapes[2 * l + 1];
        const int64_t start = a.level_start_index[l];
        for (int64_t p = 0; p < P; ++p) {
          const int64_t i = l * P + p;
          Corners<T>& c = corners[i];
          inside[i] = make_corners(loc[2 * i], loc[2 * i + 1], H, W, start, row_stride, c);
          c.scale_x = static_cast<T>(W);
          c.scale_y = static_cast<T>(H);
#if defined(__GNUC__) || defined(__clang__)
          if (inside[i]) {
            for (int j = 0; j < 4; ++j) {
              if (!c.ok[j]) continue;
              const char* r = reinterpret_cast<const char*>(vbase + c.off[j]);
              const char* gr = reinterpret_cast<const char*>(gvbase + c.off[j]);
              for (int64_t b = 0; b < D * static_cast<int64_t>(sizeof(T)); b += 64) {
                __builtin_prefetch(r + b);
                __builtin_prefetch(gr + b, 1);
              }
            }
          }
#endif
        }
      }
      // Phase 2: gradients.
      for (int64_t i = 0; i < LP; ++i) {
        const Corners<T>& c = corners[i];
        if (!inside[i]) {
          gloc[2 * i] = T(0);
          gloc[2 * i + 1] = T(0);
          gaw[i] = T(0);
          continue;
        }
        const T w = aw[i];
        T dots[4];
        for (int j = 0; j < 4; ++j) {
          dots[j] = c.ok[j] ? dot_and_scatter<T, DC>(g, vbase + c.off[j], gvbase + c.off[j], w * c.w[j], D) : T(0);
        }
        gaw[i] = c.w[0] * dots[0] + c.w[1] * dots[1] + c.w[2] * dots[2] + c.w[3] * dots[3];
        gloc[2 * i] = w * c.scale_x * ((T(1) - c.fy) * (dots[1] - dots[0]) + c.fy * (dots[3] - dots[2]));
        gloc[2 * i + 1] = w * c.scale_y * ((T(1) - c.fx) * (dots[2] - dots[0]) + c.fx * (dots[3] - dots[1]));
      }
    }
  }
}

// Entry points: choose a compile-time D for the common head sizes.
template <typename T, bool kOffsets = false>
void forward(const MSDAArgs<T>& a, int64_t begin, int64_t end) {
  switch (a.D) {
    case 16: return forward_items<T, 16, kOffsets>(a, begin, end);
    case 32: return forward_items<T, 32, kOffsets>(a, begin, end);
    case 64: return forward_items<T, 64, kOffsets>(a, begin, end);
    default: return forward_items<T, 0, kOffsets>(a, begin, end);
  }
}

template <typename T>
void backward(const MSDAArgs<T>& a, int64_t begin, int64_t end) {
  switch (a.D) {
    case 16: return backward_items<T, 16>(a, begin, end);
    case 32: return backward_items<T, 32>(a, begin, end);
    case 64: return backward_items<T, 64>(a, begin, end);
    default: return backward_items<T, 0>(a, begin, end);
  }
}

// Non-template symbols the dispatcher takes the address of.
inline void forward_f32(const MSDAArgs<float>& a, int64_t b, int64_t e) { forward<float>(a, b, e); }
inline void forward_f64(const MSDAArgs<double>& a, int64_t b, int64_t e) { forward<double>(a, b, e); }
inline void forward_offsets_f32(const MSDAArgs<float>& a, int64_t b, int64_t e) { forward<float, true>(a, b, e); }
inline void forward_offsets_f64(const MSDAArgs<double>& a, int64_t b, int64_t e) { forward<double, true>(a, b, e); }
inline void backward_f32(const MSDAArgs<float>& a, int64_t b, int64_t e) { backward<float>(a, b, e); }
inline void backward_f64(const MSDAArgs<double>& a, int64_t b, int64_t e) { backward<double>(a, b, e); }

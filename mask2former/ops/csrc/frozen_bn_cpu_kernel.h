// CPU kernel of mask2former::frozen_bn_act for one (n, c) plane, written against raw pointers.
//
// NO include guard on purpose: frozen_bn_cpu.cpp includes this file once per instruction set,
// each time inside its own namespace and under a `#pragma GCC target(...)` (see cpu_isa.h).
// It must not include headers itself; the includer provides <cmath>, <cstdint> and, for the
// x86 variants, <immintrin.h>.
//
// Bitwise contract: the result must equal ATen's inference batch_norm followed by `+=` and
// `relu_`. ATen's CPU kernel evaluates `x * alpha + beta`, which its FMA builds contract into
// one fused multiply-add, so this file uses an explicit FMA in every variant (intrinsics for
// AVX2 / AVX-512, std::fma otherwise; the build runs in ISO C++ mode, where GCC never
// contracts). The Python wrapper checks the equality once per process before using the kernel.
//
// ReLU is `v < 0 ? 0 : v`, which, like torch.relu, keeps NaN and -0.0. vmaxps(0, v) returns
// its second operand when either is NaN or both are zeros, so it computes exactly that.

// y[i] = fma(x[i], alpha, beta) (+ r[i]) (ReLU) for i < n. y may be x (in-place).
template <bool kResidual, bool kRelu>
inline void bn_act_plane(const float* x, const float* r, float* y, int64_t n, float alpha, float beta) {
  int64_t i = 0;
#if M2F_VEC_BYTES == 64
  const __m512 va = _mm512_set1_ps(alpha), vb = _mm512_set1_ps(beta), zero = _mm512_setzero_ps();
  auto apply = [&](__m512 v, __m512 res) {
    v = _mm512_fmadd_ps(v, va, vb);
    if constexpr (kResidual) v = _mm512_add_ps(v, res);
    if constexpr (kRelu) v = _mm512_max_ps(zero, v);
    return v;
  };
  for (; i + 16 <= n; i += 16) {
    const __m512 res = kResidual ? _mm512_loadu_ps(r + i) : zero;
    _mm512_storeu_ps(y + i, apply(_mm512_loadu_ps(x + i), res));
  }
  if (i < n) {  // masked tail: no scalar loop, no reads past the plane
    const __mmask16 m = static_cast<__mmask16>((1u << (n - i)) - 1u);
    const __m512 res = kResidual ? _mm512_maskz_loadu_ps(m, r + i) : zero;
    _mm512_mask_storeu_ps(y + i, m, apply(_mm512_maskz_loadu_ps(m, x + i), res));
  }
  return;
#elif M2F_VEC_BYTES == 32
  const __m256 va = _mm256_set1_ps(alpha), vb = _mm256_set1_ps(beta), zero = _mm256_setzero_ps();
  for (; i + 8 <= n; i += 8) {
    __m256 v = _mm256_fmadd_ps(_mm256_loadu_ps(x + i), va, vb);
    if constexpr (kResidual) v = _mm256_add_ps(v, _mm256_loadu_ps(r + i));
    if constexpr (kRelu) v = _mm256_max_ps(zero, v);
    _mm256_storeu_ps(y + i, v);
  }
#endif
  // Baseline variant and the AVX2 tail (std::fma is a single vfmadd there; in the baseline
  // x86-64 build it is libm's correctly rounded fmaf, arm64 has FMA in its baseline).
  for (; i < n; ++i) {
    float v = std::fma(x[i], alpha, beta);
    if constexpr (kResidual) v = v + r[i];
    if constexpr (kRelu) v = v < 0.f ? 0.f : v;
    y[i] = v;
  }
}

// Planes [begin, end) of an (N, C / B, HW, B) tensor (B = 1: plain NCHW; B > 1: oneDNN's
// channel-blocked layout, channel cb * B + j at [n, cb, p, j]); plane p covers channels
// (p % (C / B)) * B .. + B. alpha / beta: (C,) per-channel scale and shift; r may be null when
// kResidual is false.
template <bool kResidual, bool kRelu>
void bn_act_planes(const float* x, const float* r, float* y, const float* alpha, const float* beta, int64_t C,
                   int64_t B, int64_t HW, int64_t begin, int64_t end) {
  const int64_t CB = C / B, plane = HW * B;
  for (int64_t p = begin; p < end; ++p) {
    const int64_t off = p * plane, c0 = (p % CB) * B;
    const float* xp = x + off;
    const float* rp = kResidual ? r + off : nullptr;
    float* yp = y + off;
    if (B == 1) {
      bn_act_plane<kResidual, kRelu>(xp, rp, yp, HW, alpha[c0], beta[c0]);
      continue;
    }
#if M2F_VEC_BYTES == 64
    if (B == 16) {  // one vector per pixel, the block's 16 scales and shifts held in registers
      const __m512 va = _mm512_loadu_ps(alpha + c0), vb = _mm512_loadu_ps(beta + c0), zero = _mm512_setzero_ps();
      for (int64_t i = 0; i < plane; i += 16) {
        __m512 v = _mm512_fmadd_ps(_mm512_loadu_ps(xp + i), va, vb);
        if constexpr (kResidual) v = _mm512_add_ps(v, _mm512_loadu_ps(rp + i));
        if constexpr (kRelu) v = _mm512_max_ps(zero, v);
        _mm512_storeu_ps(yp + i, v);
      }
      continue;
    }
#endif
#if M2F_VEC_BYTES >= 32
    if (B % 8 == 0) {
      const __m256 zero = _mm256_setzero_ps();
      for (int64_t i = 0; i < plane; i += B) {
        for (int64_t j = 0; j < B; j += 8) {
          __m256 v = _mm256_fmadd_ps(_mm256_loadu_ps(xp + i + j), _mm256_loadu_ps(alpha + c0 + j),
                                     _mm256_loadu_ps(beta + c0 + j));
          if constexpr (kResidual) v = _mm256_add_ps(v, _mm256_loadu_ps(rp + i + j));
          if constexpr (kRelu) v = _mm256_max_ps(zero, v);
          _mm256_storeu_ps(yp + i + j, v);
        }
      }
      continue;
    }
#endif
    for (int64_t i = 0; i < plane; i += B) {
      for (int64_t j = 0; j < B; ++j) {
        float v = std::fma(xp[i + j], alpha[c0 + j], beta[c0 + j]);
        if constexpr (kResidual) v = v + rp[i + j];
        if constexpr (kRelu) v = v < 0.f ? 0.f : v;
        yp[i + j] = v;
      }
    }
  }
}

using PlanesFn = void (*)(const float*, const float*, float*, const float*, const float*, int64_t, int64_t,
                          int64_t, int64_t, int64_t);

inline PlanesFn pick_planes(bool residual, bool relu) {
  if (residual) return relu ? &bn_act_planes<true, true> : &bn_act_planes<true, false>;
  return relu ? &bn_act_planes<false, true> : &bn_act_planes<false, false>;
}

// What the three kernels share: the walk over output tiles and the vector epilogue
// (bias, GELU, rounding to bf16). Included by each gemv_*.cpp *after* its
// `#pragma GCC target`, so every function here is compiled for that file's
// instruction set; all of it has internal linkage, so no copy built for one
// instruction set can stand in for another's at link time.
#pragma once

#include <immintrin.h>

#include <cstdint>

namespace gpt2lab {
namespace {

// Software prefetch of the weights into L2, 8 KB ahead of the read. On the 2-core AMD
// EPYC (Zen 4) machine every distance from none to 16 KB streamed at the plain read
// speed within the noise (28-34 GB/s at two threads), while prefetching into L1 (T0,
// 2 KB ahead, the int8 kernel's former setting) was 10-20% slower; the hint is kept
// for CPUs whose hardware prefetcher stops at page boundaries. Both can be changed
// at compile time for experiments.
#ifndef GPT2LAB_PREFETCH_BYTES
#define GPT2LAB_PREFETCH_BYTES 8192
#endif
#ifndef GPT2LAB_PREFETCH_HINT
#define GPT2LAB_PREFETCH_HINT _MM_HINT_T1
#endif
constexpr int64_t kPrefetchBytes = GPT2LAB_PREFETCH_BYTES;
constexpr int kTile = 16;  // output columns per epilogue vector
constexpr int kMaxRows = 4;  // rows of x sharing one read of each weight row

inline void prefetch(const void* p) {
  if (kPrefetchBytes > 0) _mm_prefetch(static_cast<const char*>(p), GPT2LAB_PREFETCH_HINT);
}

// e^x to ~2 ulp: x = n ln2 + r with |r| <= ln2/2, a degree-7 Taylor polynomial for e^r
// (truncation error 5e-9 relative), and 2^n applied by scalef, which also underflows
// gracefully to 0 far below -87.
inline __m512 exp_ps(__m512 x) {
  x = _mm512_min_ps(x, _mm512_set1_ps(88.7f));
  x = _mm512_max_ps(x, _mm512_set1_ps(-104.f));
  const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), x);
  r = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.12194440e-4f), r);
  __m512 p = _mm512_set1_ps(1.f / 5040);
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.f / 720));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.f / 120));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.f / 24));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.f / 6));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(0.5f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.f));
  return _mm512_scalef_ps(p, n);
}

// GELU, tanh approximation: 0.5 z (1 + tanh(u)) = z / (1 + e^(-2u)) exactly, with
// u = sqrt(2/pi) (z + 0.044715 z^3); the second form keeps its relative accuracy
// where the result is tiny (large negative z).
inline __m512 gelu_tanh_ps(__m512 z) {
  const __m512 z3 = _mm512_mul_ps(_mm512_mul_ps(z, z), z);
  const __m512 u = _mm512_mul_ps(_mm512_set1_ps(0.7978845608028654f),
                                 _mm512_fmadd_ps(z3, _mm512_set1_ps(0.044715f), z));
  const __m512 e = exp_ps(_mm512_mul_ps(u, _mm512_set1_ps(-2.f)));
  return _mm512_div_ps(z, _mm512_add_ps(_mm512_set1_ps(1.f), e));
}

// GELU, exact: z Phi(z) = z erfc(-z / sqrt 2) / 2. erfc(a) for a >= 0 is Numerical
// Recipes' erfcc (Chebyshev fit, fractional error < 1.2e-7 everywhere), so the
// negative side, where the result is tiny, keeps its relative accuracy;
// erfc(-a) = 2 - erfc(a) gives the positive side.
inline __m512 gelu_erf_ps(__m512 z) {
  const __m512 w = _mm512_mul_ps(z, _mm512_set1_ps(-0.7071067811865476f));
  const __m512 a = _mm512_abs_ps(w);
  const __m512 t = _mm512_div_ps(_mm512_set1_ps(1.f),
                                 _mm512_fmadd_ps(a, _mm512_set1_ps(0.5f), _mm512_set1_ps(1.f)));
  __m512 p = _mm512_set1_ps(0.17087277f);
  p = _mm512_fmadd_ps(p, t, _mm512_set1_ps(-0.82215223f));
  p = _mm512_fmadd_ps(p, t, _mm512_set1_ps(1.48851587f));
  p = _mm512_fmadd_ps(p, t, _mm512_set1_ps(-1.13520398f));
  p = _mm512_fmadd_ps(p, t, _mm512_set1_ps(0.27886807f));
  p = _mm512_fmadd_ps(p, t, _mm512_set1_ps(-0.18628806f));
  p = _mm512_fmadd_ps(p, t, _mm512_set1_ps(0.09678418f));
  p = _mm512_fmadd_ps(p, t, _mm512_set1_ps(0.37409196f));
  p = _mm512_fmadd_ps(p, t, _mm512_set1_ps(1.00002368f));
  p = _mm512_fmadd_ps(p, t, _mm512_set1_ps(-1.26551223f));
  const __m512 erfc_a = _mm512_mul_ps(t, exp_ps(_mm512_fnmadd_ps(a, a, p)));
  const __mmask16 neg = _mm512_cmp_ps_mask(w, _mm512_setzero_ps(), _CMP_LT_OQ);
  const __m512 erfc_w = _mm512_mask_sub_ps(erfc_a, neg, _mm512_set1_ps(2.f), erfc_a);
  return _mm512_mul_ps(_mm512_mul_ps(z, _mm512_set1_ps(0.5f)), erfc_w);
}

inline __m512 activate(__m512 v, int act) {
  if (act == 1) return gelu_tanh_ps(v);
  if (act == 2) return gelu_erf_ps(v);
  return v;
}

inline __m512 load_bf16(const uint16_t* p, __mmask16 mask) {
  const __m256i h = _mm256_maskz_loadu_epi16(mask, p);
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
}

// float32 -> bf16, round to nearest even (as torch's .to(torch.bfloat16)), NaN kept NaN.
inline __m256i to_bf16(__m512 v) {
  const __m512i b = _mm512_castps_si512(v);
  const __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(b, 16), _mm512_set1_epi32(1));
  __m512i r = _mm512_srli_epi32(
      _mm512_add_epi32(b, _mm512_add_epi32(lsb, _mm512_set1_epi32(0x7fff))), 16);
  const __mmask16 nan = _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q);
  r = _mm512_mask_mov_epi32(r, nan, _mm512_set1_epi32(0x7fc0));
  return _mm512_cvtepi32_epi16(r);
}

inline void store(float* y, __m512 v, __mmask16 mask) { _mm512_mask_storeu_ps(y, mask, v); }
inline void store(uint16_t* y, __m512 v, __mmask16 mask) {
  _mm256_mask_storeu_epi16(y, mask, to_bf16(v));
}

// The walk every kernel shares. Output columns go 16 at a time; for each such tile,
// rows of x go kMaxRows at a time, and `dot.template run<MB>(n, m0, r)` computes the
// MB dot products of weight row n with rows m0.. of x into r[0..MB). The weight tile
// (16 rows) is read from memory once, by the first block of rows, and from cache by
// the rest. `bias(t, mask)` gives the tile's bias as floats (or zeros).
template <class Dot, class Bias, class Out>
inline void walk(const Dot& dot, const Bias& bias, Out* y, int64_t M, int64_t N, int act,
                 int64_t n0, int64_t n1) {
  alignas(64) float tmp[kMaxRows][kTile] = {};
  for (int64_t t = n0; t < n1; t += kTile) {
    const int cnt = static_cast<int>(n1 - t < kTile ? n1 - t : kTile);
    const __mmask16 mask = static_cast<__mmask16>((1u << cnt) - 1);
    const __m512 b = bias(t, mask);
    for (int64_t m0 = 0; m0 < M; m0 += kMaxRows) {
      const int mb = static_cast<int>(M - m0 < kMaxRows ? M - m0 : kMaxRows);
      int j = 0;
      if constexpr (Dot::kCols > 1) {  // several rows of x: kCols weight rows at a time
        if (mb > 1) {
          for (; j + Dot::kCols <= cnt; j += Dot::kCols) {
            float r[Dot::kCols][kMaxRows];
            switch (mb) {
              case 2: dot.template block<2, Dot::kCols>(t + j, m0, r); break;
              case 3: dot.template block<3, Dot::kCols>(t + j, m0, r); break;
              default: dot.template block<4, Dot::kCols>(t + j, m0, r); break;
            }
            for (int c = 0; c < Dot::kCols; ++c)
              for (int m = 0; m < mb; ++m) tmp[m][j + c] = r[c][m];
          }
        }
      }
      for (; j < cnt; ++j) {
        float r[kMaxRows];
        switch (mb) {
          case 1: dot.template run<1>(t + j, m0, r); break;
          case 2: dot.template run<2>(t + j, m0, r); break;
          case 3: dot.template run<3>(t + j, m0, r); break;
          default: dot.template run<4>(t + j, m0, r); break;
        }
        for (int m = 0; m < mb; ++m) tmp[m][j] = r[m];
      }
      for (int m = 0; m < mb; ++m) {
        const __m512 v = activate(_mm512_add_ps(_mm512_load_ps(tmp[m]), b), act);
        store(y + (m0 + m) * N + t, v, mask);
      }
    }
  }
}

}  // namespace
}  // namespace gpt2lab

// int8-weight GEMV for a few rows (AVX-512 VNNI): int8 x int8 products summed in int32
// by `vpdpbusd` (64 products per instruction), so each weight is read as one byte and
// never converted to float.
//
// Each row of x is first quantized to two int8 vectors, hi and lo:
//   s = max|x| / 127,  t = x / s,  hi = round(t),  lo = round((t - hi) * 254)
// so x = s * (hi + lo / 254) to within s / 508 (16 bits over the row's range, finer
// than the bf16 it comes from). VNNI's dot product wants unsigned bytes on one side:
// hi + 128 and lo + 128 are fed in, and 128 * q_sum is taken off the int32 sums.
#include <cstdint>

#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,avx512vnni,fma")

#include "gemv.h"
#include "gemv_common.h"

namespace gpt2lab {
namespace {

struct Int8Dot {
  const uint8_t* xq;  // [M][2][K]: hi + 128, then lo + 128
  const float* xs;    // [M]
  const int8_t* q;    // [N][K]
  const int32_t* q_sum;
  const float* scales;
  int64_t K;
  static constexpr int kCols = 1;  // (two sums per product already: no room for more)

  template <int MB>
  void run(int64_t n, int64_t m0, float* r) const {
    constexpr int U = MB == 1 ? 4 : (MB == 2 ? 2 : 1);
    const int8_t* wr = q + n * K;
    const uint8_t* xr = xq + m0 * 2 * K;
    __m512i hi[MB][U], lo[MB][U];
    for (int m = 0; m < MB; ++m)
      for (int u = 0; u < U; ++u) hi[m][u] = lo[m][u] = _mm512_setzero_si512();
    int64_t k = 0;
    for (; k + 64 * U <= K; k += 64 * U) {
      for (int u = 0; u < U; ++u) {
        prefetch(wr + k + 64 * u + kPrefetchBytes);
        const __m512i wv = _mm512_loadu_si512(wr + k + 64 * u);
        for (int m = 0; m < MB; ++m) {
          const uint8_t* h = xr + m * 2 * K + k + 64 * u;
          hi[m][u] = _mm512_dpbusd_epi32(hi[m][u], _mm512_loadu_si512(h), wv);
          lo[m][u] = _mm512_dpbusd_epi32(lo[m][u], _mm512_loadu_si512(h + K), wv);
        }
      }
    }
    for (; k < K; k += 64) {
      const __m512i wv = _mm512_loadu_si512(wr + k);
      for (int m = 0; m < MB; ++m) {
        const uint8_t* h = xr + m * 2 * K + k;
        hi[m][0] = _mm512_dpbusd_epi32(hi[m][0], _mm512_loadu_si512(h), wv);
        lo[m][0] = _mm512_dpbusd_epi32(lo[m][0], _mm512_loadu_si512(h + K), wv);
      }
    }
    const int32_t offset = 128 * q_sum[n];
    for (int m = 0; m < MB; ++m) {
      __m512i h = hi[m][0], l = lo[m][0];
      for (int u = 1; u < U; ++u) {
        h = _mm512_add_epi32(h, hi[m][u]);
        l = _mm512_add_epi32(l, lo[m][u]);
      }
      const float dot = static_cast<float>(_mm512_reduce_add_epi32(h) - offset) +
                        static_cast<float>(_mm512_reduce_add_epi32(l) - offset) * (1.f / 254.f);
      r[m] = xs[m0 + m] * scales[n] * dot;
    }
  }
};

}  // namespace

void int8_quantize_rows(const void* x, bool x_bf16, int64_t K, int64_t m0, int64_t m1,
                        uint8_t* xq, float* xs) {
  const __m512i offset = _mm512_set1_epi32(128);
  auto load = [x, x_bf16](int64_t i) {
    return x_bf16 ? load_bf16(static_cast<const uint16_t*>(x) + i, 0xffff)
                  : _mm512_loadu_ps(static_cast<const float*>(x) + i);
  };
  for (int64_t m = m0; m < m1; ++m) {
    __m512 vmax = _mm512_setzero_ps();
    for (int64_t k = 0; k < K; k += 16) vmax = _mm512_max_ps(vmax, _mm512_abs_ps(load(m * K + k)));
    const float amax = _mm512_reduce_max_ps(vmax);
    const float s = amax > 0.f ? amax / 127.f : 1.f;
    xs[m] = s;
    const __m512 inv = _mm512_set1_ps(1.f / s), frac = _mm512_set1_ps(254.f);
    uint8_t* hi = xq + m * 2 * K;
    uint8_t* lo = hi + K;
    for (int64_t k = 0; k < K; k += 16) {  // round to nearest even, as nearbyint
      const __m512 t = _mm512_mul_ps(load(m * K + k), inv);
      const __m512 h = _mm512_roundscale_ps(t, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
      const __m512 l = _mm512_roundscale_ps(_mm512_mul_ps(_mm512_sub_ps(t, h), frac),
                                            _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
      const __m512i hu = _mm512_add_epi32(_mm512_cvtps_epi32(h), offset);
      const __m512i lu = _mm512_add_epi32(_mm512_cvtps_epi32(l), offset);
      _mm_storeu_si128(reinterpret_cast<__m128i*>(hi + k), _mm512_cvtepi32_epi8(hu));
      _mm_storeu_si128(reinterpret_cast<__m128i*>(lo + k), _mm512_cvtepi32_epi8(lu));
    }
  }
}

void int8_gemv_cols(const uint8_t* xq, const float* xs, const int8_t* q, const int32_t* q_sum,
                    const float* scales, const float* bias, void* y, bool y_bf16, int64_t M,
                    int64_t K, int64_t N, int act, int64_t n0, int64_t n1) {
  const Int8Dot dot{xq, xs, q, q_sum, scales, K};
  auto b = [bias](int64_t t, __mmask16 mask) {
    return bias ? _mm512_maskz_loadu_ps(mask, bias + t) : _mm512_setzero_ps();
  };
  if (y_bf16)
    walk(dot, b, static_cast<uint16_t*>(y), M, N, act, n0, n1);
  else
    walk(dot, b, static_cast<float*>(y), M, N, act, n0, n1);
}

}  // namespace gpt2lab

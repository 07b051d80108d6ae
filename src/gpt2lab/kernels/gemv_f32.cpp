// float32 GEMV for a few rows (AVX-512F FMA): the walk of gemv_common.h with one
// weight row streamed at a time, front to back, as one sequential read.
#include <cstdint>

#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,fma")

#include "gemv.h"
#include "gemv_common.h"

namespace gpt2lab {
namespace {

struct F32Dot {
  const float* x;
  const float* w;
  int64_t K;
  static constexpr int kCols = 4;

  // MB rows of x against NB weight rows at once (see Bf16Dot::block).
  template <int MB, int NB>
  void block(int64_t n, int64_t m0, float (*r)[kMaxRows]) const {
    const float* wr = w + n * K;
    const float* xr = x + m0 * K;
    __m512 acc[NB][MB];
    for (int j = 0; j < NB; ++j)
      for (int m = 0; m < MB; ++m) acc[j][m] = _mm512_setzero_ps();
    for (int64_t k = 0; k < K; k += 16) {
      __m512 wv[NB];
      for (int j = 0; j < NB; ++j) {
        prefetch(wr + j * K + k + kPrefetchBytes / 4);
        wv[j] = _mm512_loadu_ps(wr + j * K + k);
      }
      for (int m = 0; m < MB; ++m) {
        const __m512 xv = _mm512_loadu_ps(xr + m * K + k);
        for (int j = 0; j < NB; ++j) acc[j][m] = _mm512_fmadd_ps(xv, wv[j], acc[j][m]);
      }
    }
    for (int j = 0; j < NB; ++j)
      for (int m = 0; m < MB; ++m) r[j][m] = _mm512_reduce_add_ps(acc[j][m]);
  }

  // One accumulator chain per (row, unrolled step): 4 chains at one row hide the FMA
  // latency; with more rows the rows themselves give the independent chains.
  template <int MB>
  void run(int64_t n, int64_t m0, float* r) const {
    constexpr int U = MB == 1 ? 4 : (MB == 2 ? 2 : 1);
    const float* wr = w + n * K;
    const float* xr = x + m0 * K;
    __m512 acc[MB][U];
    for (int m = 0; m < MB; ++m)
      for (int u = 0; u < U; ++u) acc[m][u] = _mm512_setzero_ps();
    int64_t k = 0;
    for (; k + 16 * U <= K; k += 16 * U) {
      for (int u = 0; u < U; ++u) {
        prefetch(wr + k + 16 * u + kPrefetchBytes / 4);
        const __m512 wv = _mm512_loadu_ps(wr + k + 16 * u);
        for (int m = 0; m < MB; ++m)
          acc[m][u] = _mm512_fmadd_ps(_mm512_loadu_ps(xr + m * K + k + 16 * u), wv, acc[m][u]);
      }
    }
    for (; k < K; k += 16) {
      const __m512 wv = _mm512_loadu_ps(wr + k);
      for (int m = 0; m < MB; ++m)
        acc[m][0] = _mm512_fmadd_ps(_mm512_loadu_ps(xr + m * K + k), wv, acc[m][0]);
    }
    for (int m = 0; m < MB; ++m) {
      __m512 s = acc[m][0];
      for (int u = 1; u < U; ++u) s = _mm512_add_ps(s, acc[m][u]);
      r[m] = _mm512_reduce_add_ps(s);
    }
  }
};

}  // namespace

void f32_gemv_cols(const float* x, const float* w, const float* bias, float* y, int64_t M,
                   int64_t K, int64_t N, int act, int64_t n0, int64_t n1) {
  const F32Dot dot{x, w, K};
  auto b = [bias](int64_t t, __mmask16 mask) {
    return bias ? _mm512_maskz_loadu_ps(mask, bias + t) : _mm512_setzero_ps();
  };
  walk(dot, b, y, M, N, act, n0, n1);
}

}  // namespace gpt2lab

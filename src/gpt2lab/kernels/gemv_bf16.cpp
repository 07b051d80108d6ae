// bf16 GEMV for a few rows (AVX-512 BF16): `vdpbf16ps` multiplies 32 bf16 pairs and
// adds them, in pairs, into 16 float32 sums, so the products are exact and only the
// float32 accumulation rounds; the result is rounded to bf16 once, after bias and GELU.
#include <cstdint>

#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,avx512bf16,fma")

#include "gemv.h"
#include "gemv_common.h"

namespace gpt2lab {
namespace {

struct Bf16Dot {
  const uint16_t* x;
  const uint16_t* w;
  int64_t K;
  static constexpr int kCols = 4;

  // MB rows of x against NB weight rows n.. at once: each vector loaded (weights from
  // memory, x from L1) feeds NB or MB products, so with several rows the loads no
  // longer bound the dot products (one-row decoding takes `run`: memory-bound).
  template <int MB, int NB>
  void block(int64_t n, int64_t m0, float (*r)[kMaxRows]) const {
    const uint16_t* wr = w + n * K;
    const uint16_t* xr = x + m0 * K;
    __m512 acc[NB][MB];
    for (int j = 0; j < NB; ++j)
      for (int m = 0; m < MB; ++m) acc[j][m] = _mm512_setzero_ps();
    for (int64_t k = 0; k < K; k += 32) {
      __m512bh wv[NB];
      for (int j = 0; j < NB; ++j) {
        prefetch(wr + j * K + k + kPrefetchBytes / 2);
        wv[j] = (__m512bh)_mm512_loadu_si512(wr + j * K + k);
      }
      for (int m = 0; m < MB; ++m) {
        const __m512bh xv = (__m512bh)_mm512_loadu_si512(xr + m * K + k);
        for (int j = 0; j < NB; ++j) acc[j][m] = _mm512_dpbf16_ps(acc[j][m], xv, wv[j]);
      }
    }
    for (int j = 0; j < NB; ++j)
      for (int m = 0; m < MB; ++m) r[j][m] = _mm512_reduce_add_ps(acc[j][m]);
  }

  template <int MB>
  void run(int64_t n, int64_t m0, float* r) const {
    constexpr int U = MB == 1 ? 4 : (MB == 2 ? 2 : 1);
    const uint16_t* wr = w + n * K;
    const uint16_t* xr = x + m0 * K;
    __m512 acc[MB][U];
    for (int m = 0; m < MB; ++m)
      for (int u = 0; u < U; ++u) acc[m][u] = _mm512_setzero_ps();
    int64_t k = 0;
    for (; k + 32 * U <= K; k += 32 * U) {
      for (int u = 0; u < U; ++u) {
        prefetch(wr + k + 32 * u + kPrefetchBytes / 2);
        const __m512bh wv = (__m512bh)_mm512_loadu_si512(wr + k + 32 * u);
        for (int m = 0; m < MB; ++m)
          acc[m][u] = _mm512_dpbf16_ps(
              acc[m][u], (__m512bh)_mm512_loadu_si512(xr + m * K + k + 32 * u), wv);
      }
    }
    for (; k < K; k += 32) {
      const __m512bh wv = (__m512bh)_mm512_loadu_si512(wr + k);
      for (int m = 0; m < MB; ++m)
        acc[m][0] = _mm512_dpbf16_ps(acc[m][0], (__m512bh)_mm512_loadu_si512(xr + m * K + k), wv);
    }
    for (int m = 0; m < MB; ++m) {
      __m512 s = acc[m][0];
      for (int u = 1; u < U; ++u) s = _mm512_add_ps(s, acc[m][u]);
      r[m] = _mm512_reduce_add_ps(s);
    }
  }
};

}  // namespace

void bf16_gemv_cols(const uint16_t* x, const uint16_t* w, const uint16_t* bias, uint16_t* y,
                    int64_t M, int64_t K, int64_t N, int act, int64_t n0, int64_t n1) {
  const Bf16Dot dot{x, w, K};
  auto b = [bias](int64_t t, __mmask16 mask) {
    return bias ? load_bf16(bias + t, mask) : _mm512_setzero_ps();
  };
  walk(dot, b, y, M, N, act, n0, n1);
}

}  // namespace gpt2lab

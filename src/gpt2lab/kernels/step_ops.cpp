// The small per-layer operations of a native decoding step (step.cpp), for one row:
// LayerNorm, the residual add, attention of one head over the KV cache, and the greedy
// pick from a row of logits. Compiled
// for AVX-512F, like gemv_f32.cpp; step.cpp only calls them where the CPU has it.
//
// Rounding follows the eager model exactly where it rounds: with bf16 activations
// (a bf16 or int8 model) a LayerNorm's output, the residual stream after each add and
// an attention head's output are rounded to bf16 once, from float32, as torch does;
// everything in between is float32.
#include <cmath>
#include <cstdint>

#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,fma")

#include "gemv_common.h"
#include "step.h"

namespace gpt2lab {
namespace {

inline __m512 load16(const void* p, bool bf16, int64_t i) {
  return bf16 ? load_bf16(static_cast<const uint16_t*>(p) + i, 0xffff)
              : _mm512_loadu_ps(static_cast<const float*>(p) + i);
}

inline void store16(void* p, bool bf16, int64_t i, __m512 v) {
  if (bf16)
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(static_cast<uint16_t*>(p) + i), to_bf16(v));
  else
    _mm512_storeu_ps(static_cast<float*>(p) + i, v);
}

// v rounded to bf16 and back where activations are bf16 (as torch rounds them).
inline __m512 round16(__m512 v, bool bf16) {
  if (!bf16) return v;
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(to_bf16(v)), 16));
}

// The sum of 16 floats in double, added to two accumulators of 8.
inline void add_pd(__m512 v, __m512d& lo, __m512d& hi) {
  lo = _mm512_add_pd(lo, _mm512_cvtps_pd(_mm512_castps512_ps256(v)));
  hi = _mm512_add_pd(hi, _mm512_cvtps_pd(_mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(v), 1))));
}

}  // namespace

// The row functions below take D a multiple of 16 (d_model = heads x d_head, d_head a
// multiple of 16) and run 16 values at a time: a native step calls them ~100 times a
// token on every thread.
void layer_norm_row(const float* x, const void* w, const void* b, bool bf16, int64_t D, float eps,
                    void* y) {
  // Two passes in double for the mean and the variance: torch's CPU LayerNorm is exact
  // to float32 rounding, and so is this.
  __m512d lo = _mm512_setzero_pd(), hi = _mm512_setzero_pd();
  for (int64_t i = 0; i < D; i += 16) add_pd(_mm512_loadu_ps(x + i), lo, hi);
  const double mean = _mm512_reduce_add_pd(_mm512_add_pd(lo, hi)) / D;
  const __m512d mean_pd = _mm512_set1_pd(mean);
  lo = hi = _mm512_setzero_pd();
  for (int64_t i = 0; i < D; i += 8) {
    const __m512d d = _mm512_sub_pd(_mm512_cvtps_pd(_mm256_loadu_ps(x + i)), mean_pd);
    lo = _mm512_fmadd_pd(d, d, lo);
  }
  const double sq = _mm512_reduce_add_pd(lo);
  const __m512 rstd = _mm512_set1_ps(static_cast<float>(1.0 / std::sqrt(sq / D + eps)));
  const __m512 m = _mm512_set1_ps(static_cast<float>(mean));
  for (int64_t i = 0; i < D; i += 16) {
    const __m512 n = _mm512_mul_ps(_mm512_sub_ps(_mm512_loadu_ps(x + i), m), rstd);
    store16(y, bf16, i, _mm512_fmadd_ps(n, load16(w, bf16, i), load16(b, bf16, i)));
  }
}

void add_row(float* resid, const void* delta, bool bf16, int64_t D) {
  for (int64_t i = 0; i < D; i += 16) {
    const __m512 v = _mm512_add_ps(_mm512_loadu_ps(resid + i), load16(delta, bf16, i));
    _mm512_storeu_ps(resid + i, round16(v, bf16));
  }
}

void load_row(const void* x, bool bf16, int64_t D, float* out) {
  for (int64_t i = 0; i < D; i += 16) _mm512_storeu_ps(out + i, load16(x, bf16, i));
}

void store_row(const float* x, bool bf16, int64_t D, void* out) {
  for (int64_t i = 0; i < D; i += 16) store16(out, bf16, i, _mm512_loadu_ps(x + i));
}

void attend_head(const void* q, const void* k_new, const void* v_new, void* k_cache,
                 void* v_cache, int64_t pos, int64_t dh, float scale, bool bf16, float* scores,
                 void* z) {
  const int64_t elem = bf16 ? 2 : 4;
  auto at = [elem](void* base, int64_t i) { return static_cast<char*>(base) + i * elem; };
  __builtin_memcpy(at(k_cache, pos * dh), k_new, dh * elem);
  __builtin_memcpy(at(v_cache, pos * dh), v_new, dh * elem);

  // Scores: the query stays in registers (d_head <= 128: 8 vectors).
  __m512 qv[8];
  const int64_t nv = dh / 16;
  for (int64_t d = 0; d < nv; ++d) qv[d] = load16(q, bf16, 16 * d);
  float top = -INFINITY;
  for (int64_t j = 0; j <= pos; ++j) {
    const void* kj = at(k_cache, j * dh);
    __m512 acc = _mm512_mul_ps(qv[0], load16(kj, bf16, 0));
    for (int64_t d = 1; d < nv; ++d) acc = _mm512_fmadd_ps(qv[d], load16(kj, bf16, 16 * d), acc);
    const float s = _mm512_reduce_add_ps(acc) * scale;
    scores[j] = s;
    top = s > top ? s : top;
  }
  // Softmax, 16 scores at a time (exp_ps: ~2 ulp).
  __m512 total = _mm512_setzero_ps();
  const __m512 shift = _mm512_set1_ps(top);
  for (int64_t j = 0; j <= pos; j += 16) {
    const int64_t left = pos + 1 - j;
    const __mmask16 mask = left >= 16 ? 0xffff : static_cast<__mmask16>((1u << left) - 1);
    const __m512 e = exp_ps(_mm512_sub_ps(_mm512_maskz_loadu_ps(mask, scores + j), shift));
    _mm512_mask_storeu_ps(scores + j, mask, e);
    total = _mm512_add_ps(total, _mm512_maskz_mov_ps(mask, e));
  }
  const float inv = 1.f / _mm512_reduce_add_ps(total);
  // z = sum_j p_j v_j
  __m512 acc[8];
  for (int64_t d = 0; d < nv; ++d) acc[d] = _mm512_setzero_ps();
  for (int64_t j = 0; j <= pos; ++j) {
    const __m512 p = _mm512_set1_ps(scores[j] * inv);
    const void* vj = at(v_cache, j * dh);
    for (int64_t d = 0; d < nv; ++d) acc[d] = _mm512_fmadd_ps(p, load16(vj, bf16, 16 * d), acc[d]);
  }
  alignas(64) float out[128];
  for (int64_t d = 0; d < nv; ++d) _mm512_store_ps(out + 16 * d, acc[d]);
  store_row(out, bf16, dh, z);
}

void greedy_row(const void* logits, bool bf16, int64_t V, int64_t* id, float* logprob) {
  // Pass 1: the maximum and the first index holding it. Each lane keeps its first
  // maximum (it moves only on a strictly greater value); the lanes are merged by the
  // least index among those equal to the maximum. NaNs are counted, not compared.
  __m512 top = _mm512_set1_ps(-INFINITY);
  __m512i at = _mm512_set1_epi32(0);
  __m512i idx = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
  __mmask16 nan = 0;
  auto load = [&](int64_t i, __mmask16 mask) {
    const __m512 fill = _mm512_set1_ps(-INFINITY);
    if (bf16)
      return _mm512_mask_mov_ps(fill, mask, load_bf16(static_cast<const uint16_t*>(logits) + i, mask));
    return _mm512_mask_loadu_ps(fill, mask, static_cast<const float*>(logits) + i);
  };
  for (int64_t i = 0; i < V; i += 16) {
    const __mmask16 mask = V - i >= 16 ? 0xffff : static_cast<__mmask16>((1u << (V - i)) - 1);
    const __m512 v = load(i, mask);
    nan |= _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q);
    const __mmask16 up = _mm512_cmp_ps_mask(v, top, _CMP_GT_OQ);
    top = _mm512_mask_mov_ps(top, up, v);
    at = _mm512_mask_mov_epi32(at, up, idx);
    idx = _mm512_add_epi32(idx, _mm512_set1_epi32(16));
  }
  const float best = _mm512_reduce_max_ps(top);
  const __mmask16 is_best = _mm512_cmp_ps_mask(top, _mm512_set1_ps(best), _CMP_EQ_OQ);
  *id = _mm512_mask_reduce_min_epi32(is_best, at);
  // A NaN, an infinite maximum or a row of -inf has no finite log-softmax (torch's
  // gives NaN there too): the caller treats NaN as non-finite logits.
  if (nan || !std::isfinite(best)) {
    *logprob = NAN;
    return;
  }
  // Pass 2: log-softmax of the maximum = -log(sum_j e^(x_j - max)), float32 sums.
  __m512 sum = _mm512_setzero_ps();
  const __m512 shift = _mm512_set1_ps(best);
  for (int64_t i = 0; i < V; i += 16) {
    const __mmask16 mask = V - i >= 16 ? 0xffff : static_cast<__mmask16>((1u << (V - i)) - 1);
    sum = _mm512_add_ps(sum, _mm512_maskz_mov_ps(mask, exp_ps(_mm512_sub_ps(load(i, mask), shift))));
  }
  *logprob = -std::log(_mm512_reduce_add_ps(sum));
}

}  // namespace gpt2lab

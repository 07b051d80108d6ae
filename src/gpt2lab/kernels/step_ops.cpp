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

inline float bf16_to_float(uint16_t h) {
  uint32_t bits = static_cast<uint32_t>(h) << 16;
  float f;
  __builtin_memcpy(&f, &bits, 4);
  return f;
}

// float32 -> bf16, round to nearest even, NaN kept NaN (as to_bf16 in gemv_common.h).
inline uint16_t float_to_bf16(float f) {
  uint32_t bits;
  __builtin_memcpy(&bits, &f, 4);
  if ((bits & 0x7fffffffu) > 0x7f800000u) return 0x7fc0;
  return static_cast<uint16_t>((bits + 0x7fffu + ((bits >> 16) & 1u)) >> 16);
}

inline float load1(const void* p, bool bf16, int64_t i) {
  return bf16 ? bf16_to_float(static_cast<const uint16_t*>(p)[i]) : static_cast<const float*>(p)[i];
}

inline void store1(void* p, bool bf16, int64_t i, float v) {
  if (bf16)
    static_cast<uint16_t*>(p)[i] = float_to_bf16(v);
  else
    static_cast<float*>(p)[i] = v;
}

inline __m512 load16(const void* p, bool bf16, int64_t i) {
  return bf16 ? load_bf16(static_cast<const uint16_t*>(p) + i, 0xffff)
              : _mm512_loadu_ps(static_cast<const float*>(p) + i);
}

}  // namespace

float round_act(float v, bool bf16) { return bf16 ? bf16_to_float(float_to_bf16(v)) : v; }

void layer_norm_row(const float* x, const void* w, const void* b, bool bf16, int64_t D, float eps,
                    void* y) {
  // Two passes in double for the mean and the variance: torch's CPU LayerNorm is exact
  // to float32 rounding, and so is this.
  double sum = 0;
  for (int64_t i = 0; i < D; ++i) sum += x[i];
  const double mean = sum / D;
  double sq = 0;
  for (int64_t i = 0; i < D; ++i) sq += (x[i] - mean) * (x[i] - mean);
  const float rstd = static_cast<float>(1.0 / std::sqrt(sq / D + eps));
  const float m = static_cast<float>(mean);
  for (int64_t i = 0; i < D; ++i)
    store1(y, bf16, i, (x[i] - m) * rstd * load1(w, bf16, i) + load1(b, bf16, i));
}

void add_row(float* resid, const void* delta, bool bf16, int64_t D) {
  for (int64_t i = 0; i < D; ++i) resid[i] = round_act(resid[i] + load1(delta, bf16, i), bf16);
}

void load_row(const void* x, bool bf16, int64_t D, float* out) {
  for (int64_t i = 0; i < D; ++i) out[i] = load1(x, bf16, i);
}

void store_row(const float* x, bool bf16, int64_t D, void* out) {
  for (int64_t i = 0; i < D; ++i) store1(out, bf16, i, x[i]);
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

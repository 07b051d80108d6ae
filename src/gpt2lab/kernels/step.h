// The small operations of a native decoding step (step_ops.cpp, AVX-512F), free of
// torch types like gemv.h. Activations are float32 or bf16 (bf16 = true: uint16_t bit
// patterns); the residual stream is kept in float32 holding the values the eager
// model would hold (rounded to bf16 after each add when bf16).
#pragma once

#include <cstdint>

namespace gpt2lab {

// y = LayerNorm(x) * w + b for one row of D values (w, b, y in the activation type).
void layer_norm_row(const float* x, const void* w, const void* b, bool bf16, int64_t D, float eps,
                    void* y);
// resid += delta, rounded as the eager model rounds.
void add_row(float* resid, const void* delta, bool bf16, int64_t D);
void load_row(const void* x, bool bf16, int64_t D, float* out);
void store_row(const float* x, bool bf16, int64_t D, void* out);
// One head of one query: writes k_new / v_new (dh values) at row `pos` of this head's
// cache rows (k_cache, v_cache: [max_len, dh]) and z = softmax(q k^T * scale) v over
// rows 0..pos. `scores`: room for pos + 1 floats. dh: a multiple of 16, at most 128.
void attend_head(const void* q, const void* k_new, const void* v_new, void* k_cache,
                 void* v_cache, int64_t pos, int64_t dh, float scale, bool bf16, float* scores,
                 void* z);
// The greedy token of one row of V logits (the first index of the maximum, as torch's
// argmax) and its log-softmax; NaN where the row has a NaN, +inf or only -inf.
void greedy_row(const void* logits, bool bf16, int64_t V, int64_t* id, float* logprob);

}  // namespace gpt2lab

// The kernels' entry points, free of torch types: each gemv_*.cpp is compiled for its
// own instruction set (a `#pragma GCC target` at its top) and only ever called after
// gemv.cpp has checked that the CPU has it, so one module serves every AVX-512 CPU.
//
// Each call computes the output columns [n0, n1) of y [M, N] for all M rows:
//   y[m, n] = act(sum_k x[m, k] * w[n, k] + bias[n])
// accumulated in float32, with act 0 none, 1 GELU (tanh approximation), 2 GELU (erf),
// applied to the float32 value before the single rounding to the output type.
// bf16 values are passed as their uint16_t bit patterns.
#pragma once

#include <cstdint>

namespace gpt2lab {

void f32_gemv_cols(const float* x, const float* w, const float* bias, float* y, int64_t M,
                   int64_t K, int64_t N, int act, int64_t n0, int64_t n1);

void bf16_gemv_cols(const uint16_t* x, const uint16_t* w, const uint16_t* bias, uint16_t* y,
                    int64_t M, int64_t K, int64_t N, int act, int64_t n0, int64_t n1);

// int8 weights: x is first turned into xq [M][2][K] unsigned bytes and a scale per row
// (int8_quantize_rows, see gemv_int8.cpp), then y = xs[m] * scales[n] * dot + bias[n].
// x_bf16 / y_bf16 say whether x and y are bf16 (else float32).
void int8_quantize_rows(const void* x, bool x_bf16, int64_t K, int64_t m0, int64_t m1,
                        uint8_t* xq, float* xs);
void int8_gemv_cols(const uint8_t* xq, const float* xs, const int8_t* q, const int32_t* q_sum,
                    const float* scales, const float* bias, void* y, bool y_bf16, int64_t M,
                    int64_t K, int64_t N, int act, int64_t n0, int64_t n1);

}  // namespace gpt2lab

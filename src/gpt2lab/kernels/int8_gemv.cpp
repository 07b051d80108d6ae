// y = x @ (q * scales[:, None]).T + bias for a few rows of x, reading each int8 weight
// once with AVX-512 VNNI. See gpt2lab/kernels/__init__.py for why and for the numerics.
//
// x [M, K] float32, q [N, K] int8, q_sum [N] int32 (row sums of q), scales [N] float32,
// bias [N] float32 or empty  ->  y [M, N] float32.   K % 64 == 0.
//
// Each row of x is quantized to two int8 vectors, hi and lo:
//   s = max|x| / 127,  t = x / s,  hi = round(t),  lo = round((t - hi) * 254)
// so x = s * (hi + lo / 254) to within s / 508 (16 bits over the row's range). VNNI's
// dot product wants unsigned bytes on one side: hi + 128 and lo + 128 are fed in, and
// 128 * q_sum is taken off the int32 sums.
#include <ATen/Parallel.h>
#include <immintrin.h>
#include <torch/extension.h>

#include <vector>

namespace {

constexpr int64_t kPrefetch = 2048;  // bytes ahead of the weight read

inline int32_t hsum(__m512i v) { return _mm512_reduce_add_epi32(v); }

}  // namespace

torch::Tensor int8_gemv(torch::Tensor x, torch::Tensor q, torch::Tensor q_sum,
                        torch::Tensor scales, torch::Tensor bias) {
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == torch::kFloat && x.is_contiguous());
  TORCH_CHECK(q.dim() == 2 && q.scalar_type() == torch::kChar && q.is_contiguous());
  const int64_t M = x.size(0), K = x.size(1), N = q.size(0);
  TORCH_CHECK(q.size(1) == K && K % 64 == 0, "int8_gemv: K must match and be a multiple of 64");
  TORCH_CHECK(q_sum.scalar_type() == torch::kInt && q_sum.numel() == N);
  TORCH_CHECK(scales.scalar_type() == torch::kFloat && scales.numel() == N);
  const bool has_bias = bias.numel() > 0;
  TORCH_CHECK(!has_bias || (bias.scalar_type() == torch::kFloat && bias.numel() == N));

  // Quantize the activations: [M][2][K] unsigned bytes, and each row's scale.
  std::vector<uint8_t> xq(M * 2 * K);
  std::vector<float> xs(M);
  const float* xp = x.data_ptr<float>();
  const __m512i offset = _mm512_set1_epi32(128);
  for (int64_t m = 0; m < M; ++m) {
    const float* row = xp + m * K;
    __m512 vmax = _mm512_setzero_ps();
    for (int64_t k = 0; k < K; k += 16)
      vmax = _mm512_max_ps(vmax, _mm512_abs_ps(_mm512_loadu_ps(row + k)));
    const float amax = _mm512_reduce_max_ps(vmax);
    const float s = amax > 0.f ? amax / 127.f : 1.f;
    xs[m] = s;
    const __m512 inv = _mm512_set1_ps(1.f / s), frac = _mm512_set1_ps(254.f);
    uint8_t* hi = xq.data() + m * 2 * K;
    uint8_t* lo = hi + K;
    for (int64_t k = 0; k < K; k += 16) {  // round to nearest even, as nearbyint
      const __m512 t = _mm512_mul_ps(_mm512_loadu_ps(row + k), inv);
      const __m512 h = _mm512_roundscale_ps(t, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
      const __m512 l = _mm512_roundscale_ps(_mm512_mul_ps(_mm512_sub_ps(t, h), frac),
                                            _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
      const __m512i hu = _mm512_add_epi32(_mm512_cvtps_epi32(h), offset);
      const __m512i lu = _mm512_add_epi32(_mm512_cvtps_epi32(l), offset);
      _mm_storeu_si128(reinterpret_cast<__m128i*>(hi + k), _mm512_cvtepi32_epi8(hu));
      _mm_storeu_si128(reinterpret_cast<__m128i*>(lo + k), _mm512_cvtepi32_epi8(lu));
    }
  }

  auto y = torch::empty({M, N}, x.options());
  float* yp = y.data_ptr<float>();
  const int8_t* qp = q.data_ptr<int8_t>();
  const int32_t* qs = q_sum.data_ptr<int32_t>();
  const float* sc = scales.data_ptr<float>();
  const float* bp = has_bias ? bias.data_ptr<float>() : nullptr;

  auto finish = [&](int64_t m, int64_t n, int32_t acc_hi, int32_t acc_lo) {
    const int32_t offset = 128 * qs[n];
    const float dot = static_cast<float>(acc_hi - offset) +
                      static_cast<float>(acc_lo - offset) * (1.f / 254.f);
    yp[m * N + n] = xs[m] * sc[n] * dot + (bp ? bp[n] : 0.f);
  };

  // One weight row at a time, front to back: memory is read as one sequential stream,
  // which the hardware prefetcher follows (four rows interleaved ran at a third of the
  // bandwidth); four accumulator pairs per row hide VNNI's latency.
  at::parallel_for(0, N, 64, [&](int64_t n0, int64_t n1) {
    for (int64_t n = n0; n < n1; ++n) {
      const int8_t* w = qp + n * K;
      for (int64_t m = 0; m < M; ++m) {
        const uint8_t* hi = xq.data() + m * 2 * K;
        const uint8_t* lo = hi + K;
        __m512i h0 = _mm512_setzero_si512(), h1 = h0, h2 = h0, h3 = h0;
        __m512i l0 = h0, l1 = h0, l2 = h0, l3 = h0;
        int64_t k = 0;
        for (; k + 256 <= K; k += 256) {
          _mm_prefetch(reinterpret_cast<const char*>(w + k + kPrefetch), _MM_HINT_T0);
          _mm_prefetch(reinterpret_cast<const char*>(w + k + kPrefetch + 64), _MM_HINT_T0);
          _mm_prefetch(reinterpret_cast<const char*>(w + k + kPrefetch + 128), _MM_HINT_T0);
          _mm_prefetch(reinterpret_cast<const char*>(w + k + kPrefetch + 192), _MM_HINT_T0);
          const __m512i a = _mm512_loadu_si512(w + k), c = _mm512_loadu_si512(w + k + 64);
          const __m512i d = _mm512_loadu_si512(w + k + 128), e = _mm512_loadu_si512(w + k + 192);
          h0 = _mm512_dpbusd_epi32(h0, _mm512_loadu_si512(hi + k), a);
          l0 = _mm512_dpbusd_epi32(l0, _mm512_loadu_si512(lo + k), a);
          h1 = _mm512_dpbusd_epi32(h1, _mm512_loadu_si512(hi + k + 64), c);
          l1 = _mm512_dpbusd_epi32(l1, _mm512_loadu_si512(lo + k + 64), c);
          h2 = _mm512_dpbusd_epi32(h2, _mm512_loadu_si512(hi + k + 128), d);
          l2 = _mm512_dpbusd_epi32(l2, _mm512_loadu_si512(lo + k + 128), d);
          h3 = _mm512_dpbusd_epi32(h3, _mm512_loadu_si512(hi + k + 192), e);
          l3 = _mm512_dpbusd_epi32(l3, _mm512_loadu_si512(lo + k + 192), e);
        }
        for (; k < K; k += 64) {  // K % 256 != 0 (gpt2-xl's 1600): 64 bytes at a time
          const __m512i a = _mm512_loadu_si512(w + k);
          h0 = _mm512_dpbusd_epi32(h0, _mm512_loadu_si512(hi + k), a);
          l0 = _mm512_dpbusd_epi32(l0, _mm512_loadu_si512(lo + k), a);
        }
        const __m512i h = _mm512_add_epi32(_mm512_add_epi32(h0, h1), _mm512_add_epi32(h2, h3));
        const __m512i l = _mm512_add_epi32(_mm512_add_epi32(l0, l1), _mm512_add_epi32(l2, l3));
        finish(m, n, hsum(h), hsum(l));
      }
    }
  });
  return y;
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("int8_gemv", &int8_gemv, "int8-weight GEMV for a few rows (AVX-512 VNNI)");
}

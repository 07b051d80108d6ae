// torch bindings of the native GEMV kernels (gemv_*.cpp): argument checks, the output,
// and the split of the output columns between threads. This file is compiled for
// plain x86-64; each kernel refuses to run on a CPU without its instruction set
// (gpt2lab.kernels.native checks first, so this is only a guard against SIGILL).
#include <ATen/Parallel.h>
#include <omp.h>
#include <torch/extension.h>

#include <vector>

#include "chunks.h"
#include "gemv.h"

namespace {

bool cpu_has(const char* what) {
  __builtin_cpu_init();
  if (std::string(what) == "f32") return __builtin_cpu_supports("avx512f");
  if (std::string(what) == "bf16")
    return __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512bf16");
  return __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512vnni");
}

// Computes the output columns [0, N) over torch's thread count (torch.get_num_threads()),
// in chunks as threads come free (chunks.h). Under ~64 KB of weights per thread the
// threads' start-up costs more than it saves: one thread does it all.
template <class F>
void over_columns(int64_t N, int64_t K, int64_t elem_bytes, const F& f) {
  const int64_t least = gpt2lab::least_chunk(K, elem_bytes);
  const int64_t tiles = (N + gpt2lab::kTileCols - 1) / gpt2lab::kTileCols;
  const int nt = at::in_parallel_region() ? 1 : std::max(1, at::get_num_threads());
  if (nt == 1 || tiles < 2 * least) {
    f(0, N);
    return;
  }
  std::atomic<int64_t> next{0};
#pragma omp parallel num_threads(nt)
  gpt2lab::take_chunks(next, N, least, omp_get_num_threads(), f);
}

void check_common(const char* name, const torch::Tensor& x, const torch::Tensor& w,
                  int64_t multiple, int64_t act) {
  TORCH_CHECK(x.device().is_cpu() && w.device().is_cpu(), name, ": CPU tensors only");
  TORCH_CHECK(x.dim() == 2 && x.is_contiguous(), name, ": x must be a contiguous [M, K] matrix");
  TORCH_CHECK(w.dim() == 2 && w.is_contiguous(), name, ": the weight must be a contiguous [N, K] matrix");
  TORCH_CHECK(x.size(1) == w.size(1), name, ": x has ", x.size(1), " columns, the weight ",
              w.size(1));
  TORCH_CHECK(w.size(1) > 0 && w.size(1) % multiple == 0, name, ": K = ", w.size(1),
              " is not a multiple of ", multiple);
  TORCH_CHECK(act >= 0 && act <= 2, name, ": act must be 0 (none), 1 (GELU tanh) or 2 (GELU erf)");
}

const void* bias_ptr(const char* name, const torch::Tensor& bias, int64_t N,
                     torch::ScalarType dtype) {
  if (bias.numel() == 0) return nullptr;
  TORCH_CHECK(bias.scalar_type() == dtype && bias.numel() == N && bias.is_contiguous(), name,
              ": bias must be empty or a contiguous [N] tensor of ", dtype);
  return bias.data_ptr();
}

}  // namespace

torch::Tensor f32_gemv(torch::Tensor x, torch::Tensor w, torch::Tensor bias, int64_t act) {
  TORCH_CHECK(cpu_has("f32"), "f32_gemv: this CPU lacks AVX-512");
  check_common("f32_gemv", x, w, 16, act);
  TORCH_CHECK(x.scalar_type() == torch::kFloat && w.scalar_type() == torch::kFloat,
              "f32_gemv: x and the weight must be float32");
  const int64_t M = x.size(0), K = x.size(1), N = w.size(0);
  const auto* b = static_cast<const float*>(bias_ptr("f32_gemv", bias, N, torch::kFloat));
  auto y = torch::empty({M, N}, x.options());
  const float *xp = x.data_ptr<float>(), *wp = w.data_ptr<float>();
  float* yp = y.data_ptr<float>();
  over_columns(N, K, 4, [&](int64_t n0, int64_t n1) {
    gpt2lab::f32_gemv_cols(xp, wp, b, yp, M, K, N, static_cast<int>(act), n0, n1);
  });
  return y;
}

torch::Tensor bf16_gemv(torch::Tensor x, torch::Tensor w, torch::Tensor bias, int64_t act) {
  TORCH_CHECK(cpu_has("bf16"), "bf16_gemv: this CPU lacks AVX-512 BF16");
  check_common("bf16_gemv", x, w, 32, act);
  TORCH_CHECK(x.scalar_type() == torch::kBFloat16 && w.scalar_type() == torch::kBFloat16,
              "bf16_gemv: x and the weight must be bfloat16");
  const int64_t M = x.size(0), K = x.size(1), N = w.size(0);
  const auto* b = static_cast<const uint16_t*>(bias_ptr("bf16_gemv", bias, N, torch::kBFloat16));
  auto y = torch::empty({M, N}, x.options());
  const auto* xp = static_cast<const uint16_t*>(x.data_ptr());
  const auto* wp = static_cast<const uint16_t*>(w.data_ptr());
  auto* yp = static_cast<uint16_t*>(y.data_ptr());
  over_columns(N, K, 2, [&](int64_t n0, int64_t n1) {
    gpt2lab::bf16_gemv_cols(xp, wp, b, yp, M, K, N, static_cast<int>(act), n0, n1);
  });
  return y;
}

torch::Tensor int8_gemv(torch::Tensor x, torch::Tensor q, torch::Tensor q_sum,
                        torch::Tensor scales, torch::Tensor bias, int64_t act) {
  TORCH_CHECK(cpu_has("int8"), "int8_gemv: this CPU lacks AVX-512 VNNI");
  check_common("int8_gemv", x, q, 64, act);
  const bool x_bf16 = x.scalar_type() == torch::kBFloat16;
  TORCH_CHECK(x_bf16 || x.scalar_type() == torch::kFloat, "int8_gemv: x must be bfloat16 or float32");
  TORCH_CHECK(q.scalar_type() == torch::kChar, "int8_gemv: the weight must be int8");
  const int64_t M = x.size(0), K = x.size(1), N = q.size(0);
  TORCH_CHECK(q_sum.scalar_type() == torch::kInt && q_sum.numel() == N && q_sum.is_contiguous(),
              "int8_gemv: q_sum must be the int32 [N] row sums of the weight");
  TORCH_CHECK(scales.scalar_type() == torch::kFloat && scales.numel() == N && scales.is_contiguous(),
              "int8_gemv: scales must be float32 [N]");
  const auto* b = static_cast<const float*>(bias_ptr("int8_gemv", bias, N, torch::kFloat));

  std::vector<uint8_t> xq(M * 2 * K);
  std::vector<float> xs(M);
  const void* xp = x.data_ptr();
  at::parallel_for(0, M, std::max<int64_t>(1, (64 << 10) / K), [&](int64_t m0, int64_t m1) {
    gpt2lab::int8_quantize_rows(xp, x_bf16, K, m0, m1, xq.data(), xs.data());
  });

  auto y = torch::empty({M, N}, x.options());  // bf16 in, bf16 out; float32 likewise
  over_columns(N, K, 1, [&](int64_t n0, int64_t n1) {
    gpt2lab::int8_gemv_cols(xq.data(), xs.data(), q.data_ptr<int8_t>(), q_sum.data_ptr<int32_t>(),
                            scales.data_ptr<float>(), b, y.data_ptr(), x_bf16, M, K, N,
                            static_cast<int>(act), n0, n1);
  });
  return y;
}

void register_step(pybind11::module_& m);  // step.cpp

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  namespace py = pybind11;
  register_step(m);
  m.def("f32_gemv", &f32_gemv, "float32 GEMV for a few rows (AVX-512F)", py::arg("x"),
        py::arg("w"), py::arg("bias"), py::arg("act") = 0);
  m.def("bf16_gemv", &bf16_gemv, "bf16 GEMV for a few rows (AVX-512 BF16)", py::arg("x"),
        py::arg("w"), py::arg("bias"), py::arg("act") = 0);
  m.def("int8_gemv", &int8_gemv, "int8-weight GEMV for a few rows (AVX-512 VNNI)", py::arg("x"),
        py::arg("q"), py::arg("q_sum"), py::arg("scales"), py::arg("bias"), py::arg("act") = 0);
}

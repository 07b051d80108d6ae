// A native decoding step: one new token of each of a few sequences (a batch without
// padding) from its id to its logits in one call: the embeddings, every block, the
// final LayerNorm and the unembedding (kernels/step.py decides when it runs). An eager
// step pays ~40 small torch ops per layer around its weight reads (3-14 ms a token at
// gpt2-medium size on the 2-core AMD EPYC); here the whole step is one OpenMP region:
// each matrix-vector product is split by output columns over the threads (gemv_*.cpp,
// each weight streamed once for all rows; chunks.h), the (row, head) pairs of attention
// likewise, and the threads meet at a barrier only where the next product needs the
// whole previous output (five per layer). The residual stream and the LayerNorms, a few
// thousand values, are computed by every thread into its own copy, which costs less
// than another barrier. Compiled for plain x86-64 (torch's headers); the arithmetic
// lives in step_ops.cpp and gemv_*.cpp, each built for its instruction set.
#include <omp.h>
#include <torch/extension.h>

#include <atomic>
#include <memory>
#include <tuple>
#include <vector>

#include "chunks.h"
#include "gemv.h"
#include "step.h"

namespace {

enum Kind : int64_t { kF32 = 0, kBF16 = 1, kInt8 = 2 };
constexpr int kPerLayer = 20;  // tensors per layer passed to the constructor

// One linear layer: a float32 or bf16 weight [N, K] with its bias (activation type), or
// an int8 weight with its row sums, float32 scales and float32 bias.
struct Lin {
  torch::Tensor w, bias, q_sum, scales;
  int64_t N = 0, K = 0;
};

struct Layer {
  torch::Tensor ln1_w, ln1_b, ln2_w, ln2_b;
  Lin qkv, out, fc, proj;
  float scale = 1.f;
};

const void* ptr_or_null(const torch::Tensor& t) { return t.numel() ? t.data_ptr() : nullptr; }

bool cpu_can(Kind kind) {
  __builtin_cpu_init();
  if (!__builtin_cpu_supports("avx512f") || !__builtin_cpu_supports("avx512bw")) return false;
  if (kind == kBF16) return __builtin_cpu_supports("avx512bf16");
  if (kind == kInt8) return __builtin_cpu_supports("avx512vnni");
  return true;
}

class Step {
 public:
  // tensors: kPerLayer per layer; head: the token and position embeddings, the final
  // LayerNorm's weight and bias and the unembedding as a linear layer (4 tensors).
  Step(int64_t kind, int64_t act, double eps, std::vector<double> scales,
       std::vector<torch::Tensor> tensors, std::vector<torch::Tensor> head)
      : kind_(static_cast<Kind>(kind)), act_(static_cast<int>(act)), eps_(static_cast<float>(eps)) {
    TORCH_CHECK(kind >= 0 && kind <= 2, "Step: kind must be 0 (float32), 1 (bf16) or 2 (int8)");
    TORCH_CHECK(cpu_can(kind_), "Step: this CPU lacks the instructions of this step");
    TORCH_CHECK(act >= 0 && act <= 2, "Step: act must be 0, 1 (GELU tanh) or 2 (GELU erf)");
    TORCH_CHECK(!scales.empty() && tensors.size() == scales.size() * kPerLayer,
                "Step: ", kPerLayer, " tensors per layer and one scale per layer");
    bf16_ = kind_ != kF32;
    const auto adtype = bf16_ ? torch::kBFloat16 : torch::kFloat;
    for (size_t l = 0; l < scales.size(); ++l) {
      const torch::Tensor* t = tensors.data() + l * kPerLayer;
      Layer layer;
      layer.ln1_w = t[0], layer.ln1_b = t[1], layer.ln2_w = t[2], layer.ln2_b = t[3];
      layer.qkv = lin(t + 4), layer.out = lin(t + 8), layer.fc = lin(t + 12), layer.proj = lin(t + 16);
      layer.scale = static_cast<float>(scales[l]);
      if (l == 0) {
        D_ = layer.qkv.K, d_mlp_ = layer.fc.N;
      }
      for (const auto* ln : {&layer.ln1_w, &layer.ln1_b, &layer.ln2_w, &layer.ln2_b})
        TORCH_CHECK(ln->scalar_type() == adtype && ln->numel() == D_ && ln->is_contiguous(),
                    "Step: LayerNorm parameters must be contiguous [d_model] of the activation type");
      TORCH_CHECK(layer.qkv.N == 3 * D_ && layer.out.N == D_ && layer.out.K == D_ &&
                      layer.fc.K == D_ && layer.fc.N == d_mlp_ && layer.proj.K == d_mlp_ &&
                      layer.proj.N == D_,
                  "Step: layer ", l, " has weights of the wrong shapes");
      layers_.push_back(std::move(layer));
    }
    TORCH_CHECK(head.size() == 8, "Step: head must hold wte, wpe, ln_final weight and bias, and "
                "the unembedding's 4 tensors");
    wte_ = head[0], wpe_ = head[1], lnf_w_ = head[2], lnf_b_ = head[3];
    for (const auto* emb : {&wte_, &wpe_})
      TORCH_CHECK(emb->scalar_type() == adtype && emb->dim() == 2 && emb->size(1) == D_ &&
                      emb->size(0) > 0 && emb->is_contiguous(),
                  "Step: embeddings must be contiguous [rows, d_model] of the activation type");
    for (const auto* ln : {&lnf_w_, &lnf_b_})
      TORCH_CHECK(ln->scalar_type() == adtype && ln->numel() == D_ && ln->is_contiguous(),
                  "Step: LayerNorm parameters must be contiguous [d_model] of the activation type");
    unembed_ = lin(head.data() + 4);
    TORCH_CHECK(unembed_.K == D_, "Step: the unembedding must be [d_vocab, d_model]");
  }

  // tokens: int64 [rows], one new token for each of `rows` sequences of the same length
  // (no padding); positions: int64 [rows], each token's position embedding, or empty
  // for `pos`; k_cache, v_cache: [layers, rows, heads, max_len, d_head] (the model's
  // KVCache), written at `pos`; returns the logits [rows, d_vocab] in the activation type.
  torch::Tensor run(torch::Tensor tokens, torch::Tensor positions, torch::Tensor k_cache,
                    torch::Tensor v_cache, int64_t pos, int64_t chunk_bytes) {
    TORCH_CHECK(chunk_bytes > 0, "Step.run: chunk_bytes must be positive");
    const auto adtype = bf16_ ? torch::kBFloat16 : torch::kFloat;
    const int64_t L = static_cast<int64_t>(layers_.size()), M = tokens.numel();
    for (const auto* t : {&tokens, &positions})
      TORCH_CHECK(t->scalar_type() == torch::kLong && t->dim() == 1 && t->device().is_cpu(),
                  "Step.run: tokens and positions must be int64 [rows] tensors");
    TORCH_CHECK(M >= 1 && (positions.numel() == 0 || positions.numel() == M),
                "Step.run: one token per row, and one position per token or none");
    std::vector<int64_t> tok(M), at_pos(M, pos);  // (any strides)
    for (int64_t m = 0; m < M; ++m) {
      tok[m] = tokens.data_ptr<int64_t>()[m * tokens.stride(0)];
      if (positions.numel()) at_pos[m] = positions.data_ptr<int64_t>()[m * positions.stride(0)];
      TORCH_CHECK(tok[m] >= 0 && tok[m] < wte_.size(0), "Step.run: token id ", tok[m],
                  " is outside the vocabulary");
      TORCH_CHECK(at_pos[m] >= 0 && at_pos[m] < wpe_.size(0), "Step.run: position ", at_pos[m],
                  " is outside the position embedding");
    }
    for (const auto* c : {&k_cache, &v_cache})
      TORCH_CHECK(c->scalar_type() == adtype && c->dim() == 5 && c->size(0) == L &&
                      c->size(1) == M && c->is_contiguous() && c->size(2) * c->size(4) == D_,
                  "Step.run: caches must be contiguous [layers, rows, heads, max_len, d_head]");
    const int64_t H = k_cache.size(2), max_len = k_cache.size(3), dh = k_cache.size(4);
    TORCH_CHECK(v_cache.sizes() == k_cache.sizes(), "Step.run: key and value caches differ in shape");
    TORCH_CHECK(dh % 16 == 0 && dh <= 128, "Step.run: d_head must be a multiple of 16, at most 128");
    TORCH_CHECK(pos >= 0 && pos < max_len, "Step.run: position ", pos, " is outside the cache");

    const int64_t e = bf16_ ? 2 : 4;  // bytes of an activation
    auto logits = torch::empty({M, unembed_.N}, wte_.options());
    std::vector<char> qkv(M * 3 * D_ * e), z(M * D_ * e), ao(M * D_ * e), u(M * d_mlp_ * e),
        mo(M * D_ * e);
    const int nt = at::in_parallel_region() ? 1 : std::max(1, at::get_num_threads());
    // one chunk counter per product: [layer][qkv, out, fc, proj]
    // (and one for the unembedding)
    std::unique_ptr<std::atomic<int64_t>[]> next(new std::atomic<int64_t>[4 * L + 1]);
    for (int64_t i = 0; i < 4 * L + 1; ++i) next[i].store(0, std::memory_order_relaxed);
    char* kc = static_cast<char*>(k_cache.data_ptr());
    char* vc = static_cast<char*>(v_cache.data_ptr());
    const int64_t head_bytes = max_len * dh * e;

#pragma omp parallel num_threads(nt)
    {
      const int tid = omp_get_thread_num(), T = omp_get_num_threads();
      std::vector<float> resid(M * D_), scores(pos + 1), xs(M);
      std::vector<char> h(M * D_ * e);
      std::vector<uint8_t> xq(kind_ == kInt8 ? M * 2 * std::max(D_, d_mlp_) : 0);
      // the embeddings, wte[token] + wpe[position], rounded once as the eager sum
      const auto* wte = static_cast<const char*>(wte_.data_ptr());
      const auto* wpe = static_cast<const char*>(wpe_.data_ptr());
      for (int64_t m = 0; m < M; ++m) {
        gpt2lab::load_row(wte + tok[m] * D_ * e, bf16_, D_, &resid[m * D_]);
        gpt2lab::add_row(&resid[m * D_], wpe + at_pos[m] * D_ * e, bf16_, D_);
      }
      // this thread's (row, head) pairs of attention
      const int64_t a0 = M * H * tid / T, a1 = M * H * (tid + 1) / T;
      auto norm = [&](const torch::Tensor& w, const torch::Tensor& b) {
        for (int64_t m = 0; m < M; ++m)
          gpt2lab::layer_norm_row(&resid[m * D_], w.data_ptr(), b.data_ptr(), bf16_, D_, eps_,
                                  h.data() + m * D_ * e);
      };
      auto add = [&](const std::vector<char>& delta) {
        for (int64_t m = 0; m < M; ++m)
          gpt2lab::add_row(&resid[m * D_], delta.data() + m * D_ * e, bf16_, D_);
      };
      auto product = [&](const Lin& lin, const char* in, char* out, int act, int64_t i) {
        gemv(lin, in, out, M, act, next[i], chunk_bytes, T, xq.data(), xs.data());
      };
      for (int64_t l = 0; l < L; ++l) {
        const Layer& ly = layers_[l];
        norm(ly.ln1_w, ly.ln1_b);
        product(ly.qkv, h.data(), qkv.data(), 0, 4 * l);
#pragma omp barrier
        for (int64_t a = a0; a < a1; ++a) {
          const int64_t m = a / H, hd = a % H;
          const int64_t at = ((l * M + m) * H + hd) * head_bytes;
          const char* q = qkv.data() + (m * 3 * D_ + hd * dh) * e;
          gpt2lab::attend_head(q, q + D_ * e, q + 2 * D_ * e, kc + at, vc + at, pos, dh, ly.scale,
                               bf16_, scores.data(), z.data() + (m * D_ + hd * dh) * e);
        }
#pragma omp barrier
        product(ly.out, z.data(), ao.data(), 0, 4 * l + 1);
#pragma omp barrier
        add(ao);
        norm(ly.ln2_w, ly.ln2_b);
        product(ly.fc, h.data(), u.data(), act_, 4 * l + 2);
#pragma omp barrier
        product(ly.proj, u.data(), mo.data(), 0, 4 * l + 3);
#pragma omp barrier
        add(mo);
      }
      norm(lnf_w_, lnf_b_);
      product(unembed_, h.data(), static_cast<char*>(logits.data_ptr()), 0, 4 * L);
    }
    return logits;
  }

 private:
  Lin lin(const torch::Tensor* t) const {
    Lin l{t[0], t[1], t[2], t[3], t[0].size(0), t[0].dim() == 2 ? t[0].size(1) : 0};
    TORCH_CHECK(l.w.dim() == 2 && l.w.is_contiguous(), "Step: weights must be contiguous [N, K]");
    if (kind_ == kInt8) {
      TORCH_CHECK(l.w.scalar_type() == torch::kChar && l.K % 64 == 0,
                  "Step: int8 weights [N, K] with K a multiple of 64");
      TORCH_CHECK(l.q_sum.scalar_type() == torch::kInt && l.q_sum.numel() == l.N &&
                      l.scales.scalar_type() == torch::kFloat && l.scales.numel() == l.N &&
                      l.q_sum.is_contiguous() && l.scales.is_contiguous(),
                  "Step: int8 layers need int32 row sums and float32 scales [N]");
      TORCH_CHECK(l.bias.numel() == 0 || (l.bias.scalar_type() == torch::kFloat &&
                                          l.bias.numel() == l.N && l.bias.is_contiguous()),
                  "Step: an int8 layer's bias must be float32 [N]");
    } else {
      const auto dtype = kind_ == kBF16 ? torch::kBFloat16 : torch::kFloat;
      TORCH_CHECK(l.w.scalar_type() == dtype && l.K % (kind_ == kBF16 ? 32 : 16) == 0,
                  "Step: weights of the model's dtype, K a multiple of 16 (float32) / 32 (bf16)");
      TORCH_CHECK(l.bias.numel() == 0 || (l.bias.scalar_type() == dtype &&
                                          l.bias.numel() == l.N && l.bias.is_contiguous()),
                  "Step: a bias must be [N] of the model's dtype");
    }
    return l;
  }

  // This thread's share of y = act(x W^T + b), in chunks taken from `next` (chunks.h).
  void gemv(const Lin& l, const void* x, void* y, int64_t M, int act, std::atomic<int64_t>& next,
            int64_t chunk_bytes, int T, uint8_t* xq, float* xs) const {
    const int64_t elem = kind_ == kInt8 ? 1 : (kind_ == kBF16 ? 2 : 4);
    if (kind_ == kInt8) gpt2lab::int8_quantize_rows(x, true, l.K, 0, M, xq, xs);
    gpt2lab::take_chunks(next, l.N, gpt2lab::least_chunk(l.K, elem, chunk_bytes), T,
                         [&](int64_t n0, int64_t n1) { cols(l, x, y, M, act, n0, n1, xq, xs); });
  }

  void cols(const Lin& l, const void* x, void* y, int64_t M, int act, int64_t n0, int64_t n1,
            const uint8_t* xq, const float* xs) const {
    if (kind_ == kF32) {
      gpt2lab::f32_gemv_cols(static_cast<const float*>(x), static_cast<const float*>(l.w.data_ptr()),
                             static_cast<const float*>(ptr_or_null(l.bias)), static_cast<float*>(y),
                             M, l.K, l.N, act, n0, n1);
    } else if (kind_ == kBF16) {
      gpt2lab::bf16_gemv_cols(static_cast<const uint16_t*>(x),
                              static_cast<const uint16_t*>(l.w.data_ptr()),
                              static_cast<const uint16_t*>(ptr_or_null(l.bias)),
                              static_cast<uint16_t*>(y), M, l.K, l.N, act, n0, n1);
    } else {
      gpt2lab::int8_gemv_cols(xq, xs, static_cast<const int8_t*>(l.w.data_ptr()),
                              static_cast<const int32_t*>(l.q_sum.data_ptr()),
                              static_cast<const float*>(l.scales.data_ptr()),
                              static_cast<const float*>(ptr_or_null(l.bias)), y, true, M, l.K,
                              l.N, act, n0, n1);
    }
  }

  Kind kind_;
  int act_;
  float eps_;
  bool bf16_ = false;
  int64_t D_ = 0, d_mlp_ = 0;
  std::vector<Layer> layers_;
  torch::Tensor wte_, wpe_, lnf_w_, lnf_b_;
  Lin unembed_;
};

// The greedy pick of each row of logits [B, V] (float32 or bf16): (ids int64 [B], their
// log-softmax float32 [B]) in two passes over each row, where torch takes four ops
// (float, log_softmax, argmax, gather) of ~50 us each on a decoding step's cold caches.
std::tuple<torch::Tensor, torch::Tensor> greedy(torch::Tensor logits) {
  TORCH_CHECK(cpu_can(kF32), "greedy: this CPU lacks AVX-512");
  TORCH_CHECK(logits.device().is_cpu() && logits.dim() == 2 && logits.size(1) > 0 &&
                  (logits.scalar_type() == torch::kFloat || logits.scalar_type() == torch::kBFloat16),
              "greedy: logits must be a CPU [rows, vocab] tensor of float32 or bfloat16");
  const auto x = logits.contiguous();
  const int64_t B = x.size(0), V = x.size(1);
  const bool bf16 = x.scalar_type() == torch::kBFloat16;
  auto ids = torch::empty({B}, x.options().dtype(torch::kLong));
  auto lp = torch::empty({B}, x.options().dtype(torch::kFloat));
  const char* base = static_cast<const char*>(x.data_ptr());
  for (int64_t b = 0; b < B; ++b)
    gpt2lab::greedy_row(base + b * V * x.element_size(), bf16, V, ids.data_ptr<int64_t>() + b,
                        lp.data_ptr<float>() + b);
  return {ids, lp};
}

}  // namespace

void register_step(pybind11::module_& m) {
  namespace py = pybind11;
  py::class_<Step>(m, "Step", "one new token of each of a few sequences, ids to logits (step.cpp)")
      .def(py::init<int64_t, int64_t, double, std::vector<double>, std::vector<torch::Tensor>,
                    std::vector<torch::Tensor>>(),
           py::arg("kind"), py::arg("act"), py::arg("eps"), py::arg("scales"), py::arg("tensors"),
           py::arg("head"))
      .def("run", &Step::run, py::arg("tokens"), py::arg("positions"), py::arg("k_cache"),
           py::arg("v_cache"), py::arg("pos"),
           py::arg("chunk_bytes") = gpt2lab::kChunkBytes, py::call_guard<py::gil_scoped_release>());
  m.def("greedy", &greedy, "argmax of each row of logits and its log-softmax (AVX-512F)",
        py::arg("logits"), py::call_guard<py::gil_scoped_release>());
}

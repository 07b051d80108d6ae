// How threads share the output columns of a matrix-vector product (gemv.cpp, step.cpp).
//
// Threads take chunks of whole 16-column tiles as they come, from an atomic counter per
// product, each chunk half of what is left divided by the thread count, down to about
// kChunkBytes of weights ("guided" scheduling): long chunks first, so each core streams
// far before it jumps (the hardware prefetcher starts over at every jump), and short
// ones last, so no core waits long for the other at the end. Fixed halves made one slow
// core (a shared machine) hold the other at the end of every product; fixed 512 KB
// chunks still left ~30% of a bf16 decoding step waiting (AMD EPYC, gpt2-medium:
// 24.6 -> 17.7 ms a step guided). Results do not depend on who takes which chunk:
// every output column is computed alike, whatever thread computes it.
#pragma once

#include <algorithm>
#include <atomic>
#include <cstdint>

namespace gpt2lab {

constexpr int64_t kTileCols = 16;
constexpr int64_t kChunkBytes = 64 << 10;

// The least chunk, in tiles, for weights of K columns of `elem` bytes.
inline int64_t least_chunk(int64_t K, int64_t elem, int64_t chunk_bytes = kChunkBytes) {
  return std::max<int64_t>(1, chunk_bytes / (kTileCols * K * elem));
}

// Calls f(n0, n1) for the column ranges this thread takes, until none is left. Every
// one of the T threads calls it with the same `next` (set to 0 before).
template <class F>
inline void take_chunks(std::atomic<int64_t>& next, int64_t N, int64_t least, int T, const F& f) {
  const int64_t tiles = (N + kTileCols - 1) / kTileCols;
  int64_t c = next.load(std::memory_order_relaxed);
  while (c < tiles) {
    const int64_t size = std::max(least, (tiles - c) / (2 * T));
    if (!next.compare_exchange_weak(c, c + size, std::memory_order_relaxed)) continue;
    f(c * kTileCols, std::min(N, (c + size) * kTileCols));
    c = next.load(std::memory_order_relaxed);
  }
}

}  // namespace gpt2lab

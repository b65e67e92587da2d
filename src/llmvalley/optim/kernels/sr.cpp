// Stochastic rounding of float32 to bfloat16 with hashed noise, on CPU: the eager path of
// llmvalley/optim/quantize.py's bf16_round_with_seed (a compiled step hashes inside its graph).
// Element j gets common.h's round_bf16_hashed under the seed, j taken modulo 2^32.
#include <cstring>

#pragma GCC optimize("tree-loop-vectorize")

extern "C" void kernel(const float* x, void* bf16_out, int64_t n, int64_t seed,
                       int64_t threads) {
  uint16_t* out = static_cast<uint16_t*>(bf16_out);
  const uint32_t s = static_cast<uint32_t>(seed);
#pragma omp parallel for num_threads(static_cast<int>(threads)) if (threads > 1)
  for (int64_t j = 0; j < n; ++j)
    out[j] = llmvalley::round_bf16_hashed(x[j], static_cast<uint32_t>(j), s);
}

// Stochastic rounding of float32 to bfloat16 with hashed noise, on CPU: the eager path of
// llmvalley/optim/quantize.py's bf16_round_with_seed (a compiled step hashes inside its graph).
// Element j's noise is the top 16 bits of the 32-bit hash
//
//   h = j * 0x61C88647 + seed;  h ^= h >> 16;  h *= 0x7FEB352D;  h ^= h >> 15;  h *= 0x7B935975
//
// (mod 2^32); the rounded value keeps the top 16 bits of bits(x) + noise, and a NaN becomes
// 0xFFFF, what torch's vectorised float-to-bfloat16 conversion (AVX2, AVX512) and inductor's
// code give every NaN. Unsigned 32-bit arithmetic
// (defined to wrap), in a plain loop the compiler vectorises.
#include <cstring>

#pragma GCC optimize("tree-loop-vectorize")

extern "C" void kernel(const float* x, void* bf16_out, int64_t n, int64_t seed,
                       int64_t threads) {
  uint16_t* out = static_cast<uint16_t*>(bf16_out);
  const uint32_t s = static_cast<uint32_t>(seed);
#pragma omp parallel for num_threads(static_cast<int>(threads)) if (threads > 1)
  for (int64_t j = 0; j < n; ++j) {
    uint32_t h = static_cast<uint32_t>(j) * 0x61C88647u + s;
    h ^= h >> 16;
    h *= 0x7FEB352Du;
    h ^= h >> 15;
    h *= 0x7B935975u;
    uint32_t bits;
    std::memcpy(&bits, x + j, sizeof(bits));
    const bool nan = (bits & 0x7FFFFFFFu) > 0x7F800000u;
    out[j] = nan ? static_cast<uint16_t>(0xFFFFu)
                 : static_cast<uint16_t>((bits + (h >> 16)) >> 16);
  }
}

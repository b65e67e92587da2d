// Adam(W) and Lion with 8-bit or 4-bit block-wise state, one float32 tensor on CPU: the step of
// adamw8bit, adamw4bit and lion8bit (ScaleByAdam or LionDirection in
// llmvalley/optim/transforms, the shell's decoupled decay and write, and the codec of
// llmvalley/optim/quantize.py) in one pass over the tensor.
//
// The tensor is walked in chunks of 256 elements (one 8-bit block, two 4-bit ones). Each
// chunk's moments are decoded into L1 (code -> map[code] * absmax), updated with the gradient,
// the parameter written, and the new moments encoded (absmax of each block, value / absmax,
// nearest map entry): every parameter-sized array is read or written once. The nearest entry
// comes from the codec's table (quantize._code_table: one int32 per pattern of a float's top
// 16 bits, `code = (entry >> 17) + (low bits in float order >= (entry & 0x1FFFF))`), the
// same codes as the eager codec for the same values.
//
// The arithmetic is the foreach chain's, operation for operation, including where torch's CPU
// kernels fuse a multiply-add (lerp, addcmul, add with alpha): the same moments to the bit
// wherever the chain's vectorised loops and this loop agree, and so the same codes.
//
//   Adam (mode 0): m <- lerp(m, g, 1 - b1), v <- b2 v + (1 - b2) g^2,
//                  u = m / (sqrt(v) a + b)   (a = bc1 / sqrt(bc2), b = eps bc1)
//   Lion (mode 1): u = sign(b1 m + (1 - b1) g), m <- lerp(m, g, 1 - b2)
//   then p <- p shrink - lr u   (shrink = 1 - lr wd: the decoupled decay)
//
// A slot is stored in one of four kinds (the codec's): 8 (uint8 codes, blocks of 256),
// 4 (two codes a byte, the even element in the high nibble, blocks of 128), 16 (bfloat16,
// stored by stochastic rounding with the hashed noise of kernels/sr.cpp, under the slot's
// seed of this step and each element's index in the tensor) or 32 (float32: a float32 slot,
// or a tensor too small to quantize). Chunks are split evenly over the OpenMP threads.
#include <cstring>

// the plain loops below (packing codes, the tails) vectorised: inductor builds with
// -fno-tree-loop-vectorize
#pragma GCC optimize("tree-loop-vectorize")

namespace {
using namespace llmvalley;

constexpr int64_t CHUNK = 256;

struct Slot {
  void* data;           // codes (kinds 8, 4), bfloat16 bits (kind 16) or floats (kind 32)
  float* absmax;        // one per block (kinds 8, 4)
  const float* map;     // the sorted code map (kinds 8, 4)
  const int32_t* table; // the nearest-entry table (65536 entries; kinds 8, 4)
  uint32_t seed;        // the stochastic-rounding seed of this step (kind 16)
};

// the largest lane of v
inline float max_all(const Vec& v) {
  return at::vec::vec_reduce_all<float>([](Vec& x, Vec& y) { return at::vec::maximum(x, y); },
                                        v);
}

template <int Kind>
constexpr int64_t block_of() { return Kind == 8 ? 256 : 128; }

// Table lookups in SIMD lanes: gathers on AVX512 (16 lanes) and AVX2 (8), plain loads
// otherwise. (A test builds this file with LLMVALLEY_LANES set to 8 and to 1 to check those
// paths on an AVX512 machine.)
#ifndef LLMVALLEY_LANES
#if defined(CPU_CAPABILITY_AVX512)
#define LLMVALLEY_LANES 16
#elif defined(CPU_CAPABILITY_AVX2)
#define LLMVALLEY_LANES 8
#else
#define LLMVALLEY_LANES 1
#endif
#endif

// out[j] = map[c[j]] * scale for the e 8-bit codes at c
inline void lookup8(const uint8_t* c, int64_t e, const float* map, float scale, float* out) {
  int64_t j = 0;
#if LLMVALLEY_LANES == 16
  const __m512 sv = _mm512_set1_ps(scale);
  for (; j + 16 <= e; j += 16) {
    const __m512i idx =
        _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(c + j)));
    _mm512_storeu_ps(out + j, _mm512_mul_ps(_mm512_i32gather_ps(idx, map, 4), sv));
  }
#elif LLMVALLEY_LANES == 8
  const __m256 sv = _mm256_set1_ps(scale);
  for (; j + 8 <= e; j += 8) {
    const __m256i idx =
        _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(c + j)));
    _mm256_storeu_ps(out + j, _mm256_mul_ps(_mm256_i32gather_ps(map, idx, 4), sv));
  }
#endif
  for (; j < e; ++j) out[j] = map[c[j]] * scale;
}

// the same for e 4-bit codes, two a byte (the even element in the high nibble)
inline void lookup4(const uint8_t* c, int64_t e, const float* map, float scale, float* out) {
  int64_t j = 0;  // elements
#if LLMVALLEY_LANES == 16
  const __m512 sv = _mm512_set1_ps(scale), table = _mm512_loadu_ps(map);
  const __m512i shifts = _mm512_set_epi32(0, 4, 0, 4, 0, 4, 0, 4, 0, 4, 0, 4, 0, 4, 0, 4);
  const __m512i low4 = _mm512_set1_epi32(15);
  for (; j + 16 <= e; j += 16) {
    const __m128i bytes = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(c + j / 2));
    const __m512i twice = _mm512_cvtepu8_epi32(_mm_unpacklo_epi8(bytes, bytes));
    const __m512i idx = _mm512_and_si512(_mm512_srlv_epi32(twice, shifts), low4);
    _mm512_storeu_ps(out + j, _mm512_mul_ps(_mm512_permutexvar_ps(idx, table), sv));
  }
#elif LLMVALLEY_LANES == 8
  const __m256 sv = _mm256_set1_ps(scale);
  const __m256i shifts = _mm256_set_epi32(0, 4, 0, 4, 0, 4, 0, 4);
  const __m256i low4 = _mm256_set1_epi32(15);
  for (; j + 8 <= e; j += 8) {
    int32_t four;
    std::memcpy(&four, c + j / 2, sizeof(four));
    const __m128i bytes = _mm_cvtsi32_si128(four);
    const __m256i twice = _mm256_cvtepu8_epi32(_mm_unpacklo_epi8(bytes, bytes));
    const __m256i idx = _mm256_and_si256(_mm256_srlv_epi32(twice, shifts), low4);
    _mm256_storeu_ps(out + j, _mm256_mul_ps(_mm256_i32gather_ps(map, idx, 4), sv));
  }
#endif
  for (; j < e; ++j) out[j] = map[(j % 2 ? c[j / 2] : c[j / 2] >> 4) & 15] * scale;
}

// elements [start, start + k) of the slot into out (k <= CHUNK; start a multiple of CHUNK)
template <int Kind>
inline void decode(const Slot& s, int64_t start, int64_t k, float* out) {
  if constexpr (Kind == 32) {
    std::memcpy(out, static_cast<const float*>(s.data) + start, k * sizeof(float));
  } else if constexpr (Kind == 16) {
    const uint16_t* half = static_cast<const uint16_t*>(s.data) + start;
    uint32_t* bits = reinterpret_cast<uint32_t*>(out);
    for (int64_t j = 0; j < k; ++j) bits[j] = static_cast<uint32_t>(half[j]) << 16;
  } else {
    constexpr int64_t B = block_of<Kind>();
    const uint8_t* codes = static_cast<const uint8_t*>(s.data);
    for (int64_t b = 0; b < k; b += B) {
      const int64_t e = std::min(B, k - b);
      const float scale = s.absmax[(start + b) / B];
      if constexpr (Kind == 8)
        lookup8(codes + start + b, e, s.map, scale, out + b);
      else
        lookup4(codes + (start + b) / 2, e, s.map, scale, out + b);
    }
  }
}

// the code of one value already divided by its block's absmax (the codec's nearest entry)
inline int32_t code_of(float y, const int32_t* table) {
  int32_t bits;
  std::memcpy(&bits, &y, sizeof(bits));
  const int32_t key = (bits ^ (bits >> 31)) & 0xFFFF;
  const int32_t entry = table[static_cast<uint32_t>(bits) >> 16];
  return (entry >> 17) + (key >= (entry & 0x1FFFF) ? 1 : 0);
}

// the code of each x[j] / divisor, j < e
inline void codes_of(const float* x, int64_t e, float divisor, const int32_t* table,
                     int32_t* code) {
  int64_t j = 0;
#if LLMVALLEY_LANES == 16
  const __m512 d = _mm512_set1_ps(divisor);
  const __m512i low16 = _mm512_set1_epi32(0xFFFF), step = _mm512_set1_epi32(0x1FFFF);
  const __m512i one = _mm512_set1_epi32(1);
  for (; j + 16 <= e; j += 16) {
    const __m512i bits = _mm512_castps_si512(_mm512_div_ps(_mm512_loadu_ps(x + j), d));
    const __m512i key =
        _mm512_and_si512(_mm512_xor_si512(bits, _mm512_srai_epi32(bits, 31)), low16);
    const __m512i entry = _mm512_i32gather_epi32(_mm512_srli_epi32(bits, 16), table, 4);
    const __m512i base = _mm512_srai_epi32(entry, 17);
    const __mmask16 up = _mm512_cmpge_epi32_mask(key, _mm512_and_si512(entry, step));
    _mm512_storeu_si512(code + j, _mm512_mask_add_epi32(base, up, base, one));
  }
#elif LLMVALLEY_LANES == 8
  const __m256 d = _mm256_set1_ps(divisor);
  const __m256i low16 = _mm256_set1_epi32(0xFFFF), step = _mm256_set1_epi32(0x1FFFF);
  const __m256i one = _mm256_set1_epi32(1);
  for (; j + 8 <= e; j += 8) {
    const __m256i bits = _mm256_castps_si256(_mm256_div_ps(_mm256_loadu_ps(x + j), d));
    const __m256i key =
        _mm256_and_si256(_mm256_xor_si256(bits, _mm256_srai_epi32(bits, 31)), low16);
    const __m256i entry = _mm256_i32gather_epi32(table, _mm256_srli_epi32(bits, 16), 4);
    // key >= step <=> not (step > key): base + 1 + (step > key ? -1 : 0)
    const __m256i below = _mm256_cmpgt_epi32(_mm256_and_si256(entry, step), key);
    const __m256i base = _mm256_srai_epi32(entry, 17);
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(code + j),
                        _mm256_add_epi32(base, _mm256_add_epi32(one, below)));
  }
#endif
  for (; j < e; ++j) code[j] = code_of(x[j] / divisor, table);
}

// x[0..k) rounded stochastically to bfloat16 into out: kernels/sr.cpp's rounding of elements
// [start, start + k) of a tensor (the noise of element i hashes (seed, i mod 2^32))
inline void round_bf16(const float* x, int64_t start, int64_t k, uint32_t seed,
                       uint16_t* out) {
  const uint32_t first = static_cast<uint32_t>(start);
  for (int64_t j = 0; j < k; ++j)
    out[j] = round_bf16_hashed(x[j], first + static_cast<uint32_t>(j), seed);
}

// x[0..k) stored into elements [start, start + k) of the slot
template <int Kind>
inline void encode(const Slot& s, int64_t start, int64_t k, const float* x) {
  if constexpr (Kind == 32) {
    std::memcpy(static_cast<float*>(s.data) + start, x, k * sizeof(float));
  } else if constexpr (Kind == 16) {
    round_bf16(x, start, k, s.seed, static_cast<uint16_t*>(s.data) + start);
  } else {
    constexpr int64_t B = block_of<Kind>();
    alignas(64) int32_t code[B];
    for (int64_t b = 0; b < k; b += B) {
      const int64_t e = std::min(B, k - b);
      Vec top(0.0f);
      int64_t j = 0;
      for (; j + VEC <= e; j += VEC) top = at::vec::maximum(top, Vec::loadu(x + b + j).abs());
      float amax = max_all(top);
      for (; j < e; ++j) amax = std::max(amax, std::fabs(x[b + j]));
      s.absmax[(start + b) / B] = amax;
      codes_of(x + b, e, amax > 0.0f ? amax : 1.0f, s.table, code);
      if constexpr (Kind == 8) {
        uint8_t* c = static_cast<uint8_t*>(s.data) + start + b;
        for (int64_t i = 0; i < e; ++i) c[i] = static_cast<uint8_t>(code[i]);
      } else {
        uint8_t* c = static_cast<uint8_t*>(s.data) + (start + b) / 2;
        const int64_t pairs = e / 2;
        for (int64_t i = 0; i < pairs; ++i)
          c[i] = static_cast<uint8_t>((code[2 * i] << 4) | code[2 * i + 1]);
        if (e % 2) c[pairs] = static_cast<uint8_t>(code[e - 1] << 4);  // padding nibble 0
      }
    }
  }
}

struct Numbers {
  float b1, w1, b2, w2, a, b, lr, shrink;
  bool decay;
};

template <int Mode, int MKind, int VKind>
void run(float* p, const float* g, const Slot& m, const Slot& v, int64_t n, const Numbers& h,
         int threads) {
  const int64_t chunks = (n + CHUNK - 1) / CHUNK;
  // Adam's step and the write (Lion's write: its w1, w2 are its own)
  const AdamWrite adam(h.w1, h.b2, h.w2, h.a, h.b, h.lr, h.shrink, h.decay);
#pragma omp parallel num_threads(threads) if (threads > 1)
  {
    int64_t lo, hi;
    thread_rows(chunks, &lo, &hi);
    alignas(64) float mb[CHUNK], vb[CHUNK];
    for (int64_t c = lo; c < hi; ++c) {
      const int64_t start = c * CHUNK, k = std::min(CHUNK, n - start);
      float* pp = p + start;
      const float* gg = g + start;
      decode<MKind>(m, start, k, mb);
      if constexpr (Mode == 0) {
        decode<VKind>(v, start, k, vb);
        for (int64_t j = 0; j < k; j += VEC) {
          const int64_t w = std::min(VEC, k - j);
          const Vec gj = Vec::loadu(gg + j, w);
          adam.write(pp + j,
                     adam.moments(mb + j, vb + j, Vec::loadu(mb + j, w), Vec::loadu(vb + j, w),
                                  gj, w),
                     w);
        }
        encode<VKind>(v, start, k, vb);
      } else {
        for (int64_t j = 0; j < k; j += VEC) {
          const int64_t w = std::min(VEC, k - j);
          const Vec gj = Vec::loadu(gg + j, w), m0 = Vec::loadu(mb + j, w);
          const Vec cj = at::vec::fmadd(Vec(h.w1), gj, m0 * Vec(h.b1));
          lerp_vec(m0, gj, h.w2).store(mb + j, w);
          adam.write(pp + j, sign_vec(cj), w);
        }
      }
      encode<MKind>(m, start, k, mb);
    }
  }
}

template <int Mode, int MKind>
void dispatch_v(int64_t v_kind, float* p, const float* g, const Slot& m, const Slot& v,
                int64_t n, const Numbers& h, int threads) {
  if (Mode == 1 || v_kind == 32) return run<Mode, MKind, 32>(p, g, m, v, n, h, threads);
  if (v_kind == 16) return run<Mode, MKind, 16>(p, g, m, v, n, h, threads);
  if (v_kind == 8) return run<Mode, MKind, 8>(p, g, m, v, n, h, threads);
  return run<Mode, MKind, 4>(p, g, m, v, n, h, threads);
}

template <int Mode>
void dispatch(int64_t m_kind, int64_t v_kind, float* p, const float* g, const Slot& m,
              const Slot& v, int64_t n, const Numbers& h, int threads) {
  if (m_kind == 32) return dispatch_v<Mode, 32>(v_kind, p, g, m, v, n, h, threads);
  if (m_kind == 16) return dispatch_v<Mode, 16>(v_kind, p, g, m, v, n, h, threads);
  if (m_kind == 8) return dispatch_v<Mode, 8>(v_kind, p, g, m, v, n, h, threads);
  return dispatch_v<Mode, 4>(v_kind, p, g, m, v, n, h, threads);
}
}  // namespace

// m_*, v_*: the slots (v_* unused by Lion); *_kind: 8, 4, 16 or 32; *_seed: a bfloat16
// slot's rounding seed. a, b: Adam's denominator numbers (unused by Lion). decay: whether the
// decoupled decay applies (the chain skips its multiplication when the decay is 0).
extern "C" void kernel(float* p, const float* g, void* m_data, float* m_absmax,
                       const float* m_map, const int32_t* m_table, void* v_data,
                       float* v_absmax, const float* v_map, const int32_t* v_table, int64_t n,
                       int64_t m_kind, int64_t v_kind, int64_t m_seed, int64_t v_seed,
                       float b1, float w1, float b2, float w2, float a, float b, float lr,
                       float shrink, int64_t decay, int64_t mode, int64_t threads) {
  const Slot m{m_data, m_absmax, m_map, m_table, static_cast<uint32_t>(m_seed)},
      v{v_data, v_absmax, v_map, v_table, static_cast<uint32_t>(v_seed)};
  const Numbers h{b1, w1, b2, w2, a, b, lr, shrink, decay != 0};
  if (mode == 0)
    dispatch<0>(m_kind, v_kind, p, g, m, v, n, h, static_cast<int>(threads));
  else
    dispatch<1>(m_kind, v_kind, p, g, m, v, n, h, static_cast<int>(threads));
}

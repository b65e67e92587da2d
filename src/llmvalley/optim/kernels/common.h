// Helpers shared by the kernels of llmvalley/optim/kernels (prepended to each kernel's source
// by kernels/__init__.py). The matrices are `batch` row-major m x n blocks; their
// batch * m rows are split evenly over the OpenMP threads, and every partial sum is added in
// thread order, so results depend only on the thread count.
#include <torch/csrc/inductor/cpp_prefix.h>

#include <algorithm>
#include <array>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

namespace llmvalley {

using Vec = at::vec::Vectorized<float>;
constexpr int64_t VEC = Vec::size();
// rows whose column sums are added in float before they go into the double totals
constexpr int64_t COLUMN_BLOCK = 64;

inline float sum_all(const Vec& v) {
  return at::vec::vec_reduce_all<float>([](Vec& x, Vec& y) { return x + y; }, v);
}

// the first k lanes of v, zeros after (a tail's padding out of a sum)
inline Vec head(const Vec& v, int64_t k) {
  return k == VEC ? v : Vec::set(Vec(0.0f), v, k);
}

// this thread's rows [lo, hi) of `rows`
inline void thread_rows(int64_t rows, int64_t* lo, int64_t* hi) {
  const int64_t tid = omp_get_thread_num(), nt = omp_get_num_threads();
  *lo = rows * tid / nt;
  *hi = rows * (tid + 1) / nt;
}

// Sums of f over every row and every column of each matrix, in one pass. f(r, j, k) gives the
// values of row r, columns j..j+k (k <= VEC lanes; lanes past k are ignored) and may store
// into buffers of its own on the way. row_sum gets batch * m floats, col_sum batch * n
// doubles.
//
// With a scale (Scaled): once row r is summed, scale(r, row sum) gives a number s_r, and a
// second sweep over the row (in L1 by then) adds s_r f2 into col_scaled: column sums
// weighted by a function of each row's sum. f2 is called like f and must not store.
template <bool Scaled, typename F, typename F2, typename S>
void row_col_sums_impl(int64_t batch, int64_t m, int64_t n, int threads, const F& f,
                       const F2& f2, const S& scale, float* row_sum, double* col_sum,
                       double* col_scaled) {
  const int64_t rows = batch * m, cols = batch * n;
  const int64_t parts = Scaled ? 2 : 1;
  std::vector<double> part(static_cast<size_t>(threads) * parts * cols, 0.0);
#pragma omp parallel num_threads(threads) if (threads > 1)
  {
    int64_t lo, hi;
    thread_rows(rows, &lo, &hi);
    double* mine = part.data() + static_cast<size_t>(omp_get_thread_num()) * parts * cols;
    std::vector<float> block(parts * n, 0.0f);
    int64_t filled = 0, block_batch = lo < hi ? lo / m : 0;
    auto flush = [&]() {
      for (int64_t q = 0; q < parts; ++q) {
        double* dst = mine + q * cols + block_batch * n;
        float* src = block.data() + q * n;
        for (int64_t j = 0; j < n; ++j) {
          dst[j] += src[j];
          src[j] = 0.0f;
        }
      }
      filled = 0;
    };
    for (int64_t r = lo; r < hi; ++r) {
      if (r / m != block_batch || filled == COLUMN_BLOCK) {
        flush();
        block_batch = r / m;
      }
      Vec acc(0.0f);
      for (int64_t j = 0; j < n; j += VEC) {
        const int64_t k = std::min(VEC, n - j);
        const Vec v = head(f(r, j, k), k);
        acc = acc + v;
        (Vec::loadu(block.data() + j, k) + v).store(block.data() + j, k);
      }
      row_sum[r] = sum_all(acc);
      if constexpr (Scaled) {
        const Vec s(scale(r, row_sum[r]));
        float* second = block.data() + n;
        for (int64_t j = 0; j < n; j += VEC) {
          const int64_t k = std::min(VEC, n - j);
          (Vec::loadu(second + j, k) + head(f2(r, j, k), k) * s).store(second + j, k);
        }
      }
      ++filled;
    }
    if (filled) flush();
  }
  for (int64_t q = 0; q < parts; ++q) {
    double* out = q == 0 ? col_sum : col_scaled;
    std::fill(out, out + cols, 0.0);
    for (int t = 0; t < threads; ++t) {
      const double* src = part.data() + (static_cast<size_t>(t) * parts + q) * cols;
      for (int64_t c = 0; c < cols; ++c) out[c] += src[c];
    }
  }
}

template <typename F>
void row_col_sums(int64_t batch, int64_t m, int64_t n, int threads, const F& f,
                  float* row_sum, double* col_sum) {
  row_col_sums_impl<false>(batch, m, n, threads, f, f, [](int64_t, float) { return 0.0f; },
                           row_sum, col_sum, nullptr);
}

template <typename F, typename F2, typename S>
void row_col_sums_scaled(int64_t batch, int64_t m, int64_t n, int threads, const F& f,
                         const F2& f2, const S& scale, float* row_sum, double* col_sum,
                         double* col_scaled) {
  row_col_sums_impl<true>(batch, m, n, threads, f, f2, scale, row_sum, col_sum, col_scaled);
}

// sum_j x[j] / y[j] over j < count, skipping the terms with x[j] == 0 (a zero column)
inline double ratio_sum(const double* x, const float* y, int64_t count) {
  double total = 0.0;
  for (int64_t j = 0; j < count; ++j)
    if (x[j] != 0.0) total += x[j] / y[j];
  return total;
}

// sum of x^2 over row r of a matrix with n columns
inline float row_square_sum(const float* x, int64_t r, int64_t n) {
  Vec acc(0.0f);
  for (int64_t j = 0; j < n; j += VEC) {
    const Vec v = Vec::loadu(x + r * n + j, std::min(VEC, n - j));
    acc = at::vec::fmadd(v, v, acc);
  }
  return sum_all(acc);
}

// The totals over rows [0, rows) of f(r) (N floats per row), added in double per thread.
template <size_t N, typename F>
std::array<double, N> rows_totals(int64_t rows, int threads, const F& f) {
  std::vector<std::array<double, N>> part(threads);
#pragma omp parallel num_threads(threads) if (threads > 1)
  {
    int64_t lo, hi;
    thread_rows(rows, &lo, &hi);
    std::array<double, N> total{};
    for (int64_t r = lo; r < hi; ++r) {
      const std::array<float, N> x = f(r);
      for (size_t i = 0; i < N; ++i) total[i] += x[i];
    }
    part[omp_get_thread_num()] = total;
  }
  std::array<double, N> total{};
  for (const auto& x : part)
    for (size_t i = 0; i < N; ++i) total[i] += x[i];
  return total;
}

// f(r) for every row r in [0, rows), rows split over the threads
template <typename F>
void for_rows(int64_t rows, int threads, const F& f) {
#pragma omp parallel num_threads(threads) if (threads > 1)
  {
    int64_t lo, hi;
    thread_rows(rows, &lo, &hi);
    for (int64_t r = lo; r < hi; ++r) f(r);
  }
}

// torch.lerp's formula for a float weight
inline float lerp(float self, float end, float weight) {
  return weight < 0.5f ? self + weight * (end - self) : end - (end - self) * (1.0f - weight);
}

// f(lo, hi) for the spans [lo, hi) of `span` elements that cover n, the spans split evenly over
// the threads: each thread joins its spans' results in order, then the threads' results are
// joined in thread order (so the result depends only on the thread count)
template <typename T, typename F, typename J>
T reduce_spans(int64_t n, int64_t span, int threads, T init, const F& f, const J& join) {
  const int64_t spans = (n + span - 1) / span;
  std::vector<T> part(threads, init);
#pragma omp parallel num_threads(threads) if (threads > 1)
  {
    int64_t lo, hi;
    thread_rows(spans, &lo, &hi);
    T mine = init;
    for (int64_t s = lo; s < hi; ++s)
      mine = join(mine, f(s * span, std::min(n, (s + 1) * span)));
    part[omp_get_thread_num()] = mine;
  }
  T total = init;
  for (const T& x : part) total = join(total, x);
  return total;
}

// the sum of x^2 over x = f(j, k), the values of the vectors of k <= VEC lanes at j that cover
// n elements (lanes past k ignored; f may store on the way): in float lanes per span, then in
// double in span and thread order (see reduce_spans)
template <typename F>
double sum_squares(int64_t n, int64_t span, int threads, const F& f) {
  return reduce_spans<double>(
      n, span, threads, 0.0,
      [&](int64_t lo, int64_t hi) {
        Vec acc(0.0f);
        for (int64_t j = lo; j < hi; j += VEC) {
          const int64_t k = std::min(VEC, hi - j);
          const Vec x = head(f(j, k), k);
          acc = at::vec::fmadd(x, x, acc);
        }
        return static_cast<double>(sum_all(acc));
      },
      [](double x, double y) { return x + y; });
}

// f(j, k) for the vectors of k <= VEC lanes at j that cover n elements, in spans of `span`
// elements split evenly over the threads (an element-wise pass)
template <typename F>
void for_vectors(int64_t n, int64_t span, int threads, const F& f) {
  const int64_t spans = (n + span - 1) / span;
#pragma omp parallel num_threads(threads) if (threads > 1)
  {
    int64_t lo, hi;
    thread_rows(spans, &lo, &hi);
    const int64_t end = std::min(n, hi * span);
    int64_t j = lo * span;
    // full vectors with a width the compiler sees (whole loads and stores), then the tail
    for (; j + VEC <= end; j += VEC) f(j, VEC);
    if (j < end) f(j, end - j);
  }
}

// torch.lerp(start, end, weight) as torch's vectorised CPU kernel computes it (one fma)
inline Vec lerp_vec(const Vec& start, const Vec& end, float weight) {
  return weight < 0.5f ? at::vec::fmadd(Vec(weight), end - start, start)
                       : at::vec::fmadd(Vec(weight - 1.0f), end - start, end);
}

// torch.sign for each lane: 1, -1, or 0 for a zero
inline Vec sign_vec(const Vec& x) {
  const Vec zero(0.0f), one(1.0f);
  return Vec::blendv(zero, one, x > zero) - Vec::blendv(zero, one, x < zero);
}

// ScaleByAdam's step (torch eps form) and the shell's decoupled write, for w lanes:
//   m <- lerp(m, x, w1), v <- b2 v + w2 x^2, u = m / (sqrt(v) a + b),
//   p <- p shrink - lr u  (shrink only when `decay`)
// with the chain's roundings (its lerp and addcmul as torch's vectorised kernels fuse them,
// the write's add with alpha a fused multiply-add). a = bc1 / sqrt(bc2), b = eps bc1.
struct AdamWrite {
  float w1;
  Vec b2, w2, a, b, neg_lr, shrink;
  bool decay;

  AdamWrite(float w1_, float b2_, float w2_, float a_, float b_, float lr, float shrink_,
            bool decay_)
      : w1(w1_), b2(b2_), w2(w2_), a(a_), b(b_), neg_lr(-lr), shrink(shrink_), decay(decay_) {}

  // the moments m0, v0 (as loaded, or zeros) moved by x and stored at m, v; the direction
  inline Vec moments(float* m, float* v, const Vec& m0, const Vec& v0, const Vec& x,
                     int64_t w) const {
    const Vec mj = lerp_vec(m0, x, w1);
    const Vec vj = at::vec::fmadd(w2 * x, x, v0 * b2);
    mj.store(m, w);
    vj.store(v, w);
    return mj / (vj.sqrt() * a + b);
  }

  // p <- p shrink - lr u for w lanes at p
  inline void write(float* p, const Vec& u, int64_t w) const {
    Vec pv = Vec::loadu(p, w);
    if (decay) pv = pv * shrink;
    at::vec::fmadd(neg_lr, u, pv).store(p, w);
  }
};

// the mean of x[0..count) (summed in double)
inline float mean(const float* x, int64_t count) {
  double total = 0.0;
  for (int64_t i = 0; i < count; ++i) total += x[i];
  return static_cast<float>(total / count);
}

// float32 x rounded stochastically to bfloat16 bits with the hashed noise of element `index`
// under `seed` (llmvalley/optim/quantize.py's bf16_noise): the hash
//
//   h = index * 0x61C88647 + seed;  h ^= h >> 16;  h *= 0x7FEB352D;  h ^= h >> 15;  h *= 0x7B935975
//
// (mod 2^32), its top 16 bits added to bits(x), the top 16 bits kept; a NaN becomes 0xFFFF,
// what torch's vectorised float-to-bfloat16 conversion and inductor's code give every NaN.
// Unsigned 32-bit arithmetic (defined to wrap); loops calling it vectorise.
inline uint16_t round_bf16_hashed(float x, uint32_t index, uint32_t seed) {
  uint32_t h = index * 0x61C88647u + seed;
  h ^= h >> 16;
  h *= 0x7FEB352Du;
  h ^= h >> 15;
  h *= 0x7B935975u;
  uint32_t bits;
  std::memcpy(&bits, &x, sizeof(bits));
  const bool nan = (bits & 0x7FFFFFFFu) > 0x7F800000u;
  return nan ? static_cast<uint16_t>(0xFFFFu) : static_cast<uint16_t>((bits + (h >> 16)) >> 16);
}

}  // namespace llmvalley

// CAME's step of one float32 tensor on CPU (ScaleByCAME in
// llmvalley/optim/transforms/factored.py, as came-pytorch 0.1.3 computes it, with the shell's
// decoupled decay):
//
//   R <- b2 R + (1 - b2) mean_j (g^2 + eps1), C <- b2 C + (1 - b2) mean_i (g^2 + eps1)
//   u = rsqrt(R_i / mean(R)) rsqrt(C_j) g, then u /= max(1, rms(u) / clip_threshold)
//   m <- b1 m + (1 - b1) u
//   S_R, S_C <- the same EMAs (b3) of the row and column means of (u - m)^2 + eps2
//   p <- p (1 - lr wd) - lr rsqrt(S_R,i / mean(S_R)) rsqrt(S_C,j) m
//
// A matrix takes three passes over memory: the sums of g (reads g: the row and column sums of
// g^2 + eps1, and sum u^2 as mean(R) sum_j (sum_i g_ij^2 / R_i) / C_j, which a second sweep
// of each row, still in L1, gathers), the momentum with the row and column sums of the
// residual (reads g and m, writes m), the write (reads m and p, writes p). A vector (full
// second moment v, direction m) takes two.
namespace {
using namespace llmvalley;

// beta a + keep x (keep = 1 - beta, rounded from double by the caller)
inline float ema(float a, float x, float beta, float keep) { return a * beta + x * keep; }

// the rsqrt of each of `count` factors, relative to their mean when `normalise` (the row
// factors: rsqrt(a_i / mean(a))) and as they are otherwise (the column factors)
void rsqrt_factors(const float* a, int64_t count, bool normalise, float* out) {
  const float mu = normalise ? mean(a, count) : 1.0f;
  for (int64_t i = 0; i < count; ++i)
    out[i] = normalise ? 1.0f / std::sqrt(a[i] / mu) : 1.0f / std::sqrt(a[i]);
}

void factored(float* p, const float* g, float* m1, float* row, float* col, float* rrow,
              float* rcol, int64_t batch, int64_t m, int64_t n, float lr, float beta1,
              float keep1, float beta2, float keep2, float beta3, float keep3, float eps1,
              float eps2, float threshold, float shrink, int threads) {
  const int64_t rows = batch * m, cols = batch * n;
  const double numel = static_cast<double>(rows) * static_cast<double>(n);
  const float fn = static_cast<float>(n), fm = static_cast<float>(m);
  std::vector<float> row_sum(rows), row_factor(rows), col_factor(cols);
  std::vector<double> col_sum(cols), col_scaled(cols);
  const Vec e1(eps1), e2(eps2);

  // pass A: R's EMA row by row, the column sums of g^2 + eps1 and of g^2 / R_i
  row_col_sums_scaled(batch, m, n, threads, [&](int64_t r, int64_t j, int64_t k) {
    const Vec x = Vec::loadu(g + r * n + j, k);
    return at::vec::fmadd(x, x, e1);
  }, [&](int64_t r, int64_t j, int64_t k) {
    const Vec x = Vec::loadu(g + r * n + j, k);
    return x * x;
  }, [&](int64_t r, float sum) {
    float& x = row[r];
    x = ema(x, sum / fn, beta2, keep2);
    return x > 0.0f ? 1.0f / x : 0.0f;
  }, row_sum.data(), col_sum.data(), col_scaled.data());
  // C's EMA, the factors, and sum u^2 = sum_b mean(R) sum_j (sum_i g_ij^2 / R_i) / C_j
  double usq = 0.0;
  for (int64_t b = 0; b < batch; ++b) {
    float* cb = col + b * n;
    for (int64_t j = 0; j < n; ++j)
      cb[j] = ema(cb[j], static_cast<float>(col_sum[b * n + j]) / fm, beta2, keep2);
    rsqrt_factors(row + b * m, m, true, row_factor.data() + b * m);
    rsqrt_factors(cb, n, false, col_factor.data() + b * n);
    usq += mean(row + b * m, m) * ratio_sum(col_scaled.data() + b * n, cb, n);
  }
  // the clip folded into each row's factor (one multiplication less per element; equal to
  // float rounding)
  const float clip = std::max(static_cast<float>(std::sqrt(usq / numel)) / threshold, 1.0f);

  // pass B: the momentum, and the row and column sums of the residual
  const Vec b1(beta1), k1(keep1);
  row_col_sums(batch, m, n, threads, [&](int64_t r, int64_t j, int64_t k) {
    float* mr = m1 + r * n + j;
    const Vec c = Vec::loadu(col_factor.data() + (r / m) * n + j, k);
    const Vec u = Vec(row_factor[r] / clip) * c * Vec::loadu(g + r * n + j, k);
    const Vec mv = Vec::loadu(mr, k) * b1 + u * k1;
    mv.store(mr, k);
    const Vec res = u - mv;
    return at::vec::fmadd(res, res, e2);
  }, row_sum.data(), col_sum.data());
  for (int64_t r = 0; r < rows; ++r) rrow[r] = ema(rrow[r], row_sum[r] / fn, beta3, keep3);
  for (int64_t c = 0; c < cols; ++c)
    rcol[c] = ema(rcol[c], static_cast<float>(col_sum[c]) / fm, beta3, keep3);
  for (int64_t b = 0; b < batch; ++b) {
    rsqrt_factors(rrow + b * m, m, true, row_factor.data() + b * m);
    rsqrt_factors(rcol + b * n, n, false, col_factor.data() + b * n);
  }

  // pass C: the write
  const Vec rate(lr), vs(shrink);
  for_rows(rows, threads, [&](int64_t r) {
    float* pr = p + r * n;
    const float* mr = m1 + r * n;
    const Vec a(row_factor[r]);
    const float* c = col_factor.data() + (r / m) * n;
    for (int64_t j = 0; j < n; j += VEC) {
      const int64_t k = std::min(VEC, n - j);
      const Vec step = a * Vec::loadu(c + j, k) * Vec::loadu(mr + j, k);
      (Vec::loadu(pr + j, k) * vs - rate * step).store(pr + j, k);
    }
  });
}

// a tensor of fewer than two dimensions: second moment v and momentum m1 of n elements
void unfactored(float* p, const float* g, float* m1, float* v, int64_t n, float lr,
                float beta1, float keep1, float beta2, float keep2, float eps1,
                float threshold, float shrink) {
  const Vec b2(beta2), k2(keep2), e1(eps1);
  double usum = 0.0;
  for (int64_t j = 0; j < n; j += VEC) {
    const int64_t k = std::min(VEC, n - j);
    const Vec x = Vec::loadu(g + j, k);
    const Vec vn = Vec::loadu(v + j, k) * b2 + at::vec::fmadd(x, x, e1) * k2;
    vn.store(v + j, k);
    const Vec u = head(vn.rsqrt() * x, k);
    usum += sum_all(u * u);
  }
  const Vec clip(std::max(static_cast<float>(std::sqrt(usum / n)) / threshold, 1.0f));
  const Vec b1(beta1), k1(keep1), rate(lr), vs(shrink);
  for (int64_t j = 0; j < n; j += VEC) {
    const int64_t k = std::min(VEC, n - j);
    const Vec u = Vec::loadu(v + j, k).rsqrt() * Vec::loadu(g + j, k) / clip;
    const Vec mv = Vec::loadu(m1 + j, k) * b1 + u * k1;
    mv.store(m1 + j, k);
    (Vec::loadu(p + j, k) * vs - rate * mv).store(p + j, k);
  }
}

}  // namespace

// m > 0: p, g and m1 (the momentum) are `batch` matrices of m x n; row and rrow hold
// batch * m factors, col and rcol batch * n. m == 0: p, g, m1 and row (the second moment)
// hold n elements; col, rrow and rcol are unused. keep_i = 1 - beta_i.
extern "C" void kernel(float* p, const float* g, float* m1, float* row, float* col,
                       float* rrow, float* rcol, int64_t batch, int64_t m, int64_t n, float lr,
                       float beta1, float keep1, float beta2, float keep2, float beta3,
                       float keep3, float eps1, float eps2, float threshold, float shrink,
                       int64_t threads) {
  if (m > 0)
    factored(p, g, m1, row, col, rrow, rcol, batch, m, n, lr, beta1, keep1, beta2, keep2,
             beta3, keep3, eps1, eps2, threshold, shrink,
             static_cast<int>(std::max<int64_t>(threads, 1)));
  else
    unfactored(p, g, m1, row, n, lr, beta1, keep1, beta2, keep2, eps1, threshold, shrink);
}

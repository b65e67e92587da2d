// Adafactor's step of one float32 tensor on CPU (ScaleByAdafactor in
// llmvalley/optim/transforms/factored.py, with the shell's decoupled decay, as
// torch.optim.Adafactor computes them):
//
//   R <- lerp(R, mean_j g^2, w), C <- lerp(C, mean_i g^2, w)        (per matrix of the batch)
//   u = min(rsqrt(R_i / max(mean(R), eps1)) rsqrt(C_j), 1 / eps1) g
//   p <- p (1 - lr wd) - max(eps2, rms(p_old)) rate / max(1, rms(u) / d) u
//
// and for a vector V <- lerp(V, g^2, w), u = rsqrt(max(V, eps1^2)) g. A matrix takes two
// passes over memory: the sums (reads g and p: the row and column sums of g^2, sum p^2, and
// sum u^2 as sum_j (sum_i g_ij^2 / R_i) / C_j, which a second sweep of each row, still in
// L1, gathers), then the write (reads g and p, writes p). When the 1/eps1 cap on the
// preconditioner could bind (the largest row factor times the largest column factor above
// it: a gradient around 1e-7 or smaller), a pass in between sums u^2 directly. A vector
// takes two passes. Entries whose square underflows to zero in float32 (|g| < 1e-19) are
// left out of the identity's sum, as they are out of the factors.
namespace {
using namespace llmvalley;

void factored(float* p, const float* g, float* row, float* col, int64_t batch, int64_t m,
              int64_t n, float weight, float eps1, float rate, float eps2, float d,
              float shrink, int threads) {
  const int64_t rows = batch * m;
  const double numel = static_cast<double>(rows) * static_cast<double>(n);
  std::vector<float> row_sq(rows);
  std::vector<double> col_sq(batch * n), col_scaled(batch * n), p_part(threads, 0.0);
  auto square = [&](int64_t r, int64_t j, int64_t k) {
    const Vec x = Vec::loadu(g + r * n + j, k);
    return x * x;
  };
  // pass A: R's EMA row by row, the column sums of g^2 and of g^2 / R_i, and sum p^2
  row_col_sums_scaled(batch, m, n, threads, square, square, [&](int64_t r, float sum) {
    p_part[omp_get_thread_num()] += row_square_sum(p, r, n);
    float& x = row[r];
    x = lerp(x, sum / static_cast<float>(n), weight);
    return x > 0.0f ? 1.0f / x : 0.0f;
  }, row_sq.data(), col_sq.data(), col_scaled.data());

  // C's EMA, the per-row and per-column rsqrt of the preconditioner, and sum u^2 from the
  // sums (u_ij^2 = max(mean(R), eps1) / R_i / C_j g_ij^2 while the 1/eps1 cap does not bind)
  std::vector<float> row_factor(rows), col_factor(batch * n);
  float row_max = 0.0f, col_max = 0.0f;
  double usq = 0.0;
  for (int64_t b = 0; b < batch; ++b) {
    const float* rb = row + b * m;
    const float denom = std::max(mean(rb, m), eps1);
    for (int64_t i = 0; i < m; ++i) {
      row_factor[b * m + i] = 1.0f / std::sqrt(rb[i] / denom);
      if (rb[i] > 0.0f) row_max = std::max(row_max, row_factor[b * m + i]);
    }
    float* cb = col + b * n;
    for (int64_t j = 0; j < n; ++j) {
      const float mean_sq = static_cast<float>(col_sq[b * n + j]) / static_cast<float>(m);
      cb[j] = lerp(cb[j], mean_sq, weight);
      col_factor[b * n + j] = 1.0f / std::sqrt(cb[j]);
      if (cb[j] > 0.0f) col_max = std::max(col_max, col_factor[b * n + j]);
    }
    usq += denom * ratio_sum(col_scaled.data() + b * n, cb, n);
  }
  const float cap = 1.0f / eps1;
  const Vec vcap(cap);
  auto u_at = [&](int64_t r, int64_t j, int64_t k) {
    const Vec c = Vec::loadu(col_factor.data() + (r / m) * n + j, k);
    return at::vec::minimum(Vec(row_factor[r]) * c, vcap) * Vec::loadu(g + r * n + j, k);
  };
  if (!(row_max * col_max <= cap)) {  // the cap may bind: pass B sums u^2 itself
    usq = rows_totals<1>(rows, threads, [&](int64_t r) {
      Vec acc(0.0f);
      for (int64_t j = 0; j < n; j += VEC) {
        const Vec u = u_at(r, j, std::min(VEC, n - j));
        acc = at::vec::fmadd(u, u, acc);
      }
      return std::array<float, 1>{sum_all(acc)};
    })[0];
  }
  double psq = 0.0;
  for (double x : p_part) psq += x;
  const float clip = std::max(static_cast<float>(std::sqrt(usq / numel)) / d, 1.0f);
  const float alpha = std::max(static_cast<float>(std::sqrt(psq / numel)), eps2) * rate;
  const Vec coef(alpha / clip), vs(shrink);

  // pass C: the write
  for_rows(rows, threads, [&](int64_t r) {
    float* pr = p + r * n;
    for (int64_t j = 0; j < n; j += VEC) {
      const int64_t k = std::min(VEC, n - j);
      (Vec::loadu(pr + j, k) * vs - coef * u_at(r, j, k)).store(pr + j, k);
    }
  });
}

// a tensor of fewer than two dimensions: a full second moment v of n elements
void unfactored(float* p, const float* g, float* v, int64_t n, float weight, float eps1,
                float rate, float eps2, float d, float shrink) {
  const Vec floor(eps1 * eps1);
  double usum = 0.0, psum = 0.0;
  for (int64_t j = 0; j < n; j += VEC) {
    const int64_t k = std::min(VEC, n - j);
    float vv[VEC], gg[VEC];
    Vec::loadu(v + j, k).store(vv, k);
    Vec::loadu(g + j, k).store(gg, k);
    for (int64_t e = 0; e < k; ++e) vv[e] = lerp(vv[e], gg[e] * gg[e], weight);
    const Vec vn = Vec::loadu(vv, k);
    vn.store(v + j, k);
    const Vec u = head(at::vec::maximum(vn, floor).rsqrt() * Vec::loadu(gg, k), k);
    const Vec x = Vec::loadu(p + j, k);
    usum += sum_all(u * u);
    psum += sum_all(x * x);
  }
  const float clip = std::max(static_cast<float>(std::sqrt(usum / n)) / d, 1.0f);
  const float alpha = std::max(static_cast<float>(std::sqrt(psum / n)), eps2) * rate;
  const Vec coef(alpha / clip), vs(shrink);
  for (int64_t j = 0; j < n; j += VEC) {
    const int64_t k = std::min(VEC, n - j);
    const Vec u = at::vec::maximum(Vec::loadu(v + j, k), floor).rsqrt() * Vec::loadu(g + j, k);
    (Vec::loadu(p + j, k) * vs - coef * u).store(p + j, k);
  }
}

}  // namespace

// m > 0: p and g are `batch` matrices of m x n, row holds batch * m factors and col batch * n;
// m == 0: p, g and row (the second moment) hold n elements, col is unused.
extern "C" void kernel(float* p, const float* g, float* row, float* col, int64_t batch,
                       int64_t m, int64_t n, float weight, float eps1, float rate, float eps2,
                       float d, float shrink, int64_t threads) {
  if (m > 0)
    factored(p, g, row, col, batch, m, n, weight, eps1, rate, eps2, d, shrink,
             static_cast<int>(std::max<int64_t>(threads, 1)));
  else
    unfactored(p, g, row, n, weight, eps1, rate, eps2, d, shrink);
}

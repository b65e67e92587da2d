// AdamP's step of one float32 tensor on CPU (ScaleByAdam + ProjectScaleInvariant in
// llmvalley/optim/transforms, with the shell's decoupled decay, as clovaai/AdamP computes it):
//
//   m <- lerp(m, g, 1 - b1), v <- b2 v + (1 - b2) g^2
//   u = n / (sqrt(v) a + b), n = m (or b1 m + (1 - b1) g with nesterov),
//       a = bc1 / sqrt(bc2), b = eps bc1 (the caller's numbers)
//   for a tensor of two or more dimensions, seen as rows x n: when every row has
//   |cos(g, p)| < delta / sqrt(n), u -= p (p.u) / (|p| + eps)^2 per row; else when the whole
//   tensor has |cos(g, p)| < delta / sqrt(size), the same over the whole tensor; a projected
//   tensor's decay is multiplied by wd_ratio
//   p <- p (1 - lr wd ratio) - lr u
//
// A projected tensor takes two passes: the moments with the row sums of g.p, |g|^2, |p|^2 and
// p.u (reads p, g, m, v; writes m, v), then the write (reads p, m, v, and g with nesterov;
// writes p). A vector takes one.
namespace {
using namespace llmvalley;

struct Adam {
  Vec b1, k1, b2, k2, a, b;
  bool nesterov;

  // the moments of one vector of lanes, stored, and the direction
  Vec step(float* m, float* v, const float* g, int64_t k) const {
    const Vec gv = Vec::loadu(g, k), mv0 = Vec::loadu(m, k);
    const Vec mv = mv0 + k1 * (gv - mv0);
    const Vec vv = Vec::loadu(v, k) * b2 + gv * gv * k2;
    mv.store(m, k);
    vv.store(v, k);
    return direction(mv, vv, gv);
  }
  // the direction from stored (updated) moments
  Vec direction(const Vec& mv, const Vec& vv, const Vec& gv) const {
    const Vec num = nesterov ? b1 * mv + k1 * gv : mv;
    return num / (vv.sqrt() * a + b);
  }
};

}  // namespace

// p, g, m, v hold rows x n floats; project: whether the tensor has two or more dimensions
extern "C" void kernel(float* p, const float* g, float* m, float* v, int64_t rows, int64_t n,
                       float beta1, float keep1, float beta2, float keep2, float a, float b,
                       float lr, float wd, float wd_ratio, float delta, float eps,
                       int64_t nesterov, int64_t project, int64_t threads) {
  const Adam adam{Vec(beta1), Vec(keep1), Vec(beta2), Vec(keep2), Vec(a), Vec(b),
                  nesterov != 0};
  const int nt = static_cast<int>(std::max<int64_t>(threads, 1));
  const Vec rate(lr);
  if (!project) {  // one pass: moments, direction, write
    const Vec shrink(1.0f - lr * wd);
    for_rows(rows, nt, [&](int64_t r) {
      for (int64_t j = r * n; j < (r + 1) * n; j += VEC) {
        const int64_t k = std::min(VEC, (r + 1) * n - j);
        const Vec u = adam.step(m + j, v + j, g + j, k);
        (Vec::loadu(p + j, k) * shrink - rate * u).store(p + j, k);
      }
    });
    return;
  }

  // pass 1: the moments and the row sums
  std::vector<float> gp(rows), gg(rows), pp(rows), pu(rows);
  for_rows(rows, nt, [&](int64_t r) {
    Vec s_gp(0.0f), s_gg(0.0f), s_pp(0.0f), s_pu(0.0f);
    for (int64_t j = r * n; j < (r + 1) * n; j += VEC) {
      const int64_t k = std::min(VEC, (r + 1) * n - j);
      const Vec u = head(adam.step(m + j, v + j, g + j, k), k);
      const Vec gv = Vec::loadu(g + j, k), pv = Vec::loadu(p + j, k);
      s_gp = at::vec::fmadd(gv, pv, s_gp);
      s_gg = at::vec::fmadd(gv, gv, s_gg);
      s_pp = at::vec::fmadd(pv, pv, s_pp);
      s_pu = at::vec::fmadd(pv, u, s_pu);
    }
    gp[r] = sum_all(s_gp);
    gg[r] = sum_all(s_gg);
    pp[r] = sum_all(s_pp);
    pu[r] = sum_all(s_pu);
  });

  // the choice: per row, else the whole tensor, else none (F.cosine_similarity's clamps)
  auto cosine = [&](float dot, float g2, float p2) {
    return std::abs(dot / (std::max(std::sqrt(g2), eps) * std::max(std::sqrt(p2), eps)));
  };
  const float row_bound = delta / std::sqrt(static_cast<float>(n));
  bool by_rows = true;
  double t_gp = 0.0, t_gg = 0.0, t_pp = 0.0, t_pu = 0.0;
  for (int64_t r = 0; r < rows; ++r) {
    if (!(cosine(gp[r], gg[r], pp[r]) < row_bound)) by_rows = false;  // NaN: no projection
    t_gp += gp[r];
    t_gg += gg[r];
    t_pp += pp[r];
    t_pu += pu[r];
  }
  const float whole_bound = delta / std::sqrt(static_cast<float>(rows) * static_cast<float>(n));
  const float all_pp = static_cast<float>(t_pp);
  const bool whole = !by_rows && cosine(static_cast<float>(t_gp), static_cast<float>(t_gg),
                                        all_pp) < whole_bound;
  const float whole_coef = whole ? static_cast<float>(t_pu) /
                                       ((std::sqrt(all_pp) + eps) * (std::sqrt(all_pp) + eps))
                                 : 0.0f;
  const Vec shrink(1.0f - lr * wd * (by_rows || whole ? wd_ratio : 1.0f));

  // pass 2: the projected direction and the write
  for_rows(rows, nt, [&](int64_t r) {
    const float root = std::sqrt(pp[r]) + eps;
    const Vec coef(by_rows ? pu[r] / (root * root) : whole_coef);
    for (int64_t j = r * n; j < (r + 1) * n; j += VEC) {
      const int64_t k = std::min(VEC, (r + 1) * n - j);
      const Vec gv = nesterov ? Vec::loadu(g + j, k) : Vec(0.0f);
      const Vec u = adam.direction(Vec::loadu(m + j, k), Vec::loadu(v + j, k), gv);
      const Vec pv = Vec::loadu(p + j, k);
      (pv * shrink - rate * (u - pv * coef)).store(p + j, k);
    }
  });
}

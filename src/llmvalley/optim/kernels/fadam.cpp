// FAdam's step of one float32 tensor on CPU (ScaleByFAdam in
// llmvalley/optim/transforms/variants.py and the shell's write; FAdam's weight decay is part
// of its direction), in three passes where the eager chain makes about fourteen:
//
//   1. f <- b2t f + (1 - b2t) g^2 (the Fisher diagonal), and sum g^2:
//      eps_t = eps min(1, RMS(g)) (eps when g is all zero), d = f^pw + eps_t
//   2. the sums of (g / d)^2 and, with weight decay, (p / d)^2:
//      c_n = max(1, RMS(g / d) / clip), c_w = max(1, RMS(p / d) / clip)
//   3. m <- lerp(m, g / d / c_n, 1 - b1),  u = m + wd (p / d / c_w) (u = m without decay),
//      p <- p - lr u
//
// The first pass reads g and f and writes f, the second reads g, f and p, the third reads g,
// f, m and p and writes m and p: 48 bytes per element against fused AdamW's 28 (the RMS of
// g / d needs d, which needs the RMS of g). d = sqrt(f) + eps_t for pw = 0.5, as torch's pow
// computes that power. Sums are taken per thread in float lanes, then in double, so results
// depend only on the thread count; the arithmetic is the chain's operations in float32 (its
// addcmul and lerp as torch's vectorised kernels fuse them), to rounding, except that g / d,
// p / d and the divisions by c_n and c_w are multiplications by reciprocals (an ulp apart; one
// division per element where there were two to four: 5-7% of the step).
namespace {
using namespace llmvalley;
constexpr int64_t SPAN = 4096;  // elements per unit of work split over the threads

// f^pw for k lanes (torch's pow takes a square root for 0.5)
inline Vec power(const Vec& f, float pw, int64_t k) {
  if (pw == 0.5f) return f.sqrt();
  alignas(64) float x[VEC];
  f.store(x, k);
  for (int64_t l = 0; l < k; ++l) x[l] = std::pow(x[l], pw);
  return Vec::loadu(x, k);
}

struct Sums {
  double nat = 0.0, decay = 0.0;
};
}  // namespace

extern "C" void kernel(float* p, const float* g, float* m, float* f, int64_t n, float b2t,
                       float w2t, float w1, float eps, float clip, float pw, float wd,
                       float lr, int64_t threads) {
  const int nt = static_cast<int>(threads);
  const Vec vb2t(b2t), vw2t(w2t);
  // 1. the Fisher diagonal, and the gradient's sum of squares
  const double gsq = sum_squares(n, SPAN, nt, [&](int64_t j, int64_t k) {
    const Vec gv = Vec::loadu(g + j, k);
    at::vec::fmadd(vw2t * gv, gv, Vec::loadu(f + j, k) * vb2t).store(f + j, k);
    return gv;
  });
  const float grad_rms = std::sqrt(static_cast<float>(gsq) / static_cast<float>(n));
  const float eps_t = grad_rms > 0.0f ? eps * std::min(grad_rms, 1.0f) : eps;
  const Vec veps(eps_t);
  const bool decay = wd != 0.0f;
  // 2. the natural gradient's and the natural decay's sums of squares
  const Sums sums = reduce_spans<Sums>(
      n, SPAN, nt, Sums{},
      [&](int64_t lo, int64_t hi) {
        Vec an(0.0f), aw(0.0f);
        for (int64_t j = lo; j < hi; j += VEC) {
          const int64_t k = std::min(VEC, hi - j);
          const Vec d = power(Vec::loadu(f + j, k), pw, k) + veps;
          const Vec r = Vec(1.0f) / d;
          const Vec nat = head(Vec::loadu(g + j, k) * r, k);
          an = at::vec::fmadd(nat, nat, an);
          if (decay) {
            const Vec w = head(Vec::loadu(p + j, k) * r, k);
            aw = at::vec::fmadd(w, w, aw);
          }
        }
        return Sums{sum_all(an), sum_all(aw)};
      },
      [](const Sums& x, const Sums& y) { return Sums{x.nat + y.nat, x.decay + y.decay}; });
  const float cn = std::max(std::sqrt(static_cast<float>(sums.nat) / n) / clip, 1.0f);
  const float cw = std::max(std::sqrt(static_cast<float>(sums.decay) / n) / clip, 1.0f);
  const Vec vcn(1.0f / cn), vcw(1.0f / cw), vwd(wd), vlr(-lr);
  // 3. the momentum, the direction and the write
  for_vectors(n, SPAN, nt, [&](int64_t j, int64_t k) {
    const Vec d = power(Vec::loadu(f + j, k), pw, k) + veps;
    const Vec r = Vec(1.0f) / d;
    const Vec mj = lerp_vec(Vec::loadu(m + j, k), Vec::loadu(g + j, k) * r * vcn, w1);
    mj.store(m + j, k);
    const Vec pv = Vec::loadu(p + j, k);
    const Vec u = decay ? pv * r * vcw * vwd + mj : mj;
    at::vec::fmadd(vlr, u, pv).store(p + j, k);
  });
}

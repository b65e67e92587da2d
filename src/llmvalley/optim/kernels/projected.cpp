// AdamP's and SGDP's step of one float32 tensor on CPU (ScaleByAdam or DampedMomentum, then
// ProjectScaleInvariant, in llmvalley/optim/transforms, with the shell's decoupled decay, as
// clovaai/AdamP computes them). The direction u is
//
//   AdamP (mode 0): m <- lerp(m, g, 1 - b1), v <- b2 v + (1 - b2) g^2,
//       u = n / (sqrt(v) a + b), n = m (or b1 m + (1 - b1) g with nesterov),
//       a = bc1 / sqrt(bc2), b = eps bc1 (the caller's numbers)
//   SGDP (mode 1): buf <- momentum buf + (1 - dampening) g, u = buf (or g + momentum buf with
//       nesterov); without momentum (mode 2) u = (1 - dampening) g and there is no buffer
//
// then, for a tensor of two or more dimensions seen as rows x n: when every row has
// |cos(g, p)| < delta / sqrt(n), u -= p (p.u) / (|p| + eps)^2 per row; else when the whole
// tensor has |cos(g, p)| < delta / sqrt(size), the same over the whole tensor; a projected
// tensor's decay is multiplied by wd_ratio. Last, p <- p (1 - lr wd ratio) - lr u.
//
// A vector takes one pass. A matrix first takes the row sums of g.p, |g|^2 and |p|^2 (reads g
// and p), which decide the projection (they depend on neither the state nor u). Then a tensor
// not projected takes one pass, as a vector; one projected per row also one, row by row: the
// row's state and direction into a buffer in L1 with the row's p.u, then the row's write. Only
// one projected as a whole takes two: the state with the row sums of p.u, then the write
// (reads p and the state, and g where the direction needs it). So 9 floats move per element
// (12 for the whole-tensor projection) against fused AdamW's 7.
namespace {
using namespace llmvalley;

struct Adam {
  float *m, *v;
  const float* g;
  Vec b1, k1, b2, k2, a, b;
  bool nesterov;

  // the state of lanes j..j+k updated and stored, and their direction
  Vec step(int64_t j, int64_t k) const {
    const Vec gv = Vec::loadu(g + j, k), mv0 = Vec::loadu(m + j, k);
    const Vec mv = mv0 + k1 * (gv - mv0);
    const Vec vv = Vec::loadu(v + j, k) * b2 + gv * gv * k2;
    mv.store(m + j, k);
    vv.store(v + j, k);
    return from(mv, vv, gv);
  }
  // the direction of lanes j..j+k from the stored (updated) state
  Vec direction(int64_t j, int64_t k) const {
    const Vec gv = nesterov ? Vec::loadu(g + j, k) : Vec(0.0f);
    return from(Vec::loadu(m + j, k), Vec::loadu(v + j, k), gv);
  }
  Vec from(const Vec& mv, const Vec& vv, const Vec& gv) const {
    const Vec num = nesterov ? b1 * mv + k1 * gv : mv;
    return num / (vv.sqrt() * a + b);
  }
};

struct Sgd {
  float* buf;  // null without momentum
  const float* g;
  Vec momentum, keep;
  bool nesterov;

  Vec step(int64_t j, int64_t k) const {
    const Vec gv = Vec::loadu(g + j, k);
    if (!buf) return gv * keep;
    const Vec bv = Vec::loadu(buf + j, k) * momentum + gv * keep;
    bv.store(buf + j, k);
    return nesterov ? gv + momentum * bv : bv;
  }
  Vec direction(int64_t j, int64_t k) const {
    const Vec gv = Vec::loadu(g + j, k);
    if (!buf) return gv * keep;
    const Vec bv = Vec::loadu(buf + j, k);
    return nesterov ? gv + momentum * bv : bv;
  }
};

template <typename D>
void run(const D& d, float* p, const float* g, int64_t rows, int64_t n, float lr, float wd,
         float wd_ratio, float delta, float eps, bool project, int nt) {
  const Vec rate(lr);
  // one pass: state, direction, write
  auto plain = [&](const Vec& shrink) {
    for_rows(rows, nt, [&](int64_t r) {
      for (int64_t j = r * n; j < (r + 1) * n; j += VEC) {
        const int64_t k = std::min(VEC, (r + 1) * n - j);
        const Vec u = d.step(j, k);
        (Vec::loadu(p + j, k) * shrink - rate * u).store(p + j, k);
      }
    });
  };
  if (!project) return plain(Vec(1.0f - lr * wd));

  // pass 1: the row sums of g.p, |g|^2 and |p|^2, which make the choice
  std::vector<float> gp(rows), gg(rows), pp(rows);
  for_rows(rows, nt, [&](int64_t r) {
    Vec s_gp(0.0f), s_gg(0.0f), s_pp(0.0f);
    for (int64_t j = r * n; j < (r + 1) * n; j += VEC) {
      const int64_t k = std::min(VEC, (r + 1) * n - j);
      const Vec gv = Vec::loadu(g + j, k), pv = Vec::loadu(p + j, k);
      s_gp = at::vec::fmadd(gv, pv, s_gp);
      s_gg = at::vec::fmadd(gv, gv, s_gg);
      s_pp = at::vec::fmadd(pv, pv, s_pp);
    }
    gp[r] = sum_all(s_gp);
    gg[r] = sum_all(s_gg);
    pp[r] = sum_all(s_pp);
  });

  // the choice: per row, else the whole tensor, else none (F.cosine_similarity's clamps)
  auto cosine = [&](float dot, float g2, float p2) {
    return std::abs(dot / (std::max(std::sqrt(g2), eps) * std::max(std::sqrt(p2), eps)));
  };
  const float row_bound = delta / std::sqrt(static_cast<float>(n));
  bool by_rows = true;
  double t_gp = 0.0, t_gg = 0.0, t_pp = 0.0;
  for (int64_t r = 0; r < rows; ++r) {
    if (!(cosine(gp[r], gg[r], pp[r]) < row_bound)) by_rows = false;  // NaN: no projection
    t_gp += gp[r];
    t_gg += gg[r];
    t_pp += pp[r];
  }
  const float whole_bound = delta / std::sqrt(static_cast<float>(rows) * static_cast<float>(n));
  const float all_pp = static_cast<float>(t_pp);
  const bool whole = !by_rows && cosine(static_cast<float>(t_gp), static_cast<float>(t_gg),
                                        all_pp) < whole_bound;
  if (!by_rows && !whole) return plain(Vec(1.0f - lr * wd));
  const Vec shrink(1.0f - lr * wd * wd_ratio);

  if (by_rows) {  // pass 2, row by row: the state and direction into L1, p.u, then the write
    std::vector<float> buffers(static_cast<size_t>(nt) * n);
    for_rows(rows, nt, [&](int64_t r) {
      float* u_row = buffers.data() + static_cast<size_t>(omp_get_thread_num()) * n;
      Vec s_pu(0.0f);
      for (int64_t j = r * n; j < (r + 1) * n; j += VEC) {
        const int64_t k = std::min(VEC, (r + 1) * n - j);
        const Vec u = head(d.step(j, k), k);
        u.store(u_row + (j - r * n), k);
        s_pu = at::vec::fmadd(Vec::loadu(p + j, k), u, s_pu);
      }
      const float root = std::sqrt(pp[r]) + eps;
      const Vec coef(sum_all(s_pu) / (root * root));
      for (int64_t j = r * n; j < (r + 1) * n; j += VEC) {
        const int64_t k = std::min(VEC, (r + 1) * n - j);
        const Vec u = Vec::loadu(u_row + (j - r * n), k), pv = Vec::loadu(p + j, k);
        (pv * shrink - rate * (u - pv * coef)).store(p + j, k);
      }
    });
    return;
  }

  // the whole tensor: pass 2 the state and the row sums of p.u, pass 3 the write
  std::vector<float> pu(rows);
  for_rows(rows, nt, [&](int64_t r) {
    Vec s_pu(0.0f);
    for (int64_t j = r * n; j < (r + 1) * n; j += VEC) {
      const int64_t k = std::min(VEC, (r + 1) * n - j);
      s_pu = at::vec::fmadd(Vec::loadu(p + j, k), head(d.step(j, k), k), s_pu);
    }
    pu[r] = sum_all(s_pu);
  });
  double t_pu = 0.0;
  for (int64_t r = 0; r < rows; ++r) t_pu += pu[r];
  const float root = std::sqrt(all_pp) + eps;
  const Vec coef(static_cast<float>(t_pu) / (root * root));
  for_rows(rows, nt, [&](int64_t r) {
    for (int64_t j = r * n; j < (r + 1) * n; j += VEC) {
      const int64_t k = std::min(VEC, (r + 1) * n - j);
      const Vec u = d.direction(j, k);
      const Vec pv = Vec::loadu(p + j, k);
      (pv * shrink - rate * (u - pv * coef)).store(p + j, k);
    }
  });
}

}  // namespace

// p, g and the state hold rows x n floats. mode 0 (AdamP): s1 = m, s2 = v, c1..c6 = b1,
// 1 - b1, b2, 1 - b2, a, b. Mode 1 (SGDP with momentum): s1 = the buffer, c1 = momentum,
// c2 = 1 - dampening. Mode 2 (SGDP without): c2 = 1 - dampening. project: whether the tensor
// has two or more dimensions.
extern "C" void kernel(float* p, const float* g, float* s1, float* s2, int64_t rows, int64_t n,
                       float c1, float c2, float c3, float c4, float c5, float c6, float lr,
                       float wd, float wd_ratio, float delta, float eps, int64_t nesterov,
                       int64_t project, int64_t threads, int64_t mode) {
  const int nt = static_cast<int>(std::max<int64_t>(threads, 1));
  if (mode == 0) {
    const Adam d{s1, s2, g, Vec(c1), Vec(c2), Vec(c3), Vec(c4), Vec(c5), Vec(c6),
                 nesterov != 0};
    run(d, p, g, rows, n, lr, wd, wd_ratio, delta, eps, project != 0, nt);
  } else {
    const Sgd d{mode == 1 ? s1 : nullptr, g, Vec(c1), Vec(c2), nesterov != 0};
    run(d, p, g, rows, n, lr, wd, wd_ratio, delta, eps, project != 0, nt);
  }
}

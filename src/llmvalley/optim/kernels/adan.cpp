// Adan's step of one float32 tensor on CPU (ScaleByAdan in llmvalley/optim/transforms/adaptive.py
// with the shell's proximal or decoupled decay), in one pass where the eager chain makes about
// fifteen. With d_g = g - g_prev (zero at the first step, `first`):
//
//   m <- lerp(m, g, 1 - b1),  d <- lerp(d, d_g, 1 - b2),  x = d_g b2 + g,
//   n <- b3 n + (1 - b3) x^2,  g_prev <- g,
//   u = (m / bc1 + d (b2 / bc2)) / (sqrt(n) / sqrt(bc3) + eps)
//   proximal (`mode` 0): p <- (p - lr u) / (1 + lr wd);  decoupled (1): p <- p shrink - lr u
//
// It reads g, g_prev, m, d, n and p and writes g_prev, m, d, n and p: 44 bytes per element
// against fused AdamW's 28. The arithmetic is the chain's operations in float32 (its lerp and
// addcmul as torch's vectorised kernels fuse them), to rounding, except that the divisions by
// bc1 and sqrt(bc3) are multiplications by their reciprocals (an ulp apart; two divisions per
// element fewer, which took the step from 1.63x to about 1.5x fused AdamW, level with the
// compiled tier's).
namespace {
using namespace llmvalley;
constexpr int64_t SPAN = 4096;  // elements per unit of work split over the threads
}  // namespace

extern "C" void kernel(float* p, const float* g, float* m, float* d, float* sq, float* prev,
                       int64_t n, int64_t first, float w1, float b2, float w2, float b3,
                       float w3, float bc1, float c2, float root3, float eps, float lr,
                       float decay_factor, int64_t decay, int64_t mode, int64_t threads) {
  const int nt = static_cast<int>(threads);
  const bool fresh = first != 0, decays = decay != 0, proximal = mode == 0;
  const Vec vb2(b2), vb3(b3), vw3(w3), vbc1(1.0f / bc1), vc2(c2), vroot3(1.0f / root3), veps(eps),
      vlr(-lr), vdecay(decay_factor);
  for_vectors(n, SPAN, nt, [&](int64_t j, int64_t k) {
    const Vec gv = Vec::loadu(g + j, k);
    const Vec dg = fresh ? Vec(0.0f) : gv - Vec::loadu(prev + j, k);
    const Vec mj = lerp_vec(Vec::loadu(m + j, k), gv, w1);
    const Vec dj = lerp_vec(Vec::loadu(d + j, k), dg, w2);
    const Vec x = dg * vb2 + gv;
    const Vec nj = at::vec::fmadd(vw3 * x, x, Vec::loadu(sq + j, k) * vb3);
    mj.store(m + j, k);
    dj.store(d + j, k);
    nj.store(sq + j, k);
    gv.store(prev + j, k);
    const Vec u = (mj * vbc1 + dj * vc2) / (nj.sqrt() * vroot3 + veps);
    Vec pv = Vec::loadu(p + j, k);
    if (proximal) {
      pv = at::vec::fmadd(vlr, u, pv);
      if (decays) pv = pv / vdecay;
    } else {
      if (decays) pv = pv * vdecay;
      pv = at::vec::fmadd(vlr, u, pv);
    }
    pv.store(p + j, k);
  });
}

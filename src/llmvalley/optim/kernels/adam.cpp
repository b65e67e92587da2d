// AdamW's step of one float32 tensor on CPU (ScaleByAdam in llmvalley/optim/transforms and
// the shell's decoupled decay and write), with MARS's correction (MARSCorrection: the mars
// recipe's matrices) or a gradient scale (AdaGC's clipping factor, adagc=True), in the passes
// they need where the eager chain makes about twelve:
//
//   1. with `correct`: c = (g - g_prev) k + g  (k = gamma beta1 / (1 - beta1)), n = ||c||
//   2. c' = c / n where n > 1, else c (with `correct`; g_prev <- g), else c' = g scale;
//      m <- lerp(m, c', 1 - b1), v <- b2 v + (1 - b2) c'^2, u = m / (sqrt(v) a + b)
//      (a = bc1 / sqrt(bc2), b = eps bc1: ScaleByAdam's torch eps form),
//      p <- p shrink - lr u (shrink = 1 - lr wd when `decay`)
//
// Without the correction the step is one pass (28 bytes per element, as fused AdamW; the
// gradient is only read: torch's fused kernels, given a gradient scale, write the unscaled
// gradient back). With it the first pass reads g and g_prev; the second reads g, g_prev, m, v
// and p and writes g_prev, m, v and p (44 bytes per element). The norm is summed per thread in
// float lanes, then in double, so results depend only on the thread count; the arithmetic is
// the chain's operations in float32 (lerp and addcmul as torch's vectorised kernels fuse
// them), to rounding.
namespace {
using namespace llmvalley;
constexpr int64_t SPAN = 4096;  // elements per unit of work split over the threads
}  // namespace

extern "C" void kernel(float* p, const float* g, float* m, float* v, float* last, int64_t n,
                       float k, int64_t correct, float scale, float w1, float b2, float w2,
                       float a, float b, float lr, float shrink, int64_t decay,
                       int64_t threads) {
  const int nt = static_cast<int>(threads);
  const bool mars = correct != 0;
  const Vec vk(k);
  // 1. the corrected gradient's norm
  float norm = 0.0f;
  if (mars) {
    const double sq = sum_squares(n, SPAN, nt, [&](int64_t j, int64_t w) {
      const Vec gv = Vec::loadu(g + j, w);
      return (gv - Vec::loadu(last + j, w)) * vk + gv;
    });
    norm = static_cast<float>(std::sqrt(sq));
  }
  const bool unit = norm > 1.0f;
  const bool scaled = !mars && scale != 1.0f;
  const Vec vnorm(norm), vscale(scale);
  const AdamWrite adam(w1, b2, w2, a, b, lr, shrink, decay != 0);
  // 2. Adam on the corrected gradient, and the write
  for_vectors(n, SPAN, nt, [&](int64_t j, int64_t w) {
    const Vec gv = Vec::loadu(g + j, w);
    Vec c = gv;
    if (mars) {
      c = (gv - Vec::loadu(last + j, w)) * vk + gv;
      if (unit) c = c / vnorm;
      gv.store(last + j, w);
    } else if (scaled) {
      c = gv * vscale;
    }
    const Vec u = adam.moments(m + j, v + j, Vec::loadu(m + j, w), Vec::loadu(v + j, w), c,
                               w);
    adam.write(p + j, u, w);
  });
}

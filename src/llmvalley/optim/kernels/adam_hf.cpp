// Adam in the HF eps form (ScaleByAdam(eps_form="hf") in llmvalley/optim/transforms) on one
// float32 tensor on CPU, with the shell's write, in one pass: SPAM's step
// (ScaleBySpikeAwareAdam in stability.py, decay after the write) and Grams' (Adam, then
// GradSignTimesMagnitude in sign.py, decay before it). The eager chains make about ten passes.
//
//   with `reset` the moments restart at zero; with `clip` (SPAM), g' = sign(g) sqrt(theta v)
//   where g^2 > theta v (v before this step's update), else g' = g;
//   m <- lerp(m, g', 1 - b1), v <- b2 v + (1 - b2) g'^2,
//   u = m / (sqrt(v) + eps) c  (c = sqrt(bc2) / bc1), times SPAM's warm-up multiplier `ramp`
//   after a reset (when it is not 1); with `grams`, u <- |u| sign(g);
//   decay after (SPAM): p <- p - lr u, then p <- p shrink; before (Grams): p <- p shrink - lr u
//   (shrink = 1 - lr wd when `decay`)
//
// It reads g, m, v and p and writes m, v and p: fused AdamW's 28 bytes per element. The
// arithmetic is the chain's operations in float32 (its lerp and addcmul as torch's vectorised
// kernels fuse them, its products by c and by the multiplier apart), to rounding.
namespace {
using namespace llmvalley;
constexpr int64_t SPAN = 4096;  // elements per unit of work split over the threads
}  // namespace

extern "C" void kernel(float* p, const float* g, float* m, float* v, int64_t n, float theta,
                       int64_t clip, int64_t reset, float w1, float b2, float w2, float eps,
                       float c, float ramp, int64_t grams, float lr, float shrink,
                       int64_t decay, int64_t decay_after, int64_t threads) {
  const int nt = static_cast<int>(threads);
  const bool clips = clip != 0 && theta != 0.0f, restart = reset != 0, ramps = ramp != 1.0f,
             shrinks = decay != 0, after = decay_after != 0, sign_of_g = grams != 0;
  const Vec vtheta(theta), vb2(b2), vw2(w2), veps(eps), vc(c), vramp(ramp), vlr(-lr),
      vshrink(shrink), zero(0.0f);
  for_vectors(n, SPAN, nt, [&](int64_t j, int64_t k) {
    const Vec gv = Vec::loadu(g + j, k);
    const Vec m0 = restart ? zero : Vec::loadu(m + j, k);
    const Vec v0 = restart ? zero : Vec::loadu(v + j, k);
    Vec x = gv;
    if (clips) {  // spike clipping against the second moment before this step
      const Vec limit = v0 * vtheta;
      x = Vec::blendv(x, sign_vec(x) * limit.sqrt(), x * x > limit);
    }
    const Vec mj = lerp_vec(m0, x, w1);
    const Vec vj = at::vec::fmadd(vw2 * x, x, v0 * vb2);
    mj.store(m + j, k);
    vj.store(v + j, k);
    Vec u = mj / (vj.sqrt() + veps) * vc;
    if (ramps) u = u * vramp;
    if (sign_of_g) u = u.abs() * sign_vec(gv);
    Vec pv = Vec::loadu(p + j, k);
    if (shrinks && !after) pv = pv * vshrink;
    pv = at::vec::fmadd(vlr, u, pv);
    if (shrinks && after) pv = pv * vshrink;
    pv.store(p + j, k);
  });
}

// Schedule-free SGD's and AdamW's step of one float32 tensor on CPU, in training mode
// (ScaleByAdam(first_moment="input") for AdamW, CoupledWeightDecay and ScheduleFree in
// llmvalley/optim/transforms, as schedulefree's SGDScheduleFree and AdamWScheduleFree compute
// them), in one pass. The parameter holds y, the state z (and AdamW's v); with this step's
// numbers c (the averaging weight), coef = lr (1 - beta (1 - c)) and lr:
//
//   SGD (mode 0):   d = g + wd y
//   AdamW (mode 1): v <- b2 v + (1 - b2) g^2,  d = g / (sqrt(v) a + eps) + wd y
//                   (a = 1 / sqrt(1 - b2^t))
//   then            y <- y - ((y - z) c + coef d),  z <- z - lr d
//
// with the chain's roundings (its foreach add with alpha and addcmul are fused
// multiply-adds). SGD reads y, z and g and writes y and z (20 bytes per element, where the
// chain's eager step moves 44); AdamW also reads and writes v.
namespace {
using namespace llmvalley;
constexpr int64_t SPAN = 1024;  // elements per unit of work split over the threads
}  // namespace

extern "C" void kernel(float* p, const float* g, float* z, float* v, int64_t n, float wd,
                       float c, float coef, float lr, float b2, float k2, float a, float eps,
                       int64_t mode, int64_t threads) {
  const Vec vwd(wd), vc(c), vcoef(coef), vlr(-lr), vb2(b2), vk2(k2), va(a), veps(eps);
  const bool decay = wd != 0.0f, adam = mode == 1;
  for_vectors(n, SPAN, static_cast<int>(threads), [&](int64_t j, int64_t k) {
    const Vec y = Vec::loadu(p + j, k), zv = Vec::loadu(z + j, k);
    Vec d = Vec::loadu(g + j, k);
    if (adam) {
      const Vec vv = at::vec::fmadd(vk2 * d, d, Vec::loadu(v + j, k) * vb2);
      vv.store(v + j, k);
      d = d / (vv.sqrt() * va + veps);
    }
    if (decay) d = at::vec::fmadd(vwd, y, d);
    const Vec u = at::vec::fmadd(vcoef, d, (y - zv) * vc);
    (y - u).store(p + j, k);
    at::vec::fmadd(vlr, d, zv).store(z + j, k);
  });
}

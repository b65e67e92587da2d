// Stable-SPAM's step of one float32 tensor on CPU (ScaleByStableSPAM in
// llmvalley/optim/transforms/stability.py, the shell's decoupled decay and write), in two
// passes (three when many elements come near the clipping limit), where the eager chain
// makes about fifteen and inductor's code six:
//
//   1. peak = max |g|;  m_max <- g3 m_max + (1 - g3) peak,  L = m_max / c_max;
//      n = ||g'||  with g' = g / peak * L where |g| > L, else g (AdaClip);
//      m_norm <- g1 m_norm + (1 - g1) n,  v_norm <- g2 v_norm + (1 - g2) n^2,
//      r = (m_norm / c_norm) / (sqrt(v_norm / c_sq) + eps)
//   2. x = g' / n * r (x = g' when n == 0: AdaGN); with `reset` the moments restart at zero;
//      m <- lerp(m, x, 1 - b1), v <- b2 v + (1 - b2) x^2, u = m / (sqrt(v) a + b)
//      (a = bc1 / sqrt(bc2), b = eps bc1: ScaleByAdam's torch eps form at Adam's restarted
//      step count), p <- p shrink - lr u (shrink = 1 - lr wd when `decay`)
//
// L is not known until the peak is, but it is at least L0 = g3 m_max / c_max (the old m_max).
// So the first pass sums g^2 over the elements with |g| <= L0, which no limit of this step
// clips, and keeps the others aside: in steady state only elements near the running peak, a
// handful. Their clipped squares complete n. When a thread would keep more than KEPT (the
// first steps, when m_max is still small), n takes a pass of its own over g.
//
// m_max, m_norm and v_norm are the tensor's three 0-d float32 statistics, updated in place
// (no host sync). c_max, c_norm, c_sq: the statistics' bias corrections at their restarted
// step count (the transform's prelude). The first pass reads g; the second reads g, m, v and
// p and writes m, v and p (32 bytes per element against fused AdamW's 28). The sums are
// taken per thread in float lanes, then in double, so results depend only on the thread
// count; the arithmetic is the chain's operations (lerp and addcmul as torch's vectorised
// kernels fuse them), in float32, to rounding.
namespace {
using namespace llmvalley;
constexpr int64_t SPAN = 4096;  // elements per unit of work split over the threads

constexpr int ALL_LANES = (1 << VEC) - 1;  // zero_mask() of a vector without a set lane

// g' of the AdaClip for k lanes
inline Vec clipped(const Vec& gv, const Vec& limit, const Vec& scale) {
  const Vec over = gv.abs() > limit;
  if (over.zero_mask() == ALL_LANES) return gv;  // no lane clipped: no division
  return Vec::blendv(gv, gv / scale * limit, over);
}

constexpr size_t KEPT = 4096;  // elements a thread keeps aside in pass 1 before it gives up

// what a thread's part of the first pass gives
struct First {
  float peak = 0.0f;
  double sq = 0.0;  // sum of g^2 over the elements at most the lowest possible limit
  std::vector<float> kept;  // the other elements (while no more than KEPT)
  bool overflow = false;  // more than KEPT: the norm takes a pass of its own
};

// keep aside the lanes of gv that `mask` sets
inline void keep(First& f, const Vec& gv, const Vec& mask) {
  if (f.overflow) return;
  alignas(64) float values[VEC], flags[VEC];
  gv.store(values);
  mask.store(flags);
  for (int64_t l = 0; l < VEC; ++l) {
    if (flags[l] == 0.0f) continue;
    if (f.kept.size() == KEPT) {
      f.overflow = true;
      return;
    }
    f.kept.push_back(values[l]);
  }
}

}  // namespace

extern "C" void kernel(float* p, const float* g, float* m, float* v, float* m_max,
                       float* m_norm, float* v_norm, int64_t n, float g1, float w1n, float g2,
                       float w2n, float g3, float w3, float c_max, float c_norm, float c_sq,
                       float eps, int64_t reset, float w1, float b2, float w2,
                       float a, float b, float lr, float shrink, int64_t decay,
                       int64_t threads) {
  const int nt = static_cast<int>(threads);
  // 1. the peak |g|, and the sum of g^2 over the elements that no limit of this step can clip
  // (|g| <= L0 = g3 m_max / c_max <= L); the others are kept aside (a few in steady state)
  const float kept_max = *m_max * g3;
  const float floor_limit = kept_max / c_max;
  const Vec vfloor(floor_limit);
  std::vector<First> part(nt);
#pragma omp parallel num_threads(nt) if (nt > 1)
  {
    int64_t lo, hi;
    thread_rows((n + SPAN - 1) / SPAN, &lo, &hi);
    First& mine = part[omp_get_thread_num()];
    Vec peak(0.0f), acc(0.0f);
    double sq = 0.0;
    for (int64_t s = lo; s < hi; ++s) {
      const int64_t end = std::min(n, (s + 1) * SPAN);
      for (int64_t j = s * SPAN; j < end; j += VEC) {
        const int64_t k = std::min(VEC, end - j);
        const Vec gv = head(Vec::loadu(g + j, k), k), a = gv.abs();
        peak = at::vec::maximum(peak, a);
        const Vec over = a > vfloor;
        const Vec small = Vec::blendv(gv, Vec(0.0f), over);
        acc = at::vec::fmadd(small, small, acc);
        if (over.zero_mask() != ALL_LANES) keep(mine, gv, over);
      }
      sq += sum_all(acc);
      acc = Vec(0.0f);
    }
    mine.peak = at::vec::vec_reduce_all<float>(
        [](Vec& x, Vec& y) { return at::vec::maximum(x, y); }, peak);
    mine.sq = sq;
  }
  float peak = 0.0f;
  double sq = 0.0;
  bool overflow = false;
  for (const First& f : part) {
    peak = std::isnan(peak) || std::isnan(f.peak) ? NAN : std::max(peak, f.peak);
    sq += f.sq;
    overflow = overflow || f.overflow;
  }
  *m_max = kept_max + w3 * peak;
  const float limit = *m_max / c_max;
  const Vec vlimit(limit), vpeak(peak);
  if (overflow) {  // the norm of the clipped gradient, in a pass of its own
    sq = sum_squares(n, SPAN, nt, [&](int64_t j, int64_t k) {
      return clipped(Vec::loadu(g + j, k), vlimit, vpeak);
    });
  } else {  // the kept elements, clipped
    for (const First& f : part)
      for (const float x : f.kept) {
        const float c = std::abs(x) > limit ? x / peak * limit : x;
        sq += static_cast<double>(c) * c;
      }
  }
  const float norm = static_cast<float>(std::sqrt(sq));
  *m_norm = *m_norm * g1 + w1n * norm;
  *v_norm = *v_norm * g2 + w2n * (norm * norm);
  const float ratio = (*m_norm / c_norm) / (std::sqrt(*v_norm / c_sq) + eps);
  const bool scaled = norm > 0.0f, restart = reset != 0;
  const Vec vnorm(norm), vratio(ratio), zero(0.0f);
  const AdamWrite adam(w1, b2, w2, a, b, lr, shrink, decay != 0);
  // 2. Adam on the rescaled gradient, and the write
  for_vectors(n, SPAN, nt, [&](int64_t j, int64_t k) {
    Vec x = clipped(Vec::loadu(g + j, k), vlimit, vpeak);
    if (scaled) x = x / vnorm * vratio;
    const Vec m0 = restart ? zero : Vec::loadu(m + j, k);
    const Vec v0 = restart ? zero : Vec::loadu(v + j, k);
    adam.write(p + j, adam.moments(m + j, v + j, m0, v0, x, k), k);
  });
}

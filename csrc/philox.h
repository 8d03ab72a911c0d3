// Philox4x32-10 + Box-Muller, shared by the CPU and CUDA kernels (no torch headers).
//
// The mapping is the one of fastvae/ops/philox.py (bit-compatible with Triton's tl.randn):
// element i of a stream is lane i % 4 of Philox4x32-10 keyed by the 64-bit seed (k0 low word,
// k1 high) at counter i / 4 (c0 low word, c1 high, c2 = c3 = 0); words become uniforms as
// Triton's uint_to_uniform_float does, and Box-Muller turns words (0, 1) into lanes 0, 1 and
// words (2, 3) into lanes 2, 3.
#pragma once

#include <cstdint>
#include <cmath>

#if defined(__CUDACC__)
#define FASTVAE_HD __host__ __device__ __forceinline__
#else
#define FASTVAE_HD inline
#endif

namespace fastvae {

constexpr float kUniformScale = 4.6566127342e-10f;  // largest s with (2^31 - 1) * s < 1
constexpr float kMinUniform = 1.0e-7f;               // Box-Muller's guard against log(0)
constexpr float kTwoPi = 6.28318530717958647692f;

// The four 32-bit words of Philox4x32-10 at `counter` under `seed`.
FASTVAE_HD void philox4x32_10(uint64_t seed, uint64_t counter, uint32_t out[4]) {
  uint32_t c0 = static_cast<uint32_t>(counter), c1 = static_cast<uint32_t>(counter >> 32), c2 = 0, c3 = 0;
  uint32_t k0 = static_cast<uint32_t>(seed), k1 = static_cast<uint32_t>(seed >> 32);
#if defined(__CUDACC__)
#pragma unroll
#endif
  for (int round = 0; round < 10; ++round) {
    const uint64_t pb = static_cast<uint64_t>(0xCD9E8D57u) * c2;
    const uint64_t pa = static_cast<uint64_t>(0xD2511F53u) * c0;
    const uint32_t n0 = static_cast<uint32_t>(pb >> 32) ^ c1 ^ k0;
    const uint32_t n2 = static_cast<uint32_t>(pa >> 32) ^ c3 ^ k1;
    c1 = static_cast<uint32_t>(pb);
    c3 = static_cast<uint32_t>(pa);
    c0 = n0;
    c2 = n2;
    k0 += 0x9E3779B9u;
    k1 += 0xBB67AE85u;
  }
  out[0] = c0; out[1] = c1; out[2] = c2; out[3] = c3;
}

// Triton's uint_to_uniform_float: the word as int32, negatives folded (-x - 1), scaled into [0, 1).
FASTVAE_HD float uniform_from_word(uint32_t word) {
  int32_t x = static_cast<int32_t>(word);
  x = x < 0 ? -x - 1 : x;
  return static_cast<float>(x) * kUniformScale;
}

// Box-Muller radius for the first uniform of a pair (clamped away from 0).
FASTVAE_HD float box_muller_radius(float u1) {
  return sqrtf(-2.0f * logf(u1 < kMinUniform ? kMinUniform : u1));
}

// sin and cos of Box-Muller's angle th in [0, 2 pi] at once (the CPU kernels run the same steps on
// vectors): quadrant q = round(th / (pi/2)), r = th - q pi/2 in three exact parts (Cody-Waite),
// Cephes' minimax polynomials on [-pi/4, pi/4] (about 1 ulp), then the quadrant's swap and signs.
// Exact range reduction for this range, so no slow path (CUDA's sinf/cosf keep one for huge
// arguments, with local memory).
namespace sincos_coef {
constexpr float kTwoOverPi = 0.636619772367581343f;
constexpr float kPiO2Hi = 1.5703125f, kPiO2Mid = 4.837512969970703125e-4f, kPiO2Lo = 7.54978995489188216e-8f;
constexpr float kS1 = -1.6666654611e-1f, kS2 = 8.3321608736e-3f, kS3 = -1.9515295891e-4f;
constexpr float kC1 = 4.166664568298827e-2f, kC2 = -1.388731625493765e-3f, kC3 = 2.443315711809948e-5f;
}  // namespace sincos_coef

FASTVAE_HD void sincos_angle(float th, float* s, float* c) {
  using namespace sincos_coef;
  const float q = rintf(th * kTwoOverPi);
  float r = fmaf(q, -kPiO2Hi, th);
  r = fmaf(q, -kPiO2Mid, r);
  r = fmaf(q, -kPiO2Lo, r);
  const float r2 = r * r;
  const float ps = fmaf(r * r2, fmaf(fmaf(kS3, r2, kS2), r2, kS1), r);
  const float pc = fmaf(r2 * r2, fmaf(fmaf(kC3, r2, kC2), r2, kC1), fmaf(r2, -0.5f, 1.0f));
  const int m = static_cast<int>(q) & 3;
  const float sv = (m & 1) ? pc : ps, cv = (m & 1) ? ps : pc;
  *s = (m & 2) ? -sv : sv;
  *c = ((m + 1) & 2) ? -cv : cv;
}

// The four normals of counter `counter` (lanes 0..3) in `out`.
FASTVAE_HD void philox_normal4(uint64_t seed, uint64_t counter, float out[4]) {
  uint32_t w[4];
  philox4x32_10(seed, counter, w);
#if defined(__CUDACC__)
#pragma unroll
#endif
  for (int pair = 0; pair < 2; ++pair) {
    const float r = box_muller_radius(uniform_from_word(w[2 * pair]));
    float s, c;
    sincos_angle(kTwoPi * uniform_from_word(w[2 * pair + 1]), &s, &c);
    out[2 * pair] = r * c;
    out[2 * pair + 1] = r * s;
  }
}

// Stream values i0 .. i0 + 3 at any offset: one Philox call when i0 % 4 == 0, else two (the
// window of 8 values shifted by i0 % 4 with selects, no indexing into a local array).
FASTVAE_HD void philox_normals_at(uint64_t seed, uint64_t i0, float eps[4]) {
  const int o = static_cast<int>(i0 & 3);
  philox_normal4(seed, i0 >> 2, eps);
  if (o == 0) return;
  float b[4];
  philox_normal4(seed, (i0 >> 2) + 1, b);
  const float w1 = eps[1], w2 = eps[2], w3 = eps[3];
  eps[0] = o == 1 ? w1 : (o == 2 ? w2 : w3);
  eps[1] = o == 1 ? w2 : (o == 2 ? w3 : b[0]);
  eps[2] = o == 1 ? w3 : (o == 2 ? b[0] : b[1]);
  eps[3] = o == 1 ? b[0] : (o == 2 ? b[1] : b[2]);
}

}  // namespace fastvae

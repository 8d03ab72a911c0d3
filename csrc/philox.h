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

// The four normals of counter `counter` (lanes 0..3) in `out`.
FASTVAE_HD void philox_normal4(uint64_t seed, uint64_t counter, float out[4]) {
  uint32_t w[4];
  philox4x32_10(seed, counter, w);
#if defined(__CUDACC__)
#pragma unroll
#endif
  for (int pair = 0; pair < 2; ++pair) {
    const float r = box_muller_radius(uniform_from_word(w[2 * pair]));
    const float th = kTwoPi * uniform_from_word(w[2 * pair + 1]);
    out[2 * pair] = r * cosf(th);
    out[2 * pair + 1] = r * sinf(th);
  }
}

}  // namespace fastvae

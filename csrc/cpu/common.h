// Helpers shared by the CPU kernels. Every kernel file is compiled twice: as is (portable
// baseline) and from avx2.cpp with AVX2+FMA enabled; FASTVAE_ISA names the namespace of each
// copy and the ops pick one at run time (ATen's CPU capability, which honours
// ATEN_CPU_CAPABILITY=default). at::vec::Vectorized gives explicit SIMD (Sleef exp/log/sin/cos)
// with IEEE NaN/Inf semantics: no -ffast-math.
#pragma once

#include <ATen/Parallel.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>

#include <algorithm>
#include <cstdint>

#include "../philox.h"

#ifndef FASTVAE_ISA
#define FASTVAE_ISA base
#endif

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define FASTVAE_HAVE_AVX2_COPY 1
#else
#define FASTVAE_HAVE_AVX2_COPY 0
#endif

namespace fastvae::cpu::FASTVAE_ISA {

template <typename T>
using Vec = at::vec::Vectorized<T>;

// `count` (<= Vec size) elements from `p`, the other lanes 0.
template <typename T>
inline Vec<T> load(const T* p, int64_t count) {
  return count == Vec<T>::size() ? Vec<T>::loadu(p) : Vec<T>::loadu(p, count);
}

template <typename T>
inline void store(const Vec<T>& v, T* p, int64_t count) {
  if (count == Vec<T>::size()) v.store(p); else v.store(p, count);
}

template <typename T>
inline T sum_lanes(const Vec<T>& v) {
  return at::vec::vec_reduce_all<T>([](Vec<T>& a, Vec<T>& b) { return a + b; }, v);
}

// sigmoid(l) from e = exp(-|l|): e / (1 + e) below 0, 1 / (1 + e) above; no overflow.
template <typename T>
inline Vec<T> sigmoid_from(const Vec<T>& l, const Vec<T>& e) {
  const Vec<T> one(1), inv = one / (one + e);
  return Vec<T>::blendv(e * inv, inv, l >= Vec<T>(0));
}

// KL(N(mu, exp(lv)) || N(0, I)) of one row, -0.5 sum(1 + lv - mu^2 - exp(lv)); with `g_mu`
// it also writes its gradients times `scale` (scale * mu, scale * 0.5 (exp(lv) - 1)).
// Zero-filled tail lanes contribute 1 + 0 - 0 - 1 = 0.
template <typename T>
inline T kl_row(const T* mu, const T* lv, int64_t n, T scale = 0, T* g_mu = nullptr, T* g_lv = nullptr) {
  constexpr int64_t W = Vec<T>::size();
  Vec<T> acc(0);
  for (int64_t j = 0; j < n; j += W) {
    const int64_t c = std::min(W, n - j);
    const Vec<T> m = load(mu + j, c), v = load(lv + j, c), e = v.exp();
    acc = acc + (Vec<T>(1) + v - m * m - e);
    if (g_mu != nullptr) {
      store(m * Vec<T>(scale), g_mu + j, c);
      store((e - Vec<T>(1)) * Vec<T>(T(0.5) * scale), g_lv + j, c);
    }
  }
  return T(-0.5) * sum_lanes(acc);
}

// Normals offset .. offset + n - 1 of Philox stream `seed` (fastvae/ops/philox.py's mapping)
// into `out`: words scalar (auto-vectorised), Box-Muller with at::vec.
template <typename T>
inline void fill_randn(uint64_t seed, uint64_t offset, int64_t n, T* out) {
  constexpr int64_t kCounters = 64, kPairs = 2 * kCounters;
  using VF = Vec<float>;
  alignas(64) float u1[kPairs], u2[kPairs], cs[kPairs], sn[kPairs];
  const uint64_t end = offset + static_cast<uint64_t>(n);
  for (uint64_t c0 = offset / 4; 4 * c0 < end; c0 += kCounters) {
    for (int64_t j = 0; j < kCounters; ++j) {
      uint32_t w[4];
      philox4x32_10(seed, c0 + j, w);
      u1[2 * j] = uniform_from_word(w[0]);
      u2[2 * j] = uniform_from_word(w[1]);
      u1[2 * j + 1] = uniform_from_word(w[2]);
      u2[2 * j + 1] = uniform_from_word(w[3]);
    }
    for (int64_t p = 0; p < kPairs; p += VF::size()) {
      const VF r = (VF(-2.0f) * at::vec::maximum(VF::loadu(u1 + p), VF(kMinUniform)).log()).sqrt();
      const VF th = VF(kTwoPi) * VF::loadu(u2 + p);
      (r * th.cos()).store(cs + p);
      (r * th.sin()).store(sn + p);
    }
    // element 4 c + 2 h + e of the block is pair 2 c + h, cos for e = 0 and sin for e = 1
    const uint64_t first = std::max(offset, 4 * c0), last = std::min(end, 4 * (c0 + kCounters));
    for (uint64_t i = first; i < last; ++i) {
      const uint64_t q = i - 4 * c0;
      out[i - offset] = static_cast<T>((q & 1) ? sn[q >> 1] : cs[q >> 1]);
    }
  }
}

}  // namespace fastvae::cpu::FASTVAE_ISA

#ifndef FASTVAE_KERNELS_ONLY
#include <ATen/Version.h>

namespace fastvae::cpu {
// Whether to run the AVX2 copy of the kernels on this CPU.
inline bool use_avx2() {
#if FASTVAE_HAVE_AVX2_COPY
  static const bool yes = at::get_cpu_capability().rfind("AVX", 0) == 0;  // "AVX2" or "AVX512"
  return yes;
#else
  return false;
#endif
}
}  // namespace fastvae::cpu

// Run kernel `fn` (a template in both ISA namespaces) on `args`, in the copy this CPU supports.
#if FASTVAE_HAVE_AVX2_COPY
#define FASTVAE_CPU_RUN(fn, args) \
  (::fastvae::cpu::use_avx2() ? ::fastvae::cpu::avx2::fn(args) : ::fastvae::cpu::base::fn(args))
#else
#define FASTVAE_CPU_RUN(fn, args) ::fastvae::cpu::base::fn(args)
#endif
#endif

// Helpers shared by the CPU kernels. Every kernel file is compiled twice: as is (portable
// baseline) and from avx2.cpp with AVX2+FMA enabled; FASTVAE_ISA names the namespace of each
// copy and the ops pick one at run time (ATen's CPU capability, which honours
// ATEN_CPU_CAPABILITY=default). at::vec::Vectorized gives explicit SIMD (Sleef exp/log) with
// IEEE NaN/Inf semantics: no -ffast-math. Philox runs on raw AVX2 integer intrinsics in the AVX2
// copy and in scalar code in the baseline; both give the same words (tests compare them).
#pragma once

#include <ATen/Parallel.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <type_traits>

#include "../flags.h"
#include "../philox.h"

#ifndef FASTVAE_ISA
#define FASTVAE_ISA base
#endif

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define FASTVAE_HAVE_AVX2_COPY 1
#else
#define FASTVAE_HAVE_AVX2_COPY 0
#endif

#if defined(CPU_CAPABILITY_AVX2)
#include <immintrin.h>
#endif

namespace fastvae::cpu {

// The value-check bits one parallel task found, ORed once per task (not per element).
class FlagSink {
 public:
  void add(int bits) {
    if (bits != 0) bits_.fetch_or(bits, std::memory_order_relaxed);
  }
  // ORs what the tasks found into the flag word (after the parallel region); never clears it.
  void commit(int32_t* word) const {
    if (word != nullptr) *word |= bits_.load(std::memory_order_relaxed);
  }

 private:
  std::atomic<int> bits_{0};
};

namespace FASTVAE_ISA {

template <typename T>
using Vec = at::vec::Vectorized<T>;

#if defined(CPU_CAPABILITY_AVX2)
// Lane mask of the first `count` lanes of a 256-bit vector of T (masked loads read no memory past them).
template <typename T>
inline __m256i lane_mask(int64_t count) {
  alignas(32) static const int32_t ramp[16] = {-1, -1, -1, -1, -1, -1, -1, -1, 0, 0, 0, 0, 0, 0, 0, 0};
  if constexpr (sizeof(T) == 4) {
    return _mm256_loadu_si256(reinterpret_cast<const __m256i*>(ramp + 8 - count));
  } else {
    return _mm256_cvtepi32_epi64(_mm_loadu_si128(reinterpret_cast<const __m128i*>(ramp + 8 - count)));
  }
}
#endif

// `count` (<= Vec size) elements from `p`, the other lanes 0 (which never trip a value check).
template <typename T>
inline Vec<T> load(const T* p, int64_t count) {
  if (count == Vec<T>::size()) return Vec<T>::loadu(p);
#if defined(CPU_CAPABILITY_AVX2)
  if constexpr (std::is_same_v<T, float>) return _mm256_maskload_ps(p, lane_mask<T>(count));
  else return _mm256_maskload_pd(p, lane_mask<T>(count));
#else
  return Vec<T>::loadu(p, count);
#endif
}

template <typename T>
inline void store(const Vec<T>& v, T* p, int64_t count) {
  if (count == Vec<T>::size()) {
    v.store(p);
    return;
  }
#if defined(CPU_CAPABILITY_AVX2)
  if constexpr (std::is_same_v<T, float>) _mm256_maskstore_ps(p, lane_mask<T>(count), v);
  else _mm256_maskstore_pd(p, lane_mask<T>(count), v);
#else
  v.store(p, count);
#endif
}

template <typename T>
inline T sum_lanes(const Vec<T>& v) {
  return at::vec::vec_reduce_all<T>([](Vec<T>& a, Vec<T>& b) { return a + b; }, v);
}

// Lane-wise min / max that keep `acc` where `v` is NaN (x86 minps/maxps semantics).
template <typename T>
inline Vec<T> min_keep(const Vec<T>& v, const Vec<T>& acc) {
#if defined(CPU_CAPABILITY_AVX2)
  if constexpr (std::is_same_v<T, float>) return _mm256_min_ps(v, acc); else return _mm256_min_pd(v, acc);
#else
  return Vec<T>::blendv(acc, v, v < acc);
#endif
}

template <typename T>
inline Vec<T> max_keep(const Vec<T>& v, const Vec<T>& acc) {
#if defined(CPU_CAPABILITY_AVX2)
  if constexpr (std::is_same_v<T, float>) return _mm256_max_ps(v, acc); else return _mm256_max_pd(v, acc);
#else
  return Vec<T>::blendv(acc, v, v > acc);
#endif
}

// Value checks on vectors a kernel has already loaded: each costs one to three vector ops per
// vector; bits() reduces the lanes once per task.
template <typename T>
struct FiniteCheck {  // a lane turns NaN once it has seen a NaN or +-Inf (v * 0 is NaN exactly then)
  Vec<T> acc{T(0)};
  void add(const Vec<T>& v) { acc = at::vec::fmadd(v, Vec<T>(T(0)), acc); }
  bool bad() const { const T s = sum_lanes(acc); return s != s; }
};

template <typename T>
struct RangeCheck {  // NaN-ignoring min and max of what it saw
  Vec<T> lo{T(0)}, hi{T(0)};
  void add(const Vec<T>& v) { lo = min_keep(v, lo); hi = max_keep(v, hi); }
  bool outside(T a, T b) const {
    return at::vec::vec_reduce_all<T>([](Vec<T>& p, Vec<T>& q) { return at::vec::minimum(p, q); }, lo) < a ||
           at::vec::vec_reduce_all<T>([](Vec<T>& p, Vec<T>& q) { return at::vec::maximum(p, q); }, hi) > b;
  }
};

template <typename T>
struct LogvarCheck {  // non-finite, and the largest finite value (v + (v - v) is NaN for +-Inf)
  Vec<T> nonfinite{T(0)}, hi{T(0)};
  void add(const Vec<T>& v) {
    const Vec<T> d = v - v;
    nonfinite = nonfinite + d;
    hi = max_keep(v + d, hi);
  }
  int bits() const {
    const T s = sum_lanes(nonfinite);
    const T top = at::vec::vec_reduce_all<T>([](Vec<T>& p, Vec<T>& q) { return at::vec::maximum(p, q); }, hi);
    return (s != s ? FLAG_LOGVAR_NONFINITE : 0) | (top > T(MAX_LOGVAR) ? FLAG_LOGVAR_HIGH : 0);
  }
};

template <typename T>
struct LatentCheck {
  FiniteCheck<T> mu;
  LogvarCheck<T> logvar;
  void add(const Vec<T>& m, const Vec<T>& v) { mu.add(m); logvar.add(v); }
  int bits() const { return (mu.bad() ? FLAG_MU_NONFINITE : 0) | logvar.bits(); }
};

// sigmoid(l) from e = exp(-|l|): e / (1 + e) below 0, 1 / (1 + e) above; no overflow.
template <typename T>
inline Vec<T> sigmoid_from(const Vec<T>& l, const Vec<T>& e) {
  const Vec<T> one(1), inv = one / (one + e);
  return Vec<T>::blendv(e * inv, inv, l >= Vec<T>(0));
}

// KL(N(mu, exp(lv)) || N(0, I)) of one row, -0.5 sum(1 + lv - mu^2 - exp(lv)), checking mu and lv;
// with `g_mu` it also writes its gradients times `scale` (scale * mu, scale * 0.5 (exp(lv) - 1)).
// Zero-filled tail lanes contribute 1 + 0 - 0 - 1 = 0.
template <typename T>
inline T kl_row(const T* mu, const T* lv, int64_t n, LatentCheck<T>* check, T scale = 0, T* g_mu = nullptr,
                T* g_lv = nullptr) {
  constexpr int64_t W = Vec<T>::size();
  Vec<T> acc(0);
  for (int64_t j = 0; j < n; j += W) {
    const int64_t c = std::min(W, n - j);
    const Vec<T> m = load(mu + j, c), v = load(lv + j, c), e = v.exp();
    if (check != nullptr) check->add(m, v);
    acc = acc + (Vec<T>(1) + v - m * m - e);
    if (g_mu != nullptr) {
      store(m * Vec<T>(scale), g_mu + j, c);
      store((e - Vec<T>(1)) * Vec<T>(T(0.5) * scale), g_lv + j, c);
    }
  }
  return T(-0.5) * sum_lanes(acc);
}

// ---- Philox4x32-10 + Box-Muller (fastvae/ops/philox.py's stream) --------------------------------

constexpr int64_t kCountersPerBatch = 8;  // counters per vectorised Philox call: 32 normals

// The words of counters first .. first + 7 under `seed`: words[w][j] is word w of counter first + j.
inline void philox_batch(uint64_t seed, uint64_t first, uint32_t words[4][kCountersPerBatch]) {
#if defined(CPU_CAPABILITY_AVX2)
  // Eight counters per 256-bit register, one 32-bit lane each. The high word of the 32 x 32 -> 64
  // products: _mm256_mul_epu32 on the even lanes and on the odd lanes shifted down, blended.
  const __m256i ma = _mm256_set1_epi32(static_cast<int>(0xD2511F53u)), mb = _mm256_set1_epi32(static_cast<int>(0xCD9E8D57u));
  const __m256i lane = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
  __m256i c0 = _mm256_add_epi32(_mm256_set1_epi32(static_cast<int>(static_cast<uint32_t>(first))), lane);
  __m256i c1;
  if (static_cast<uint32_t>(first) <= 0xFFFFFFFFu - (kCountersPerBatch - 1)) {
    c1 = _mm256_set1_epi32(static_cast<int>(static_cast<uint32_t>(first >> 32)));
  } else {  // the low word wraps inside the batch
    alignas(32) uint32_t hi[kCountersPerBatch];
    for (int j = 0; j < kCountersPerBatch; ++j) hi[j] = static_cast<uint32_t>((first + j) >> 32);
    c1 = _mm256_load_si256(reinterpret_cast<const __m256i*>(hi));
  }
  auto mulhilo = [](__m256i a, __m256i m, __m256i& hi, __m256i& lo) {
    const __m256i even = _mm256_mul_epu32(a, m), odd = _mm256_mul_epu32(_mm256_srli_epi64(a, 32), m);
    hi = _mm256_blend_epi32(_mm256_srli_epi64(even, 32), odd, 0xAA);
    lo = _mm256_blend_epi32(even, _mm256_slli_epi64(odd, 32), 0xAA);
  };
  uint32_t k0 = static_cast<uint32_t>(seed), k1 = static_cast<uint32_t>(seed >> 32);
  // round 0: c2 = c3 = 0
  __m256i hi_a, lo_a, hi_b, lo_b;
  mulhilo(c0, ma, hi_a, lo_a);
  c0 = _mm256_xor_si256(c1, _mm256_set1_epi32(static_cast<int>(k0)));
  c1 = _mm256_setzero_si256();
  __m256i c2 = _mm256_xor_si256(hi_a, _mm256_set1_epi32(static_cast<int>(k1))), c3 = lo_a;
  for (int round = 1; round < 10; ++round) {
    k0 += 0x9E3779B9u;
    k1 += 0xBB67AE85u;
    mulhilo(c0, ma, hi_a, lo_a);
    mulhilo(c2, mb, hi_b, lo_b);
    c0 = _mm256_xor_si256(_mm256_xor_si256(hi_b, c1), _mm256_set1_epi32(static_cast<int>(k0)));
    c2 = _mm256_xor_si256(_mm256_xor_si256(hi_a, c3), _mm256_set1_epi32(static_cast<int>(k1)));
    c1 = lo_b;
    c3 = lo_a;
  }
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(words[0]), c0);
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(words[1]), c1);
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(words[2]), c2);
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(words[3]), c3);
#else
  for (int j = 0; j < kCountersPerBatch; ++j) {
    uint32_t w[4];
    philox4x32_10(seed, first + j, w);
    for (int i = 0; i < 4; ++i) words[i][j] = w[i];
  }
#endif
}

// Triton's uint_to_uniform_float on eight words: ~x for negative x equals -x - 1.
inline Vec<float> uniforms(const uint32_t* words) {
#if defined(CPU_CAPABILITY_AVX2)
  const __m256i x = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(words));
  return _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_xor_si256(x, _mm256_srai_epi32(x, 31))), _mm256_set1_ps(kUniformScale));
#else
  alignas(32) float u[Vec<float>::size()];
  for (int j = 0; j < Vec<float>::size(); ++j) u[j] = uniform_from_word(words[j]);
  return Vec<float>::loadu(u);
#endif
}

// philox.h's sincos_angle on vectors (same constants and steps).
inline void sincos_angle(const Vec<float>& th, Vec<float>& s, Vec<float>& c) {
  using namespace sincos_coef;
  using V = Vec<float>;
  const V q = (th * V(kTwoOverPi)).round();
  V r = at::vec::fmadd(q, V(-kPiO2Hi), th);
  r = at::vec::fmadd(q, V(-kPiO2Mid), r);
  r = at::vec::fmadd(q, V(-kPiO2Lo), r);
  const V r2 = r * r;
  const V ps = at::vec::fmadd(r * r2, at::vec::fmadd(at::vec::fmadd(V(kS3), r2, V(kS2)), r2, V(kS1)), r);
  const V pc = at::vec::fmadd(r2 * r2, at::vec::fmadd(at::vec::fmadd(V(kC3), r2, V(kC2)), r2, V(kC1)),
                              at::vec::fmadd(r2, V(-0.5f), V(1.0f)));
  // q in {0, .., 4}: q mod 4 as a float, then which of sin/cos and which sign each quadrant takes
  const V m = q - V(4.0f) * (q * V(0.25f)).floor();
  const V swap = (m == V(1.0f)) | (m == V(3.0f));
  const V sin_neg = m >= V(2.0f), cos_neg = (m == V(1.0f)) | (m == V(2.0f));
  const V sv = V::blendv(ps, pc, swap), cv = V::blendv(pc, ps, swap);
  s = V::blendv(sv, V(0.0f) - sv, sin_neg);
  c = V::blendv(cv, V(0.0f) - cv, cos_neg);
}

// Normals of counters first .. first + 7 in stream order (4 per counter) into out[0 .. 32).
inline void normals_batch(uint64_t seed, uint64_t first, float* out) {
  using V = Vec<float>;
  alignas(32) uint32_t w[4][kCountersPerBatch];
  philox_batch(seed, first, w);
  V lanes[4];  // lanes[l][j]: lane l of counter first + j
  for (int pair = 0; pair < 2; ++pair) {
    const V u1 = at::vec::maximum(uniforms(w[2 * pair]), V(kMinUniform));
    const V r = (V(-2.0f) * u1.log()).sqrt();
    V s, c;
    sincos_angle(V(kTwoPi) * uniforms(w[2 * pair + 1]), s, c);
    lanes[2 * pair] = r * c;
    lanes[2 * pair + 1] = r * s;
  }
#if defined(CPU_CAPABILITY_AVX2)
  // 4 x 8 transpose: counter j's four lanes become out[4 j .. 4 j + 3]
  const __m256 t0 = _mm256_unpacklo_ps(lanes[0], lanes[1]), t1 = _mm256_unpackhi_ps(lanes[0], lanes[1]);
  const __m256 t2 = _mm256_unpacklo_ps(lanes[2], lanes[3]), t3 = _mm256_unpackhi_ps(lanes[2], lanes[3]);
  const __m256 u0 = _mm256_shuffle_ps(t0, t2, 0x44), u1 = _mm256_shuffle_ps(t0, t2, 0xEE);
  const __m256 u2 = _mm256_shuffle_ps(t1, t3, 0x44), u3 = _mm256_shuffle_ps(t1, t3, 0xEE);
  _mm256_storeu_ps(out, _mm256_permute2f128_ps(u0, u1, 0x20));
  _mm256_storeu_ps(out + 8, _mm256_permute2f128_ps(u2, u3, 0x20));
  _mm256_storeu_ps(out + 16, _mm256_permute2f128_ps(u0, u1, 0x31));
  _mm256_storeu_ps(out + 24, _mm256_permute2f128_ps(u2, u3, 0x31));
#else
  alignas(32) float l[4][kCountersPerBatch];
  for (int i = 0; i < 4; ++i) lanes[i].store(l[i]);
  for (int j = 0; j < kCountersPerBatch; ++j)
    for (int i = 0; i < 4; ++i) out[4 * j + i] = l[i][j];
#endif
}

// Space `normals` needs for n values: whole batches plus the offset into the first counter.
constexpr int64_t normals_capacity(int64_t n) {
  return (n + 3 + 4 * kCountersPerBatch - 1) / (4 * kCountersPerBatch) * (4 * kCountersPerBatch);
}

// Stream values offset .. offset + n - 1 of `seed`; returns where they start in `buf`
// (normals_capacity(n) floats).
inline const float* normals(uint64_t seed, uint64_t offset, int64_t n, float* buf) {
  const uint64_t first = offset / 4;
  const int64_t counters = static_cast<int64_t>((offset + n + 3) / 4 - first);
  for (int64_t c = 0; c < counters; c += kCountersPerBatch) normals_batch(seed, first + c, buf + 4 * c);
  return buf + offset % 4;
}

}  // namespace FASTVAE_ISA
}  // namespace fastvae::cpu

#ifndef FASTVAE_KERNELS_ONLY
#include <ATen/Version.h>

namespace fastvae::cpu {
// -1: ATen's CPU capability decides; 0 / 1 force the baseline / AVX2 copy (tests: fastvae._C._force_isa).
inline std::atomic<int> isa_override{-1};

// Whether to run the AVX2 copy of the kernels on this CPU.
inline bool use_avx2() {
#if FASTVAE_HAVE_AVX2_COPY
  static const bool capable = at::get_cpu_capability().rfind("AVX", 0) == 0;  // "AVX2" or "AVX512"
  const int forced = isa_override.load(std::memory_order_relaxed);
  return forced < 0 ? capable : (forced == 1 && capable);
#else
  return false;
#endif
}
}  // namespace fastvae::cpu

// Run kernel `fn` (defined in both ISA namespaces) on its arguments, in the copy this CPU supports.
#if FASTVAE_HAVE_AVX2_COPY
#define FASTVAE_CPU_RUN(fn, ...) \
  (::fastvae::cpu::use_avx2() ? ::fastvae::cpu::avx2::fn(__VA_ARGS__) : ::fastvae::cpu::base::fn(__VA_ARGS__))
#else
#define FASTVAE_CPU_RUN(fn, ...) ::fastvae::cpu::base::fn(__VA_ARGS__)
#endif
#endif

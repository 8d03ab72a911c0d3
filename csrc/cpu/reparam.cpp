// Fused reparameterisation + KL on the CPU: z = mu + exp(0.5 logvar) * eps for k samples with eps
// drawn from Philox per tile (vectorised: 8 counters per AVX2 call, one sincos per Box-Muller
// pair; never stored), the per-row KL and the value checks of mu and logvar, in one pass.
//
// Backward uses z - mu = eps * std (z is saved anyway) instead of drawing eps again, by measurement:
// the draw alone costs about 1.9 ns per element here (AVX2, one thread), more than this whole
// backward (about 1.6 ns per element at B=65536, L=20), and z - mu is exact to float rounding for
// float32/float64 (this kernel's dtypes). The GPU kernels draw eps again (exact under bf16, no z read).
#include "args.h"
#include "common.h"

namespace fastvae::cpu {

namespace FASTVAE_ISA {

constexpr int64_t kTile = 1024;    // elements per tile: the eps, std and KL-term buffers stay in L1
constexpr int64_t kGrain = 16384;  // elements per parallel task: smaller calls run on one thread

template <typename T>
T row_sum(const T* p, int64_t n) {
  constexpr int64_t W = Vec<T>::size();
  Vec<T> acc(0);
  for (int64_t j = 0; j < n; j += W) acc = acc + load(p + j, std::min(W, n - j));
  return sum_lanes(acc);
}

template <typename T>
void reparam_forward(const ReparamForwardArgs<T>& a) {
  constexpr int64_t W = Vec<T>::size();
  const int64_t L = a.dim, BL = a.rows * L, tile_rows = std::max<int64_t>(1, kTile / std::max<int64_t>(L, 1));
  at::parallel_for(0, a.rows, std::max<int64_t>(1, kGrain / std::max<int64_t>(L, 1)), [&](int64_t b0, int64_t b1) {
    const int64_t cap = tile_rows * L;
    std::vector<float> buf(normals_capacity(cap));
    std::vector<T> stdev(a.k > 1 ? cap : 0), terms(a.kl != nullptr ? cap : 0), eps64(std::is_same_v<T, float> ? 0 : cap);
    LatentCheck<T> check;
    for (int64_t r0 = b0; r0 < b1; r0 += tile_rows) {
      const int64_t r1 = std::min(b1, r0 + tile_rows), n = (r1 - r0) * L, base = r0 * L;
      const T* mu = a.mu + base;
      const T* lv = a.logvar + base;
      for (int64_t s = 0; s < a.k; ++s) {
        const float* e32 = normals(a.seed, static_cast<uint64_t>(s * BL + base), n, buf.data());
        const T* eps;
        if constexpr (std::is_same_v<T, float>) {
          eps = e32;
        } else {
          at::vec::convert(e32, eps64.data(), n);
          eps = eps64.data();
        }
        T* z = a.z + s * BL + base;
        if (s > 0) {
          for (int64_t j = 0; j < n; j += W) {
            const int64_t c = std::min(W, n - j);
            store(at::vec::fmadd(load(eps + j, c), load(stdev.data() + j, c), load(mu + j, c)), z + j, c);
          }
          continue;
        }
        for (int64_t j = 0; j < n; j += W) {
          const int64_t c = std::min(W, n - j);
          const Vec<T> m = load(mu + j, c), v = load(lv + j, c), sd = (v * Vec<T>(0.5)).exp();
          store(at::vec::fmadd(load(eps + j, c), sd, m), z + j, c);
          if (a.k > 1) store(sd, stdev.data() + j, c);
          // exp(lv) as std^2: one exp per element (equal to float rounding, and inf where exp(lv) is)
          if (a.kl != nullptr) store(Vec<T>(1) + v - m * m - sd * sd, terms.data() + j, c);
          if (a.flags != nullptr) check.add(m, v);
        }
        if (a.kl != nullptr) {
          for (int64_t r = r0; r < r1; ++r) a.kl[r] = T(-0.5) * row_sum(terms.data() + (r - r0) * L, L);
        }
      }
    }
    if (a.flags != nullptr) a.flags->add(check.bits());
  });
}

// grad_mu = sum_s grad_z + grad_kl mu; grad_logvar = 0.5 sum_s grad_z (z - mu) + grad_kl 0.5 (exp(lv) - 1).
template <typename T>
void reparam_backward(const ReparamBackwardArgs<T>& a) {
  constexpr int64_t W = Vec<T>::size();
  const int64_t L = a.dim, BL = a.rows * L, tile_rows = std::max<int64_t>(1, kTile / std::max<int64_t>(L, 1));
  at::parallel_for(0, a.rows, std::max<int64_t>(1, kGrain / std::max<int64_t>(L, 1)), [&](int64_t b0, int64_t b1) {
    std::vector<T> gk(a.grad_kl != nullptr ? tile_rows * L : 0);  // grad_kl per element of the tile
    for (int64_t r0 = b0; r0 < b1; r0 += tile_rows) {
      const int64_t r1 = std::min(b1, r0 + tile_rows), n = (r1 - r0) * L, base = r0 * L;
      if (a.grad_kl != nullptr) {
        for (int64_t r = r0; r < r1; ++r) std::fill_n(gk.data() + (r - r0) * L, L, a.grad_kl[r]);
      }
      for (int64_t j = 0; j < n; j += W) {
        const int64_t c = std::min(W, n - j), i = base + j;
        const Vec<T> m = load(a.mu + i, c);
        Vec<T> gm(0), gl(0);
        for (int64_t s = 0; s < a.k; ++s) {
          const Vec<T> g = load(a.grad_z + s * BL + i, c);
          gm = gm + g;
          gl = at::vec::fmadd(g, load(a.z + s * BL + i, c) - m, gl);
        }
        if (a.grad_kl != nullptr) {
          const Vec<T> g = load(gk.data() + j, c);
          gm = at::vec::fmadd(g, m, gm);
          gl = at::vec::fmadd(g, load(a.logvar + i, c).exp() - Vec<T>(1), gl);
        }
        store(gm, a.grad_mu + i, c);
        store(gl * Vec<T>(0.5), a.grad_logvar + i, c);
      }
    }
  });
}

// Test hook: the Philox words of `counters` counters from `first`, as this copy computes them.
void philox_words(uint64_t seed, uint64_t first, int64_t counters, int64_t* out) {
  for (int64_t c = 0; c < counters; c += kCountersPerBatch) {
    alignas(32) uint32_t w[4][kCountersPerBatch];
    philox_batch(seed, first + c, w);
    for (int64_t j = 0; j < std::min(kCountersPerBatch, counters - c); ++j)
      for (int i = 0; i < 4; ++i) out[4 * (c + j) + i] = w[i][j];
  }
}

template void reparam_forward<float>(const ReparamForwardArgs<float>&);
template void reparam_forward<double>(const ReparamForwardArgs<double>&);
template void reparam_backward<float>(const ReparamBackwardArgs<float>&);
template void reparam_backward<double>(const ReparamBackwardArgs<double>&);

}  // namespace FASTVAE_ISA
}  // namespace fastvae::cpu

#ifndef FASTVAE_KERNELS_ONLY
#include "../ops.h"

namespace fastvae::cpu {
#if FASTVAE_HAVE_AVX2_COPY
namespace avx2 {  // the kernels' AVX2 copies are declared in args.h
void philox_words(uint64_t seed, uint64_t first, int64_t counters, int64_t* out);
}  // namespace avx2
#endif

std::tuple<at::Tensor, at::Tensor> reparam_forward(const at::Tensor& mu, const at::Tensor& logvar, const OptTensor& seed_t,
                                                   int64_t seed, int64_t k, bool need_kl, const OptTensor& flags) {
  check_latents(mu, logvar, at::kCPU);
  TORCH_CHECK(k >= 1, "fastvae::reparam_forward: k must be >= 1, got ", k);
  const uint64_t stream = host_seed(seed_t, seed);
  int32_t* word = flag_word(flags, mu.device());
  auto z = new_output({k, mu.size(0), mu.size(1)}, mu.options());
  auto kl = new_output({need_kl ? mu.size(0) : 0}, mu.options());
  FlagSink sink;
  AT_DISPATCH_FLOATING_TYPES(mu.scalar_type(), "fastvae_reparam_forward_cpu", [&] {
    const ReparamForwardArgs<scalar_t> args{mu.data_ptr<scalar_t>(), logvar.data_ptr<scalar_t>(), z.data_ptr<scalar_t>(),
                                            need_kl ? kl.data_ptr<scalar_t>() : nullptr, mu.size(0), mu.size(1), k, stream,
                                            word != nullptr ? &sink : nullptr};
    FASTVAE_CPU_RUN(reparam_forward, args);
  });
  sink.commit(word);
  return {z, kl};
}

std::tuple<at::Tensor, at::Tensor> reparam_backward(const at::Tensor& grad_z, const OptTensor& grad_kl, const at::Tensor& mu,
                                                    const at::Tensor& logvar, const at::Tensor& z, const OptTensor& seed_t,
                                                    int64_t seed, int64_t k) {
  check_latents(mu, logvar, at::kCPU);
  seed_pointer(seed_t, seed, mu.device());  // validated only: this backward reads z, not the stream
  const at::Tensor gk = check_reparam_backward(grad_z, grad_kl, mu, z, k);
  auto grad_mu = new_output(mu.sizes(), mu.options()), grad_logvar = new_output(mu.sizes(), mu.options());
  AT_DISPATCH_FLOATING_TYPES(mu.scalar_type(), "fastvae_reparam_backward_cpu", [&] {
    const ReparamBackwardArgs<scalar_t> args{grad_z.data_ptr<scalar_t>(), gk.defined() ? gk.data_ptr<scalar_t>() : nullptr,
                                             mu.data_ptr<scalar_t>(), logvar.data_ptr<scalar_t>(), z.data_ptr<scalar_t>(),
                                             grad_mu.data_ptr<scalar_t>(), grad_logvar.data_ptr<scalar_t>(),
                                             mu.size(0), mu.size(1), k};
    FASTVAE_CPU_RUN(reparam_backward, args);
  });
  return {grad_mu, grad_logvar};
}

at::Tensor philox_words(int64_t seed, int64_t first, int64_t counters) {
  TORCH_CHECK(seed >= 0 && first >= 0 && counters >= 0, "fastvae: philox_words needs non-negative arguments");
  auto out = at::empty({counters, 4}, at::kLong);
  FASTVAE_CPU_RUN(philox_words, static_cast<uint64_t>(seed), static_cast<uint64_t>(first), counters, out.data_ptr<int64_t>());
  return out;
}

at::Tensor philox_normals(int64_t seed, int64_t first, int64_t n) {
  TORCH_CHECK(seed >= 0 && first >= 0 && n >= 0, "fastvae: philox_normals needs non-negative arguments");
  auto out = at::empty({n}, at::kFloat);
  float* p = out.data_ptr<float>();
  for (int64_t i = 0; i < n; i += 4) {
    float eps[4];
    philox_normals_at(static_cast<uint64_t>(seed), static_cast<uint64_t>(first + i), eps);
    for (int64_t e = 0; e < std::min<int64_t>(4, n - i); ++e) p[i + e] = eps[e];
  }
  return out;
}

void force_isa(int which) {
  TORCH_CHECK(which >= -1 && which <= 1, "fastvae: force_isa takes -1, 0 or 1, got ", which);
  isa_override.store(which);
}

}  // namespace fastvae::cpu
#endif

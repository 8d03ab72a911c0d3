// Fused reparameterisation + KL on the GPU.
//
// Forward: each block takes a chunk of whole rows. Its threads draw one Philox call per 4
// consecutive elements of the stream (z is written with 16-byte stores, mu/logvar read with
// 16-byte loads when the row-major layout keeps them aligned), then one warp per row reduces the
// KL (fp32 accumulation; fp64 for double) and checks mu and logvar on the values it loads; at most
// one atomicOr per block reports them. Index arithmetic is additions: no 64-bit % or / per element.
//
// Backward: elementwise over (batch, latent) in groups of 4, summing the k samples; eps is drawn
// again from (seed, index) (exact under reduced-precision z; z is not read). The row of each element
// (for grad_kl) advances incrementally: no division per element.
//
// The seed is read from device memory when `seed_ptr` is given (CUDA-graph replays draw fresh eps).
#include "../philox.h"
#include "common.cuh"

namespace fastvae::cuda {
namespace {

__device__ __forceinline__ uint64_t read_seed(const int64_t* seed_ptr, uint64_t seed) {
  return seed_ptr != nullptr ? static_cast<uint64_t>(__ldg(seed_ptr)) : seed;
}

template <typename T>
__global__ void reparam_forward_kernel(
    const T* __restrict__ mu, const T* __restrict__ logvar, T* __restrict__ z, T* __restrict__ kl, int64_t rows,
    int64_t dim, int64_t k, int64_t chunk_rows, const int64_t* __restrict__ seed_ptr, uint64_t seed_value,
    int32_t* __restrict__ flags, bool vec) {
  using A = Acc<T>;
  const uint64_t seed = read_seed(seed_ptr, seed_value);
  const int64_t per_sample = rows * dim;
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  int bits = 0;
  for (int64_t r0 = int64_t(blockIdx.x) * chunk_rows; r0 < rows; r0 += int64_t(gridDim.x) * chunk_rows) {
    const int64_t r1 = min(rows, r0 + chunk_rows), lo = r0 * dim, hi = r1 * dim;
    for (int64_t s = 0, off = 0; s < k; ++s, off += per_sample) {
      // counters covering stream indices off + lo .. off + hi - 1; `vec` means per_sample % 4 == 0,
      // so a counter's four elements share one row-major offset j0 that is a multiple of 4
      for (int64_t c = (off + lo) / 4 + threadIdx.x; 4 * c < off + hi; c += blockDim.x) {
        float eps[4];
        philox_normal4(seed, static_cast<uint64_t>(c), eps);
        const int64_t i0 = 4 * c, j0 = i0 - off;
        if (vec && j0 >= lo && j0 + 3 < hi) {
          const Pack4<T> m = load4(mu + j0), v = load4(logvar + j0);
          Pack4<T> out;
#pragma unroll
          for (int e = 0; e < 4; ++e) out.v[e] = T(A(m.v[e]) + A(eps[e]) * exp(A(0.5) * A(v.v[e])));
          store4(z + i0, out);
        } else {
#pragma unroll
          for (int e = 0; e < 4; ++e) {
            const int64_t j = j0 + e;
            if (j >= lo && j < hi) z[i0 + e] = T(A(mu[j]) + A(eps[e]) * exp(A(0.5) * A(logvar[j])));
          }
        }
      }
    }
    if (kl == nullptr && flags == nullptr) continue;
    for (int64_t r = r0 + warp; r < r1; r += kWarps) {  // one warp per row, coalesced
      A acc = 0;
      for (int64_t j = r * dim + lane, end = (r + 1) * dim; j < end; j += 32) {
        const A m = mu[j], v = logvar[j];
        bits |= latent_bits(m, v);
        acc += A(1) + v - m * m - exp(v);
      }
      acc = warp_sum(acc);
      if (lane == 0 && kl != nullptr) kl[r] = T(A(-0.5) * acc);
    }
  }
  commit_flags(bits, flags);
}

// grad_mu = sum_s grad_z + grad_kl mu; grad_logvar = 0.5 sum_s grad_z eps_s std + grad_kl 0.5 (exp(lv) - 1).
template <typename T>
__global__ void reparam_backward_kernel(
    const T* __restrict__ grad_z, const T* __restrict__ grad_kl, const T* __restrict__ mu, const T* __restrict__ logvar,
    T* __restrict__ grad_mu, T* __restrict__ grad_logvar, int64_t rows, int64_t dim, int64_t k,
    const int64_t* __restrict__ seed_ptr, uint64_t seed_value, bool vec) {
  using A = Acc<T>;
  const uint64_t seed = read_seed(seed_ptr, seed_value);
  const int64_t n = rows * dim, groups = (n + 3) / 4, stride = int64_t(gridDim.x) * blockDim.x;
  int64_t g = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  // (row, col) of element 4 g and how far one grid stride moves it: two divisions per thread
  int64_t row = 0, col = 0, step_rows = 0, step_cols = 0;
  if (grad_kl != nullptr) {
    row = 4 * g / dim;
    col = 4 * g - row * dim;
    step_rows = 4 * stride / dim;
    step_cols = 4 * stride - step_rows * dim;
  }
  for (; g < groups; g += stride) {
    const int64_t j0 = 4 * g;
    const bool full = vec && j0 + 3 < n;  // vec: n % 4 == 0 and 16-byte aligned pointers
    A m[4], v[4], sd[4], gm[4] = {0, 0, 0, 0}, gl[4] = {0, 0, 0, 0};
    if (full) {
      const Pack4<T> pm = load4(mu + j0), pv = load4(logvar + j0);
#pragma unroll
      for (int e = 0; e < 4; ++e) m[e] = pm.v[e], v[e] = pv.v[e];
    } else {
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const bool in = j0 + e < n;
        m[e] = in ? A(mu[j0 + e]) : A(0);
        v[e] = in ? A(logvar[j0 + e]) : A(0);
      }
    }
#pragma unroll
    for (int e = 0; e < 4; ++e) sd[e] = exp(A(0.5) * v[e]);
    for (int64_t s = 0; s < k; ++s) {
      const int64_t i0 = s * n + j0;
      float eps[4];
      philox_normals_at(seed, static_cast<uint64_t>(i0), eps);
      A gz[4];
      if (full) {
        const Pack4<T> p = load4(grad_z + i0);
#pragma unroll
        for (int e = 0; e < 4; ++e) gz[e] = p.v[e];
      } else {
#pragma unroll
        for (int e = 0; e < 4; ++e) gz[e] = j0 + e < n ? A(grad_z[i0 + e]) : A(0);
      }
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        gm[e] += gz[e];
        gl[e] += gz[e] * A(eps[e]) * sd[e];
      }
    }
    if (grad_kl != nullptr) {
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        int64_t r = row, c = col + e;
        while (c >= dim) c -= dim, ++r;
        const A gk = j0 + e < n ? A(grad_kl[r]) : A(0);
        gm[e] += gk * m[e];
        gl[e] += gk * (sd[e] * sd[e] - A(1));
      }
      col += step_cols;
      row += step_rows;
      if (col >= dim) col -= dim, ++row;
    }
    if (full) {
      Pack4<T> pm, pl;
#pragma unroll
      for (int e = 0; e < 4; ++e) pm.v[e] = T(gm[e]), pl.v[e] = T(A(0.5) * gl[e]);
      store4(grad_mu + j0, pm);
      store4(grad_logvar + j0, pl);
    } else {
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        if (j0 + e < n) grad_mu[j0 + e] = T(gm[e]), grad_logvar[j0 + e] = T(A(0.5) * gl[e]);
      }
    }
  }
}

}  // namespace

template <typename T>
cudaError_t launch_reparam_forward(const T* mu, const T* logvar, T* z, T* kl, int64_t rows, int64_t dim, int64_t k,
                                   const int64_t* seed_ptr, uint64_t seed, int32_t* flags, cudaStream_t stream) {
  // about 16 elements per thread per sample and chunk; at least one row per warp for the KL
  const int64_t chunk_rows = std::max<int64_t>(kWarps, 16 * kThreads / dim);
  const int64_t chunks = (rows + chunk_rows - 1) / chunk_rows;
  const bool vec = (rows * dim) % 4 == 0 && aligned16(mu) && aligned16(logvar) && aligned16(z);
  const unsigned int blocks = static_cast<unsigned int>(std::min<int64_t>(std::max<int64_t>(chunks, 1), int64_t(1) << 20));
  reparam_forward_kernel<T><<<blocks, kThreads, 0, stream>>>(mu, logvar, z, kl, rows, dim, k, chunk_rows, seed_ptr, seed,
                                                             flags, vec);
  return cudaGetLastError();
}

template <typename T>
cudaError_t launch_reparam_backward(const T* grad_z, const T* grad_kl, const T* mu, const T* logvar, T* grad_mu,
                                    T* grad_logvar, int64_t rows, int64_t dim, int64_t k, const int64_t* seed_ptr,
                                    uint64_t seed, cudaStream_t stream) {
  const bool vec = (rows * dim) % 4 == 0 && aligned16(grad_z) && aligned16(mu) && aligned16(logvar) && aligned16(grad_mu) &&
                   aligned16(grad_logvar);
  reparam_backward_kernel<T><<<grid_for((rows * dim + 3) / 4, int64_t(1) << 20), kThreads, 0, stream>>>(
      grad_z, grad_kl, mu, logvar, grad_mu, grad_logvar, rows, dim, k, seed_ptr, seed, vec);
  return cudaGetLastError();
}

#define FASTVAE_INSTANTIATE(T)                                                                                   \
  template cudaError_t launch_reparam_forward<T>(const T*, const T*, T*, T*, int64_t, int64_t, int64_t,         \
                                                 const int64_t*, uint64_t, int32_t*, cudaStream_t);             \
  template cudaError_t launch_reparam_backward<T>(const T*, const T*, const T*, const T*, T*, T*, int64_t,      \
                                                  int64_t, int64_t, const int64_t*, uint64_t, cudaStream_t);
FASTVAE_INSTANTIATE(float)
FASTVAE_INSTANTIATE(double)
#undef FASTVAE_INSTANTIATE

}  // namespace fastvae::cuda

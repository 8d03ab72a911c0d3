// Fused reconstruction + KL on the GPU: one warp per row reduces the row's loss terms, writes
// grad_logits (scale (sigmoid(l) - x), or 2 scale (l - x)) and the KL gradients (scale beta mu,
// scale beta 0.5 (exp(lv) - 1)) in the same pass and checks the values it loads (flags.h; at most
// one atomicOr per block). Loads and stores are 16 bytes wide when rows keep them aligned: 4
// logits/targets per lane, or 16 uint8 targets with 4 x 4 logits. fp32 accumulation (fp64 for
// double). Same formulas as csrc/cpu/loss.cpp (torch's BCE-with-logits form, so NaN/Inf behave as
// in torch). beta may be read from device memory (`beta_ptr`, a KL warm-up inside a CUDA graph).
//
// scale_grads: multiplies the gradients by the upstream gradient read on the device; a 0-dim 1
// returns at once (no host sync, CUDA-graph safe), so sum/mean losses cost no extra pass.
#include <algorithm>

#include "common.cuh"

namespace fastvae::cuda {
namespace {

// uint8 target / 255 as the reference's x.to(dtype) / 255. float: the reciprocal and one FMA
// correction, equal to the correctly rounded quotient for all 256 values (tests/test_cpp_ops.py).
template <typename A>
__device__ __forceinline__ A byte_target(unsigned int b) {
  if constexpr (sizeof(A) == 4) {
    constexpr float r = 1.0f / 255.0f;
    const float f = static_cast<float>(b), q = f * r;
    return fmaf(fmaf(-q, 255.0f, f), r, q);
  } else {
    return static_cast<double>(b) / 255.0;
  }
}

template <bool kGaussian, bool kFloatX, typename A>
struct Term {
  A scale;
  A acc = 0;
  int bits = 0;
  // one element: adds its loss term, returns its gradient, records bad values
  __device__ __forceinline__ A operator()(A l, A t) {
    if (!isfinite(l)) bits |= FLAG_LOGITS_NONFINITE;
    if constexpr (kFloatX) {
      if (!isfinite(t)) bits |= FLAG_X_NONFINITE;
      if (!kGaussian && (t < A(0) || t > A(1))) bits |= FLAG_X_RANGE;
    }
    if constexpr (kGaussian) {
      const A d = l - t;
      acc += d * d;
      return A(2) * scale * d;
    } else {
      const A e = exp(-fabs(l));
      acc += (A(1) - t) * l - (l < A(0) ? l : A(0)) + log1p(e);
      return scale * (sigmoid_from(l, e) - t);
    }
  }
};

template <typename T, typename X, bool kGaussian>
__global__ void loss_forward_kernel(
    const T* __restrict__ logits, const X* __restrict__ x, const T* __restrict__ mu, const T* __restrict__ logvar,
    T* __restrict__ recon, T* __restrict__ kl, T* __restrict__ grad_logits, T* __restrict__ grad_mu,
    T* __restrict__ grad_logvar, int64_t rows, int64_t dim, int64_t latent, const double* __restrict__ beta_ptr,
    double beta_value, double scale, int32_t* __restrict__ flags, bool vec) {
  using A = Acc<T>;
  constexpr bool kFloatX = sizeof(X) == sizeof(T);
  constexpr int U = kFloatX ? 4 : 16;  // elements per lane per step on the vector path
  const A beta = A(beta_ptr != nullptr ? __ldg(beta_ptr) : beta_value), kl_scale = A(scale) * beta;
  const int lane = threadIdx.x & 31;
  int bits = 0;
  for (int64_t r = int64_t(blockIdx.x) * kWarps + (threadIdx.x >> 5); r < rows; r += int64_t(gridDim.x) * kWarps) {
    const T* l_row = logits + r * dim;
    const X* x_row = x + r * dim;
    T* g_row = grad_logits != nullptr ? grad_logits + r * dim : nullptr;
    Term<kGaussian, kFloatX, A> term{A(scale)};
    if (vec) {  // dim % U == 0 and 16-byte aligned rows
      for (int64_t c = int64_t(lane) * U; c < dim; c += 32 * U) {
        A t[U];
        if constexpr (kFloatX) {
          const Pack4<T> p = load4(x_row + c);
#pragma unroll
          for (int e = 0; e < 4; ++e) t[e] = p.v[e];
        } else {
          const uint4 q = __ldg(reinterpret_cast<const uint4*>(x_row + c));
          const unsigned int w[4] = {q.x, q.y, q.z, q.w};
#pragma unroll
          for (int e = 0; e < 16; ++e) t[e] = byte_target<A>((w[e / 4] >> (8 * (e % 4))) & 0xFFu);
        }
#pragma unroll
        for (int q = 0; q < U / 4; ++q) {
          const Pack4<T> l = load4(l_row + c + 4 * q);
          Pack4<T> g;
#pragma unroll
          for (int e = 0; e < 4; ++e) g.v[e] = T(term(A(l.v[e]), t[4 * q + e]));
          if (g_row != nullptr) store4(g_row + c + 4 * q, g);
        }
      }
    } else {
      for (int64_t c = lane; c < dim; c += 32) {
        const A t = kFloatX ? A(x_row[c]) : byte_target<A>(static_cast<unsigned int>(x_row[c]));
        const A g = term(A(l_row[c]), t);
        if (g_row != nullptr) g_row[c] = T(g);
      }
    }
    A kl_acc = 0;
    for (int64_t c = r * latent + lane, end = (r + 1) * latent; c < end; c += 32) {
      const A m = mu[c], v = logvar[c], e = exp(v);
      bits |= latent_bits(m, v);
      kl_acc += A(1) + v - m * m - e;
      if (grad_mu != nullptr) {
        grad_mu[c] = T(kl_scale * m);
        grad_logvar[c] = T(A(0.5) * kl_scale * (e - A(1)));
      }
    }
    bits |= term.bits;
    const A acc = warp_sum(term.acc);
    kl_acc = warp_sum(kl_acc);
    if (lane == 0) {
      recon[r] = T(acc);
      kl[r] = T(A(-0.5) * kl_acc);
    }
  }
  commit_flags(bits, flags);
}

template <typename T, typename G>
__global__ void scale_grads_kernel(const G* __restrict__ grad_out, bool per_row,
                                                                ScaledTensors<T> tensors) {
  const G one_factor = per_row ? G(1) : __ldg(grad_out);
  if (!per_row && one_factor == G(1)) return;  // the common case: loss.sum().backward()
  const int64_t stride = int64_t(gridDim.x) * blockDim.x, tid = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
#pragma unroll  // constant indices into the parameter struct: no copy to local memory
  for (int t = 0; t < kMaxScaled; ++t) {
    if (t >= tensors.count) break;
    T* data = tensors.data[t];
    const int64_t n = tensors.numel[t];
    if (!per_row) {
      const T f = T(one_factor);
      const bool vec = (reinterpret_cast<uintptr_t>(data) & 15u) == 0;
      const int64_t quads = vec ? n / 4 : 0;
      for (int64_t i = tid; i < quads; i += stride) {
        Pack4<T> p = load4(data + 4 * i);
#pragma unroll
        for (int e = 0; e < 4; ++e) p.v[e] *= f;
        store4(data + 4 * i, p);
      }
      for (int64_t i = 4 * quads + tid; i < n; i += stride) data[i] *= f;
    } else {  // reduction="none": one factor per row (32-bit division where the tensor allows it)
      const int64_t len = tensors.row_len[t];
      for (int64_t i = tid; i < n; i += stride) {
        const int64_t row = n < (int64_t(1) << 31) ? int64_t(uint32_t(i) / uint32_t(len)) : i / len;
        data[i] = T(data[i] * __ldg(grad_out + row));
      }
    }
  }
}

}  // namespace

template <typename T, typename X>
cudaError_t launch_loss_forward(const T* logits, const X* x, const T* mu, const T* logvar, T* recon, T* kl,
                                T* grad_logits, T* grad_mu, T* grad_logvar, int64_t rows, int64_t dim, int64_t latent,
                                const double* beta_ptr, double beta, double scale, bool gaussian, int32_t* flags,
                                cudaStream_t stream) {
  constexpr int64_t unit = sizeof(X) == sizeof(T) ? 4 : 16;
  const bool vec = dim % unit == 0 && aligned16(logits) && aligned16(x) && aligned16(grad_logits);
  const unsigned int blocks = grid_for(rows * 32, int64_t(1) << 20);  // a warp per row
  auto launch = [&](auto kernel) {
    kernel<<<blocks, kThreads, 0, stream>>>(logits, x, mu, logvar, recon, kl, grad_logits, grad_mu,
                                                         grad_logvar, rows, dim, latent, beta_ptr, beta, scale, flags, vec);
  };
  if (gaussian) launch(loss_forward_kernel<T, X, true>); else launch(loss_forward_kernel<T, X, false>);
  return cudaGetLastError();
}

template <typename T, typename G>
cudaError_t launch_scale_grads(const G* grad_out, bool per_row, const ScaledTensors<T>& tensors, int max_blocks,
                               cudaStream_t stream) {
  int64_t most = 0;
  for (int t = 0; t < tensors.count; ++t) most = std::max(most, tensors.numel[t]);
  const unsigned int blocks = grid_for((most + 3) / 4, std::max(max_blocks, 1));
  scale_grads_kernel<T, G><<<blocks, kThreads, 0, stream>>>(grad_out, per_row, tensors);
  return cudaGetLastError();
}

#define FASTVAE_INSTANTIATE(T, X)                                                                                   \
  template cudaError_t launch_loss_forward<T, X>(const T*, const X*, const T*, const T*, T*, T*, T*, T*, T*, int64_t, \
                                                 int64_t, int64_t, const double*, double, double, bool, int32_t*,    \
                                                 cudaStream_t);
FASTVAE_INSTANTIATE(float, float)
FASTVAE_INSTANTIATE(float, uint8_t)
FASTVAE_INSTANTIATE(double, double)
FASTVAE_INSTANTIATE(double, uint8_t)
#undef FASTVAE_INSTANTIATE

#define FASTVAE_INSTANTIATE(T, G) \
  template cudaError_t launch_scale_grads<T, G>(const G*, bool, const ScaledTensors<T>&, int, cudaStream_t);
FASTVAE_INSTANTIATE(float, float)
FASTVAE_INSTANTIATE(float, double)
FASTVAE_INSTANTIATE(double, float)
FASTVAE_INSTANTIATE(double, double)
#undef FASTVAE_INSTANTIATE

}  // namespace fastvae::cuda

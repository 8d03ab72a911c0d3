// Device helpers shared by the CUDA kernels: warp reductions, the value-check flag commit, 4-wide
// vector loads/stores and the fp32 (fp64 for double) accumulation type.
#pragma once

#include <cuda_runtime.h>

#include <type_traits>

#include "../flags.h"
#include "kernels.h"

namespace fastvae::cuda {

constexpr unsigned kFullMask = 0xffffffffu;

template <typename T>
using Acc = std::conditional_t<sizeof(T) == 8, double, float>;  // the accumulation type

template <typename T>
__device__ __forceinline__ T warp_sum(T v) {
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) v += __shfl_xor_sync(kFullMask, v, off);
  return v;
}

// ORs the block's value-check bits into the flag word: one shared-memory OR per thread that found
// something, then at most one global atomicOr per block, and none when nothing was found.
// Every thread of the block must call it (it has barriers).
__device__ __forceinline__ void commit_flags(int local, int32_t* flags) {
  if (flags == nullptr) return;  // uniform over the grid
  __shared__ int word;
  if (threadIdx.x == 0) word = 0;
  __syncthreads();
  if (local != 0) atomicOr(&word, local);
  __syncthreads();
  if (threadIdx.x == 0 && word != 0) atomicOr(flags, word);
}

// Value checks on values a kernel has already loaded (isfinite is false for NaN and +-Inf).
template <typename A>
__device__ __forceinline__ int latent_bits(A m, A v) {
  int bits = isfinite(m) ? 0 : FLAG_MU_NONFINITE;
  if (!isfinite(v)) bits |= FLAG_LOGVAR_NONFINITE;
  else if (v > A(MAX_LOGVAR)) bits |= FLAG_LOGVAR_HIGH;
  return bits;
}

// sigmoid(l) from e = exp(-|l|), without overflow; NaN stays NaN.
template <typename T>
__device__ __forceinline__ T sigmoid_from(T l, T e) {
  const T inv = T(1) / (T(1) + e);
  return l >= T(0) ? inv : e * inv;
}

// Four consecutive elements (16-byte aligned for float: one float4; double: two double2).
template <typename T>
struct Pack4 {
  T v[4];
};

template <typename T>
__device__ __forceinline__ Pack4<T> load4(const T* p) {
  Pack4<T> out;
  if constexpr (sizeof(T) == 4) {
    const float4 q = __ldg(reinterpret_cast<const float4*>(p));
    out.v[0] = q.x; out.v[1] = q.y; out.v[2] = q.z; out.v[3] = q.w;
  } else {
    const double2 a = __ldg(reinterpret_cast<const double2*>(p)), b = __ldg(reinterpret_cast<const double2*>(p) + 1);
    out.v[0] = a.x; out.v[1] = a.y; out.v[2] = b.x; out.v[3] = b.y;
  }
  return out;
}

template <typename T>
__device__ __forceinline__ void store4(T* p, const Pack4<T>& q) {
  if constexpr (sizeof(T) == 4) {
    *reinterpret_cast<float4*>(p) = make_float4(q.v[0], q.v[1], q.v[2], q.v[3]);
  } else {
    reinterpret_cast<double2*>(p)[0] = make_double2(q.v[0], q.v[1]);
    reinterpret_cast<double2*>(p)[1] = make_double2(q.v[2], q.v[3]);
  }
}

}  // namespace fastvae::cuda

// Matrix products on raw row-major pointers for the CPU ops that chain several (mlp_step.cpp):
// straight to the BLAS torch's own CPU products call (MKL's sgemm/dgemm in the x86
// wheels), with none of a torch call's checks, allocation and dispatch; ATen's product where no
// BLAS symbol is linked.
#pragma once

#include <ATen/ATen.h>

#include <type_traits>

// The Fortran BLAS that torch's own CPU products call (MKL in the x86 wheels); weak, so that a torch
// linking none still loads this extension (the products then go through ATen).
extern "C" {
void sgemm_(const char*, const char*, const int*, const int*, const int*, const float*, const float*, const int*, const float*,
            const int*, const float*, float*, const int*) __attribute__((weak));
void dgemm_(const char*, const char*, const int*, const int*, const int*, const double*, const double*, const int*, const double*,
            const int*, const double*, double*, const int*) __attribute__((weak));
}

namespace fastvae::cpu::blas {

// Row-major C (m x n) = alpha op(A) op(B) + beta C, all contiguous; op(A) (m x k) is A, or A^T when ta
// (A stored k x m); op(B) (k x n) is B, or B^T when tb (B stored n x k). Column-major BLAS computes
// C^T = op(B)^T op(A)^T.
template <typename T>
inline void gemm(bool ta, bool tb, int64_t m, int64_t n, int64_t k, T alpha, const T* a, const T* b, T beta, T* c) {
  const char transa = tb ? 'T' : 'N', transb = ta ? 'T' : 'N';
  const int M = static_cast<int>(n), N = static_cast<int>(m), K = static_cast<int>(k);
  const int lda = static_cast<int>(tb ? k : n), ldb = static_cast<int>(ta ? m : k), ldc = static_cast<int>(n);
  if constexpr (std::is_same_v<T, float>) {
    if (sgemm_ != nullptr) return sgemm_(&transa, &transb, &M, &N, &K, &alpha, b, &lda, a, &ldb, &beta, c, &ldc);
  } else {
    if (dgemm_ != nullptr) return dgemm_(&transa, &transb, &M, &N, &K, &alpha, b, &lda, a, &ldb, &beta, c, &ldc);
  }
  const auto opts = at::TensorOptions().dtype(c10::CppTypeToScalarType<T>::value);
  const at::Tensor A = ta ? at::from_blob(const_cast<T*>(a), {k, m}, opts).t() : at::from_blob(const_cast<T*>(a), {m, k}, opts);
  const at::Tensor B = tb ? at::from_blob(const_cast<T*>(b), {n, k}, opts).t() : at::from_blob(const_cast<T*>(b), {k, n}, opts);
  at::Tensor C = at::from_blob(c, {m, n}, opts);
  at::addmm_out(C, C, A, B, beta, alpha);
}

}  // namespace fastvae::cpu::blas

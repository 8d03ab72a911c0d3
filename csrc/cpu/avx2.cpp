// The CPU kernels compiled a second time with AVX2 + FMA (x86-64 with GCC), in namespace
// fastvae::cpu::avx2; the ops run this copy when the CPU has AVX2 (common.h: use_avx2).
// Listed last in the sources so that the linker keeps the baseline copies of shared inline code.
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#pragma GCC target("avx2,fma")
// The pragma does not define the ISA macros that sleef.h and ATen's headers test: set them (as
// -mavx2 -mfma would) for this translation unit only.
#define __AVX__ 1
#define __AVX2__ 1
#define __FMA__ 1
#define CPU_CAPABILITY AVX2
#define CPU_CAPABILITY_AVX2
#define FASTVAE_ISA avx2
#define FASTVAE_KERNELS_ONLY
#include "reparam.cpp"
#include "loss.cpp"
#include "decode.cpp"
#include "mlp_step.cpp"
#endif

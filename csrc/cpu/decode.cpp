// Decode's elementwise tail on the CPU: sigmoid (from logits) and, for uint8 output, the
// quantisation floor(clamp(p, 0, 1) * 255 + 0.5) computed in float32 like the reference.
#include "common.h"

namespace fastvae::cpu {

template <typename T, typename O>
struct ToImageArgs {
  const T* values; O* out; int64_t n; bool from_logits;  // O is T or uint8_t
};

namespace FASTVAE_ISA {

template <typename T, typename O>
void to_image(const ToImageArgs<T, O>& a) {
  constexpr int64_t kBlock = 1024;
  at::parallel_for(0, (a.n + kBlock - 1) / kBlock, 16, [&](int64_t k0, int64_t k1) {
    alignas(64) T p[kBlock];
    alignas(64) float q[kBlock];
    for (int64_t blk = k0; blk < k1; ++blk) {
      const int64_t start = blk * kBlock, n = std::min(kBlock, a.n - start);
      O* dst = a.out + start;
      T* probs = std::is_same_v<O, T> ? reinterpret_cast<T*>(dst) : p;
      if (a.from_logits) {
        at::vec::map([](Vec<T> v) { return sigmoid_from(v, (Vec<T>(0) - v.abs()).exp()); }, probs, a.values + start, n);
      } else if (probs != a.values + start) {
        std::copy(a.values + start, a.values + start + n, probs);
      }
      if constexpr (std::is_same_v<O, uint8_t>) {
        for (int64_t i = 0; i < n; ++i) q[i] = static_cast<float>(probs[i]);
        using VF = Vec<float>;
        at::vec::map([](VF v) { return (at::vec::clamp(v, VF(0), VF(1)) * VF(255) + VF(0.5f)).floor(); }, q, q, n);
        for (int64_t i = 0; i < n; ++i) dst[i] = static_cast<uint8_t>(q[i]);
      }
    }
  });
}

template void to_image<float, float>(const ToImageArgs<float, float>&);
template void to_image<float, uint8_t>(const ToImageArgs<float, uint8_t>&);
template void to_image<double, double>(const ToImageArgs<double, double>&);
template void to_image<double, uint8_t>(const ToImageArgs<double, uint8_t>&);

}  // namespace FASTVAE_ISA
}  // namespace fastvae::cpu

#ifndef FASTVAE_KERNELS_ONLY
#include "../ops.h"

namespace fastvae::cpu {
#if FASTVAE_HAVE_AVX2_COPY
namespace avx2 {
template <typename T, typename O> void to_image(const ToImageArgs<T, O>&);
}  // namespace avx2
#endif

void to_image(const at::Tensor& values, at::Tensor& out, bool from_logits) {
  at::Tensor target = check_to_image(values, out, at::kCPU);
  AT_DISPATCH_FLOATING_TYPES(values.scalar_type(), "fastvae_to_image_cpu", [&] {
    auto run = [&](auto* dst) {
      using O = std::remove_pointer_t<decltype(dst)>;
      const ToImageArgs<scalar_t, O> args{values.data_ptr<scalar_t>(), dst, values.numel(), from_logits};
      FASTVAE_CPU_RUN(to_image, args);
    };
    if (target.scalar_type() == at::kByte) run(target.data_ptr<uint8_t>()); else run(target.data_ptr<scalar_t>());
  });
  if (!target.is_same(out)) out.copy_(target);
}

}  // namespace fastvae::cpu
#endif

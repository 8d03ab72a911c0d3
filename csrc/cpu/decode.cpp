// Decode's elementwise tail on the CPU: uint8 pixels floor(clamp(p, 0, 1) * 255 + 0.5) of
// p = sigmoid(values) (from logits) or values, computed in float32 like the reference. A float
// output never comes here: decode_latents writes it with torch's sigmoid.
#include "common.h"

namespace fastvae::cpu {

template <typename T>
struct ToImageArgs {
  const T* values; uint8_t* out; int64_t n; bool from_logits;
};

namespace FASTVAE_ISA {

template <typename T>
void to_image(const ToImageArgs<T>& a) {
  constexpr int64_t kBlock = 1024;
  at::parallel_for(0, (a.n + kBlock - 1) / kBlock, 16, [&](int64_t k0, int64_t k1) {
    alignas(64) T p[kBlock];
    alignas(64) float q[kBlock];
    for (int64_t blk = k0; blk < k1; ++blk) {
      const int64_t start = blk * kBlock, n = std::min(kBlock, a.n - start);
      const T* probs = a.values + start;
      if (a.from_logits) {
        at::vec::map([](Vec<T> v) { return sigmoid_from(v, (Vec<T>(0) - v.abs()).exp()); }, p, probs, n);
        probs = p;
      }
      for (int64_t i = 0; i < n; ++i) q[i] = static_cast<float>(probs[i]);
      using VF = Vec<float>;
      at::vec::map([](VF v) { return (at::vec::clamp(v, VF(0), VF(1)) * VF(255) + VF(0.5f)).floor(); }, q, q, n);
      uint8_t* dst = a.out + start;
      for (int64_t i = 0; i < n; ++i) dst[i] = static_cast<uint8_t>(q[i]);
    }
  });
}

template void to_image<float>(const ToImageArgs<float>&);
template void to_image<double>(const ToImageArgs<double>&);

}  // namespace FASTVAE_ISA
}  // namespace fastvae::cpu

#ifndef FASTVAE_KERNELS_ONLY
#include "../ops.h"

namespace fastvae::cpu {
#if FASTVAE_HAVE_AVX2_COPY
namespace avx2 {
template <typename T> void to_image(const ToImageArgs<T>&);
}  // namespace avx2
#endif

void to_image(const at::Tensor& values, at::Tensor& out, bool from_logits) {
  at::Tensor target = check_to_image(values, out, at::kCPU);
  AT_DISPATCH_FLOATING_TYPES(values.scalar_type(), "fastvae_to_image_cpu", [&] {
    const ToImageArgs<scalar_t> args{values.data_ptr<scalar_t>(), target.data_ptr<uint8_t>(), values.numel(), from_logits};
    FASTVAE_CPU_RUN(to_image, args);
  });
  if (!target.is_same(out)) out.copy_(target);
}

}  // namespace fastvae::cpu
#endif

// Decode on the CPU: the elementwise tail (uint8 pixels floor(clamp(p, 0, 1) * 255 + 0.5) of
// p = sigmoid(values) (from logits) or values, computed in float32 like the reference), and the
// whole MLP decoder for a chunk of latents (decode_mlp): the products straight to the BLAS
// (blas.h), each followed by one in-cache pass for the bias and the activation (ReLU, then sigmoid
// into a float output; uint8 pixels through to_image), the prior's latents drawn from the Philox
// stream when none are given.
#include "args.h"
#include "common.h"

namespace fastvae::cpu {

template <typename T>
struct ToImageArgs {
  const T* values; uint8_t* out; int64_t n; bool from_logits;
};

template <typename T>
struct PriorArgs {
  uint64_t seed, offset; T* out; int64_t n;
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

// Prior latents: n values of the Philox stream `seed` from element `offset`, in T.
template <typename T>
void prior(const PriorArgs<T>& a) {
  constexpr int64_t kBlock = 4096;
  at::parallel_for(0, (a.n + kBlock - 1) / kBlock, 1, [&](int64_t b0, int64_t b1) {
    std::vector<float> buf(normals_capacity(kBlock));
    for (int64_t blk = b0; blk < b1; ++blk) {
      const int64_t i = blk * kBlock, n = std::min(kBlock, a.n - i);
      const float* eps = normals(a.seed, a.offset + static_cast<uint64_t>(i), n, buf.data());
      std::copy_n(eps, n, a.out + i);
    }
  });
}

template void prior<float>(const PriorArgs<float>&);
template void prior<double>(const PriorArgs<double>&);
template void to_image<float>(const ToImageArgs<float>&);
template void to_image<double>(const ToImageArgs<double>&);

}  // namespace FASTVAE_ISA
}  // namespace fastvae::cpu

#ifndef FASTVAE_KERNELS_ONLY
#include <torch/library.h>

#include "../ops.h"
#include "blas.h"

namespace fastvae::cpu {
#if FASTVAE_HAVE_AVX2_COPY
namespace avx2 {
template <typename T> void to_image(const ToImageArgs<T>&);
template <typename T> void prior(const PriorArgs<T>&);
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

// Rows start .. start + out.size(0) of the decoded batch: z (rows, latent) or, without z, the prior's
// Philox stream `seed` from element start * latent. out: probabilities (the weights' dtype) or uint8 pixels.
void decode_mlp(at::TensorList weights, at::TensorList biases, const OptTensor& z, const OptTensor& seed_t, int64_t seed,
                int64_t start, at::Tensor& out) {
  const int64_t n = static_cast<int64_t>(weights.size());
  TORCH_CHECK(n >= 1 && static_cast<int64_t>(biases.size()) == n, "fastvae::decode_mlp: one bias per weight, at least one layer");
  const at::ScalarType dtype = weights[0].scalar_type();
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kDouble, "fastvae::decode_mlp: float32 or float64 weights only");
  int64_t width = weights[0].size(1), widest = 1;
  for (int64_t i = 0; i < n; ++i) {
    const at::Tensor &w = weights[i], &b = biases[i];
    TORCH_CHECK(w.device().is_cpu() && w.is_contiguous() && w.dim() == 2 && w.size(1) == width && w.scalar_type() == dtype &&
                    b.is_contiguous() && b.dim() == 1 && b.size(0) == w.size(0) && b.scalar_type() == dtype,
                "fastvae::decode_mlp: layer ", i, " must be a contiguous CPU (out, ", width, ") weight and (out,) bias of ", dtype);
    width = w.size(0);
    if (i < n - 1) widest = std::max(widest, width);
  }
  const int64_t rows = out.size(0), L = weights[0].size(1);
  TORCH_CHECK(out.device().is_cpu() && out.is_contiguous() && out.dim() == 2 && out.size(1) == width &&
                  (out.scalar_type() == at::kByte || out.scalar_type() == dtype),
              "fastvae::decode_mlp: out must be a contiguous (rows, ", width, ") uint8 or ", dtype, " CPU tensor");
  const bool given = z.has_value() && z->defined();
  TORCH_CHECK(!given || (z->device().is_cpu() && z->is_contiguous() && z->sizes() == at::IntArrayRef{rows, L} && z->scalar_type() == dtype),
              "fastvae::decode_mlp: z must be a contiguous (", rows, ", ", L, ") CPU tensor of the weights' dtype");
  const uint64_t stream = given ? 0 : host_seed(seed_t, seed);
  const bool direct = out.scalar_type() == dtype;  // the last product writes the output itself
  at::Tensor work = at::empty({(given ? 0 : rows * L) + 2 * rows * widest + (direct ? 0 : rows * width)}, weights[0].options());
  AT_DISPATCH_FLOATING_TYPES(dtype, "fastvae_decode_mlp_cpu", [&] {
    using T = scalar_t;
    T* w = work.data_ptr<T>();
    const T* in = given ? z->data_ptr<T>() : w;
    if (!given) {
      FASTVAE_CPU_RUN(prior, PriorArgs<T>{stream, static_cast<uint64_t>(start * L), w, rows * L});
      w += rows * L;
    }
    T* hidden[2] = {w, w + rows * widest};
    T* last = direct ? out.data_ptr<T>() : hidden[1] + rows * widest;
    for (int64_t i = 0; i < n; ++i) {
      const int64_t o = weights[i].size(0), k = weights[i].size(1);
      T* dst = i == n - 1 ? last : hidden[i % 2];
      blas::gemm<T>(false, true, rows, o, k, T(1), in, weights[i].data_ptr<T>(), T(0), dst);
      FASTVAE_CPU_RUN(bias_act, BiasActArgs<T>{dst, biases[i].data_ptr<T>(), rows, o,
                                               i == n - 1 ? Activation::kSigmoid : Activation::kRelu});
      in = dst;
    }
    if (!direct) FASTVAE_CPU_RUN(to_image, ToImageArgs<T>{last, out.data_ptr<uint8_t>(), rows * width, false});
  });
}

}  // namespace fastvae::cpu

TORCH_LIBRARY_FRAGMENT(fastvae, m) {
  m.def("decode_mlp(Tensor[] weights, Tensor[] biases, Tensor? z, Tensor? seed_t, int seed, int start, Tensor(a!) out) -> ()");
}

TORCH_LIBRARY_IMPL(fastvae, CPU, m) { m.impl("decode_mlp", &fastvae::cpu::decode_mlp); }
#endif

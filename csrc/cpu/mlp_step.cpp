// The hand-written training step of fastvae.VAE's MLP on the CPU, as one op: forward, fused loss,
// backward, every gradient written into the caller's tensors (views of FlatAdam's flat gradient
// buffer). fastvae/step.py has the same sequence in PyTorch calls (any device, CUDA graphs) and
// describes it; here it costs one call from Python per step instead of forty. The products are
// ATen's (MKL), sampling and the loss are the fused kernels of reparam.cpp and loss.cpp, and
// bias_grad folds a ReLU's backward into its bias gradient (one pass).
#include "common.h"

namespace fastvae::cpu {

template <typename T>
struct BiasGradArgs {
  T* grad; const T* relu_out; T* out;  // relu_out null: no ReLU
  int64_t rows, cols;
};

namespace FASTVAE_ISA {

// grad becomes the pre-activation gradient (0 where relu_out <= 0, torch's threshold_backward: NaN
// activations keep their gradient) and out its column sums. A task owns a range of columns and
// walks every row, kChunk vectors of running sums in registers.
template <typename T>
void bias_grad(const BiasGradArgs<T>& a) {
  constexpr int64_t W = Vec<T>::size(), kChunk = 8;
  const int64_t vectors = (a.cols + W - 1) / W;
  const int64_t grain = std::max<int64_t>(kChunk, 16384 / std::max<int64_t>(a.rows * W, 1));
  at::parallel_for(0, vectors, grain, [&](int64_t v0, int64_t v1) {
    for (int64_t c0 = v0; c0 < v1; c0 += kChunk) {
      const int64_t nv = std::min(kChunk, v1 - c0);
      Vec<T> acc[kChunk];
      for (int64_t v = 0; v < nv; ++v) acc[v] = Vec<T>(0);
      for (int64_t r = 0; r < a.rows; ++r) {
        T* g = a.grad + r * a.cols;
        const T* y = a.relu_out != nullptr ? a.relu_out + r * a.cols : nullptr;
        for (int64_t v = 0; v < nv; ++v) {
          const int64_t j = (c0 + v) * W, c = std::min(W, a.cols - j);
          Vec<T> gv = load(g + j, c);
          if (y != nullptr) {
            gv = Vec<T>::blendv(gv, Vec<T>(0), load(y + j, c) <= Vec<T>(0));
            store(gv, g + j, c);
          }
          acc[v] = acc[v] + gv;
        }
      }
      for (int64_t v = 0; v < nv; ++v) {
        const int64_t j = (c0 + v) * W;
        store(acc[v], a.out + j, std::min(W, a.cols - j));
      }
    }
  });
}

template void bias_grad<float>(const BiasGradArgs<float>&);
template void bias_grad<double>(const BiasGradArgs<double>&);

}  // namespace FASTVAE_ISA
}  // namespace fastvae::cpu

#ifndef FASTVAE_KERNELS_ONLY
#include "../ops.h"

namespace fastvae::cpu {
#if FASTVAE_HAVE_AVX2_COPY
namespace avx2 {
template <typename T> void bias_grad(const BiasGradArgs<T>&);
}  // namespace avx2
#endif

void bias_grad(at::Tensor& grad, const OptTensor& relu_out, at::Tensor& out) {
  check_bias_grad(grad, relu_out, out, at::kCPU);
  const bool relu = relu_out.has_value() && relu_out->defined();
  AT_DISPATCH_FLOATING_TYPES(grad.scalar_type(), "fastvae_bias_grad_cpu", [&] {
    const BiasGradArgs<scalar_t> args{grad.data_ptr<scalar_t>(), relu ? relu_out->data_ptr<scalar_t>() : nullptr,
                                      out.data_ptr<scalar_t>(), grad.size(0), grad.size(1)};
    FASTVAE_CPU_RUN(bias_grad, args);
  });
}

namespace {
// out = alpha * a @ b, into `out` (a view of the flat gradient buffer)
void mm_into(at::Tensor& out, const at::Tensor& a, const at::Tensor& b, double alpha) {
  if (alpha == 1.0) {
    at::mm_out(out, a, b);
  } else {
    at::addmm_out(out, out, a, b, /*beta=*/0, alpha);
  }
}
}  // namespace

at::Tensor mlp_step(const at::Tensor& x, at::TensorList weights, at::TensorList biases, at::TensorList grad_weights,
                    at::TensorList grad_biases, int64_t encoder_layers, int64_t seed, double beta, bool gaussian,
                    const OptTensor& flags) {
  const int64_t n = static_cast<int64_t>(weights.size()), E = encoder_layers;
  check_mlp_step(x, weights, biases, grad_weights, grad_biases, E, at::kCPU);
  const int64_t B = x.size(0), L = weights[E].size(0) / 2;
  const at::TensorOptions opts = weights[0].options();
  const bool bytes = x.scalar_type() == at::kByte;
  const double scale_in = bytes ? 1.0 / 255.0 : 1.0;  // (x / 255) W^T = (x W^T) / 255: the scale rides on the product
  std::vector<at::Tensor> act(n + 1);  // act[i]: the input of layer i; act[n]: the logits
  act[0] = bytes ? x.to(weights[0].scalar_type()) : x;
  for (int64_t i = 0; i < E; ++i) {
    at::Tensor out = at::empty({B, weights[i].size(0)}, opts);
    at::addmm_out(out, biases[i], act[i], weights[i].t(), 1, i == 0 ? scale_in : 1.0);
    act[i + 1] = out.relu_();
  }
  // [mu | logvar] from one product (the heads are stored back to back), then each contiguous for the kernels
  const at::Tensor heads = at::addmm(biases[E], act[E], weights[E].t(), 1, E == 0 ? scale_in : 1.0);
  const at::Tensor latent = heads.view({B, 2, L}).transpose(0, 1).contiguous(), mu = latent[0], logvar = latent[1];
  const at::Tensor z = std::get<0>(reparam_forward(mu, logvar, std::nullopt, seed, 1, false, flags));
  act[E + 1] = z[0];
  for (int64_t i = E + 1; i < n; ++i) {
    at::Tensor out = at::empty({B, weights[i].size(0)}, opts);
    at::addmm_out(out, biases[i], act[i], weights[i].t());
    if (i < n - 1) out.relu_();
    act[i + 1] = out;
  }
  auto [recon, kl, g, unused_mu, unused_logvar] = loss_forward(act[n], x, mu, logvar, std::nullopt, beta, gaussian, true, 1.0, flags);
  // backward; g: the gradient of layer i's pre-activation output
  at::Tensor last_bias = grad_biases[n - 1];
  bias_grad(g, std::nullopt, last_bias);
  for (int64_t i = n - 1; i > E; --i) {
    at::Tensor gw = grad_weights[i];
    at::mm_out(gw, g.t(), act[i]);
    at::Tensor d = at::mm(g, weights[i]);
    if (i > E + 1) {
      at::Tensor gb = grad_biases[i - 1];
      bias_grad(d, act[i], gb);
    }
    g = d;
  }
  // g = d loss / d z; the reparam backward adds beta * d KL / d(mu, logvar) (grad_kl = beta per row)
  auto [g_mu, g_logvar] = reparam_backward(g.unsqueeze(0), at::full({B}, beta, opts), mu, logvar, z, std::nullopt, seed, 1);
  g = at::cat({g_mu, g_logvar}, 1);
  at::Tensor heads_bias = grad_biases[E];
  bias_grad(g, std::nullopt, heads_bias);
  for (int64_t i = E; i >= 0; --i) {
    at::Tensor gw = grad_weights[i];
    mm_into(gw, g.t(), act[i], i == 0 ? scale_in : 1.0);
    if (i == 0) break;
    at::Tensor d = at::mm(g, weights[i]);
    at::Tensor gb = grad_biases[i - 1];
    bias_grad(d, act[i], gb);
    g = d;
  }
  const at::Tensor r = recon.sum(), k = kl.sum();
  return at::stack({r + beta * k, r, k});
}

}  // namespace fastvae::cpu
#endif

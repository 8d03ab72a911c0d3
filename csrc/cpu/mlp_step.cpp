// The training step of fastvae.VAE's MLP on the CPU as one op: forward, fused loss, backward and
// Adam, on raw pointers into FlatAdam's flat buffers (fastvae/mlp_step.py describes the step and
// runs the same sequence as PyTorch calls elsewhere). One call from Python per step: the matrix
// products go straight to the BLAS that torch links (MKL's sgemm/dgemm; ATen's mm where there is
// none), sampling and the loss are reparam.cpp's and loss.cpp's kernels, and the rest is here:
// the bias + ReLU epilogue of a product, the ReLU's backward folded into the bias gradient, and
// Adam, applied to each layer as soon as its gradients are final and its weight was last read
// (its parameters and gradients are then still in cache: only the moments come from memory).
#include "args.h"
#include "common.h"

namespace fastvae::cpu {

template <typename T>
struct BiasGradArgs {
  T* grad; const T* relu_out; T* out;  // relu_out null: no ReLU
  int64_t rows, cols;
};

template <typename T>
struct AdamArgs {
  T* param; const T* grad; T* exp_avg; T* exp_avg_sq;
  int64_t n;
  double step_size, beta1, beta2, eps, weight_decay, bias_correction2_sqrt;  // step_size = lr / bias_correction1
};

template <typename T>
struct ToFloatArgs {
  const uint8_t* x; T* out; int64_t n;
};

namespace FASTVAE_ISA {

// grad becomes the pre-activation gradient (0 where relu_out <= 0, as torch's threshold_backward:
// NaN activations keep their gradient) and out its column sums. A task owns a range of columns
// and walks every row, kChunk vectors of running sums in registers.
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

// A product's epilogue: bias added to every row, then ReLU if asked (NaN stays NaN, as torch.relu).
template <typename T>
void bias_act(const BiasActArgs<T>& a) {
  constexpr int64_t W = Vec<T>::size();
  at::parallel_for(0, a.rows, std::max<int64_t>(1, 16384 / std::max<int64_t>(a.cols, 1)), [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      T* row = a.out + r * a.cols;
      for (int64_t j = 0; j < a.cols; j += W) {
        const int64_t c = std::min(W, a.cols - j);
        Vec<T> v = load(row + j, c) + load(a.bias + j, c);
        if (a.act == Activation::kRelu) v = at::vec::maximum(v, Vec<T>(0));
        store(v, row + j, c);
      }
    }
  });
}

// torch.optim.Adam's update (its fused CPU kernel's arithmetic): m = lerp(m, g, 1 - beta1),
// v = beta2 v + (1 - beta2) g^2, p -= step_size m / (sqrt(v) / sqrt(bias_correction2) + eps).
template <typename T>
void adam(const AdamArgs<T>& a) {
  constexpr int64_t W = Vec<T>::size();
  const Vec<T> w1(T(1 - a.beta1)), b2(T(a.beta2)), w2(T(1 - a.beta2)), eps(T(a.eps)), wd(T(a.weight_decay));
  const Vec<T> step(T(a.step_size)), bc2(T(a.bias_correction2_sqrt));
  const bool decay = a.weight_decay != 0;
  at::parallel_for(0, (a.n + W - 1) / W, 2048, [&](int64_t v0, int64_t v1) {
    for (int64_t j = v0 * W; j < std::min(a.n, v1 * W); j += W) {
      const int64_t c = std::min(W, a.n - j);
      const Vec<T> p = load(a.param + j, c);
      Vec<T> g = load(a.grad + j, c);
      if (decay) g = at::vec::fmadd(p, wd, g);
      Vec<T> m = load(a.exp_avg + j, c);
      m = at::vec::fmadd(w1, g - m, m);
      const Vec<T> v = load(a.exp_avg_sq + j, c) * b2 + w2 * g * g;
      store(m, a.exp_avg + j, c);
      store(v, a.exp_avg_sq + j, c);
      store(p - step * m / (v.sqrt() / bc2 + eps), a.param + j, c);
    }
  });
}

template <typename T>
void to_float(const ToFloatArgs<T>& a) {
  at::parallel_for(0, a.n, 65536, [&](int64_t i0, int64_t i1) {
    for (int64_t i = i0; i < i1; ++i) a.out[i] = static_cast<T>(a.x[i]);
  });
}

#define FASTVAE_STEP_INSTANTIATE(T)                       \
  template void bias_grad<T>(const BiasGradArgs<T>&);     \
  template void bias_act<T>(const BiasActArgs<T>&);       \
  template void adam<T>(const AdamArgs<T>&);              \
  template void to_float<T>(const ToFloatArgs<T>&);
FASTVAE_STEP_INSTANTIATE(float)
FASTVAE_STEP_INSTANTIATE(double)
#undef FASTVAE_STEP_INSTANTIATE

}  // namespace FASTVAE_ISA
}  // namespace fastvae::cpu

#ifndef FASTVAE_KERNELS_ONLY
#include <ATen/CPUGeneratorImpl.h>
#include <ATen/record_function.h>
#include <torch/library.h>

#include <cmath>
#include <cstring>
#include <mutex>

#include "../ops.h"
#include "blas.h"

namespace fastvae::cpu {
#if FASTVAE_HAVE_AVX2_COPY
namespace avx2 {
template <typename T> void bias_grad(const BiasGradArgs<T>&);
template <typename T> void adam(const AdamArgs<T>&);
template <typename T> void to_float(const ToFloatArgs<T>&);
}  // namespace avx2
#endif

namespace {

struct Layer {
  int64_t out, in, weight, bias;  // sizes, and offsets into the flat buffers
};

// Each piece of the step in its own torch.profiler scope ("mlp_step::gemm", ...): python -m benchmarks.step_profile
// lists them under fastvae::mlp_step. A thread-local check when no profiler runs.
#define STEP_SCOPE(name, ...)                                                              \
  do {                                                                                     \
    RECORD_FUNCTION("mlp_step::" name, c10::ArrayRef<const c10::IValue>{});                \
    __VA_ARGS__;                                                                           \
  } while (0)

void check_step(const at::Tensor& x, const at::Tensor& flat, const at::Tensor& grad, const at::Tensor& exp_avg,
                const at::Tensor& exp_avg_sq, const at::Tensor& step, const at::Tensor& stats, const OptTensor& window,
                const std::vector<Layer>& layers, int64_t E) {
  const int64_t n = static_cast<int64_t>(layers.size());
  TORCH_CHECK(E >= 0 && E + 2 <= n, "fastvae::mlp_step: encoder_layers must leave the heads and a decoder layer, got ", E,
              " of ", n, " layers");
  for (const at::Tensor* t : {&flat, &grad, &exp_avg, &exp_avg_sq}) {
    TORCH_CHECK(t->device().is_cpu() && t->is_contiguous() && t->dim() == 1 && t->sizes() == flat.sizes() &&
                    t->scalar_type() == flat.scalar_type(),
                "fastvae::mlp_step: the flat buffers must be contiguous 1-D CPU tensors of one size and dtype");
  }
  TORCH_CHECK(flat.scalar_type() == at::kFloat || flat.scalar_type() == at::kDouble, "fastvae::mlp_step: float32 or float64 only");
  TORCH_CHECK(step.device().is_cpu() && step.dim() == 0 && step.scalar_type() == at::kFloat,
              "fastvae::mlp_step: step must be a 0-dim float32 CPU tensor");
  TORCH_CHECK(stats.device().is_cpu() && stats.is_contiguous() && stats.numel() == 3 && stats.scalar_type() == flat.scalar_type(),
              "fastvae::mlp_step: stats must be a contiguous CPU tensor of 3 elements of the parameters' dtype");
  TORCH_CHECK(!window.has_value() || !window->defined() ||
                  (window->device().is_cpu() && window->is_contiguous() && window->numel() == 3 && window->scalar_type() == at::kDouble),
              "fastvae::mlp_step: window must be a contiguous float64 CPU tensor of 3 elements");
  TORCH_CHECK(x.device().is_cpu() && x.is_contiguous() && x.dim() == 2 && x.size(0) >= 1 &&
                  (x.scalar_type() == at::kByte || x.scalar_type() == flat.scalar_type()),
              "fastvae::mlp_step: x must be a contiguous non-empty (batch, features) CPU tensor of uint8 or the parameters' dtype");
  TORCH_CHECK(layers[E].out % 2 == 0, "fastvae::mlp_step: the heads must have 2 * latent outputs, got ", layers[E].out);
  int64_t width = x.size(1);
  for (int64_t i = 0; i < n; ++i) {
    const Layer& l = layers[i];
    if (i == E + 1) width = layers[E].out / 2;
    TORCH_CHECK(l.in == width && l.out >= 1, "fastvae::mlp_step: layer ", i, " must take ", width, " inputs, got ", l.in);
    TORCH_CHECK(l.weight >= 0 && l.bias >= 0 && l.weight + l.out * l.in <= flat.numel() && l.bias + l.out <= flat.numel(),
                "fastvae::mlp_step: layer ", i, " lies outside the flat buffers");
    width = l.out;
  }
  TORCH_CHECK(width == x.size(1), "fastvae::mlp_step: the last layer must give x's ", x.size(1), " features, got ", width);
}

template <typename T, typename X>
void run_step(const X* x, int64_t B, int64_t D, T* flat, T* grad, T* exp_avg, T* exp_avg_sq, const std::vector<Layer>& layers,
              int64_t E, uint64_t seed, double beta, bool gaussian, const AdamArgs<T>* adam, FlagSink* sink, T* work,
              double* sums) {
  const int64_t n = static_cast<int64_t>(layers.size()), L = layers[E].out / 2;
  int64_t widest = D;
  for (const Layer& l : layers) widest = std::max(widest, l.out);
  // carve the workspace (its size: workspace_size)
  T* w = work;
  auto take = [&w](int64_t count) { T* p = w; w += count; return p; };
  const T* in0 = nullptr;
  T scale_in = T(1);
  if constexpr (std::is_same_v<X, uint8_t>) {
    T* xf = take(B * D);
    STEP_SCOPE("input", FASTVAE_CPU_RUN(to_float, ToFloatArgs<T>{x, xf, B * D}));
    in0 = xf;
    scale_in = T(1.0 / 255.0);  // (x / 255) W^T = (x W^T) / 255: the scale rides on the product
  } else {
    in0 = x;
  }
  std::vector<T*> out(n);  // each layer's output (after its activation); the heads' is [mu | logvar]
  for (int64_t i = 0; i < n; ++i) out[i] = take(B * layers[i].out);
  T *mu = take(B * L), *logvar = take(B * L), *z = take(B * L), *recon = take(B), *kl = take(B);
  T *g_logits = take(B * D), *g_mu_kl = take(B * L), *g_logvar_kl = take(B * L), *g_mu = take(B * L), *g_logvar = take(B * L);
  T *beta_rows = take(B), *d_heads = take(B * 2 * L);
  T* ping[2] = {take(B * widest), take(B * widest)};
  auto input = [&](int64_t i) -> const T* { return i == 0 ? in0 : i == E + 1 ? z : out[i - 1]; };
  auto forward = [&](int64_t i, bool relu) {
    const Layer& l = layers[i];
    STEP_SCOPE("gemm", blas::gemm<T>(false, true, B, l.out, l.in, i == 0 ? scale_in : T(1), input(i), flat + l.weight, T(0), out[i]));
    STEP_SCOPE("bias_relu", FASTVAE_CPU_RUN(bias_act, BiasActArgs<T>{out[i], flat + l.bias, B, l.out, relu ? Activation::kRelu : Activation::kNone}));
  };
  // forward
  for (int64_t i = 0; i < E; ++i) forward(i, true);
  forward(E, false);
  for (int64_t r = 0; r < B; ++r) {
    std::copy_n(out[E] + r * 2 * L, L, mu + r * L);
    std::copy_n(out[E] + r * 2 * L + L, L, logvar + r * L);
  }
  STEP_SCOPE("reparam", FASTVAE_CPU_RUN(reparam_forward, ReparamForwardArgs<T>{mu, logvar, z, nullptr, B, L, 1, seed, sink}));
  for (int64_t i = E + 1; i < n; ++i) forward(i, i < n - 1);
  STEP_SCOPE("loss", FASTVAE_CPU_RUN(loss_forward, LossArgs<T, X>{out[n - 1], x, mu, logvar, recon, kl, g_logits, g_mu_kl, g_logvar_kl, B, D, L,
                                               T(beta), T(1), gaussian, sink}));
  double r_sum = 0, k_sum = 0;
  for (int64_t r = 0; r < B; ++r) {
    r_sum += recon[r];
    k_sum += kl[r];
  }
  sums[0] = r_sum + beta * k_sum;
  sums[1] = r_sum;
  sums[2] = k_sum;
  // backward: g is the gradient of layer i's output before its activation
  auto update = [&](const Layer& l) {
    if (adam == nullptr) return;
    for (auto [offset, count] : {std::pair{l.weight, l.out * l.in}, std::pair{l.bias, l.out}}) {
      AdamArgs<T> args = *adam;
      args.param = flat + offset, args.grad = grad + offset, args.exp_avg = exp_avg + offset, args.exp_avg_sq = exp_avg_sq + offset;
      args.n = count;
      STEP_SCOPE("adam", FASTVAE_CPU_RUN(adam, args));
    }
  };
  auto backward = [&](int64_t i, T* g, T* d) {  // weight gradient, input gradient into d (unless i == 0), update
    const Layer& l = layers[i];
    STEP_SCOPE("gemm", blas::gemm<T>(true, false, l.out, l.in, B, i == 0 ? scale_in : T(1), g, input(i), T(0), grad + l.weight));
    if (d != nullptr) STEP_SCOPE("gemm", blas::gemm<T>(false, false, B, l.in, l.out, T(1), g, flat + l.weight, T(0), d));
    update(l);
  };
  T* g = g_logits;
  STEP_SCOPE("bias_grad", FASTVAE_CPU_RUN(bias_grad, BiasGradArgs<T>{g, nullptr, grad + layers[n - 1].bias, B, D}));
  int flip = 0;
  for (int64_t i = n - 1; i > E; --i) {
    T* d = ping[flip ^= 1];
    backward(i, g, d);
    if (i > E + 1) STEP_SCOPE("bias_grad", FASTVAE_CPU_RUN(bias_grad, BiasGradArgs<T>{d, out[i - 1], grad + layers[i - 1].bias, B, layers[i - 1].out}));
    g = d;
  }
  // g = d loss / d z; the reparam backward adds beta * d KL / d(mu, logvar) (grad_kl = beta per row)
  std::fill_n(beta_rows, B, T(beta));
  STEP_SCOPE("reparam_backward", FASTVAE_CPU_RUN(reparam_backward, ReparamBackwardArgs<T>{g, beta_rows, mu, logvar, z, g_mu, g_logvar, B, L, 1}));
  for (int64_t r = 0; r < B; ++r) {
    std::copy_n(g_mu + r * L, L, d_heads + r * 2 * L);
    std::copy_n(g_logvar + r * L, L, d_heads + r * 2 * L + L);
  }
  g = d_heads;
  STEP_SCOPE("bias_grad", FASTVAE_CPU_RUN(bias_grad, BiasGradArgs<T>{g, nullptr, grad + layers[E].bias, B, 2 * L}));
  for (int64_t i = E; i >= 0; --i) {
    T* d = i > 0 ? ping[flip ^= 1] : nullptr;
    backward(i, g, d);
    if (i > 0) STEP_SCOPE("bias_grad", FASTVAE_CPU_RUN(bias_grad, BiasGradArgs<T>{d, out[i - 1], grad + layers[i - 1].bias, B, layers[i - 1].out}));
    g = d;
  }
}

// x's rows `rows` (each checked against x's N rows first: a bad index is an error, never a read outside x).
at::Tensor gather_rows(const at::Tensor& x, const at::Tensor& rows) {
  TORCH_CHECK(rows.device().is_cpu() && rows.dim() == 1 && rows.size(0) >= 1 && rows.scalar_type() == at::kLong,
              "fastvae::mlp_step: rows must be a non-empty 1-D int64 CPU tensor of indices into x");
  const at::Tensor idx = rows.contiguous();
  const int64_t* r = idx.data_ptr<int64_t>();
  const int64_t B = idx.size(0), N = x.size(0), row_bytes = x.size(1) * static_cast<int64_t>(x.element_size());
  for (int64_t i = 0; i < B; ++i) {
    TORCH_CHECK(r[i] >= 0 && r[i] < N, "fastvae::mlp_step: rows[", i, "] = ", r[i], " is outside x's ", N, " rows");
  }
  at::Tensor out = at::empty({B, x.size(1)}, x.options());
  const char* src = static_cast<const char*>(x.const_data_ptr());
  char* dst = static_cast<char*>(out.data_ptr());
  at::parallel_for(0, B, std::max<int64_t>(1, 65536 / std::max<int64_t>(row_bytes, 1)), [&](int64_t i0, int64_t i1) {
    for (int64_t i = i0; i < i1; ++i) std::memcpy(dst + i * row_bytes, src + r[i] * row_bytes, row_bytes);
  });
  return out;
}

// A fresh seed from torch's default CPU generator, as fastvae.ops.reparam.new_seed draws it
// (int64 random_(0, 2**62): random64() % 2**62), so torch.manual_seed makes the step reproducible.
uint64_t draw_seed() {
  at::Generator gen = at::detail::getDefaultCPUGenerator();
  std::lock_guard<std::mutex> lock(gen.mutex());
  return at::check_generator<at::CPUGeneratorImpl>(gen)->random64() % (uint64_t{1} << 62);
}

int64_t workspace_size(int64_t B, int64_t D, const std::vector<Layer>& layers, int64_t E, bool bytes) {
  const int64_t L = layers[E].out / 2;
  int64_t widest = D, total = bytes ? B * D : 0;
  for (const Layer& l : layers) {
    widest = std::max(widest, l.out);
    total += B * l.out;
  }
  return total + B * (3 * L + 2 + D + 4 * L + 1 + 2 * L) + 2 * B * widest;
}

}  // namespace

void bias_grad(at::Tensor& grad, const OptTensor& relu_out, at::Tensor& out) {
  TORCH_CHECK(grad.device().is_cpu() && grad.is_contiguous() && grad.dim() == 2, "fastvae::bias_grad: grad must be a contiguous 2-D CPU tensor");
  TORCH_CHECK(grad.scalar_type() == at::kFloat || grad.scalar_type() == at::kDouble, "fastvae::bias_grad: float32 or float64 only");
  const bool relu = relu_out.has_value() && relu_out->defined();
  TORCH_CHECK(!relu || (relu_out->sizes() == grad.sizes() && relu_out->is_contiguous() && relu_out->scalar_type() == grad.scalar_type()),
              "fastvae::bias_grad: relu_out must be contiguous, of grad's shape and dtype");
  TORCH_CHECK(out.is_contiguous() && out.dim() == 1 && out.size(0) == grad.size(1) && out.scalar_type() == grad.scalar_type(),
              "fastvae::bias_grad: out must be a contiguous (", grad.size(1), ",) tensor of grad's dtype");
  AT_DISPATCH_FLOATING_TYPES(grad.scalar_type(), "fastvae_bias_grad_cpu", [&] {
    const BiasGradArgs<scalar_t> args{grad.data_ptr<scalar_t>(), relu ? relu_out->data_ptr<scalar_t>() : nullptr,
                                      out.data_ptr<scalar_t>(), grad.size(0), grad.size(1)};
    FASTVAE_CPU_RUN(bias_grad, args);
  });
}

// One training step on the batch x (or on x's rows `rows`, gathered here: the Trainer passes its resident data
// set and the step's indices). Writes [loss, recon, kl] summed over the batch into `stats` and adds them
// to `window` (float64, the Trainer's running sums) if given; writes every gradient into `grad` and, when
// `update`, advances `step` and applies Adam to `flat`, `exp_avg` and `exp_avg_sq`. seed < 0: drawn from
// torch's generator. layout: per layer (the encoder's hidden layers, the heads with [mu; logvar] rows, the
// decoder's) out, in, and the offsets of its weight and bias in the flat buffers. Nothing but these
// calls runs in Python per step.
void mlp_step(const at::Tensor& data, const OptTensor& rows, at::Tensor& flat, at::Tensor& grad, at::Tensor& exp_avg,
              at::Tensor& exp_avg_sq, at::Tensor& step, at::IntArrayRef layout, int64_t encoder_layers, int64_t seed, double beta,
              bool gaussian, bool update, double lr, double beta1, double beta2, double eps, double weight_decay,
              const OptTensor& flags, at::Tensor& stats, const OptTensor& window) {
  TORCH_CHECK(layout.size() % 4 == 0 && !layout.empty(), "fastvae::mlp_step: layout holds 4 numbers per layer");
  std::vector<Layer> layers;
  for (size_t i = 0; i < layout.size(); i += 4) layers.push_back({layout[i], layout[i + 1], layout[i + 2], layout[i + 3]});
  const bool gather = rows.has_value() && rows->defined();
  TORCH_CHECK(!gather || (data.device().is_cpu() && data.is_contiguous() && data.dim() == 2),
              "fastvae::mlp_step: with rows, x must be a contiguous (N, features) CPU tensor");
  const at::Tensor x = gather ? gather_rows(data, *rows) : data;
  check_step(x, flat, grad, exp_avg, exp_avg_sq, step, stats, window, layers, encoder_layers);
  const uint64_t stream = seed < 0 ? draw_seed() : host_seed(std::nullopt, seed);
  int32_t* word = flag_word(flags, x.device());
  const int64_t B = x.size(0), D = x.size(1);
  const bool bytes = x.scalar_type() == at::kByte;
  at::Tensor work = at::empty({workspace_size(B, D, layers, encoder_layers, bytes)}, flat.options());
  double sums[3];
  FlagSink sink;
  AT_DISPATCH_FLOATING_TYPES(flat.scalar_type(), "fastvae_mlp_step_cpu", [&] {
    using T = scalar_t;
    AdamArgs<T> adam{};
    if (update) {
      float* count = step.data_ptr<float>();
      *count += 1;
      const double s = *count;
      adam.step_size = lr / (1 - std::pow(beta1, s));
      adam.beta1 = beta1, adam.beta2 = beta2, adam.eps = eps, adam.weight_decay = weight_decay;
      adam.bias_correction2_sqrt = std::sqrt(1 - std::pow(beta2, s));
    }
    auto run = [&](auto* xp) {
      run_step<T>(xp, B, D, flat.data_ptr<T>(), grad.data_ptr<T>(), exp_avg.data_ptr<T>(), exp_avg_sq.data_ptr<T>(), layers,
                  encoder_layers, stream, beta, gaussian, update ? &adam : nullptr, word != nullptr ? &sink : nullptr,
                  work.data_ptr<T>(), sums);
    };
    if (bytes) run(x.data_ptr<uint8_t>()); else run(x.data_ptr<T>());
  });
  sink.commit(word);
  double* w = window.has_value() && window->defined() ? window->data_ptr<double>() : nullptr;
  AT_DISPATCH_FLOATING_TYPES(flat.scalar_type(), "fastvae_mlp_step_sums", [&] {
    for (int i = 0; i < 3; ++i) {
      const scalar_t v = static_cast<scalar_t>(sums[i]);
      stats.data_ptr<scalar_t>()[i] = v;
      if (w != nullptr) w[i] += static_cast<double>(v);  // the sums as stats holds them, as the Trainer adds them
    }
  });
}

}  // namespace fastvae::cpu

TORCH_LIBRARY_FRAGMENT(fastvae, m) {
  m.def("bias_grad(Tensor(a!) grad, Tensor? relu_out, Tensor(b!) out) -> ()");
  m.def("mlp_step(Tensor x, Tensor? rows, Tensor(a!) flat, Tensor(b!) grad, Tensor(c!) exp_avg, Tensor(d!) exp_avg_sq,"
        " Tensor(e!) step, int[] layout, int encoder_layers, int seed, float beta, bool gaussian, bool update, float lr,"
        " float beta1, float beta2, float eps, float weight_decay, Tensor(f!)? flags, Tensor(g!) stats, Tensor(h!)? window) -> ()");
}

TORCH_LIBRARY_IMPL(fastvae, CPU, m) {
  m.impl("bias_grad", &fastvae::cpu::bias_grad);
  m.impl("mlp_step", &fastvae::cpu::mlp_step);
}
#endif

// Decode's elementwise tail on the GPU: sigmoid (from logits) and, for uint8 output, the
// quantisation floor(clamp(p, 0, 1) * 255 + 0.5) in float32 like the reference.
#include "common.cuh"

namespace fastvae::cuda {
namespace {

template <typename T, typename O>
__global__ void to_image_kernel(const T* __restrict__ values, O* __restrict__ out, int64_t n, bool from_logits) {
  const int64_t stride = int64_t(gridDim.x) * blockDim.x;
  for (int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < n; i += stride) {
    const T v = values[i];
    const T p = from_logits ? sigmoid_from(v, exp(-fabs(v))) : v;
    if constexpr (sizeof(O) == 1) {
      const float f = fminf(fmaxf(static_cast<float>(p), 0.0f), 1.0f);
      out[i] = static_cast<O>(floorf(f * 255.0f + 0.5f));
    } else {
      out[i] = p;
    }
  }
}

}  // namespace

template <typename T, typename O>
cudaError_t launch_to_image(const T* values, O* out, int64_t n, bool from_logits, cudaStream_t stream) {
  to_image_kernel<T, O><<<grid_for(n), kThreads, 0, stream>>>(values, out, n, from_logits);
  return cudaGetLastError();
}

template cudaError_t launch_to_image<float, float>(const float*, float*, int64_t, bool, cudaStream_t);
template cudaError_t launch_to_image<float, uint8_t>(const float*, uint8_t*, int64_t, bool, cudaStream_t);
template cudaError_t launch_to_image<double, double>(const double*, double*, int64_t, bool, cudaStream_t);
template cudaError_t launch_to_image<double, uint8_t>(const double*, uint8_t*, int64_t, bool, cudaStream_t);

}  // namespace fastvae::cuda

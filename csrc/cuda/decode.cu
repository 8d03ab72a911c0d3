// Decode's elementwise tail on the GPU: uint8 pixels floor(clamp(p, 0, 1) * 255 + 0.5) of
// p = sigmoid(values) (from logits) or values, in float32 like the reference. A float output never
// comes here: decode_latents writes it with torch's sigmoid.
#include "common.cuh"

namespace fastvae::cuda {
namespace {

template <typename T>
__global__ void to_image_kernel(const T* __restrict__ values, uint8_t* __restrict__ out, int64_t n, bool from_logits) {
  const int64_t stride = int64_t(gridDim.x) * blockDim.x;
  for (int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < n; i += stride) {
    const T v = values[i];
    const T p = from_logits ? sigmoid_from(v, exp(-fabs(v))) : v;
    const float f = fminf(fmaxf(static_cast<float>(p), 0.0f), 1.0f);
    out[i] = static_cast<uint8_t>(floorf(f * 255.0f + 0.5f));
  }
}

}  // namespace

template <typename T>
cudaError_t launch_to_image(const T* values, uint8_t* out, int64_t n, bool from_logits, cudaStream_t stream) {
  to_image_kernel<T><<<grid_for(n), kThreads, 0, stream>>>(values, out, n, from_logits);
  return cudaGetLastError();
}

template cudaError_t launch_to_image<float>(const float*, uint8_t*, int64_t, bool, cudaStream_t);
template cudaError_t launch_to_image<double>(const double*, uint8_t*, int64_t, bool, cudaStream_t);

}  // namespace fastvae::cuda

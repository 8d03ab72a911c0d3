// torch glue of the CUDA decode tail (decode.cu).
#include "glue.h"

namespace fastvae::cuda {

void to_image(const at::Tensor& values, at::Tensor& out, bool from_logits) {
  at::Tensor target = check_to_image(values, out, at::kCUDA);
  const c10::cuda::CUDAGuard guard(values.device());
  AT_DISPATCH_FLOATING_TYPES(values.scalar_type(), "fastvae_to_image_cuda", [&] {
    check_launch(launch_to_image(values.data_ptr<scalar_t>(), target.data_ptr<uint8_t>(), values.numel(), from_logits, stream()));
  });
  if (!target.is_same(out)) out.copy_(target);
}

}  // namespace fastvae::cuda

// Value-check flag bits the fused kernels OR into a flag word (an int32 tensor of shape (1,)).
// Mirrors fastvae/_checks.py FLAG_* and MAX_LOGVAR (tests/test_cpp_ops.py checks that they agree
// through fastvae._C.FLAGS). Plain C++: included by the CPU kernels and by nvcc.
#pragma once

namespace fastvae {

enum Flag : int {
  FLAG_LOGITS_NONFINITE = 1,  // a logit is NaN or +-Inf
  FLAG_X_NONFINITE = 2,       // a floating-point target is NaN or +-Inf
  FLAG_X_RANGE = 4,           // Bernoulli likelihood, floating-point target < 0 or > 1
  FLAG_MU_NONFINITE = 8,      // mu is NaN or +-Inf
  FLAG_LOGVAR_NONFINITE = 16, // logvar is NaN or +-Inf
  FLAG_LOGVAR_HIGH = 32,      // logvar is finite and > MAX_LOGVAR
};

constexpr double MAX_LOGVAR = 88.0;  // exp(88.7) is float32's largest finite value

struct FlagName {
  const char* name;
  int bit;
};

constexpr FlagName kFlagNames[] = {
    {"FLAG_LOGITS_NONFINITE", FLAG_LOGITS_NONFINITE}, {"FLAG_X_NONFINITE", FLAG_X_NONFINITE},
    {"FLAG_X_RANGE", FLAG_X_RANGE},                   {"FLAG_MU_NONFINITE", FLAG_MU_NONFINITE},
    {"FLAG_LOGVAR_NONFINITE", FLAG_LOGVAR_NONFINITE}, {"FLAG_LOGVAR_HIGH", FLAG_LOGVAR_HIGH},
};

}  // namespace fastvae

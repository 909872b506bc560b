// BN-minima kernel: per (sample, channel) minimum over spatial positions of the
// Gaussian log-density of a BatchNorm input under N(running_mean, running_var + eps).
// The PyTorch reference lives in backdoor_engine/kernels/bn_minima.py.
#pragma once

#include <cstdint>

namespace backdoor_engine {

enum class ElementType { kFloat32, kFloat16, kBFloat16 };

// kChannelsFirst: NCHW-contiguous. kChannelsLast: NHWC-contiguous (torch.channels_last).
enum class Layout { kChannelsFirst, kChannelsLast };

// x holds n * channels * spatial elements of `type` (16-bit types as raw bits) in
// `layout`; mean and var hold `channels` values; out receives n * channels floats,
// row-major [n, channels]. A NaN anywhere in x[n, c] makes out[n, c] NaN.
// Requires spatial >= 1 and var[c] + eps > 0 (checked by the Python caller).
void bn_minima(const void* x, ElementType type, Layout layout, int64_t n, int64_t channels,
               int64_t spatial, const double* mean, const double* var, double eps, float* out);

// Threads an OpenMP parallel region would use here; 1 when built without OpenMP.
int max_threads();

}  // namespace backdoor_engine

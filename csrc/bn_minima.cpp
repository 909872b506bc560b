// BN-minima CPU kernel. The minimum over positions of a Gaussian log-density is reached at
// the position farthest from the mean, which is the channel's max or min, so the kernel reads
// the activation once for per-(sample, channel) extremes and then applies the closed form
//   -0.5 * log(2 * pi * v) - max((xmax - m)^2, (xmin - m)^2) / (2 * v),   v = var + eps.
// PyTorch reference: backdoor_engine/kernels/bn_minima.py.
#include "bn_minima.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <vector>

#ifdef _OPENMP
#include <omp.h>
#endif

namespace backdoor_engine {
namespace {

// Below this many elements, waking the thread pool costs more than the scan.
constexpr int64_t kMinElementsForThreads = 1 << 15;

struct Float32Format {
  using Raw = float;
  using Key = float;
  static Key key(Raw value) { return value; }
  static bool is_nan(Raw value) { return value != value; }
  static double value(Key key) { return key; }
};

double half_bits_to_double(uint16_t bits) {
  const int exponent = (bits >> 10) & 0x1F;
  const int mantissa = bits & 0x3FF;
  double magnitude;
  if (exponent == 0) {
    magnitude = std::ldexp(mantissa, -24);  // zero or subnormal
  } else if (exponent == 0x1F) {
    magnitude = mantissa ? std::numeric_limits<double>::quiet_NaN()
                         : std::numeric_limits<double>::infinity();
  } else {
    magnitude = std::ldexp(mantissa + 1024, exponent - 25);
  }
  return (bits & 0x8000) ? -magnitude : magnitude;
}

double bfloat16_bits_to_double(uint16_t bits) {
  const uint32_t widened = static_cast<uint32_t>(bits) << 16;
  float value;
  std::memcpy(&value, &widened, sizeof(value));
  return value;
}

// 16-bit floats are compared as integer keys, so the hot loop never converts an element:
// flipping the magnitude bits of negative values gives signed keys ordered like the values
// (NaNs are tracked separately). The map is its own inverse.
template <uint16_t kInfinityBits, double (*kToDouble)(uint16_t)>
struct SixteenBitFormat {
  using Raw = uint16_t;
  using Key = int16_t;
  static Key flip_negative(int16_t bits) { return static_cast<Key>(bits ^ ((bits >> 15) & 0x7FFF)); }
  static Key key(Raw bits) { return flip_negative(static_cast<int16_t>(bits)); }
  static bool is_nan(Raw bits) { return (bits & 0x7FFF) > kInfinityBits; }
  static double value(Key key) { return kToDouble(static_cast<uint16_t>(flip_negative(key))); }
};

using Float16Format = SixteenBitFormat<0x7C00, half_bits_to_double>;
using BFloat16Format = SixteenBitFormat<0x7F80, bfloat16_bits_to_double>;

// Per-channel terms of the closed form, computed once per call in double precision.
struct ChannelTerms {
  std::vector<double> mean, log_normaliser, inverse_two_var;

  ChannelTerms(const double* running_mean, const double* running_var, double eps, int64_t channels)
      : mean(running_mean, running_mean + channels), log_normaliser(channels),
        inverse_two_var(channels) {
    constexpr double kTwoPi = 6.283185307179586476925286766559;
    for (int64_t c = 0; c < channels; ++c) {
      const double variance = running_var[c] + eps;
      log_normaliser[c] = -0.5 * std::log(kTwoPi * variance);
      inverse_two_var[c] = 0.5 / variance;
    }
  }

  float minimum(double high, double low, bool saw_nan, int64_t c) const {
    if (saw_nan) return std::numeric_limits<float>::quiet_NaN();
    const double farthest = std::max(std::fabs(high - mean[c]), std::fabs(low - mean[c]));
    return static_cast<float>(log_normaliser[c] - farthest * farthest * inverse_two_var[c]);
  }
};

// NCHW: each (sample, channel) plane is contiguous; one task per plane.
template <class Format>
void channels_first(const typename Format::Raw* x, int64_t n, int64_t channels, int64_t spatial,
                    const ChannelTerms& terms, float* out) {
  using Key = typename Format::Key;
  const int64_t planes = n * channels;
#pragma omp parallel for schedule(static) if (planes * spatial >= kMinElementsForThreads)
  for (int64_t plane = 0; plane < planes; ++plane) {
    const typename Format::Raw* values = x + plane * spatial;
    Key high = Format::key(values[0]);
    Key low = high;
    unsigned saw_nan = Format::is_nan(values[0]);
#pragma omp simd reduction(max : high) reduction(min : low) reduction(| : saw_nan)
    for (int64_t i = 1; i < spatial; ++i) {
      const Key key = Format::key(values[i]);
      high = key > high ? key : high;
      low = key < low ? key : low;
      saw_nan |= Format::is_nan(values[i]);
    }
    out[plane] = terms.minimum(Format::value(high), Format::value(low), saw_nan, plane % channels);
  }
}

// NHWC: channels are interleaved, so one task per sample keeps running extremes for all its
// channels and walks its pixels in memory order (vectorised across channels).
template <class Format>
void channels_last(const typename Format::Raw* x, int64_t n, int64_t channels, int64_t spatial,
                   const ChannelTerms& terms, float* out) {
  using Key = typename Format::Key;
#pragma omp parallel if (n * channels * spatial >= kMinElementsForThreads)
  {
    std::vector<Key> high_buffer(channels), low_buffer(channels);
    std::vector<unsigned char> nan_buffer(channels);
    Key* high = high_buffer.data();
    Key* low = low_buffer.data();
    unsigned char* saw_nan = nan_buffer.data();
#pragma omp for schedule(static)
    for (int64_t sample = 0; sample < n; ++sample) {
      const typename Format::Raw* image = x + sample * spatial * channels;
      for (int64_t c = 0; c < channels; ++c) {
        high[c] = low[c] = Format::key(image[c]);
        saw_nan[c] = Format::is_nan(image[c]);
      }
      for (int64_t position = 1; position < spatial; ++position) {
        const typename Format::Raw* pixel = image + position * channels;
#pragma omp simd
        for (int64_t c = 0; c < channels; ++c) {
          const Key key = Format::key(pixel[c]);
          high[c] = key > high[c] ? key : high[c];
          low[c] = key < low[c] ? key : low[c];
          saw_nan[c] |= Format::is_nan(pixel[c]);
        }
      }
      for (int64_t c = 0; c < channels; ++c) {
        out[sample * channels + c] =
            terms.minimum(Format::value(high[c]), Format::value(low[c]), saw_nan[c], c);
      }
    }
  }
}

template <class Format>
void run(const void* x, Layout layout, int64_t n, int64_t channels, int64_t spatial,
         const ChannelTerms& terms, float* out) {
  const auto* values = static_cast<const typename Format::Raw*>(x);
  if (layout == Layout::kChannelsFirst) {
    channels_first<Format>(values, n, channels, spatial, terms, out);
  } else {
    channels_last<Format>(values, n, channels, spatial, terms, out);
  }
}

}  // namespace

void bn_minima(const void* x, ElementType type, Layout layout, int64_t n, int64_t channels,
               int64_t spatial, const double* mean, const double* var, double eps, float* out) {
  const ChannelTerms terms(mean, var, eps, channels);
  switch (type) {
    case ElementType::kFloat32:
      run<Float32Format>(x, layout, n, channels, spatial, terms, out);
      break;
    case ElementType::kFloat16:
      run<Float16Format>(x, layout, n, channels, spatial, terms, out);
      break;
    case ElementType::kBFloat16:
      run<BFloat16Format>(x, layout, n, channels, spatial, terms, out);
      break;
  }
}

int max_threads() {
#ifdef _OPENMP
  return omp_get_max_threads();
#else
  return 1;
#endif
}

}  // namespace backdoor_engine

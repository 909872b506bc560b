// Python bindings of the compiled kernels: module backdoor_engine._C.
// Arrays arrive as numpy views of CPU tensors (16-bit floats as uint16 views).
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>

#include <array>
#include <stdexcept>
#include <string>

#include "bn_minima.h"

namespace py = pybind11;
using backdoor_engine::ElementType;
using backdoor_engine::Layout;

namespace {

ElementType parse_element_type(const py::array& x, const std::string& dtype) {
  if (dtype == "float32") {
    if (!x.dtype().is(py::dtype::of<float>())) {
      throw std::invalid_argument("dtype='float32' expects a float32 array, got " +
                                  std::string(py::str(x.dtype())));
    }
    return ElementType::kFloat32;
  }
  if (dtype == "float16" || dtype == "bfloat16") {
    if (!x.dtype().is(py::dtype::of<uint16_t>())) {
      throw std::invalid_argument("dtype='" + dtype + "' expects its raw bits as a uint16 array, got " +
                                  std::string(py::str(x.dtype())));
    }
    return dtype == "float16" ? ElementType::kFloat16 : ElementType::kBFloat16;
  }
  throw std::invalid_argument("dtype must be 'float32', 'float16' or 'bfloat16', got '" + dtype + "'");
}

// Dense strides (in elements) of an N, C, H, W array stored in the given dimension order.
// Dimensions of size 1 are not compared, as in torch's contiguity rules.
bool has_dense_order(const py::array& x, const std::array<int, 4>& order_outer_to_inner) {
  py::ssize_t expected = 1;
  for (int i = 3; i >= 0; --i) {
    const int dim = order_outer_to_inner[i];
    if (x.shape(dim) != 1 && x.strides(dim) != expected * x.itemsize()) return false;
    expected *= x.shape(dim);
  }
  return true;
}

Layout parse_layout(const py::array& x) {
  if (has_dense_order(x, {0, 1, 2, 3})) return Layout::kChannelsFirst;
  if (has_dense_order(x, {0, 2, 3, 1})) return Layout::kChannelsLast;
  throw std::invalid_argument(
      "x must be NCHW-contiguous or channels_last (NHWC-contiguous); got another memory layout");
}

using DoubleVector = py::array_t<double, py::array::c_style | py::array::forcecast>;

py::array_t<float> bn_minima(const py::array& x, const DoubleVector& running_mean,
                             const DoubleVector& running_var, double eps, const std::string& dtype) {
  if (x.ndim() != 4) {
    throw std::invalid_argument("x must be 4-D (N, C, H, W), got " + std::to_string(x.ndim()) + "-D");
  }
  const ElementType type = parse_element_type(x, dtype);
  const py::ssize_t n = x.shape(0), channels = x.shape(1), spatial = x.shape(2) * x.shape(3);
  if (running_mean.ndim() != 1 || running_mean.shape(0) != channels || running_var.ndim() != 1 ||
      running_var.shape(0) != channels) {
    throw std::invalid_argument("running_mean and running_var must be 1-D with " +
                                std::to_string(channels) + " entries (x's channels)");
  }
  if (spatial == 0 && n * channels > 0) {
    throw std::invalid_argument("x has no spatial positions (H * W == 0)");
  }
  py::array_t<float> out({n, channels});
  if (n * channels == 0) return out;
  const Layout layout = parse_layout(x);  // an empty array's strides are arbitrary
  const void* data = x.data();
  const double* mean = running_mean.data();
  const double* var = running_var.data();
  float* result = out.mutable_data();
  {
    py::gil_scoped_release release;
    backdoor_engine::bn_minima(data, type, layout, n, channels, spatial, mean, var, eps, result);
  }
  return out;
}

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "Compiled CPU kernels of backdoor-engine (see backdoor_engine.kernels for the dispatch).";
  m.def("bn_minima", &bn_minima, py::arg("x"), py::arg("running_mean"), py::arg("running_var"),
        py::arg("eps"), py::arg("dtype"),
        "Per (sample, channel) minimum over H*W of the Gaussian log-density of x under\n"
        "N(running_mean, running_var + eps); returns float32 [N, C]. x: 4-D NCHW or channels_last\n"
        "array, float32 or the uint16 bits of float16/bfloat16 named by dtype.");
  m.def("max_threads", &backdoor_engine::max_threads,
        "Threads the kernels use (OpenMP's current maximum; 1 without OpenMP).");
#ifdef _OPENMP
  m.attr("has_openmp") = true;
#else
  m.attr("has_openmp") = false;
#endif
}

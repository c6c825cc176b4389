// The small per-layer ops of an eager decode step on the CPU, one call each.
//
// A decoder layer runs two RMSNorms and one RoPE; in torch each is 8-10 ops (casts, pow, mean,
// rsqrt, multiplies, chunk, cat), and at batch 1 every op costs ~1.5 us of dispatch against
// almost no arithmetic: ~25 dispatches per layer, ~1 ms per token for a 30-layer model. Here
// each is one pass over its rows. The math is the torch code's (model/layers.py), in float32:
//
//   rms_norm: y = weight * (x * rsqrt(mean(x^2) + eps)).to(dtype)   (the product rounded to dtype)
//   rope:     y[..., :D/2] = x1 cos - x2 sin,  y[..., D/2:] = x2 cos + x1 sin   (rotate-half)
//
// Schemas (registered below; fakes for torch.compile are in kernels/cpu.py):
//   tokenmill::rms_norm(Tensor x [T, D], Tensor weight [D], float eps) -> [T, D]
//   tokenmill::rope(Tensor x [T, N, D], Tensor cos [T, 1, D/2] f32, Tensor sin) -> [T, N, D]
// x may be a strided view (rows apart, the last dimension contiguous); outputs are contiguous.

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cmath>
#include <cstdint>
#include <vector>

namespace {

template <typename T>
void rms_norm_rows(const T* x, int64_t row_stride, const T* w, T* y, int64_t rows, int64_t d, float eps) {
  at::parallel_for(0, rows, 8, [&](int64_t r0, int64_t r1) {
    std::vector<float> buf(d);
    for (int64_t r = r0; r < r1; ++r) {
      const T* xr = x + r * row_stride;
      float ss = 0.f;
#pragma omp simd reduction(+ : ss)
      for (int64_t i = 0; i < d; ++i) {
        buf[i] = static_cast<float>(xr[i]);
        ss += buf[i] * buf[i];
      }
      const float inv = 1.f / std::sqrt(ss / static_cast<float>(d) + eps);
      T* yr = y + r * d;
      for (int64_t i = 0; i < d; ++i) {
        const float normed = static_cast<float>(static_cast<T>(buf[i] * inv));  // .to(dtype)
        yr[i] = static_cast<T>(static_cast<float>(w[i]) * normed);
      }
    }
  });
}

template <typename T>
void rope_rows(const T* x, int64_t stride_t, int64_t stride_n, const float* cos, const float* sin,
               T* y, int64_t t, int64_t n, int64_t d) {
  const int64_t half = d / 2;
  at::parallel_for(0, t * n, 64, [&](int64_t i0, int64_t i1) {
    for (int64_t i = i0; i < i1; ++i) {
      const int64_t ti = i / n, ni = i % n;
      const T* xr = x + ti * stride_t + ni * stride_n;
      const float* c = cos + ti * half;
      const float* s = sin + ti * half;
      T* yr = y + i * d;
#pragma omp simd
      for (int64_t j = 0; j < half; ++j) {
        const float x1 = static_cast<float>(xr[j]), x2 = static_cast<float>(xr[j + half]);
        yr[j] = static_cast<T>(x1 * c[j] - x2 * s[j]);
        yr[j + half] = static_cast<T>(x2 * c[j] + x1 * s[j]);
      }
    }
  });
}

void check_float(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.device().is_cpu(), name, " must be on the CPU, got ", t.device());
  TORCH_CHECK(t.scalar_type() == at::kFloat || t.scalar_type() == at::kBFloat16 || t.scalar_type() == at::kHalf,
              name, " must be float32, bfloat16 or float16, got ", t.scalar_type());
}

at::Tensor rms_norm(const at::Tensor& x, const at::Tensor& weight, double eps) {
  check_float(x, "x");
  TORCH_CHECK(x.dim() == 2 && x.stride(1) == 1, "x must be [T, D] with a contiguous last dimension, got sizes ",
              x.sizes(), " strides ", x.strides());
  TORCH_CHECK(weight.dim() == 1 && weight.size(0) == x.size(1) && weight.scalar_type() == x.scalar_type(),
              "weight must be [", x.size(1), "] of x's dtype ", x.scalar_type(), ", got ", weight.sizes(), " ",
              weight.scalar_type());
  const at::Tensor w = weight.contiguous();
  at::Tensor y = at::empty(x.sizes(), x.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "rms_norm", [&] {
    rms_norm_rows<scalar_t>(x.data_ptr<scalar_t>(), x.stride(0), w.data_ptr<scalar_t>(), y.data_ptr<scalar_t>(),
                            x.size(0), x.size(1), static_cast<float>(eps));
  });
  return y;
}

at::Tensor rope(const at::Tensor& x, const at::Tensor& cos, const at::Tensor& sin) {
  check_float(x, "x");
  TORCH_CHECK(x.dim() == 3 && x.stride(2) == 1 && x.size(2) % 2 == 0,
              "x must be [T, N, D] with D even and a contiguous last dimension, got sizes ", x.sizes(),
              " strides ", x.strides());
  const int64_t t = x.size(0), half = x.size(2) / 2;
  for (const at::Tensor* a : {&cos, &sin}) {
    TORCH_CHECK(a->scalar_type() == at::kFloat && a->numel() == t * half,
                "cos and sin must be float32 with T * D/2 = ", t * half, " values, got ", a->scalar_type(), " ",
                a->sizes());
  }
  const at::Tensor c = cos.contiguous(), s = sin.contiguous();
  at::Tensor y = at::empty(x.sizes(), x.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "rope", [&] {
    rope_rows<scalar_t>(x.data_ptr<scalar_t>(), x.stride(0), x.stride(1), c.data_ptr<float>(), s.data_ptr<float>(),
                        y.data_ptr<scalar_t>(), t, x.size(1), x.size(2));
  });
  return y;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(tokenmill, m) {
  m.def("rms_norm(Tensor x, Tensor weight, float eps) -> Tensor");
  m.def("rope(Tensor x, Tensor cos, Tensor sin) -> Tensor");
}

TORCH_LIBRARY_IMPL(tokenmill, CPU, m) {
  m.impl("rms_norm", &rms_norm);
  m.impl("rope", &rope);
}

// int8 weight (one scale per output row) x bf16 activations for CPUs without AVX-512 BF16 (AVX2 +
// FMA), over the tensors Int8Linear keeps for aten::_weight_int8pack_mm: q int8 [N, Kp] (Kp a
// multiple of 16) and scale bf16 [N].
//
// On two Zen 3 cores torch's kernel streams a 49k x 576 LM head at ~10 GB/s at batch 1; this one
// near the DRAM rate.
//
// Arithmetic, the same for every row count M (a row's output does not depend on its batch):
//
//   A, B     = 8-lane float32 fma sums over k of q[n, k] x[m, k]: lane i of A takes k = 16j + i,
//              of B k = 16j + 8 + i, j ascending
//   v        = A + B; t[i] = v[i] + v[i + 4]; u[i] = t[i] + t[i + 2]; d = u[0] + u[1]
//   y[m, n]  = bf16(d * scale[n])                                 round to nearest even
//
// M = 1 widens weights in registers, four rows at a time; larger M runs 2 x 2 blocks (two weight
// rows, two rows of x), over four rows widened to float once where K <= 1024 (they stay in L1),
// widening in registers otherwise. `scalar` runs the plain C++ form of the same arithmetic (tests
// compare them bit for bit).
//
// Schema: tokenmill::int8_mm(Tensor x [M, Kp] bf16, Tensor q [N, Kp] int8, Tensor scale [N] bf16,
//                            bool scalar=False) -> [M, N] bf16

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cmath>
#include <cstdint>
#include <vector>

#if defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>
#define TOKENMILL_INT8_AVX2 1
#endif

namespace {

constexpr int64_t kRowBlock = 4;     // weight rows per step
constexpr int64_t kWidenMaxK = 1024;  // M > 1: rows this short are widened to float once (L1-sized)

inline float finish(const float* v /* 8 lanes: A + B */) {
  float t[4], u[2];
  for (int i = 0; i < 4; ++i) t[i] = v[i] + v[i + 4];
  for (int i = 0; i < 2; ++i) u[i] = t[i] + t[i + 2];
  return u[0] + u[1];
}

// ---- plain C++: the reference form --------------------------------------------------------------
float dot_scalar(const int8_t* q, const float* x, int64_t kp) {
  float a[8] = {}, b[8] = {}, v[8];
  for (int64_t j = 0; j < kp; j += 16)
    for (int i = 0; i < 8; ++i) {
      a[i] = std::fma(static_cast<float>(q[j + i]), x[j + i], a[i]);
      b[i] = std::fma(static_cast<float>(q[j + 8 + i]), x[j + 8 + i], b[i]);
    }
  for (int i = 0; i < 8; ++i) v[i] = a[i] + b[i];
  return finish(v);
}

#ifdef TOKENMILL_INT8_AVX2
inline __m256 widen8(const int8_t* q) {
  return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(q))));
}

inline float finish8(__m256 a, __m256 b) {
  alignas(32) float v[8];
  _mm256_store_ps(v, _mm256_add_ps(a, b));
  return finish(v);
}

// M = 1: four weight rows against one x row, widened in registers. Each step also prefetches the
// same share of the block after next: short rows (K = 576: 2.3 KB per block) are too short a
// stream for the hardware prefetcher (an LM head of 49k x 576 streamed at 13 GB/s without, 30 with).
void rows_one(const int8_t* q, int64_t kp, const float* x, float* d /* [4] */) {
  __m256 a0 = _mm256_setzero_ps(), b0 = a0, a1 = a0, b1 = a0, a2 = a0, b2 = a0, a3 = a0, b3 = a0;
  for (int64_t j = 0; j < kp; j += 16) {
    _mm_prefetch(reinterpret_cast<const char*>(q + 8 * kp + 4 * j), _MM_HINT_T0);  // the block after next
    const __m256 xa = _mm256_loadu_ps(x + j), xb = _mm256_loadu_ps(x + j + 8);
    a0 = _mm256_fmadd_ps(widen8(q + j), xa, a0);
    b0 = _mm256_fmadd_ps(widen8(q + j + 8), xb, b0);
    a1 = _mm256_fmadd_ps(widen8(q + kp + j), xa, a1);
    b1 = _mm256_fmadd_ps(widen8(q + kp + j + 8), xb, b1);
    a2 = _mm256_fmadd_ps(widen8(q + 2 * kp + j), xa, a2);
    b2 = _mm256_fmadd_ps(widen8(q + 2 * kp + j + 8), xb, b2);
    a3 = _mm256_fmadd_ps(widen8(q + 3 * kp + j), xa, a3);
    b3 = _mm256_fmadd_ps(widen8(q + 3 * kp + j + 8), xb, b3);
  }
  d[0] = finish8(a0, b0);
  d[1] = finish8(a1, b1);
  d[2] = finish8(a2, b2);
  d[3] = finish8(a3, b3);
}

inline __m256 load8(const float* w) { return _mm256_loadu_ps(w); }
inline __m256 load8(const int8_t* q) { return widen8(q); }

// Two weight rows (int8, or already widened to float) against two x rows: d[i][r] for x row i,
// weight row r.
template <typename W>
void two_by_two(const W* w0, const W* w1, int64_t kp, const float* x0, const float* x1, float d[2][2]) {
  __m256 a00 = _mm256_setzero_ps(), b00 = a00, a01 = a00, b01 = a00, a10 = a00, b10 = a00, a11 = a00, b11 = a00;
  for (int64_t j = 0; j < kp; j += 16) {
    const __m256 w0a = load8(w0 + j), w0b = load8(w0 + j + 8);
    const __m256 w1a = load8(w1 + j), w1b = load8(w1 + j + 8);
    const __m256 x0a = _mm256_loadu_ps(x0 + j), x0b = _mm256_loadu_ps(x0 + j + 8);
    const __m256 x1a = _mm256_loadu_ps(x1 + j), x1b = _mm256_loadu_ps(x1 + j + 8);
    a00 = _mm256_fmadd_ps(w0a, x0a, a00);
    b00 = _mm256_fmadd_ps(w0b, x0b, b00);
    a01 = _mm256_fmadd_ps(w1a, x0a, a01);
    b01 = _mm256_fmadd_ps(w1b, x0b, b01);
    a10 = _mm256_fmadd_ps(w0a, x1a, a10);
    b10 = _mm256_fmadd_ps(w0b, x1b, b10);
    a11 = _mm256_fmadd_ps(w1a, x1a, a11);
    b11 = _mm256_fmadd_ps(w1b, x1b, b11);
  }
  d[0][0] = finish8(a00, b00);
  d[0][1] = finish8(a01, b01);
  d[1][0] = finish8(a10, b10);
  d[1][1] = finish8(a11, b11);
}
#endif

at::Tensor int8_mm(const at::Tensor& x_in, const at::Tensor& q_in, const at::Tensor& scale_in, bool scalar) {
  TORCH_CHECK(x_in.dim() == 2 && x_in.scalar_type() == at::kBFloat16, "int8_mm: x must be [M, Kp] bfloat16, got ",
              x_in.sizes(), " ", x_in.scalar_type());
  TORCH_CHECK(q_in.dim() == 2 && q_in.scalar_type() == at::kChar && q_in.size(1) == x_in.size(1) &&
                  q_in.size(1) % 16 == 0,
              "int8_mm: q must be int8 [N, Kp] with x's Kp, a multiple of 16; got ", q_in.sizes(), " ",
              q_in.scalar_type(), " for x ", x_in.sizes());
  TORCH_CHECK(scale_in.dim() == 1 && scale_in.size(0) == q_in.size(0) && scale_in.scalar_type() == at::kBFloat16,
              "int8_mm: scale must be bfloat16 [N]");
  const at::Tensor x = x_in.contiguous(), q_t = q_in.contiguous(), scale_t = scale_in.contiguous();
  const int64_t m = x.size(0), kp = x.size(1), n = q_t.size(0);
  at::Tensor y = at::empty({m, n}, x.options());
  if (m == 0 || n == 0) return y;
  std::vector<float> xf(m * kp);
  const c10::BFloat16* xb = x.data_ptr<c10::BFloat16>();
  for (int64_t i = 0; i < m * kp; ++i) xf[i] = static_cast<float>(xb[i]);
  const int8_t* q = q_t.data_ptr<int8_t>();
  const c10::BFloat16* scale = scale_t.data_ptr<c10::BFloat16>();
  c10::BFloat16* out = y.data_ptr<c10::BFloat16>();
  const int64_t blocks = (n + kRowBlock - 1) / kRowBlock;
  at::parallel_for(0, blocks, 16, [&](int64_t b0, int64_t b1) {
    std::vector<float> w(kp <= kWidenMaxK ? kRowBlock * kp : 0), d(kRowBlock * m);
    for (int64_t b = b0; b < b1; ++b) {
      const int64_t n0 = b * kRowBlock, rows = std::min(kRowBlock, n - n0);
      const int8_t* qb = q + n0 * kp;
      bool done = false;
#ifdef TOKENMILL_INT8_AVX2
      if (!scalar && m == 1 && rows == kRowBlock) {
        rows_one(qb, kp, xf.data(), d.data());
        done = true;
      } else if (!scalar) {
        const bool widen = kp <= kWidenMaxK;
        if (widen)
          for (int64_t r = 0; r < rows; ++r)
            for (int64_t j = 0; j < kp; j += 8) _mm256_storeu_ps(w.data() + r * kp + j, widen8(qb + r * kp + j));
        for (int64_t r = 0; r < rows; r += 2) {  // pairs of rows of each side; an odd one pairs with itself
          const int64_t r1 = std::min(r + 1, rows - 1);
          for (int64_t i = 0; i < m; i += 2) {
            const int64_t i1 = std::min(i + 1, m - 1);
            float dd[2][2];
            if (widen)
              two_by_two(w.data() + r * kp, w.data() + r1 * kp, kp, xf.data() + i * kp, xf.data() + i1 * kp, dd);
            else
              two_by_two(qb + r * kp, qb + r1 * kp, kp, xf.data() + i * kp, xf.data() + i1 * kp, dd);
            d[i * kRowBlock + r] = dd[0][0];
            d[i * kRowBlock + r1] = dd[0][1];
            d[i1 * kRowBlock + r] = dd[1][0];
            d[i1 * kRowBlock + r1] = dd[1][1];
          }
        }
        done = true;
      }
#endif
      if (!done)
        for (int64_t i = 0; i < m; ++i)
          for (int64_t r = 0; r < rows; ++r) d[i * kRowBlock + r] = dot_scalar(qb + r * kp, xf.data() + i * kp, kp);
      for (int64_t i = 0; i < m; ++i)
        for (int64_t r = 0; r < rows; ++r)
          out[i * n + n0 + r] = c10::BFloat16(d[i * kRowBlock + r] * static_cast<float>(scale[n0 + r]));
    }
  });
  return y;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(tokenmill, m) {
  m.def("int8_mm(Tensor x, Tensor q, Tensor scale, bool scalar=False) -> Tensor");
}

TORCH_LIBRARY_IMPL(tokenmill, CPU, m) { m.impl("int8_mm", &int8_mm); }

// int8 (or float8 e4m3fn) weight, one scale per output row, x bf16 activations for CPUs without
// AVX-512 BF16 (AVX2 + FMA), over the tensors Int8Linear keeps for aten::_weight_int8pack_mm: q
// int8 [N, Kp] (Kp a multiple of 16) and scale bf16 [N]; and over Fp8Linear's: q float8_e4m3fn
// [N, K] (K a multiple of 16) and scale float32 [N], each code widened exactly (Fp8Codes below).
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
// M = 1 widens weights in registers, four rows at a time, with software prefetch; larger M takes
// blocks of 8 weight rows and, for each three (or two) rows of x, runs 2 x 3 (2 x 2) register
// blocks over the block's pairs of rows, widening in registers too (widening each block to float
// once in memory was slower at every M on Zen 3: the float copy is 4x the bytes to load).
// `scalar` runs the plain C++ form of the same arithmetic (tests compare them bit for bit).
//
// Schemas: tokenmill::int8_mm(Tensor x [M, Kp] bf16, Tensor q [N, Kp] int8, Tensor scale [N] bf16,
//                             bool scalar=False) -> [M, N] bf16
//          tokenmill::fp8_mm(Tensor x [M, K] bf16, Tensor q [N, K] float8_e4m3fn,
//                            Tensor scale [N] float32, bool scalar=False) -> [M, N] bf16

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <vector>

#if defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>
#define TOKENMILL_INT8_AVX2 1
#endif

namespace {

constexpr int64_t kRowBlock = 4;      // weight rows per step at M = 1
constexpr int64_t kWideBlock = 8;     // and at M > 1 (an int8 block of 8 x 576 is 4.6 KB: in L1 with 3 x rows)

inline float finish(const float* v /* 8 lanes: A + B */) {
  float t[4], u[2];
  for (int i = 0; i < 4; ++i) t[i] = v[i] + v[i + 4];
  for (int i = 0; i < 2; ++i) u[i] = t[i] + t[i + 2];
  return u[0] + u[1];
}

// The codes: int8 values, or float8 e4m3fn bit patterns (uint8). An e4m3fn code s.eeee.mmm is read
// as a float32 whose low exponent and top mantissa bits are eeee.mmm, 2^(e - 127) 1.m (or the
// subnormal 2^-126 0.m where e = 0, as e4m3's own subnormals), times 2^(127 - 7): exact, integer
// and float operations only, so it vectorizes. (s.1111.111 is NaN in e4m3fn; quantize_fp8 never
// writes it, and it is read here as 480.)
struct Int8Codes {
  using T = int8_t;
  static float value(T c) { return static_cast<float>(c); }
};
struct Fp8Codes {
  using T = uint8_t;
  static float value(T c) {
    const uint32_t bits = ((static_cast<uint32_t>(c) & 0x80u) << 24) | ((static_cast<uint32_t>(c) & 0x7fu) << 20);
    float f;
    std::memcpy(&f, &bits, sizeof f);
    return f * 0x1p120f;
  }
};

// ---- plain C++: the reference form --------------------------------------------------------------
template <typename C>
float dot_scalar(const typename C::T* q, const float* x, int64_t kp) {
  float a[8] = {}, b[8] = {}, v[8];
  for (int64_t j = 0; j < kp; j += 16)
    for (int i = 0; i < 8; ++i) {
      a[i] = std::fma(C::value(q[j + i]), x[j + i], a[i]);
      b[i] = std::fma(C::value(q[j + 8 + i]), x[j + 8 + i], b[i]);
    }
  for (int i = 0; i < 8; ++i) v[i] = a[i] + b[i];
  return finish(v);
}

#ifdef TOKENMILL_INT8_AVX2
inline __m256 widen8(const int8_t* q) {
  return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(q))));
}
inline __m256 widen8(const uint8_t* q) {  // e4m3fn codes, as Fp8Codes::value
  const __m256i c = _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(q)));
  const __m256i bits = _mm256_or_si256(_mm256_slli_epi32(_mm256_and_si256(c, _mm256_set1_epi32(0x80)), 24),
                                       _mm256_slli_epi32(_mm256_and_si256(c, _mm256_set1_epi32(0x7f)), 20));
  return _mm256_mul_ps(_mm256_castsi256_ps(bits), _mm256_set1_ps(0x1p120f));
}

inline float finish8(__m256 a, __m256 b) {
  alignas(32) float v[8];
  _mm256_store_ps(v, _mm256_add_ps(a, b));
  return finish(v);
}

// M = 1: four weight rows against one x row, widened in registers. Each step also prefetches the
// same share of the block after next: short rows (K = 576: 2.3 KB per block) are too short a
// stream for the hardware prefetcher (an LM head of 49k x 576 streamed at 13 GB/s without, 30 with).
template <typename Q>
void rows_one(const Q* q, int64_t kp, const float* x, float* d /* [4] */) {
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

// Two weight rows (int8 or fp8 codes), widened in registers, against NX rows of x: d[i][r] for x row i,
// weight row r. NX = 3 holds 12 accumulators and loads 10 vectors per 12 FMAs (2 x 2: 8 per 8).
template <int NX, typename Q>
void two_by_n(const Q* w0, const Q* w1, int64_t kp, const float* const* x, float d[][2]) {
  __m256 a[NX][2], b[NX][2];
  for (int i = 0; i < NX; ++i) a[i][0] = a[i][1] = b[i][0] = b[i][1] = _mm256_setzero_ps();
  for (int64_t j = 0; j < kp; j += 16) {
    const __m256 w0a = widen8(w0 + j), w1a = widen8(w1 + j);  // the A half, then the B half:
    for (int i = 0; i < NX; ++i) {                          // 12 accumulators + 3 in 16 registers
      const __m256 xa = _mm256_loadu_ps(x[i] + j);
      a[i][0] = _mm256_fmadd_ps(w0a, xa, a[i][0]);
      a[i][1] = _mm256_fmadd_ps(w1a, xa, a[i][1]);
    }
    const __m256 w0b = widen8(w0 + j + 8), w1b = widen8(w1 + j + 8);
    for (int i = 0; i < NX; ++i) {
      const __m256 xb = _mm256_loadu_ps(x[i] + j + 8);
      b[i][0] = _mm256_fmadd_ps(w0b, xb, b[i][0]);
      b[i][1] = _mm256_fmadd_ps(w1b, xb, b[i][1]);
    }
  }
  for (int i = 0; i < NX; ++i) {
    d[i][0] = finish8(a[i][0], b[i][0]);
    d[i][1] = finish8(a[i][1], b[i][1]);
  }
}

// A block of `rows` weight rows (row r at w + r * kp) against every row of x, x rows outer (in
// threes and twos: they stay in L1 while the block's pairs of weight rows pass; an odd row pairs
// with itself). d[i * rows_per_block + r].
template <typename Q>
void block_all_rows(const Q* w, int64_t rows, int64_t kp, const float* xf, int64_t m, int64_t rows_per_block,
                    float* d) {
  float dd[3][2];
  auto run = [&](auto nx, int64_t i) {
    constexpr int NX = decltype(nx)::value;
    const float* x[NX];
    for (int t = 0; t < NX; ++t) x[t] = xf + (i + t) * kp;
    for (int64_t r = 0; r < rows; r += 2) {
      const int64_t r1 = std::min(r + 1, rows - 1);
      two_by_n<NX>(w + r * kp, w + r1 * kp, kp, x, dd);
      for (int t = 0; t < NX; ++t) {
        d[(i + t) * rows_per_block + r] = dd[t][0];
        d[(i + t) * rows_per_block + r1] = dd[t][1];
      }
    }
  };
  // Threes, then twos; a lone row (M = 1 here only for blocks short of 4 rows) is the slowest:
  // 3k + 1 rows run as 3(k - 1) + 2 + 2.
  const int64_t threes = m % 3 == 1 && m >= 4 ? m / 3 - 1 : m / 3;
  int64_t i = 0;
  for (; i < 3 * threes; i += 3) run(std::integral_constant<int, 3>{}, i);
  for (; i + 2 <= m; i += 2) run(std::integral_constant<int, 2>{}, i);
  for (; i < m; ++i) run(std::integral_constant<int, 1>{}, i);
}
#endif

// y = bf16(d * scale[n]) over codes q [N, Kp] (C), x [M, Kp] bf16 widened once; scale S per row.
template <typename C, typename S>
void codes_mm(const at::Tensor& x, const typename C::T* q, const S* scale, int64_t n, bool scalar, at::Tensor& y) {
  const int64_t m = x.size(0), kp = x.size(1);
  std::vector<float> xf(m * kp);
  const c10::BFloat16* xb = x.data_ptr<c10::BFloat16>();
  for (int64_t i = 0; i < m * kp; ++i) xf[i] = static_cast<float>(xb[i]);
  c10::BFloat16* out = y.data_ptr<c10::BFloat16>();
  const int64_t rb = m == 1 ? kRowBlock : kWideBlock, blocks = (n + rb - 1) / rb;
  at::parallel_for(0, blocks, 16, [&](int64_t b0, int64_t b1) {
    std::vector<float> d(rb * m);
    for (int64_t b = b0; b < b1; ++b) {
      const int64_t n0 = b * rb, rows = std::min(rb, n - n0);
      const typename C::T* qb = q + n0 * kp;
      bool done = false;
#ifdef TOKENMILL_INT8_AVX2
      if (!scalar && m == 1 && rows == kRowBlock) {
        rows_one(qb, kp, xf.data(), d.data());
        done = true;
      } else if (!scalar) {
        block_all_rows(qb, rows, kp, xf.data(), m, rb, d.data());
        done = true;
      }
#endif
      if (!done)
        for (int64_t i = 0; i < m; ++i)
          for (int64_t r = 0; r < rows; ++r) d[i * rb + r] = dot_scalar<C>(qb + r * kp, xf.data() + i * kp, kp);
      for (int64_t i = 0; i < m; ++i)
        for (int64_t r = 0; r < rows; ++r)
          out[i * n + n0 + r] = c10::BFloat16(d[i * rb + r] * static_cast<float>(scale[n0 + r]));
    }
  });
}

// The checks both entry points make; returns y [M, N] bf16 (empty work: nothing to run).
at::Tensor check_and_allocate(const char* name, const at::Tensor& x, const at::Tensor& q, at::ScalarType q_type,
                              const char* q_name, const at::Tensor& scale, at::ScalarType scale_type,
                              const char* scale_name) {
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == at::kBFloat16, name, ": x must be [M, Kp] bfloat16, got ",
              x.sizes(), " ", x.scalar_type());
  TORCH_CHECK(q.dim() == 2 && q.scalar_type() == q_type && q.size(1) == x.size(1) && q.size(1) % 16 == 0, name,
              ": q must be ", q_name, " [N, Kp] with x's Kp, a multiple of 16; got ", q.sizes(), " ",
              q.scalar_type(), " for x ", x.sizes());
  TORCH_CHECK(scale.dim() == 1 && scale.size(0) == q.size(0) && scale.scalar_type() == scale_type, name,
              ": scale must be ", scale_name, " [N]");
  return at::empty({x.size(0), q.size(0)}, x.options());
}

at::Tensor int8_mm(const at::Tensor& x_in, const at::Tensor& q_in, const at::Tensor& scale_in, bool scalar) {
  at::Tensor y = check_and_allocate("int8_mm", x_in, q_in, at::kChar, "int8", scale_in, at::kBFloat16, "bfloat16");
  if (y.numel() == 0) return y;
  const at::Tensor q = q_in.contiguous(), scale = scale_in.contiguous();
  codes_mm<Int8Codes>(x_in.contiguous(), q.data_ptr<int8_t>(), scale.data_ptr<c10::BFloat16>(), q.size(0), scalar,
                      y);
  return y;
}

at::Tensor fp8_mm(const at::Tensor& x_in, const at::Tensor& q_in, const at::Tensor& scale_in, bool scalar) {
  at::Tensor y = check_and_allocate("fp8_mm", x_in, q_in, at::kFloat8_e4m3fn, "float8_e4m3fn", scale_in, at::kFloat,
                                    "float32");
  if (y.numel() == 0) return y;
  const at::Tensor q = q_in.contiguous(), scale = scale_in.contiguous();
  codes_mm<Fp8Codes>(x_in.contiguous(), reinterpret_cast<const uint8_t*>(q.data_ptr()), scale.data_ptr<float>(),
                     q.size(0), scalar, y);
  return y;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(tokenmill, m) {
  m.def("int8_mm(Tensor x, Tensor q, Tensor scale, bool scalar=False) -> Tensor");
  m.def("fp8_mm(Tensor x, Tensor q, Tensor scale, bool scalar=False) -> Tensor");
}

TORCH_LIBRARY_IMPL(tokenmill, CPU, m) {
  m.impl("int8_mm", &int8_mm);
  m.impl("fp8_mm", &fp8_mm);
}

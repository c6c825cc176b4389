// Packed int4 weights x int8-quantized activations (AVX2 integer dot products), llama.cpp's way of
// running 4-bit weights on a CPU: opt-in (quant/int4.py, TOKENMILL_CPU_INT4_ACTIVATIONS=int8), as the
// activations lose precision that the bf16 path (int4_mm.cpp) keeps.
//
// Why: int4_mm widens every weight to float32 and multiplies with FMAs, 8 products per
// instruction; at batch 1 that is about at its uop bound below the DRAM rate, and from a few rows
// of x up it is bound by the FMA rate. Here `vpmaddubsw` multiplies 32 unsigned 4-bit codes by 32
// signed int8 activations per instruction, adding pairs into int16 lanes, and a nibble is used as
// it is (no widening to float).
//
// Layout (quant/int4.py: pack_q8), 8 output rows by 8 columns per 32 bytes: packed uint8
// [Np/8, K/8, 32]; byte 4r + t of (row block b, column octet o) holds q[8b + r, 8o + t] in its low
// nibble and q[8b + r, 8o + 4 + t] in its high one. scales_zeros bf16 is (s, z) per group and row
// as for int4_mm, W[n, k] = (q - 8) s + z: tiled [Np/8, K/g, 8, 2] (what Int4Linear stores: a row
// block's scales in one stream, 32 bytes per group; ~14% faster at batch 1 with cold weights than
// torch's [K/g, Np, 2], where they lie in K/g pieces Np rows apart; also accepted).
//
// Arithmetic, the same for every row count M (a row's output does not depend on its batch):
//
//   per row m and block j of 32 columns (llama.cpp's Q8_0 activations):
//     d[m, j]  = max |x[m, k in j]| / 127,   qx[m, k] = nearbyint(x[m, k] * (1 / d))  (0 when d = 0)
//   xs[m, g] = sum over k in g of x[m, k]                          float32, k ascending (exact x)
//   isum_j   = sum over k in j of q[n, k] qx[m, k]                 int32, exact
//   per group g ascending, acc from 0:
//     acc = fma(z - 8 s, xs[m, g], acc)
//     acc = fma(s * d[m, j], isum_j, acc)                          for the group's blocks j ascending
//   y[m, n]  = bf16(acc)                                           round to nearest even
//
// The integer sums are exact (a vpmaddubsw lane adds two products, |q qx| <= 15 * 127 each; the 8
// per block of 32 columns add up to at most 30480, inside int16), so the AVX2 loop and the plain
// C++ form (`scalar`, tests) give the same bits.
//
// Schema: tokenmill::int4_q8_mm(Tensor x [M, K] bf16, Tensor packed [Np/8, K/8, 32] uint8, int group,
//                               Tensor scales_zeros [Np/8, K/g, 8, 2] or [K/g, Np, 2] bf16,
//                               bool scalar=False) -> [M, Np] bf16

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

#if defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>
#define TOKENMILL_Q8_AVX2 1
#endif

namespace {

constexpr int64_t kBlock = 32;  // columns per activation scale
constexpr int kRows = 8;        // output rows per packed block

struct Quantized {
  std::vector<int8_t> qx;  // [M, K]
  std::vector<float> d;    // [M, K / 32]
  std::vector<float> xs;   // [M, K / group]
};

// qx, d and xs of every row of x (the same code for both forms, so they quantize alike); rows in
// parallel.
Quantized quantize_rows(const c10::BFloat16* x, int64_t m, int64_t k, int64_t group) {
  Quantized q;
  const int64_t blocks = k / kBlock, groups = k / group;
  q.qx.resize(m * k);
  q.d.resize(m * blocks);
  q.xs.resize(m * groups);
  at::parallel_for(0, m, 4, [&](int64_t r0, int64_t r1) {
    std::vector<float> xf(k);
    for (int64_t r = r0; r < r1; ++r) {
      for (int64_t i = 0; i < k; ++i) xf[i] = static_cast<float>(x[r * k + i]);
      for (int64_t j = 0; j < blocks; ++j) {
        float amax = 0.f;
        for (int64_t i = 0; i < kBlock; ++i) amax = std::max(amax, std::fabs(xf[j * kBlock + i]));
        const float d = amax / 127.f;
        const float id = d != 0.f ? 1.f / d : 0.f;
        q.d[r * blocks + j] = d;
        for (int64_t i = 0; i < kBlock; ++i)
          q.qx[r * k + j * kBlock + i] = static_cast<int8_t>(std::nearbyint(xf[j * kBlock + i] * id));
      }
      for (int64_t g = 0; g < groups; ++g) {
        float s = 0.f;
        for (int64_t i = 0; i < group; ++i) s += xf[g * group + i];
        q.xs[r * groups + g] = s;
      }
    }
  });
  return q;
}

// The plain form: row block b, every row of x.
void block_scalar(const uint8_t* packed, const c10::BFloat16* szb, int64_t gstride, const Quantized& q, int64_t m,
                  int64_t k, int64_t np, int64_t group, int64_t b, c10::BFloat16* y) {
  const int64_t groups = k / group, blocks = k / kBlock, per_group = group / kBlock;
  const uint8_t* base = packed + b * (k / 8) * 32;
  for (int64_t r = 0; r < m; ++r) {
    for (int row = 0; row < kRows; ++row) {
      const int64_t n = b * kRows + row;
      float acc = 0.f;
      for (int64_t g = 0; g < groups; ++g) {
        const float s = static_cast<float>(szb[g * gstride + row * 2]);
        const float zz = static_cast<float>(szb[g * gstride + row * 2 + 1]) - 8.f * s;
        acc = std::fma(zz, q.xs[r * groups + g], acc);
        for (int64_t j = g * per_group; j < (g + 1) * per_group; ++j) {
          int32_t isum = 0;
          for (int64_t c = j * kBlock; c < (j + 1) * kBlock; ++c) {
            const uint8_t byte = base[(c / 8) * 32 + row * 4 + (c % 4)];
            const int32_t code = (c % 8) < 4 ? (byte & 0xF) : (byte >> 4);
            isum += code * q.qx[r * k + c];
          }
          acc = std::fma(s * q.d[r * blocks + j], static_cast<float>(isum), acc);
        }
      }
      y[r * np + n] = c10::BFloat16(acc);
    }
  }
}

#ifdef TOKENMILL_Q8_AVX2

// (s, z - 8 s) of the 8 rows from n0, widened from bf16 pairs in registers.
inline void scales8(const c10::BFloat16* p, __m256& s, __m256& zz) {
  // 8 (s, z) pairs = 16 bf16 = 32 bytes: as uint32, s in the low half, z in the high one
  const __m256i pairs = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
  s = _mm256_castsi256_ps(_mm256_slli_epi32(pairs, 16));
  const __m256 z = _mm256_castsi256_ps(_mm256_and_si256(pairs, _mm256_set1_epi32(static_cast<int>(0xFFFF0000u))));
  zz = _mm256_fnmadd_ps(_mm256_set1_ps(8.f), s, z);
}

inline __m256i broadcast4(const int8_t* p) {
  int32_t v;
  std::memcpy(&v, p, 4);
  return _mm256_set1_epi32(v);
}

// Row block b (8 output rows) for R rows of x from r0: one pass over the block's weights, R int16
// and R float accumulators in registers.
template <int R>
void block_avx2(const uint8_t* packed, const c10::BFloat16* szb, int64_t gstride, const Quantized& q, int64_t r0,
                int64_t k, int64_t np, int64_t group, int64_t b, c10::BFloat16* y) {
  const int64_t groups = k / group, blocks = k / kBlock, per_group = group / kBlock;
  const uint8_t* w = packed + b * (k / 8) * 32;
  const __m256i low4 = _mm256_set1_epi8(0x0F);
  const __m256i ones = _mm256_set1_epi16(1);
  const int8_t* qx = q.qx.data() + r0 * k;
  const float* d = q.d.data() + r0 * blocks;
  const float* xs = q.xs.data() + r0 * groups;
  __m256 acc[R];
#pragma GCC unroll 8
  for (int r = 0; r < R; ++r) acc[r] = _mm256_setzero_ps();
  for (int64_t g = 0; g < groups; ++g) {
    __m256 s, zz;
    scales8(szb + g * gstride, s, zz);
#pragma GCC unroll 8
    for (int r = 0; r < R; ++r) acc[r] = _mm256_fmadd_ps(zz, _mm256_set1_ps(xs[r * groups + g]), acc[r]);
    for (int64_t j = g * per_group; j < (g + 1) * per_group; ++j) {
      __m256i s16[R];
#pragma GCC unroll 8
      for (int r = 0; r < R; ++r) s16[r] = _mm256_setzero_si256();
      const uint8_t* wp = w + j * (kBlock / 8) * 32;
      const int8_t* xp = qx + j * kBlock;
#pragma GCC unroll 1
      for (int o = 0; o < kBlock / 8; ++o, wp += 32, xp += 8) {
        const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(wp));
        const __m256i lo = _mm256_and_si256(v, low4);
        const __m256i hi = _mm256_and_si256(_mm256_srli_epi16(v, 4), low4);
#pragma GCC unroll 8
        for (int r = 0; r < R; ++r) {
          s16[r] = _mm256_add_epi16(s16[r], _mm256_maddubs_epi16(lo, broadcast4(xp + r * k)));
          s16[r] = _mm256_add_epi16(s16[r], _mm256_maddubs_epi16(hi, broadcast4(xp + r * k + 4)));
        }
      }
#pragma GCC unroll 8
      for (int r = 0; r < R; ++r) {
        const __m256 isum = _mm256_cvtepi32_ps(_mm256_madd_epi16(s16[r], ones));
        acc[r] = _mm256_fmadd_ps(_mm256_mul_ps(s, _mm256_set1_ps(d[r * blocks + j])), isum, acc[r]);
      }
    }
  }
#pragma GCC unroll 8
  for (int r = 0; r < R; ++r) {
    // float32 -> bf16, round to nearest even
    alignas(32) float out[8];
    _mm256_store_ps(out, acc[r]);
    for (int i = 0; i < 8; ++i) y[(r0 + r) * np + b * kRows + i] = c10::BFloat16(out[i]);
  }
}

void rows_avx2(const uint8_t* packed, const c10::BFloat16* szb, int64_t gstride, const Quantized& q, int64_t m,
               int64_t k, int64_t np, int64_t group, int64_t b, c10::BFloat16* y) {
  int64_t r = 0;
  for (; r + 4 <= m; r += 4) block_avx2<4>(packed, szb, gstride, q, r, k, np, group, b, y);
  switch (m - r) {
    case 3: block_avx2<3>(packed, szb, gstride, q, r, k, np, group, b, y); break;
    case 2: block_avx2<2>(packed, szb, gstride, q, r, k, np, group, b, y); break;
    case 1: block_avx2<1>(packed, szb, gstride, q, r, k, np, group, b, y); break;
    default: break;
  }
}

#endif

at::Tensor int4_q8_mm(const at::Tensor& x, const at::Tensor& packed, int64_t group, const at::Tensor& scales_zeros,
                      bool scalar) {
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == at::kBFloat16,
              "int4_q8_mm: x must be a 2-d bfloat16 tensor [M, K], got ", x.sizes(), " ", x.scalar_type());
  TORCH_CHECK(group > 0 && group % kBlock == 0, "int4_q8_mm: group must be a positive multiple of 32, got ", group);
  const int64_t m = x.size(0), k = x.size(1);
  TORCH_CHECK(k % group == 0, "int4_q8_mm: K (", k, ") must be a multiple of the group (", group, ")");
  TORCH_CHECK(packed.scalar_type() == at::kByte && packed.dim() == 3 && packed.size(1) == k / 8 && packed.size(2) == 32,
              "int4_q8_mm: packed must be uint8 [Np/8, K/8, 32] with K = ", k, ", got ", packed.sizes(), " ",
              packed.scalar_type());
  const int64_t np = packed.size(0) * kRows;
  // scales_zeros: [K/g, Np, 2] (torch's layout) or tiled [Np/8, K/g, 8, 2] (quant/int4.py: tile_scales)
  const bool tiled = scales_zeros.dim() == 4;
  TORCH_CHECK(scales_zeros.scalar_type() == at::kBFloat16 &&
                  (tiled ? scales_zeros.size(0) == np / kRows && scales_zeros.size(1) == k / group &&
                               scales_zeros.size(2) == kRows && scales_zeros.size(3) == 2
                         : scales_zeros.dim() == 3 && scales_zeros.size(0) == k / group &&
                               scales_zeros.size(1) == np && scales_zeros.size(2) == 2),
              "int4_q8_mm: scales_zeros must be bfloat16 [K/group, Np, 2] = [", k / group, ", ", np, ", 2] or [Np/8, ",
              "K/group, 8, 2] = [", np / kRows, ", ", k / group, ", 8, 2], got ", scales_zeros.sizes(), " ",
              scales_zeros.scalar_type());
  const at::Tensor xc = x.contiguous(), pc = packed.contiguous(), szc = scales_zeros.contiguous();
  at::Tensor y = at::empty({m, np}, x.options());
  if (m == 0) return y;
  const Quantized q = quantize_rows(xc.data_ptr<c10::BFloat16>(), m, k, group);
  const uint8_t* p = pc.data_ptr<uint8_t>();
  const c10::BFloat16* sz = szc.data_ptr<c10::BFloat16>();
  c10::BFloat16* out = y.data_ptr<c10::BFloat16>();
#ifdef TOKENMILL_Q8_AVX2
  const bool vector = !scalar;
#else
  const bool vector = false;
#endif
  const int64_t gstride = tiled ? 2 * kRows : 2 * np;  // row block b's group g: szb + g * gstride
  at::parallel_for(0, np / kRows, 1, [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) {
      const c10::BFloat16* szb = sz + (tiled ? b * (k / group) * kRows * 2 : b * kRows * 2);
#ifdef TOKENMILL_Q8_AVX2
      if (vector) {
        rows_avx2(p, szb, gstride, q, m, k, np, group, b, out);
        continue;
      }
#endif
      block_scalar(p, szb, gstride, q, m, k, np, group, b, out);
    }
  });
  (void)vector;
  return y;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(tokenmill, m) {
  m.def("int4_q8_mm(Tensor x, Tensor packed, int group, Tensor scales_zeros, bool scalar=False) -> Tensor");
}

TORCH_LIBRARY_IMPL(tokenmill, CPU, m) { m.impl("int4_q8_mm", &int4_q8_mm); }

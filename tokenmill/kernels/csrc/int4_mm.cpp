// Packed int4 weight x bf16 activations for CPUs without AVX-512 BF16 (AVX2 + FMA), over torch's
// CPU int4pack layout, so it reads the same packed tensors as aten::_weight_int4pack_mm_for_cpu.
//
// On such CPUs torch's kernel converts bf16 in software and streams ~6-7 GB/s of packed weights
// at batch 1 on two Zen 3 cores (DRAM gives ~26); this one keeps every operand in float32 and
// streams close to the DRAM rate.
//
// Layout (quant/int4.py), tiles of T = 64 rows (AVX-512 builds) or 32 (AVX2): packed uint8 viewed
// [Np/T, K, T/2], byte j of (tile b, column k) holds q[Tb + j, k] in its low nibble and
// q[Tb + T/2 + j, k] in its high one; scales_zeros bf16 is (s, z) per group and row,
// W[n, k] = (q - 8) s + z, either tiled [Np/T, K/g, T, 2] (what Int4Linear stores: a tile's scales
// are one contiguous stream beside its weights: ~7% faster at batch 1 with cold weights than
// torch's [K/g, Np, 2], where a tile's scales lie in K/g pieces Np rows apart; also accepted).
//
// Arithmetic, the same for every row count M (so a row's output does not depend on its batch):
//
//   xs[m, g] = sum over k in g of x[m, k]                          float32, k ascending
//   a        = sum over k in g of q[n, k] x[m, k]                  float32 fma, k ascending, from 0
//   acc      = fma(s, a, fma(z - 8 s, xs[m, g], acc))              groups ascending, acc from 0
//   y[m, n]  = bf16(acc)                                           round to nearest even
//
// Threads split the output into tiles (contiguous in memory). M < 6 widens the weights in registers
// for one or two rows of x at a time, the partial sums in registers; larger M first widens a group
// of a tile to float32 and runs 6 x 16 register blocks over it. `scalar` runs the plain C++ form of
// the same arithmetic (tests compare the two bit for bit).
//
// Schema: tokenmill::int4_mm(Tensor x [M, K] bf16, Tensor packed, int group,
//                            Tensor scales_zeros [Np/T, K/g, T, 2] or [K/g, Np, 2] bf16, int tile,
//                            bool scalar=False) -> [M, Np] bf16

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

#if defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>
#define TOKENMILL_INT4_AVX2 1
#endif

namespace {

inline float bf16_to_float(c10::BFloat16 v) { return static_cast<float>(v); }

// A tile of T rows (T/2 bytes per column): chunk i (0 .. T/16 - 1) of column c is 8 bytes whose
// low nibbles are rows 8i..8i+7 and high nibbles rows T/2 + 8i...
template <int T>
struct Tile {
  static constexpr int kChunks = T / 16;
  static inline const uint8_t* chunk(const uint8_t* tile, int64_t c, int i) { return tile + c * (T / 2) + 8 * i; }
  static constexpr int lo_row(int i) { return 8 * i; }
  static constexpr int hi_row(int i) { return T / 2 + 8 * i; }
};

// xf[m, k] = x as float32; xs[m, g] = sum of its group, k ascending.
void widen_rows(const c10::BFloat16* x, int64_t m, int64_t k, int64_t group, float* xf, float* xs) {
  const int64_t groups = k / group;
  for (int64_t r = 0; r < m; ++r) {
    for (int64_t i = 0; i < k; ++i) xf[r * k + i] = bf16_to_float(x[r * k + i]);
    for (int64_t g = 0; g < groups; ++g) {
      float s = 0.f;
      for (int64_t i = 0; i < group; ++i) s += xf[r * k + g * group + i];
      xs[r * groups + g] = s;
    }
  }
}

// The group's (s, z - 8 s) of the tile's T rows, as float32 (`szt`, `gstride`: as run_tiles sets them).
template <int T>
inline void tile_scales(const c10::BFloat16* szt, int64_t gstride, int64_t g, float* s, float* zz) {
  const c10::BFloat16* p = szt + g * gstride;
  for (int64_t j = 0; j < T; ++j) {
    s[j] = bf16_to_float(p[2 * j]);
    zz[j] = bf16_to_float(p[2 * j + 1]) - 8.f * s[j];
  }
}

inline float combine(float acc, float s, float zz, float a, float xs) {
  return std::fma(s, a, std::fma(zz, xs, acc));
}

// ---- plain C++: the reference form, any M -------------------------------------------------------
template <int T>
void tile_scalar(const uint8_t* tile, const c10::BFloat16* szt, int64_t gstride, int64_t k, int64_t group,
                 const float* xf, const float* xs, int64_t m, float* acc /* [m, T] */) {
  using L = Tile<T>;
  float s[T], zz[T], a[T];
  const int64_t groups = k / group;
  for (int64_t g = 0; g < groups; ++g) {
    tile_scales<T>(szt, gstride, g, s, zz);
    for (int64_t r = 0; r < m; ++r) {
      std::fill(a, a + T, 0.f);
      for (int64_t c = g * group; c < (g + 1) * group; ++c) {
        const float xv = xf[r * k + c];
        for (int i = 0; i < L::kChunks; ++i) {
          const uint8_t* p = L::chunk(tile, c, i);
          for (int j = 0; j < 8; ++j) {
            a[L::lo_row(i) + j] = std::fma(static_cast<float>(p[j] & 0xF), xv, a[L::lo_row(i) + j]);
            a[L::hi_row(i) + j] = std::fma(static_cast<float>(p[j] >> 4), xv, a[L::hi_row(i) + j]);
          }
        }
      }
      for (int64_t j = 0; j < T; ++j) acc[r * T + j] = combine(acc[r * T + j], s[j], zz[j], a[j], xs[r * groups + g]);
    }
  }
}

#ifdef TOKENMILL_INT4_AVX2
// The combine step 8 lanes at a time, same ops as combine(): fma(s, a, fma(z - 8 s, xs, acc)).
inline __m256 combine_v(__m256 acc, __m256 s, __m256 zz, __m256 a, __m256 xs) {
  return _mm256_fmadd_ps(s, a, _mm256_fmadd_ps(zz, xs, acc));
}

// Group partial sums -> acc, the scales from arrays.
inline void combine8(float* acc, const float* s, const float* zz, __m256 a, float xs) {
  const __m256 t = _mm256_loadu_ps(acc);
  _mm256_storeu_ps(acc, combine_v(t, _mm256_loadu_ps(s), _mm256_loadu_ps(zz), a, _mm256_set1_ps(xs)));
}

// Eight bytes -> their low and high nibbles as float.
inline void nibbles8(const uint8_t* p, __m256& lo, __m256& hi) {
  const __m256i v = _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p)));
  lo = _mm256_cvtepi32_ps(_mm256_and_si256(v, _mm256_set1_epi32(0xF)));
  hi = _mm256_cvtepi32_ps(_mm256_srli_epi32(v, 4));
}

// A group's (s, z - 8 s) of rows n0 + 8i .. n0 + 8i + 7 as float32 vectors: 16 interleaved bf16
// are 8 32-bit lanes (s low, z high), so widening is a shift and a mask.
inline void scales8(const c10::BFloat16* p, __m256& s, __m256& zz) {
  const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
  s = _mm256_castsi256_ps(_mm256_slli_epi32(v, 16));
  const __m256 z = _mm256_castsi256_ps(_mm256_and_si256(v, _mm256_set1_epi32(static_cast<int>(0xFFFF0000u))));
  zz = _mm256_sub_ps(z, _mm256_mul_ps(_mm256_set1_ps(8.f), s));  // 8 s is exact: as tile_scales
}

// pshufb masks putting bytes 0..3 (8..11) of each 128-bit lane's copy of 16 bytes into the low
// byte of 32-bit lanes 0..3, and bytes 4..7 (12..15) into lanes 4..7: row j's byte in lane j.
inline __m256i spread_mask(int first) {
  alignas(32) int8_t m[32];
  for (int lane = 0; lane < 2; ++lane)
    for (int d = 0; d < 4; ++d)
      for (int b = 0; b < 4; ++b) m[16 * lane + 4 * d + b] = b == 0 ? static_cast<int8_t>(first + 4 * lane + d) : -128;
  return _mm256_load_si256(reinterpret_cast<const __m256i*>(m));
}

// MR (1 or 2) rows of x, rows r = 0.. at xf + r * k, sums xs + r * groups, output acc + r * T: the
// tile's T group sums of each in T/8 registers (a[r][row / 8]). Per column, each 16 bytes are
// loaded once into both 128-bit lanes and split into low and high nibbles (3 ops for 32 values);
// one pshufb then places 8 rows' values in 32-bit lanes, one convert, and one FMA per x row.
// M = 1 keeps the running totals in registers too; at MR = 2 they are in acc (touched per group).
template <int T, int MR>
void tile_row_avx2(const uint8_t* tile, const c10::BFloat16* szt, int64_t gstride, int64_t k, int64_t group,
                   const float* xf, const float* xs, float* acc) {
  constexpr int kHalves = T / 32;  // 16-byte pieces of a column: bytes 16h.. are rows 16h.. (low) and T/2 + 16h..
  const __m256i first = spread_mask(0), second = spread_mask(8), nib = _mm256_set1_epi8(0x0F);
  const int64_t groups = k / group;
  __m256 total[MR == 1 ? T / 8 : 1];
  if constexpr (MR == 1)
    for (int i = 0; i < T / 8; ++i) total[i] = _mm256_setzero_ps();
  for (int64_t g = 0; g < groups; ++g) {
    __m256 a[MR][T / 8];
    for (int r = 0; r < MR; ++r)
      for (int i = 0; i < T / 8; ++i) a[r][i] = _mm256_setzero_ps();
    for (int64_t c = g * group; c < (g + 1) * group; ++c) {
      __m256 xv[MR];
      for (int r = 0; r < MR; ++r) xv[r] = _mm256_set1_ps(xf[r * k + c]);
      for (int h = 0; h < kHalves; ++h) {
        const __m256i b = _mm256_broadcastsi128_si256(
            _mm_loadu_si128(reinterpret_cast<const __m128i*>(tile + c * (T / 2) + 16 * h)));
        const __m256i lo = _mm256_and_si256(b, nib), hi = _mm256_and_si256(_mm256_srli_epi16(b, 4), nib);
        const int l0 = 2 * h, h0 = T / 16 + 2 * h;  // a[] index of rows 16h and T/2 + 16h
        const __m256 w[4] = {_mm256_cvtepi32_ps(_mm256_shuffle_epi8(lo, first)),
                             _mm256_cvtepi32_ps(_mm256_shuffle_epi8(lo, second)),
                             _mm256_cvtepi32_ps(_mm256_shuffle_epi8(hi, first)),
                             _mm256_cvtepi32_ps(_mm256_shuffle_epi8(hi, second))};
        for (int r = 0; r < MR; ++r) {
          a[r][l0] = _mm256_fmadd_ps(w[0], xv[r], a[r][l0]);
          a[r][l0 + 1] = _mm256_fmadd_ps(w[1], xv[r], a[r][l0 + 1]);
          a[r][h0] = _mm256_fmadd_ps(w[2], xv[r], a[r][h0]);
          a[r][h0 + 1] = _mm256_fmadd_ps(w[3], xv[r], a[r][h0 + 1]);
        }
      }
    }
    const c10::BFloat16* p = szt + g * gstride;
    for (int i = 0; i < T / 8; ++i) {
      __m256 s, zz;
      scales8(p + 16 * i, s, zz);
      for (int r = 0; r < MR; ++r) {
        const __m256 xsv = _mm256_set1_ps(xs[r * groups + g]);
        if constexpr (MR == 1) {
          total[i] = combine_v(total[i], s, zz, a[r][i], xsv);
        } else {
          float* t = acc + r * T + 8 * i;
          _mm256_storeu_ps(t, combine_v(_mm256_loadu_ps(t), s, zz, a[r][i], xsv));
        }
      }
    }
  }
  if constexpr (MR == 1)
    for (int i = 0; i < T / 8; ++i) _mm256_storeu_ps(acc + 8 * i, total[i]);
}

// MR rows of x against rows j0..j0+15 of a tile's group widened to float, wq[c][T].
template <int T, int MR>
inline void rows_avx2(const float* wq, int64_t group, int64_t j0, const float* xf, int64_t k, int64_t c0,
                      const float* s, const float* zz, const float* xs, int64_t groups, int64_t g, float* acc) {
  __m256 a[MR][2];
  for (int r = 0; r < MR; ++r) a[r][0] = a[r][1] = _mm256_setzero_ps();
  for (int64_t c = 0; c < group; ++c) {
    const __m256 w0 = _mm256_loadu_ps(wq + c * T + j0), w1 = _mm256_loadu_ps(wq + c * T + j0 + 8);
    for (int r = 0; r < MR; ++r) {
      const __m256 xv = _mm256_broadcast_ss(xf + r * k + c0 + c);
      a[r][0] = _mm256_fmadd_ps(w0, xv, a[r][0]);
      a[r][1] = _mm256_fmadd_ps(w1, xv, a[r][1]);
    }
  }
  for (int r = 0; r < MR; ++r) {
    combine8(acc + r * T + j0, s + j0, zz + j0, a[r][0], xs[r * groups + g]);
    combine8(acc + r * T + j0 + 8, s + j0 + 8, zz + j0 + 8, a[r][1], xs[r * groups + g]);
  }
}

// M >= kBlockedRows: each group of the tile widened to float once, then 6 x 16 blocks of x rows x tile rows
// (12 accumulators: FMA latency hidden), a 4 x 16 block and single rows for the rest.
template <int T>
void tile_rows_avx2(const uint8_t* tile, const c10::BFloat16* szt, int64_t gstride, int64_t k, int64_t group,
                    const float* xf, const float* xs, int64_t m, float* acc) {
  using L = Tile<T>;
  alignas(32) float wq[128 * T];  // [c][T]: q as float, one group (group <= 128)
  float s[T], zz[T];
  const int64_t groups = k / group;
  for (int64_t g = 0; g < groups; ++g) {
    tile_scales<T>(szt, gstride, g, s, zz);
    for (int64_t c = 0; c < group; ++c) {
      float* w = wq + c * T;
      for (int i = 0; i < L::kChunks; ++i) {
        __m256 lo, hi;
        nibbles8(L::chunk(tile, g * group + c, i), lo, hi);
        _mm256_store_ps(w + L::lo_row(i), lo);
        _mm256_store_ps(w + L::hi_row(i), hi);
      }
    }
    int64_t r = 0;
    for (; r + 6 <= m; r += 6)
      for (int64_t j0 = 0; j0 < T; j0 += 16)
        rows_avx2<T, 6>(wq, group, j0, xf + r * k, k, g * group, s, zz, xs + r * groups, groups, g, acc + r * T);
    for (; r + 4 <= m; r += 4)
      for (int64_t j0 = 0; j0 < T; j0 += 16)
        rows_avx2<T, 4>(wq, group, j0, xf + r * k, k, g * group, s, zz, xs + r * groups, groups, g, acc + r * T);
    for (; r < m; ++r)
      for (int64_t j0 = 0; j0 < T; j0 += 16)
        rows_avx2<T, 1>(wq, group, j0, xf + r * k, k, g * group, s, zz, xs + r * groups, groups, g, acc + r * T);
  }
}
#endif

// From this many x rows on, a group of a tile is widened to float once for the 6 x 16 blocks; below,
// pairs of rows widen it in registers each (on Zen 3: M = 2 ~2x, 4 ~1.4x faster that way).
constexpr int64_t kBlockedRows = 6;

template <int T>
void run_tiles(bool scalar, const uint8_t* w, const c10::BFloat16* sz, bool tiled, int64_t np, int64_t k, int64_t group,
               const float* xf, const float* xs, int64_t m, c10::BFloat16* out) {
  at::parallel_for(0, np / T, 1, [&](int64_t t0, int64_t t1) {
    std::vector<float> acc(m * T);
    for (int64_t t = t0; t < t1; ++t) {
      std::fill(acc.begin(), acc.end(), 0.f);
      const uint8_t* tile = w + t * k * (T / 2);
      const int64_t n0 = t * T;
      // this tile's scales: group g's T (s, z) pairs at szt + g * gstride, in either layout
      const int64_t groups = k / group, gstride = tiled ? 2 * T : 2 * np;
      const c10::BFloat16* szt = sz + (tiled ? t * groups * T * 2 : n0 * 2);
#ifdef TOKENMILL_INT4_AVX2
      if (!scalar && m < kBlockedRows) {  // pairs of x rows (and a last single one), weights widened in registers
        for (int64_t r = 0; r < m; r += 2) {
          if (r + 1 < m)
            tile_row_avx2<T, 2>(tile, szt, gstride, k, group, xf + r * k, xs + r * groups, acc.data() + r * T);
          else
            tile_row_avx2<T, 1>(tile, szt, gstride, k, group, xf + r * k, xs + r * groups, acc.data() + r * T);
        }
      } else if (!scalar)
        tile_rows_avx2<T>(tile, szt, gstride, k, group, xf, xs, m, acc.data());
      else
#endif
        tile_scalar<T>(tile, szt, gstride, k, group, xf, xs, m, acc.data());
      for (int64_t r = 0; r < m; ++r)
        for (int64_t j = 0; j < T; ++j) out[r * np + n0 + j] = c10::BFloat16(acc[r * T + j]);
    }
  });
}

at::Tensor int4_mm(const at::Tensor& x_in, const at::Tensor& packed, int64_t group, const at::Tensor& scales_zeros,
                   int64_t tile, bool scalar) {
  TORCH_CHECK(x_in.dim() == 2 && x_in.scalar_type() == at::kBFloat16, "int4_mm: x must be [M, K] bfloat16, got ",
              x_in.sizes(), " ", x_in.scalar_type());
  TORCH_CHECK(group == 32 || group == 64 || group == 128, "int4_mm: group ", group, ": accepted 32, 64, 128");
  TORCH_CHECK(tile == 32 || tile == 64, "int4_mm: tile ", tile, ": accepted 32, 64 rows");
  // scales_zeros: [K/g, Np, 2] (torch's layout) or tiled [Np/T, K/g, T, 2] (quant/int4.py: tile_scales)
  const bool tiled = scales_zeros.dim() == 4;
  TORCH_CHECK((scales_zeros.dim() == 3 || (tiled && scales_zeros.size(2) == tile)) && scales_zeros.size(-1) == 2 &&
                  scales_zeros.scalar_type() == at::kBFloat16,
              "int4_mm: scales_zeros must be bfloat16 [K/group, Np, 2] or [Np/", tile, ", K/group, ", tile,
              ", 2], got ", scales_zeros.sizes(), " ", scales_zeros.scalar_type());
  const at::Tensor x = x_in.contiguous(), sz_t = scales_zeros.contiguous();
  const int64_t m = x.size(0), k = x.size(1), groups = k / group;
  const int64_t np = tiled ? sz_t.size(0) * tile : sz_t.size(1), sz_groups = sz_t.size(tiled ? 1 : 0);
  TORCH_CHECK(k % group == 0 && sz_groups == groups, "int4_mm: K = ", k, " must be ", sz_groups, " groups of ",
              group);
  TORCH_CHECK(np % tile == 0 && packed.scalar_type() == at::kByte && packed.is_contiguous() &&
                  packed.numel() == np * k / 2,
              "int4_mm: packed must be contiguous uint8 holding ", np, " x ", k, " nibbles (CPU int4pack layout)");
  at::Tensor y = at::empty({m, np}, x.options());
  if (m == 0) return y;
  std::vector<float> xf(m * k), xs(m * groups);
  widen_rows(x.data_ptr<c10::BFloat16>(), m, k, group, xf.data(), xs.data());
  const uint8_t* w = packed.data_ptr<uint8_t>();
  const c10::BFloat16* sz = sz_t.data_ptr<c10::BFloat16>();
  c10::BFloat16* out = y.data_ptr<c10::BFloat16>();
  if (tile == 64)
    run_tiles<64>(scalar, w, sz, tiled, np, k, group, xf.data(), xs.data(), m, out);
  else
    run_tiles<32>(scalar, w, sz, tiled, np, k, group, xf.data(), xs.data(), m, out);
  return y;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(tokenmill, m) {
  m.def("int4_mm(Tensor x, Tensor packed, int group, Tensor scales_zeros, int tile, bool scalar=False) -> Tensor");
}

TORCH_LIBRARY_IMPL(tokenmill, CPU, m) { m.impl("int4_mm", &int4_mm); }

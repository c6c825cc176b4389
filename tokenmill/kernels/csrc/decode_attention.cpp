// Paged decode attention on the CPU: the fast path of attention/paged.py's `_decode_attention`.
//
// One query token per request attends over that request's first ctx_len cached tokens, which
// live in the KV pool's fixed-size blocks named by its block table:
//
//     cache [num_blocks, block_size, Hkv, D]      token t of request b sits in row
//           table[b][t / block_size] * block_size + t % block_size
//
// The torch reference gathers every block of the padded table into a dense copy, then runs two
// batched matmuls and a softmax (~10 kernel launches and two copies per layer). Here one call
// streams the rows twice (K, then V), in tiles of L tokens (16; 8 on AVX2); the G query heads that share a KV
// head (GQA) are computed together, so each row is read and widened to float32 once:
//
//   1. scores   per tile: widen the 16 K rows into a small buffer, tile [16, KV heads, Dp]; for
//               each query head, 16 products q * k_t summed over the row's 16-lane slices are
//               kept as 16 vectors, then folded into one vector of the 16 dot products
//               (`sum_lanes`): a few shuffles per 16 tokens, not a horizontal sum per token.
//   2. softmax  per query head over the context (max, exp, sum), 16 lanes at a time.
//   3. values   per tile: up to 4 query heads keep their output rows in registers while each V
//               row, widened 64 values at a time, is added as p_t * v_t (`accumulate_values`).
//
// Dp is D rounded up to 16 (query and output rows are zero-padded to it). Arithmetic is float32,
// as in the reference, but sums run in another order; the output is cast to q's dtype.
//
// Work items: one request, or, when there are fewer requests than threads and the context is
// long, (request, part of its context), so one long request still uses every core (flash-decoding):
// each part runs the three passes over its own range of tiles, keeping per query head its max
// score m_p, its sum of exponentials l_p = sum exp(s_t - m_p) and its unnormalized output row
// o_p = sum exp(s_t - m_p) v_t; then the parts of a head are merged with m = max_p m_p:
//     out = sum_p exp(m_p - m) o_p / sum_p exp(m_p - m) l_p
// (an empty part: m_p = -inf, l_p = 0, o_p = 0, weight 0).
//
// Quantized pools (quant/kv.py: int8 or fp8 codes [blocks, block_size, Hkv, D] with a bf16 scale
// per token and KV head) are read the same way: the codes are widened as they are, and each
// token's scale multiplies its score (K) or its probability (V), never the D values of its row:
// no dequantized copy of the context is made.
//
// The vectors are GCC/Clang vector extensions (L floats: one AVX-512 or AVX2 register, four NEON
// ones), so one code path serves every CPU that `-march=native` builds for; buffers are
// aligned to 64 bytes (`Floats`).
//
// Schemas (registered below; the fakes for torch.compile are in kernels/cpu.py):
//   tokenmill::paged_decode_attention(Tensor q [B, H, D], Tensor k_cache, Tensor v_cache,
//       Tensor block_tables [B, W] int64, Tensor ctx_lens [B] int64, float scale) -> [B, H, D]
//   tokenmill::paged_decode_attention_quantized(Tensor q, Tensor k_codes, Tensor k_scale,
//       Tensor v_codes, Tensor v_scale, Tensor block_tables, Tensor ctx_lens, float scale)

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <numeric>
#include <vector>

namespace {

// Floats per Vec, and tokens per tile: one register's worth. 16 where the CPU has AVX-512 (or
// builds without AVX); 8 on AVX2 CPUs, where 16-float vectors are register pairs and the tile's
// 16 accumulators of `score_tile` (and 4 heads x 4 vectors of `accumulate_values`) would not
// fit the 16 registers: at 8, one request over 2k tokens of context (9 heads, 3 KV heads, bf16) took
// 163 us instead of 581 on two Zen 3 cores.
#if defined(__AVX2__) && !defined(__AVX512F__)
constexpr int64_t L = 8;
#else
constexpr int64_t L = 16;
#endif
typedef float Vec __attribute__((vector_size(L * sizeof(float))));
typedef int32_t VecIndex __attribute__((vector_size(L * sizeof(int32_t))));

inline Vec load(const float* p) {  // unaligned; memcpy is the portable spelling of one vector load
  Vec v;
  std::memcpy(&v, p, sizeof v);
  return v;
}
inline void store(float* p, Vec v) { std::memcpy(p, &v, sizeof v); }

#if defined(__clang__)
#define TM_SHUFFLE(a, b, ...) __builtin_shufflevector(a, b, __VA_ARGS__)
#else
#define TM_SHUFFLE(a, b, ...) __builtin_shuffle(a, b, VecIndex{__VA_ARGS__})
#endif

// Fold a and b to half their width each and pack them: chunks of w lanes, a's even chunks beside
// b's plus a's odd chunks beside b's (lane indices L.. are b's):
//     L = 16, w = 4:  [a0-3 b0-3 a8-11 b8-11] + [a4-7 b4-7 a12-15 b12-15]
// Lane i of `sum_lanes`'s result = the sum of the L lanes of v[i]. Rounds pair vector i with vector
// i + n/2 of the n left: for L = 16, after round one vector i holds 8-lane partial sums of tokens
// i and i + 8; after two, 4-lane ones of i, i + 4, i + 8, i + 12; ... and after four, the 16 sums
// in order (15 adds and 30 shuffles for 16 dot products). L = 8 is the same from the second round.
#if defined(__AVX2__) && !defined(__AVX512F__)
inline Vec fold4(Vec a, Vec b) {
  return TM_SHUFFLE(a, b, 0, 1, 2, 3, 8, 9, 10, 11) + TM_SHUFFLE(a, b, 4, 5, 6, 7, 12, 13, 14, 15);
}
inline Vec fold2(Vec a, Vec b) {
  return TM_SHUFFLE(a, b, 0, 1, 8, 9, 4, 5, 12, 13) + TM_SHUFFLE(a, b, 2, 3, 10, 11, 6, 7, 14, 15);
}
inline Vec fold1(Vec a, Vec b) {
  return TM_SHUFFLE(a, b, 0, 8, 2, 10, 4, 12, 6, 14) + TM_SHUFFLE(a, b, 1, 9, 3, 11, 5, 13, 7, 15);
}
inline Vec sum_lanes(const Vec v[L]) {
  Vec a[4], b[2];
  for (int i = 0; i < 4; ++i) a[i] = fold4(v[i], v[i + 4]);
  for (int i = 0; i < 2; ++i) b[i] = fold2(a[i], a[i + 2]);
  return fold1(b[0], b[1]);
}
#else
inline Vec fold8(Vec a, Vec b) {
  return TM_SHUFFLE(a, b, 0, 1, 2, 3, 4, 5, 6, 7, 16, 17, 18, 19, 20, 21, 22, 23) +
         TM_SHUFFLE(a, b, 8, 9, 10, 11, 12, 13, 14, 15, 24, 25, 26, 27, 28, 29, 30, 31);
}
inline Vec fold4(Vec a, Vec b) {
  return TM_SHUFFLE(a, b, 0, 1, 2, 3, 16, 17, 18, 19, 8, 9, 10, 11, 24, 25, 26, 27) +
         TM_SHUFFLE(a, b, 4, 5, 6, 7, 20, 21, 22, 23, 12, 13, 14, 15, 28, 29, 30, 31);
}
inline Vec fold2(Vec a, Vec b) {
  return TM_SHUFFLE(a, b, 0, 1, 16, 17, 4, 5, 20, 21, 8, 9, 24, 25, 12, 13, 28, 29) +
         TM_SHUFFLE(a, b, 2, 3, 18, 19, 6, 7, 22, 23, 10, 11, 26, 27, 14, 15, 30, 31);
}
inline Vec fold1(Vec a, Vec b) {
  return TM_SHUFFLE(a, b, 0, 16, 2, 18, 4, 20, 6, 22, 8, 24, 10, 26, 12, 28, 14, 30) +
         TM_SHUFFLE(a, b, 1, 17, 3, 19, 5, 21, 7, 23, 9, 25, 11, 27, 13, 29, 15, 31);
}
inline Vec sum_lanes(const Vec v[L]) {
  Vec a[8], b[4];
  for (int i = 0; i < 8; ++i) a[i] = fold8(v[i], v[i + 8]);
  for (int i = 0; i < 4; ++i) b[i] = fold4(a[i], a[i + 4]);
  return fold1(fold2(b[0], b[2]), fold2(b[1], b[3]));
}
#endif

inline Vec vec_max(Vec a, Vec b) { return a > b ? a : b; }  // b where either is NaN
inline float reduce_max(Vec v) {
  float m = v[0];
  for (int i = 1; i < L; ++i) m = std::max(m, v[i]);
  return m;
}
inline float reduce_sum(Vec v) {
  float s = 0.f;
  for (int i = 0; i < L; ++i) s += v[i];
  return s;
}

// exp(x) per lane, within 1 ulp of exp (checked over [-87.3, 1]), 0 below -87.3 (where float32
// leaves the normal range):
//     x = n ln2 + r, n = round(x / ln2), |r| <= ln2 / 2;  exp(x) = 2^n exp(r)
// with exp(r) its Taylor polynomial to r^7 (truncation error < 2e-8 relative) and 2^n built in
// the exponent bits. Vectorizes, where std::exp is a scalar call (glibc's vector exp needs
// -ffast-math).
inline Vec vec_exp(Vec x) {
  const Vec hi = Vec{} + 88.3f, lo = Vec{} - 87.3f;
  const Vec xc = x > hi ? hi : (x < lo ? lo : x);  // NaN passes through
  const Vec round = Vec{} + 12582912.f;            // 1.5 * 2^23: adding it rounds to an integer
  const Vec n = (xc * 1.44269504f + round) - round;  // 1 / ln2
  const Vec r = (xc - n * 0.693145752f) - n * 1.42860682e-6f;  // ln2 in two parts: n * ln2 exact
  Vec p = Vec{} + 1.f / 5040.f;
  p = p * r + 1.f / 720.f;
  p = p * r + 1.f / 120.f;
  p = p * r + 1.f / 24.f;
  p = p * r + 1.f / 6.f;
  p = p * r + 0.5f;
  p = p * r + 1.f;
  p = p * r + 1.f;
  const VecIndex bits = (__builtin_convertvector(n, VecIndex) + 127) << 23;  // 2^n, n in [-126, 127]
  Vec two_n;
  std::memcpy(&two_n, &bits, sizeof two_n);
  const Vec e = p * two_n;
  return x < lo ? Vec{} : e;
}

// One pool value as float32, written with integer and float operations only, so that the loop
// in `widen` vectorizes for every type (c10's casts are scalar code for bf16, fp16 and fp8).
inline float to_float(float x) { return x; }
inline float to_float(double x) { return static_cast<float>(x); }
inline float to_float(int8_t x) { return static_cast<float>(x); }
inline float from_bits(uint32_t bits) {
  float f;
  std::memcpy(&f, &bits, sizeof f);
  return f;
}
inline float to_float(c10::BFloat16 x) { return from_bits(static_cast<uint32_t>(x.x) << 16); }  // a float's top half
// fp16 s.eeeee.mmmmmmmmmm and e4m3fn s.eeee.mmm: the exponent and mantissa bits moved to the low
// exponent and top mantissa bits of a float32 read as 2^(e - 127) * 1.m (the subnormal 2^-126 * 0.m
// where e = 0, as the small format's own subnormals); times 2^(127 - bias) that is the value.
inline float to_float(c10::Half x) {
  const uint32_t h = x.x, em = h & 0x7fff;
  const float f = from_bits(((h & 0x8000) << 16) | (em << 13)) * 0x1p112f;
  return em >= 0x7c00 ? from_bits(((h & 0x8000) << 16) | 0x7f800000 | ((h & 0x3ff) << 13)) : f;  // inf, NaN
}
inline float to_float(c10::Float8_e4m3fn x) {
  const uint32_t c = x.x, em = c & 0x7f;
  const float f = from_bits(((c & 0x80) << 24) | (em << 20)) * 0x1p120f;
  return em == 0x7f ? from_bits(((c & 0x80) << 24) | 0x7fc00000) : f;  // no infinities; s.1111.111 is NaN
}

// Widen n pool values to float32.
template <typename T>
inline void widen(const T* src, float* dst, int64_t n) {
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) dst[i] = to_float(src[i]);
}

// A pool's rows: where the D values of (slot, kv head) start (the heads of a slot are adjacent),
// and the factor that makes them real values (1 for a plain pool; applied per token by the caller).
template <typename T>
struct PlainRows {
  using Value = T;
  static constexpr bool kScaled = false;
  const T* data;
  int64_t hkv, d;
  const T* at(int64_t slot, int64_t head) const { return data + (slot * hkv + head) * d; }
  float factor(int64_t, int64_t) const { return 1.f; }
};

template <typename C>
struct QuantizedRows {  // codes * the bf16 scale of their (slot, kv head)
  using Value = C;
  static constexpr bool kScaled = true;
  const C* codes;
  const c10::BFloat16* scale;
  int64_t hkv, d;
  const C* at(int64_t slot, int64_t head) const { return codes + (slot * hkv + head) * d; }
  float factor(int64_t slot, int64_t head) const { return static_cast<float>(scale[slot * hkv + head]); }
};

struct Shape {
  int64_t H, Hkv, D, block_size, width;
};

// What one work item reads: all nkv KV heads of one request's rows, of D values, which its
// float32 buffers hold padded to Dp (a multiple of L; the padding lanes stay zero).
struct Item {
  int64_t nkv, D, Dp;
};

// Tokens [t0, t0 + n), n <= L, of one request: where their rows start, rows [nkv, L], and for a
// quantized pool their scales, factor [nkv, L].
template <typename Rows>
void gather_tile(const Rows& pool, const int64_t* table, int64_t block_size, const Item& it, int64_t t0,
                 int64_t n, const typename Rows::Value** rows, float* factor) {
  int64_t blk = t0 / block_size, off = t0 % block_size;  // walk the table, no division per token
  for (int64_t t = 0; t < n; ++t) {
    const int64_t slot = table[blk] * block_size + off;
    for (int64_t j = 0; j < it.nkv; ++j) {
      rows[j * L + t] = pool.at(slot, j);
      if constexpr (Rows::kScaled) factor[j * L + t] = pool.factor(slot, j);
    }
    if (++off == block_size) off = 0, ++blk;
  }
}

// Values [c, c + W) of a row of D values, widened into v, zero past D.
template <int64_t W, typename T>
inline void widen_slice(const T* row, int64_t c, int64_t D, float* v) {
  if (c + W <= D) {
    widen(row + c, v, W);  // a constant count: one straight vector loop
  } else {
    widen(row + c, v, D - c);
    for (int64_t i = D - c; i < W; ++i) v[i] = 0.f;
  }
}

// The tile's K rows widened to float32 once for all G heads that read them: tile [L, nkv, Dp]
// (the padding lanes past D stay zero; rows n.. keep stale values, whose scores are never read).
template <typename T>
void widen_tile(const T* const* rows, int64_t n, const Item& it, float* tile) {
  for (int64_t t = 0; t < n; ++t) {
    float* dst = tile + t * it.nkv * it.Dp;
    if (it.Dp == it.D) {  // the item's heads are adjacent in a pool row: one go
      widen(rows[t], dst, it.nkv * it.D);
    } else {
      for (int64_t j = 0; j < it.nkv; ++j) widen(rows[j * L + t], dst + j * it.Dp, it.D);
    }
  }
}

// scores[g, 0:16] = (q_g . k_t) * mult for the 16 tokens of a tile and G query heads q [G, Dp],
// k_t = kt[t * row:]. Per head: 16 accumulators part[t] gather q_g * k_t over the row's 16-lane
// slices, then `sum_lanes` folds them into one vector of the 16 dot products.
inline void score_tile(const float* q, const float* kt, int64_t row, int64_t G, int64_t Dp, Vec mult,
                       float* scores, int64_t scores_stride) {
  for (int64_t g = 0; g < G; ++g) {
    const float* qg = q + g * Dp;
    Vec part[L] = {};
    for (int64_t c = 0; c < Dp; c += L) {
      const Vec qc = load(qg + c);
      for (int64_t t = 0; t < L; ++t) part[t] += qc * load(kt + t * row + c);
    }
    store(scores + g * scores_stride, sum_lanes(part) * mult);
  }
}

// acc[g, :] += sum_t w[g, t] * v_t for t < n and NG query heads, v_t = rows[t] (w rows
// `w_stride` apart, acc [NG, Dp]). The NG x 4 vectors of 64 output lanes stay in registers over
// the tile's tokens, each slice of v_t widened once for the NG heads; a last 16 lanes likewise.
template <int NG, typename T>
void accumulate_values(const T* const* rows, int64_t n, int64_t D, int64_t Dp, const float* w,
                       int64_t w_stride, float* acc) {
  int64_t c = 0;
  for (; c + 4 * L <= Dp; c += 4 * L) {
    Vec a[NG][4];
    for (int g = 0; g < NG; ++g)
      for (int i = 0; i < 4; ++i) a[g][i] = load(acc + g * Dp + c + i * L);
    for (int64_t t = 0; t < n; ++t) {
      alignas(64) float v[4 * L];
      widen_slice<4 * L>(rows[t], c, D, v);
      const Vec v0 = load(v), v1 = load(v + L), v2 = load(v + 2 * L), v3 = load(v + 3 * L);
      for (int g = 0; g < NG; ++g) {
        const float p = w[g * w_stride + t];
        a[g][0] += p * v0, a[g][1] += p * v1, a[g][2] += p * v2, a[g][3] += p * v3;
      }
    }
    for (int g = 0; g < NG; ++g)
      for (int i = 0; i < 4; ++i) store(acc + g * Dp + c + i * L, a[g][i]);
  }
  for (; c < Dp; c += L) {
    Vec a[NG];
    for (int g = 0; g < NG; ++g) a[g] = load(acc + g * Dp + c);
    for (int64_t t = 0; t < n; ++t) {
      alignas(64) float v[L];
      widen_slice<L>(rows[t], c, D, v);
      const Vec v0 = load(v);
      for (int g = 0; g < NG; ++g) a[g] += w[g * w_stride + t] * v0;
    }
    for (int g = 0; g < NG; ++g) store(acc + g * Dp + c, a[g]);
  }
}

// n floats (a multiple of L) aligned like a Vec, so that rows starting at multiples of L floats
// never straddle two cache lines (a vector load or store across two costs about double).
class Floats {
 public:
  void assign(int64_t n, float x) { v_.assign(n / L, Vec{} + x); }
  void resize(int64_t n) { v_.resize(n / L); }
  int64_t size() const { return static_cast<int64_t>(v_.size()) * L; }
  float* data() { return reinterpret_cast<float*>(v_.data()); }
  float& operator[](int64_t i) { return data()[i]; }

 private:
  std::vector<Vec> v_;  // std::allocator honours Vec's 64-byte alignment (C++17)
};

// Per-thread buffers, reused across work items; nh = nkv * G = H query heads.
struct Scratch {
  Floats q;       // [nh, Dp]        the query heads, zero past D
  Floats scores;  // [nh, len_pad]   scores, then probabilities (len_pad: the range rounded up to L)
  Floats tile;    // [L, nkv, Dp]    a tile of K rows as float32, zero past D
  Floats factor;  // [nkv, L]        a tile's scales (quantized pools)
  Floats w;       // [nh, L]         a tile's probabilities times its V scales (quantized pools)
  Floats acc;     // [nh, Dp]        the unnormalized output rows o_h = sum_t exp(s_t - top_h) v_t
  std::vector<float> top;  // [nh]   each head's max score over the range
  std::vector<float> sum;  // [nh]   each head's sum of exp(s_t - top_h)
};

// Request q [H, D], tokens [t_begin, t_end) (t_end > t_begin) of its context: the three passes of
// the header above, leaving b.acc, b.top and b.sum (the output is b.acc[h] / b.sum[h]).
template <typename T, typename Rows>
void attend(const T* q, const Rows& kc, const Rows& vc, const int64_t* table, int64_t t_begin, int64_t t_end,
            const Shape& s, float scale, Scratch& b) {
  const int64_t G = s.H / s.Hkv, D = s.D, Dp = (D + L - 1) / L * L;
  const Item it{s.Hkv, D, Dp};
  const int64_t nh = s.H, len = t_end - t_begin, len_pad = (len + L - 1) / L * L;
  b.q.assign(nh * Dp, 0.f);
  b.scores.resize(nh * len_pad);
  if (b.tile.size() != L * it.nkv * Dp) b.tile.assign(L * it.nkv * Dp, 0.f);
  b.factor.assign(it.nkv * L, 0.f);
  b.w.resize(nh * L);
  b.acc.assign(nh * Dp, 0.f);
  b.top.resize(nh);
  b.sum.resize(nh);
  std::vector<const typename Rows::Value*> rows(it.nkv * L);  // [nkv, L] a tile's rows
  for (int64_t h = 0; h < nh; ++h) widen(q + h * D, b.q.data() + h * Dp, D);

  // 1. scores[h, i] = q_h . k_t * scale (* the K scale of t), t = t_begin + i, 16 tokens at a time
  for (int64_t i0 = 0; i0 < len; i0 += L) {
    const int64_t n = std::min(L, len - i0);
    gather_tile(kc, table, s.block_size, it, t_begin + i0, n, rows.data(), b.factor.data());
    widen_tile(rows.data(), n, it, b.tile.data());
    for (int64_t j = 0; j < it.nkv; ++j) {
      const Vec mult = Rows::kScaled ? load(b.factor.data() + j * L) * scale : Vec{} + scale;
      score_tile(b.q.data() + j * G * Dp, b.tile.data() + j * Dp, it.nkv * Dp, G, Dp, mult,
                 b.scores.data() + j * G * len_pad + i0, len_pad);
    }
  }

  // 2. softmax over the range, per query head (left unnormalized: the caller divides by the sum);
  //    lanes len.. of the last tile: -inf, so their exp is 0
  for (int64_t h = 0; h < nh; ++h) {
    float* sh = b.scores.data() + h * len_pad;
    for (int64_t i = len; i < len_pad; ++i) sh[i] = -INFINITY;
    Vec m = load(sh);
    for (int64_t i = L; i < len_pad; i += L) m = vec_max(m, load(sh + i));
    const float top = reduce_max(m);
    Vec sum{};
    for (int64_t i = 0; i < len_pad; i += L) {
      const Vec p = vec_exp(load(sh + i) - top);
      store(sh + i, p);
      sum += p;
    }
    b.top[h] = top;
    b.sum[h] = reduce_sum(sum);
  }

  // 3. acc[h] = sum_t p[h, t] (* the V scale of t) * v_t, 16 tokens at a time, up to 4 query
  //    heads of a kv head at once (their output rows stay in registers over a tile)
  for (int64_t i0 = 0; i0 < len; i0 += L) {
    const int64_t n = std::min(L, len - i0);
    gather_tile(vc, table, s.block_size, it, t_begin + i0, n, rows.data(), b.factor.data());
    const float* w = b.scores.data() + i0;
    int64_t w_stride = len_pad;
    if constexpr (Rows::kScaled) {  // w[h, t] = p[h, t] * scale_t
      for (int64_t h = 0; h < nh; ++h)
        for (int64_t t = 0; t < n; ++t) b.w[h * L + t] = w[h * len_pad + t] * b.factor[(h / G) * L + t];
      w = b.w.data(), w_stride = L;
    }
    for (int64_t j = 0; j < it.nkv; ++j) {
      const auto* const* rj = rows.data() + j * L;
      for (int64_t g = 0; g < G; g += 4) {
        const int64_t h = j * G + g;
        const float* wh = w + h * w_stride;
        float* ah = b.acc.data() + h * Dp;
        switch (std::min<int64_t>(4, G - g)) {
          case 1: accumulate_values<1>(rj, n, D, Dp, wh, w_stride, ah); break;
          case 2: accumulate_values<2>(rj, n, D, Dp, wh, w_stride, ah); break;
          case 3: accumulate_values<3>(rj, n, D, Dp, wh, w_stride, ah); break;
          default: accumulate_values<4>(rj, n, D, Dp, wh, w_stride, ah); break;
        }
      }
    }
  }
}

// How many parts to split each request's context into: 1 when there are at least as many
// requests as threads; else enough that B * parts is a multiple of the threads (each thread gets
// as many parts, of equal length where the contexts are), but few enough to leave each part at
// least kMinPartWork multiply-adds per pass (at 9 heads x 64 values: 57 tokens, ~1-2 us). Measured
// at 2 threads, 9 x 64: splitting a context of 128 saves ~5%, of 192 ~15%, of 2048 ~33%.
constexpr int64_t kMinPartWork = 1 << 15;
int64_t context_parts(int64_t B, int64_t max_ctx, const Shape& s, int64_t threads) {
  if (B >= threads) return 1;
  const int64_t work = max_ctx * s.H * s.D;  // multiply-adds of one request, per pass
  return std::max<int64_t>(1, std::min(threads / std::gcd(B, threads), work / kMinPartWork));
}

template <typename T, typename Rows>
void decode(const T* q, const Rows& kc, const Rows& vc, const int64_t* tables, const int64_t* lens, T* out,
            int64_t B, int64_t max_ctx, const Shape& s, float scale) {
  const int64_t H = s.H, D = s.D, Dp = (D + L - 1) / L * L;
  const int64_t parts = context_parts(B, max_ctx, s, at::get_num_threads());
  const int64_t items = B * parts;
  const int64_t grain = std::max<int64_t>(1, (1 << 15) / std::max<int64_t>(1, max_ctx * H * D / parts));
  // parts > 1: each item's (m_p, l_p, o_p) per head, merged below: top, sum [B, parts, H], acc [.., Dp]
  std::vector<float> part_top, part_sum, part_acc;
  if (parts > 1) {
    part_top.assign(items * H, -INFINITY);
    part_sum.assign(items * H, 0.f);
    part_acc.assign(items * H * Dp, 0.f);
  }
  at::parallel_for(0, items, grain, [&](int64_t begin, int64_t end) {
    Scratch scratch;
    for (int64_t item = begin; item < end; ++item) {
      const int64_t b = item / parts, part = item % parts, ctx = lens[b];
      const int64_t tiles = (ctx + L - 1) / L;  // part p: tiles [tiles p / parts, tiles (p + 1) / parts)
      const int64_t t_begin = tiles * part / parts * L, t_end = std::min(ctx, tiles * (part + 1) / parts * L);
      if (t_end <= t_begin) continue;
      attend(q + b * H * D, kc, vc, tables + b * s.width, t_begin, t_end, s, scale, scratch);
      if (parts == 1) {
        T* ob = out + b * H * D;
        for (int64_t h = 0; h < H; ++h) {
          const float inv = 1.f / scratch.sum[h];
          for (int64_t d = 0; d < D; ++d) ob[h * D + d] = static_cast<T>(scratch.acc[h * Dp + d] * inv);
        }
      } else {
        std::copy_n(scratch.top.data(), H, part_top.data() + item * H);
        std::copy_n(scratch.sum.data(), H, part_sum.data() + item * H);
        std::copy_n(scratch.acc.data(), H * Dp, part_acc.data() + item * H * Dp);
      }
    }
  });
  if (parts == 1) return;
  // merge: out[b, h] = sum_p exp(m_p - m) o_p / sum_p exp(m_p - m) l_p, m = max_p m_p
  std::vector<float> row(Dp);
  for (int64_t b = 0; b < B; ++b) {
    if (lens[b] <= 0) continue;
    for (int64_t h = 0; h < H; ++h) {
      float m = -INFINITY, l = 0.f;
      for (int64_t p = 0; p < parts; ++p) m = std::max(m, part_top[(b * parts + p) * H + h]);
      std::fill(row.begin(), row.end(), 0.f);
      for (int64_t p = 0; p < parts; ++p) {
        const int64_t i = (b * parts + p) * H + h;
        if (part_sum[i] == 0.f) continue;  // an empty part
        const float w = std::exp(part_top[i] - m);
        l += w * part_sum[i];
        for (int64_t d = 0; d < D; ++d) row[d] += w * part_acc[i * Dp + d];
      }
      for (int64_t d = 0; d < D; ++d) out[(b * H + h) * D + d] = static_cast<T>(row[d] / l);
    }
  }
}

struct Checked {
  at::Tensor q, tables, lens;
  Shape s;
  int64_t max_ctx;
};

// The checks every pool shares; caches: [blocks, block_size, Hkv, D] (codes for a quantized pool).
Checked check_inputs(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
                     const at::Tensor& block_tables, const at::Tensor& ctx_lens) {
  TORCH_CHECK(q.dim() == 3 && k_cache.dim() == 4, "q must be [B, H, D] and the caches [blocks, block_size, Hkv, D]");
  TORCH_CHECK(k_cache.is_contiguous() && v_cache.is_contiguous(), "the KV caches must be contiguous");
  TORCH_CHECK(k_cache.sizes() == v_cache.sizes(), "the K and V caches must have one shape");
  TORCH_CHECK(block_tables.scalar_type() == at::kLong && ctx_lens.scalar_type() == at::kLong,
              "block tables and context lengths must be int64");
  const int64_t B = q.size(0);
  TORCH_CHECK(block_tables.dim() == 2 && block_tables.size(0) == B && ctx_lens.numel() == B,
              "one block table and length per query");
  Checked c{q.contiguous(), block_tables.contiguous(), ctx_lens.contiguous(),
            Shape{q.size(1), k_cache.size(2), q.size(2), k_cache.size(1), block_tables.size(1)}, 1};
  TORCH_CHECK(c.s.H % c.s.Hkv == 0 && k_cache.size(3) == c.s.D, "query heads must be a multiple of the KV heads");
  const int64_t* lp = c.lens.data_ptr<int64_t>();
  for (int64_t b = 0; b < B; ++b) {
    TORCH_CHECK(lp[b] <= c.s.width * c.s.block_size, "context length ", lp[b], " exceeds the block table (",
                c.s.width, " blocks of ", c.s.block_size, ")");
    c.max_ctx = std::max(c.max_ctx, lp[b]);
  }
  return c;
}

at::Tensor paged_decode_attention(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
                                  const at::Tensor& block_tables, const at::Tensor& ctx_lens, double scale) {
  TORCH_CHECK(k_cache.scalar_type() == q.scalar_type() && v_cache.scalar_type() == q.scalar_type(),
              "q and the KV caches must have one dtype");
  const Checked c = check_inputs(q, k_cache, v_cache, block_tables, ctx_lens);
  at::Tensor out = at::zeros_like(c.q);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, q.scalar_type(), "paged_decode_attention", [&] {
    const PlainRows<scalar_t> kr{k_cache.data_ptr<scalar_t>(), c.s.Hkv, c.s.D};
    const PlainRows<scalar_t> vr{v_cache.data_ptr<scalar_t>(), c.s.Hkv, c.s.D};
    decode<scalar_t>(c.q.data_ptr<scalar_t>(), kr, vr, c.tables.data_ptr<int64_t>(), c.lens.data_ptr<int64_t>(),
                     out.data_ptr<scalar_t>(), q.size(0), c.max_ctx, c.s, static_cast<float>(scale));
  });
  return out;
}

at::Tensor paged_decode_attention_quantized(const at::Tensor& q, const at::Tensor& k_codes, const at::Tensor& k_scale,
                                            const at::Tensor& v_codes, const at::Tensor& v_scale,
                                            const at::Tensor& block_tables, const at::Tensor& ctx_lens, double scale) {
  const auto kind = k_codes.scalar_type();
  TORCH_CHECK((kind == at::kChar || kind == at::kFloat8_e4m3fn) && v_codes.scalar_type() == kind,
              "KV codes must be int8 or float8_e4m3fn, one kind for K and V, got ", kind, " and ",
              v_codes.scalar_type());
  const Checked c = check_inputs(q, k_codes, v_codes, block_tables, ctx_lens);
  for (const at::Tensor* sc : {&k_scale, &v_scale}) {
    TORCH_CHECK(sc->scalar_type() == at::kBFloat16 && sc->is_contiguous() &&
                    sc->sizes() == k_codes.sizes().slice(0, 3),
                "KV scales must be contiguous bfloat16 [blocks, block_size, Hkv], got ", sc->scalar_type(), " ",
                sc->sizes());
  }
  at::Tensor out = at::zeros_like(c.q);
  const auto* ks = k_scale.data_ptr<c10::BFloat16>();
  const auto* vs = v_scale.data_ptr<c10::BFloat16>();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, q.scalar_type(), "paged_decode_attention_quantized", [&] {
    auto run = [&](const auto& kr, const auto& vr) {
      decode<scalar_t>(c.q.data_ptr<scalar_t>(), kr, vr, c.tables.data_ptr<int64_t>(),
                       c.lens.data_ptr<int64_t>(), out.data_ptr<scalar_t>(), q.size(0), c.max_ctx, c.s,
                       static_cast<float>(scale));
    };
    if (kind == at::kChar) {
      run(QuantizedRows<int8_t>{k_codes.data_ptr<int8_t>(), ks, c.s.Hkv, c.s.D},
          QuantizedRows<int8_t>{v_codes.data_ptr<int8_t>(), vs, c.s.Hkv, c.s.D});
    } else {
      using F8 = c10::Float8_e4m3fn;
      run(QuantizedRows<F8>{k_codes.data_ptr<F8>(), ks, c.s.Hkv, c.s.D},
          QuantizedRows<F8>{v_codes.data_ptr<F8>(), vs, c.s.Hkv, c.s.D});
    }
  });
  return out;
}

}  // namespace

TORCH_LIBRARY(tokenmill, m) {
  m.def("paged_decode_attention(Tensor q, Tensor k_cache, Tensor v_cache, Tensor block_tables, "
        "Tensor ctx_lens, float scale) -> Tensor");
  m.def("paged_decode_attention_quantized(Tensor q, Tensor k_codes, Tensor k_scale, Tensor v_codes, "
        "Tensor v_scale, Tensor block_tables, Tensor ctx_lens, float scale) -> Tensor");
}

TORCH_LIBRARY_IMPL(tokenmill, CPU, m) {
  m.impl("paged_decode_attention", &paged_decode_attention);
  m.impl("paged_decode_attention_quantized", &paged_decode_attention_quantized);
}

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
// streams the rows once: for each token, one contiguous read of its K row (all KV heads the
// work item owns), the dot products of all H query heads against it (GQA: head h reads kv head
// h / G), then a softmax per head, then one pass over the V rows accumulating p * v.
// Arithmetic is float32, as in the reference; the output is cast to q's dtype.
//
// Work items: one request, or (request, slice of KV heads) when there are fewer requests than
// threads and the context is long, so one long request still uses every core.
//
// Quantized pools (quant/kv.py: int8 or fp8 codes [blocks, block_size, Hkv, D] with a bf16 scale
// per token and KV head) are read the same way, each row widened as codes * scale: no
// dequantized copy of the context is made.
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
#include <vector>

namespace {

template <typename T>
inline void to_float(const T* src, float* dst, int64_t n) {
  for (int64_t i = 0; i < n; ++i) dst[i] = static_cast<float>(src[i]);
}

template <>
inline void to_float<c10::BFloat16>(const c10::BFloat16* src, float* dst, int64_t n) {
  // bf16 is the top half of a float32: widen the bits (vectorizes, unlike the scalar cast)
  const uint16_t* s = reinterpret_cast<const uint16_t*>(src);
  uint32_t* d = reinterpret_cast<uint32_t*>(dst);
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) d[i] = static_cast<uint32_t>(s[i]) << 16;
}

inline float dot(const float* a, const float* b, int64_t n) {
  float s = 0.f;
#pragma omp simd reduction(+ : s)
  for (int64_t i = 0; i < n; ++i) s += a[i] * b[i];
  return s;
}

// A pool's token rows widened to float32: kv heads [kv0, kv0 + n) of the row at `slot`.
template <typename T>
struct PlainRows {
  const T* data;
  int64_t hkv, d;
  void load(int64_t slot, int64_t kv0, int64_t n, float* dst) const {
    to_float(data + (slot * hkv + kv0) * d, dst, n * d);
  }
};

template <typename C>
struct QuantizedRows {  // codes * the bf16 scale of their (slot, kv head)
  const C* codes;
  const c10::BFloat16* scale;
  int64_t hkv, d;
  void load(int64_t slot, int64_t kv0, int64_t n, float* dst) const {
    for (int64_t j = 0; j < n; ++j) {
      const int64_t head = slot * hkv + kv0 + j;
      const float sc = static_cast<float>(scale[head]);
      const C* c = codes + head * d;
      float* o = dst + j * d;
#pragma omp simd
      for (int64_t i = 0; i < d; ++i) o[i] = static_cast<float>(c[i]) * sc;
    }
  }
};

struct Shape {
  int64_t H, Hkv, D, block_size, width;
};

// Request b, kv heads [kv0, kv1) and their query heads. Buffers are the caller's (per thread).
template <typename T, typename Rows>
void attend(const T* q, const Rows& kc, const Rows& vc, const int64_t* table, int64_t ctx, T* out,
            const Shape& s, float scale, int64_t kv0, int64_t kv1, std::vector<float>& qf,
            std::vector<float>& acc, std::vector<float>& row, std::vector<float>& scores) {
  const int64_t G = s.H / s.Hkv, D = s.D;
  const int64_t h0 = kv0 * G, nh = (kv1 - kv0) * G;  // query heads of this item
  const int64_t span = (kv1 - kv0) * D;
  qf.resize(nh * D);
  acc.assign(nh * D, 0.f);
  row.resize(span);
  scores.resize(nh * ctx);
  to_float(q + h0 * D, qf.data(), nh * D);
  auto slot = [&](int64_t t) { return table[t / s.block_size] * s.block_size + t % s.block_size; };
  // scores[h, t] = q_h . k_t * scale
  for (int64_t t = 0; t < ctx; ++t) {
    kc.load(slot(t), kv0, kv1 - kv0, row.data());
    for (int64_t h = 0; h < nh; ++h) scores[h * ctx + t] = dot(qf.data() + h * D, row.data() + (h / G) * D, D) * scale;
  }
  for (int64_t h = 0; h < nh; ++h) {  // softmax over t, per head
    float* sh = scores.data() + h * ctx;
    float m = -INFINITY;
    for (int64_t t = 0; t < ctx; ++t) m = std::max(m, sh[t]);
    float sum = 0.f;
#pragma omp simd reduction(+ : sum)
    for (int64_t t = 0; t < ctx; ++t) {
      sh[t] = std::exp(sh[t] - m);
      sum += sh[t];
    }
    const float inv = 1.f / sum;
    for (int64_t t = 0; t < ctx; ++t) sh[t] *= inv;
  }
  // acc[h] = sum_t p[h, t] * v_t
  for (int64_t t = 0; t < ctx; ++t) {
    vc.load(slot(t), kv0, kv1 - kv0, row.data());
    for (int64_t h = 0; h < nh; ++h) {
      const float p = scores[h * ctx + t];
      const float* v = row.data() + (h / G) * D;
      float* a = acc.data() + h * D;
#pragma omp simd
      for (int64_t d = 0; d < D; ++d) a[d] += p * v[d];
    }
  }
  for (int64_t i = 0; i < nh * D; ++i) out[h0 * D + i] = static_cast<T>(acc[i]);
}

template <typename T, typename Rows>
void decode(const T* q, const Rows& kc, const Rows& vc, const int64_t* tables, const int64_t* lens, T* out,
            int64_t B, int64_t max_ctx, const Shape& s, float scale) {
  const int64_t work = max_ctx * s.H * s.D;  // multiply-adds of one request, per pass
  const int64_t threads = at::get_num_threads();
  // split a request's KV heads over threads only when requests are too few and long enough
  const int64_t splits = (B < threads && work >= (1 << 16)) ? std::min<int64_t>(s.Hkv, threads) : 1;
  const int64_t items = B * splits;
  const int64_t grain = std::max<int64_t>(1, (1 << 15) / std::max<int64_t>(1, work / splits));
  at::parallel_for(0, items, grain, [&](int64_t begin, int64_t end) {
    std::vector<float> qf, acc, row, scores;
    for (int64_t item = begin; item < end; ++item) {
      const int64_t b = item / splits, part = item % splits;
      const int64_t kv0 = s.Hkv * part / splits, kv1 = s.Hkv * (part + 1) / splits;
      if (lens[b] <= 0 || kv0 == kv1) continue;
      attend(q + b * s.H * s.D, kc, vc, tables + b * s.width, lens[b], out + b * s.H * s.D, s, scale, kv0, kv1,
             qf, acc, row, scores);
    }
  });
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

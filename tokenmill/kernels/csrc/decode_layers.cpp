// Every decoder layer of an eager decode step in one call, for the CPU's common case: each
// projection a packed int4 layer of torch's CPU layout (no padding rows, no bias), bfloat16
// activations and KV pools.
//
// model/eager_decode.py runs the same layer as a Python closure of ~13 op calls, each ~1.5-2 us
// of Python and dispatch against kernels of a few us (SmolLM2-135M at batch 1: ~0.6 ms per token
// over 30 layers). Here the loop and the calls are C++ (through the dispatcher: the same kernels,
// in the same order, on the same tensors, so the values are the closures', bit for bit):
//
//   h = rms_norm(x, n1); qkv = int4mm(h, W_qkv)
//   q, k = rope(qkv[:, :(H + Hkv) D]) split at H heads; v = qkv[:, (H + Hkv) D:]
//   k_pool[slots] = k; v_pool[slots] = v (plain copies: write_slots); o = paged_decode_attention(...)
//   x = x + int4mm(o, W_o); g, u = int4mm(rms_norm(x, n2), W_gate_up) halves
//   x = x + int4mm(silu(g) * u, W_down)
//
// int4mm is torch's aten::_weight_int4pack_mm_for_cpu, with int4_tile > 0 (the layout's rows per
// tile) tokenmill::int4_mm (int4_mm.cpp), with int4_tile = -1 (Q8_LAYOUT) tokenmill::int4_q8_mm
// (int8 activations, int4_q8_mm.cpp), as quant/int4.py chooses for the modules.
//
// Schema (registered below; the layer lists hold 2 norms and 4 packed weights per layer):
//   tokenmill::decode_layers_int4(Tensor x [T, hidden] bf16, Tensor[] norms, Tensor[] packed,
//       Tensor[] scales_zeros, Tensor(a!)[] k_caches, Tensor(b!)[] v_caches, Tensor cos, Tensor sin,
//       Tensor slots [T], Tensor block_tables [T, W], Tensor ctx_lens [T], int group, int int4_tile, int heads,
//       int kv_heads, int head_dim, int intermediate, float eps, float scale) -> Tensor [T, hidden]

#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/library.h>

#include <cstring>
#include <vector>

namespace {

using Tensor = at::Tensor;

at::Tensor int4mm(const Tensor& x, const Tensor& packed, int64_t group, const Tensor& scales_zeros, int64_t tile) {
  static const auto own = c10::Dispatcher::singleton()
                              .findSchemaOrThrow("tokenmill::int4_mm", "")
                              .typed<Tensor(const Tensor&, const Tensor&, int64_t, const Tensor&, int64_t, bool)>();
  static const auto q8 = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("tokenmill::int4_q8_mm", "")
                             .typed<Tensor(const Tensor&, const Tensor&, int64_t, const Tensor&, bool)>();
  if (tile > 0) return own.call(x.contiguous(), packed, group, scales_zeros, tile, false);
  if (tile == -1) return q8.call(x.contiguous(), packed, group, scales_zeros, false);
  return at::_weight_int4pack_mm_for_cpu(x.contiguous(), packed, group, scales_zeros);
}

// pool[slots[i]] = rows[i] for each token i: rows [T, Hkv, D] with each row's Hkv * D values
// contiguous (a slice of the step's q/k/v), pool [blocks, block_size, Hkv, D] contiguous. What
// index_copy_ does on the pool viewed [slots, Hkv, D] (a later duplicate slot wins), as plain
// copies: two dispatcher calls and two views fewer per layer.
void write_slots(const Tensor& pool, const Tensor& rows, const int64_t* slots, int64_t t) {
  const int64_t width = rows.size(1) * rows.size(2), n = pool.numel() / width;
  TORCH_CHECK(pool.is_contiguous() && pool.scalar_type() == rows.scalar_type() && rows.stride(2) == 1 &&
                  rows.stride(1) == rows.size(2),
              "decode_layers_int4: KV rows must be contiguous per token and the pool contiguous, of one dtype");
  auto* dst = static_cast<char*>(pool.data_ptr());
  const auto* src = static_cast<const char*>(rows.data_ptr());
  const int64_t bytes = width * rows.element_size(), step = rows.stride(0) * rows.element_size();
  for (int64_t i = 0; i < t; ++i) {
    TORCH_CHECK(slots[i] >= 0 && slots[i] < n, "decode_layers_int4: slot ", slots[i], " outside the pool's ", n);
    std::memcpy(dst + slots[i] * bytes, src + i * step, bytes);
  }
}

Tensor decode_layers_int4(const Tensor& x0, at::TensorList norms, at::TensorList packed, at::TensorList scales_zeros,
                          at::TensorList k_caches, at::TensorList v_caches, const Tensor& cos, const Tensor& sin,
                          const Tensor& slots, const Tensor& block_tables, const Tensor& ctx_lens, int64_t group,
                          int64_t int4_tile, int64_t heads, int64_t kv_heads, int64_t head_dim, int64_t intermediate, double eps,
                          double scale) {
  static const auto rms_norm = c10::Dispatcher::singleton()
                                   .findSchemaOrThrow("tokenmill::rms_norm", "")
                                   .typed<Tensor(const Tensor&, const Tensor&, double)>();
  static const auto rope = c10::Dispatcher::singleton()
                               .findSchemaOrThrow("tokenmill::rope", "")
                               .typed<Tensor(const Tensor&, const Tensor&, const Tensor&)>();
  static const auto attend =
      c10::Dispatcher::singleton()
          .findSchemaOrThrow("tokenmill::paged_decode_attention", "")
          .typed<Tensor(const Tensor&, const Tensor&, const Tensor&, const Tensor&, const Tensor&, double)>();
  const int64_t n = static_cast<int64_t>(k_caches.size());
  TORCH_CHECK(static_cast<int64_t>(v_caches.size()) == n && static_cast<int64_t>(norms.size()) == 2 * n &&
                  static_cast<int64_t>(packed.size()) == 4 * n && static_cast<int64_t>(scales_zeros.size()) == 4 * n,
              "decode_layers_int4: per layer 2 norms, 4 packed weights and their scales, one K and one V pool; got ",
              norms.size(), " norms, ", packed.size(), " weights, ", scales_zeros.size(), " scales, ",
              k_caches.size(), " K and ", v_caches.size(), " V pools");
  TORCH_CHECK(x0.dim() == 2 && x0.scalar_type() == at::kBFloat16, "x must be [T, hidden] bfloat16, got ",
              x0.sizes(), " ", x0.scalar_type());
  const int64_t t = x0.size(0), qk = (heads + kv_heads) * head_dim;
  TORCH_CHECK(slots.scalar_type() == at::kLong && slots.numel() == t, "slots must be int64 [T]");
  const Tensor slots_c = slots.contiguous();
  const int64_t* slot = slots_c.data_ptr<int64_t>();
  Tensor x = x0.clone(at::MemoryFormat::Contiguous);  // the residual stream, added to in place
  for (int64_t l = 0; l < n; ++l) {
    const Tensor qkv = int4mm(rms_norm.call(x, norms[2 * l], eps), packed[4 * l], group, scales_zeros[4 * l], int4_tile);
    const std::vector<Tensor> q_k =
        rope.call(qkv.slice(1, 0, qk).view({t, heads + kv_heads, head_dim}), cos, sin).split_with_sizes({heads, kv_heads}, 1);
    const Tensor v = qkv.slice(1, qk).view({t, kv_heads, head_dim});
    write_slots(k_caches[l], q_k[1], slot, t);
    write_slots(v_caches[l], v, slot, t);
    const Tensor o = attend.call(q_k[0], k_caches[l], v_caches[l], block_tables, ctx_lens, scale);
    x.add_(int4mm(o.reshape({t, heads * head_dim}), packed[4 * l + 1], group, scales_zeros[4 * l + 1], int4_tile));
    const Tensor gate_up =
        int4mm(rms_norm.call(x, norms[2 * l + 1], eps), packed[4 * l + 2], group, scales_zeros[4 * l + 2], int4_tile);
    const Tensor act = at::mul(at::silu(gate_up.slice(1, 0, intermediate)), gate_up.slice(1, intermediate));
    x.add_(int4mm(act, packed[4 * l + 3], group, scales_zeros[4 * l + 3], int4_tile));
  }
  return x;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(tokenmill, m) {
  m.def("decode_layers_int4(Tensor x, Tensor[] norms, Tensor[] packed, Tensor[] scales_zeros, "
        "Tensor(a!)[] k_caches, Tensor(b!)[] v_caches, Tensor cos, Tensor sin, Tensor slots, "
        "Tensor block_tables, Tensor ctx_lens, int group, int int4_tile, int heads, int kv_heads, int head_dim, "
        "int intermediate, float eps, float scale) -> Tensor");
}

TORCH_LIBRARY_IMPL(tokenmill, CPU, m) { m.impl("decode_layers_int4", &decode_layers_int4); }

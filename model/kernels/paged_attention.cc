// One-token paged attention for XLA:CPU, called from JAX through an FFI custom call.
//
// XLA:CPU runs the same attention (model/paged.py: attend_paged_xla) as some fifty small
// operations per layer: page gathers, a broadcast multiply, reductions and the online
// softmax's bookkeeping. On a small model their per-operation cost is a third of a decode
// step. Here each (row, kv head) reads its keys page by page straight from the pool, with no
// gathered copy, and the rows are split over XLA's intra-op threads.
//
// Inputs (float32 unless said): q [B, H, D]; the key and value pools [K, L, P, S, D] (kv heads,
// layers, pages, page size, head dim), so a page of one kv head is S * D contiguous floats; layer: int32 scalar;
// page_table: int32 [B, NP]; limits: int32 [B], the number of slots row b sees (0..NP*S).
// Attribute: scale, the factor on q.k (1/sqrt(D)). Output: [B, H, D]; query head h reads kv
// head h / (H / K). A row that sees no slot gets
// zeros. Page ids are clamped into the pool, so a bad table cannot read outside it.
//
// Built by model/cpu_kernels.py with small_matmul.cc into one library on first use
// (c++ -O3 -march=native), cached per machine.

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <limits>
#include <memory>
#include <thread>
#include <vector>

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

struct Problem {
  int64_t B, H, D, L, P, S, K, G, NP, layer;
  float scale;
  const float *q, *k, *v;
  const int32_t *table, *limits;
  float* out;
};

// Calls fn(t, vector) for slots t = 0..n-1 of row b, kv head kh, in `pool` (keys or values),
// page by page: within a page consecutive slots are D floats apart.
template <typename Fn>
void ForEachSlot(const Problem& p, const float* pool, int64_t b, int64_t kh, int64_t n, Fn fn) {
  const int32_t* row = p.table + b * p.NP;
  const int64_t S = p.S, slot_stride = p.D;
  const float* pages = pool + (kh * p.L + p.layer) * p.P * S * p.D;  // kv head kh's pages of this layer
  for (int64_t start = 0; start < n; start += S) {
    const int64_t page = std::clamp<int64_t>(row[start / S], 0, p.P - 1);
    const float* slot = pages + page * S * p.D;
    const int64_t end = std::min(n, start + S);
    for (int64_t t = start; t < end; ++t, slot += slot_stride) fn(t, slot);
  }
}

void AttendOne(const Problem& p, int64_t item, std::vector<float>& scores) {
  const int64_t b = item / p.K, kh = item % p.K, G = p.G, D = p.D;
  const int64_t n = std::clamp<int64_t>(p.limits[b], 0, p.NP * p.S);
  const float* qh = p.q + (b * p.H + kh * G) * D;
  float* oh = p.out + (b * p.H + kh * G) * D;
  std::fill(oh, oh + G * D, 0.0f);
  if (n == 0) return;
  scores.resize(G * n);
  ForEachSlot(p, p.k, b, kh, n, [&](int64_t t, const float* key) {
    for (int64_t g = 0; g < G; ++g) {
      const float* qg = qh + g * D;
      float s = 0.0f;
#pragma omp simd reduction(+ : s)
      for (int64_t d = 0; d < D; ++d) s += qg[d] * key[d];
      scores[g * n + t] = s * p.scale;
    }
  });
  for (int64_t g = 0; g < G; ++g) {
    float* sg = scores.data() + g * n;
    float m = -std::numeric_limits<float>::infinity();
    for (int64_t t = 0; t < n; ++t) m = std::max(m, sg[t]);
    float sum = 0.0f;
#pragma omp simd reduction(+ : sum)
    for (int64_t t = 0; t < n; ++t) {
      sg[t] = std::exp(sg[t] - m);
      sum += sg[t];
    }
    const float inv = 1.0f / sum;
    for (int64_t t = 0; t < n; ++t) sg[t] *= inv;
  }
  ForEachSlot(p, p.v, b, kh, n, [&](int64_t t, const float* val) {
    for (int64_t g = 0; g < G; ++g) {
      const float w = scores[g * n + t];
      float* og = oh + g * D;
#pragma omp simd
      for (int64_t d = 0; d < D; ++d) og[d] += w * val[d];
    }
  });
}

struct Shared {
  Problem problem;
  int64_t items;
  std::atomic<int64_t> next{0}, done{0};
};

void Work(Shared& s) {
  thread_local std::vector<float> scores;
  for (int64_t i; (i = s.next.fetch_add(1)) < s.items;) {
    AttendOne(s.problem, i, scores);
    s.done.fetch_add(1, std::memory_order_release);
  }
}

ffi::Error PagedDecodeAttentionImpl(ffi::ThreadPool pool, float scale, ffi::Buffer<ffi::F32> q,
                                    ffi::Buffer<ffi::F32> k_cache, ffi::Buffer<ffi::F32> v_cache,
                                    ffi::Buffer<ffi::S32> layer,
                                    ffi::Buffer<ffi::S32> page_table, ffi::Buffer<ffi::S32> limits,
                                    ffi::ResultBuffer<ffi::F32> out) {
  auto qd = q.dimensions();
  auto cd = k_cache.dimensions();
  auto td = page_table.dimensions();
  if (qd.size() != 3 || cd.size() != 5 || td.size() != 2)
    return ffi::Error::InvalidArgument(
        "paged decode attention: expected q [B, H, D], caches [K, L, P, S, D], table [B, NP]");
  const int64_t B = qd[0], H = qd[1], D = qd[2], K = cd[0];
  if (cd[4] != D || cd[1] == 0 || cd[2] == 0 || K == 0 || H % K != 0 || td[0] != B || limits.element_count() != B ||
      !std::equal(cd.begin(), cd.end(), v_cache.dimensions().begin(), v_cache.dimensions().end()))
    return ffi::Error::InvalidArgument("paged decode attention: mismatched shapes");
  auto shared = std::make_shared<Shared>();
  shared->problem = Problem{B, H, D, cd[1], cd[2], cd[3], K, H / K, td[1],
                            std::clamp<int64_t>(layer.typed_data()[0], 0, cd[1] - 1), scale,
                            q.typed_data(), k_cache.typed_data(), v_cache.typed_data(),
                            page_table.typed_data(), limits.typed_data(), out->typed_data()};
  shared->items = B * K;
  const int64_t helpers = std::min<int64_t>(pool.num_threads(), shared->items) - 1;
  for (int64_t i = 0; i < helpers; ++i) pool.Schedule([shared] { Work(*shared); });
  Work(*shared);
  while (shared->done.load(std::memory_order_acquire) < shared->items) std::this_thread::yield();
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(PagedDecodeAttention, PagedDecodeAttentionImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Attr<float>("scale")
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());

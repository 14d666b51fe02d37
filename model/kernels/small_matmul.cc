// x @ w for a decode step's few rows (M <= 8), for XLA:CPU through an FFI custom call.
//
// At decode sizes a matmul is a pass over its weight matrix: batch 8 against [256, 1536]
// does 8 multiply-adds per weight read. XLA:CPU's Eigen GEMM packs the weights into panels
// first, reading and writing them once more. Here each work item owns a strip of 16 output
// columns and keeps its 8 x 16 accumulators in registers while it walks down the strip
// once, so every weight is read once; the strips are split over XLA's intra-op threads.
// The weight comes strip by strip ([N / 16, K, 16], packed once per decode loop by
// cpu_kernels.decode_weight), so a strip is one contiguous run of memory: walking a strip
// of [K, N] jumps a row of N floats per k, and ran at half the speed.
//
// Inputs (float32): x [M, K] with M <= 8, w [N / 16, K, 16]. Output: [M, N].
// Built by model/cpu_kernels.py with paged_attention.cc into one library.

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <cstring>
#include <memory>
#include <thread>
#include <vector>

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

typedef float v8 __attribute__((vector_size(32)));  // 8 floats: an AVX register, two NEON ones
constexpr int64_t kRows = 8;
constexpr int64_t kStrip = 16;  // output columns per work item: 2 vectors

struct MatmulShared {
  const float* w;
  float* out;
  int64_t M, K, N, strips;
  std::vector<float> xt;  // x transposed to [K, 8], rows past M zero: a k's 8 factors side by side
  std::atomic<int64_t> next{0}, done{0};
};

void Strip(const MatmulShared& s, int64_t strip) {
  const int64_t n0 = strip * kStrip;
  v8 acc[kRows][2] = {};
  const float* xt = s.xt.data();
  const float* wp = s.w + strip * s.K * kStrip;
  for (int64_t k = 0; k < s.K; ++k, wp += kStrip, xt += kRows) {
    v8 w0, w1;
    std::memcpy(&w0, wp, sizeof(v8));
    std::memcpy(&w1, wp + 8, sizeof(v8));
    for (int64_t m = 0; m < kRows; ++m) {
      acc[m][0] += xt[m] * w0;
      acc[m][1] += xt[m] * w1;
    }
  }
  for (int64_t m = 0; m < s.M; ++m) {
    std::memcpy(s.out + m * s.N + n0, &acc[m][0], sizeof(v8));
    std::memcpy(s.out + m * s.N + n0 + 8, &acc[m][1], sizeof(v8));
  }
}

void MatmulWork(MatmulShared& s) {
  for (int64_t i; (i = s.next.fetch_add(1)) < s.strips;) {
    Strip(s, i);
    s.done.fetch_add(1, std::memory_order_release);
  }
}

ffi::Error SmallMatmulImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> w,
                           ffi::ResultBuffer<ffi::F32> out) {
  auto xd = x.dimensions();
  auto wd = w.dimensions();
  if (xd.size() != 2 || wd.size() != 3 || xd[1] != wd[1] || xd[0] > kRows || wd[2] != kStrip)
    return ffi::Error::InvalidArgument("small matmul: expected x [M <= 8, K] and w packed as [N / 16, K, 16]");
  auto shared = std::make_shared<MatmulShared>();
  MatmulShared& s = *shared;
  s.w = w.typed_data();
  s.out = out->typed_data();
  s.M = xd[0];
  s.K = xd[1];
  s.strips = wd[0];
  s.N = s.strips * kStrip;
  s.xt.assign(s.K * kRows, 0.0f);
  const float* xp = x.typed_data();
  for (int64_t m = 0; m < s.M; ++m)
    for (int64_t k = 0; k < s.K; ++k) s.xt[k * kRows + m] = xp[m * s.K + k];
  const int64_t helpers = std::min<int64_t>(pool.num_threads(), s.strips) - 1;
  for (int64_t i = 0; i < helpers; ++i) pool.Schedule([shared] { MatmulWork(*shared); });
  MatmulWork(s);
  while (s.done.load(std::memory_order_acquire) < s.strips) std::this_thread::yield();
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(SmallMatmul, SmallMatmulImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());

// Checks the AVX-512 kernels on any x86-64 or ARM machine, including ones without AVX-512: builds
// csrc/simd_avx512.h + csrc/adamw_kernels.h against SIMDe's portable implementations of the
// AVX-512 intrinsics (https://github.com/simd-everywhere/simde; Debian/Ubuntu: libsimde-dev) and
// compares every kernel of that table with the scalar path's, element for element, on random
// values and on NaN / infinity / subnormal / signed-zero / overflow inputs. NaNs must sit in the
// same places (their sign and payload may differ: compilers commute float operands). With
// --native (on a CPU with AVX-512, built with -mavx512f...) it runs the real instructions instead.
//
//   g++ -O1 -std=c++17 -ffp-contract=off -fno-math-errno -Icsrc csrc/check_isa.cpp -o /tmp/check_isa && /tmp/check_isa
//
// The torch-level tests (tests/test_ops.py) cover the paths the machine can run against the
// reference; this covers the AVX-512 path's lane logic (masks, packs, reductions) where it cannot.

#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <type_traits>
#include <vector>

#ifdef CHECK_NATIVE
#include <immintrin.h>
#else
#define SIMDE_ENABLE_NATIVE_ALIASES
#include <simde/x86/avx512.h>
// What SIMDe 0.7 lacks, spelled out lane by lane (the definitions in Intel's guide).
#define MS_SHIM(ret, name, arg, IN, OUT, n)           \
  static inline ret name(arg a) {                     \
    IN x[n];                                          \
    OUT r[n];                                         \
    std::memcpy(x, &a, sizeof x);                     \
    for (int i = 0; i < n; ++i) r[i] = (OUT)x[i];     \
    ret o;                                            \
    std::memset(&o, 0, sizeof o);                     \
    std::memcpy(&o, r, sizeof r);                     \
    return o;                                         \
  }
#ifndef _mm512_cvtepu16_epi32
MS_SHIM(__m512i, _mm512_cvtepu16_epi32, __m256i, uint16_t, uint32_t, 16)
MS_SHIM(__m256i, _mm512_cvtepi32_epi16, __m512i, uint32_t, uint16_t, 16)  // truncates
MS_SHIM(__m128i, _mm512_cvtepi32_epi8, __m512i, uint32_t, uint8_t, 16)    // truncates
static inline __m512i _mm512_cvtepi8_epi32(__m128i a) {
  int8_t x[16];
  int32_t r[16];
  std::memcpy(x, &a, 16);
  for (int i = 0; i < 16; ++i) r[i] = x[i];
  __m512i o;
  std::memcpy(&o, r, 64);
  return o;
}
MS_SHIM(__m512i, _mm512_cvtepu8_epi32, __m128i, uint8_t, uint32_t, 16)
static inline void _mm512_stream_si512(void* p, __m512i a) { std::memcpy(p, &a, 64); }
typedef simde__mmask16 __mmask16;
#endif
#endif

#include "adamw_common.h"

#define MS_INLINE inline __attribute__((always_inline))

namespace ms_scalar {
#include "simd_scalar.h"
#include "adamw_kernels.h"
}  // namespace ms_scalar

namespace ms_avx512 {
#include "simd_avx512.h"
#include "adamw_kernels.h"
}  // namespace ms_avx512

using namespace megastream_ops;

namespace {

uint64_t rng = 0x9e3779b97f4a7c15ull;
uint32_t next_u32() {
  rng ^= rng << 13;
  rng ^= rng >> 7;
  rng ^= rng << 17;
  return static_cast<uint32_t>(rng >> 16);
}
float uniform() { return static_cast<float>(next_u32() >> 8) / 16777216.0f * 2.0f - 1.0f; }

float special_or(float x) {
  static const uint32_t specials[] = {0x7fc00000u, 0xffc00000u, 0xffff0000u, 0x7f800000u, 0xff800000u, 0x00000000u,
                                      0x80000000u, 0x000b0000u, 0x800b0000u, 0x7f7f0000u, 0xff7f0000u, 0x00000001u,
                                      0x00800000u, 0x1e3ce508u};
  if (next_u32() % 8 != 0) return x;
  const uint32_t u = specials[next_u32() % (sizeof specials / sizeof specials[0])];
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

uint16_t bf16_bits(float f) {  // truncation keeps NaN payloads as they are
  uint32_t u;
  std::memcpy(&u, &f, 4);
  return static_cast<uint16_t>(u >> 16);
}

bool is_nan32(uint32_t u) { return (u & 0x7fffffffu) > 0x7f800000u; }
bool is_nan16(uint16_t u) { return (u & 0x7fffu) > 0x7f80u; }

// Bit-equal, or both NaN.
bool same(const std::vector<uint8_t>& a, const std::vector<uint8_t>& b, int elem_size, bool is_float) {
  if (a.size() != b.size()) return false;
  for (size_t i = 0; i < a.size(); i += elem_size) {
    if (std::memcmp(&a[i], &b[i], elem_size) == 0) continue;
    if (!is_float) return false;
    if (elem_size == 4) {
      uint32_t x, y;
      std::memcpy(&x, &a[i], 4);
      std::memcpy(&y, &b[i], 4);
      if (!(is_nan32(x) && is_nan32(y))) return false;
    } else {
      uint16_t x, y;
      std::memcpy(&x, &a[i], 2);
      std::memcpy(&y, &b[i], 2);
      if (!(is_nan16(x) && is_nan16(y))) return false;
    }
  }
  return true;
}

struct Bufs {
  std::vector<uint8_t> g, w, m, v, wk;
  std::vector<float> ms, vs;
  size_t wk_at = 0;  // where the working copy starts in wk
};

Bufs make(int64_t n, bool g_bf16, Weights wm, States sm, bool specials) {
  Bufs b;
  const int64_t nblk = (n + kBlock - 1) / kBlock;
  auto put = [&](std::vector<uint8_t>& dst, bool bf16, float scale, bool positive) {
    dst.resize(n * (bf16 ? 2 : 4));
    for (int64_t i = 0; i < n; ++i) {
      float x = uniform() * scale;
      if (positive) x = std::fabs(x);
      if (specials) x = special_or(x);
      if (bf16) {
        const uint16_t h = bf16_bits(x);
        std::memcpy(&dst[i * 2], &h, 2);
      } else {
        std::memcpy(&dst[i * 4], &x, 4);
      }
    }
  };
  put(b.g, g_bf16, 1e-2f, false);
  put(b.w, wm == Weights::BF16_SR, 0.05f, false);
  if (sm == States::I8) {
    b.m.resize(n);
    b.v.resize(n);
    for (int64_t i = 0; i < n; ++i) {
      b.m[i] = static_cast<uint8_t>(next_u32());  // every code, -128 included
      b.v[i] = static_cast<uint8_t>(next_u32());
    }
    b.ms.resize(nblk);
    b.vs.resize(nblk);
    for (int64_t k = 0; k < nblk; ++k) {
      b.ms[k] = std::fabs(uniform()) * 1e-3f;
      b.vs[k] = std::fabs(uniform()) * 1e-3f;
    }
    if (specials && nblk > 2) {
      b.ms[1] = INFINITY;
      b.vs[2] = 0.0f;
    }
  } else {
    put(b.m, sm == States::BF16, 1e-3f, false);
    put(b.v, sm == States::BF16, 1e-4f, true);
  }
  // 64 extra bytes, so the working copy can start 64-byte aligned (non-temporal stores) or not
  b.wk.assign(n * 2 + 64, 0);
  return b;
}

void run(const KernelTable& t, Bufs& b, int64_t n, bool g_bf16, Weights wm, States sm, int wk_offset, int step) {
  AdamwArgs a{};
  a.n = n;
  a.grad = b.g.data();
  a.w = b.w.data();
  a.m = b.m.data();
  a.v = b.v.data();
  a.m_scale = b.ms.data();
  a.v_scale = b.vs.data();
  uint8_t* base = b.wk.data();
  uint8_t* aligned = base + ((64 - reinterpret_cast<uintptr_t>(base) % 64) % 64);
  a.working = reinterpret_cast<uint16_t*>(aligned + wk_offset);
  b.wk_at = static_cast<size_t>(aligned - base) + wk_offset;
  a.stream_working = wk_offset == 0;
  const double lr = 1e-3, b1 = 0.9, b2 = 0.95, wd = 0.1;
  a.h.decay = static_cast<float>(1.0 - lr * wd);
  a.h.one_m_beta1 = static_cast<float>(1.0 - b1);
  a.h.beta2 = static_cast<float>(b2);
  a.h.one_m_beta2 = static_cast<float>(1.0 - b2);
  a.h.inv_bc2_sqrt = static_cast<float>(1.0 / std::sqrt(1.0 - std::pow(b2, step)));
  a.h.eps = 1e-8f;
  a.h.neg_step_size = static_cast<float>(-(lr / (1.0 - std::pow(b1, step))));
  a.h.grad_scale = 0.7f;
  a.h.n_decay = n / 3;
  a.h.key = 0x1234u + step;
  const AdamwBlockFn fn = t.adamw[g_bf16][static_cast<int>(wm)][static_cast<int>(sm)];
  for (int64_t blk = 0; blk < (n + kBlock - 1) / kBlock; ++blk) fn(a, blk);
}

int failures = 0;

void check_adamw(int64_t n, bool specials) {
  const char* wname[] = {"fp32", "fp32+working", "bf16-sr"};
  const char* sname[] = {"fp32", "bf16", "int8"};
  for (int gb = 0; gb < 2; ++gb)
    for (int wi = 0; wi < kWeightModes; ++wi)
      for (int si = 0; si < kStateModes; ++si)
        for (int off = 0; off < (wi == 1 ? 2 : 1); ++off) {
          const Weights wm = static_cast<Weights>(wi);
          const States sm = static_cast<States>(si);
          const uint64_t seed = rng;
          Bufs want = make(n, gb, wm, sm, specials);
          rng = seed;
          Bufs got = make(n, gb, wm, sm, specials);
          for (int step = 1; step <= 2; ++step) {
            run(ms_scalar::kTable, want, n, gb, wm, sm, off * 2, step);
            run(ms_avx512::kTable, got, n, gb, wm, sm, off * 2, step);
          }
          const int ws = wm == Weights::BF16_SR ? 2 : 4, ss = sm == States::F32 ? 4 : sm == States::BF16 ? 2 : 1;
          std::vector<uint8_t> wkw(want.wk.begin() + want.wk_at, want.wk.begin() + want.wk_at + n * 2);
          std::vector<uint8_t> wkg(got.wk.begin() + got.wk_at, got.wk.begin() + got.wk_at + n * 2);
          const bool ok = same(got.w, want.w, ws, true) && same(got.m, want.m, ss, ss > 1) &&
                          same(got.v, want.v, ss, ss > 1) && got.ms == want.ms && got.vs == want.vs &&
                          same(wkg, wkw, 2, true);
          std::printf("%s adamw n=%lld grad=%s weights=%s states=%s%s%s\n", ok ? "ok  " : "FAIL",
                      static_cast<long long>(n), gb ? "bf16" : "fp32", wname[wi], sname[si],
                      wi == 1 ? (off ? " (unaligned working)" : " (streamed working)") : "",
                      specials ? " specials" : "");
          failures += !ok;
        }
}

void check_sqnorm(int64_t n) {
  for (int kind = 0; kind < 3; ++kind) {
    std::vector<float> d0(n);
    for (auto& x : d0) x = uniform();
    std::vector<float> sf(n);
    std::vector<uint16_t> sb(n);
    for (int64_t i = 0; i < n; ++i) {
      sf[i] = uniform();
      sb[i] = bf16_bits(sf[i]);
    }
    const void* src = kind == 0 ? nullptr : kind == 1 ? static_cast<const void*>(sf.data()) : sb.data();
    std::vector<float> da = d0, db = d0;
    bool ok = true;
    for (int64_t b0 = 0; b0 < n; b0 += kBlock) {
      const int count = static_cast<int>(n - b0 < kBlock ? n - b0 : kBlock);
      const float x = ms_scalar::kTable.sqnorm[kind](da.data(), src, 0.5f, b0, count);
      const float y = ms_avx512::kTable.sqnorm[kind](db.data(), src, 0.5f, b0, count);
      ok = ok && std::memcmp(&x, &y, 4) == 0;
    }
    ok = ok && std::memcmp(da.data(), db.data(), n * 4) == 0;
    std::printf("%s sqnorm n=%lld src=%s\n", ok ? "ok  " : "FAIL", static_cast<long long>(n),
                kind == 0 ? "none" : kind == 1 ? "fp32" : "bf16");
    failures += !ok;
  }
}

}  // namespace

int main() {
  for (int64_t n : {1LL, 17LL, 256LL, 3 * 256LL + 37, 64 * 256LL + 5}) check_adamw(n, false);
  for (int64_t n : {3 * 256LL + 37, 16 * 256LL}) check_adamw(n, true);
  for (int64_t n : {1LL, 15LL, 16LL, 17LL, 255LL, 256LL, 257LL, 4096LL + 33}) check_sqnorm(n);
  std::printf("%s: %d failed\n", failures ? "FAILED" : "passed", failures);
  return failures ? 1 : 0;
}

// NF4 codes of a chunk of a weight: the hot loop of megastream/adapters/quant.py's _quantize_nf4 (the
// first-level absmaxes and the double quantization stay in torch: one value per 64 elements). Bit for
// bit the torch path's result, for bf16 and fp32 input alike, so a quantized base is the same whichever
// path built it:
//   v    = x / A            in the input dtype (bf16: the fp32 quotient rounded to nearest even),
//                           A = 1 where the block's absmax is 0
//   lo   = (number of NF4 values <= v) - 1, clamped to [0, 14]      (torch.searchsorted, right=True)
//   code = lo + 1 if |v - NF4[lo+1]| < |v - NF4[lo]| else lo         (differences in the input dtype)
//   out[i / 2] = code[i] << 4 | code[i + 1]                          (two codes a byte, high nibble first)
// The torch path takes ~25 ns an element on one core (half of it in searchsorted); this runs each
// block as passes the compiler vectorises at -O3 (for AVX2 and for the baseline ISA), on every core.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>

namespace nf4 {

constexpr int kBlock = 64;  // elements per absmax (quant.py BLOCK)

static inline __attribute__((always_inline)) float bf16_to_float(uint16_t h) {
  uint32_t u = static_cast<uint32_t>(h) << 16;
  float r;
  std::memcpy(&r, &u, 4);
  return r;
}

// bf16 rounding of a block in place, as integer ops over the bits (a loop the compiler vectorises).
static inline __attribute__((always_inline)) void round_bf16_block(float* v) {
  uint32_t u[kBlock];
  std::memcpy(u, v, sizeof u);
  for (int i = 0; i < kBlock; ++i) {
    const uint32_t r = (u[i] + 0x7fffu + ((u[i] >> 16) & 1u)) & 0xffff0000u;
    u[i] = static_cast<int32_t>(u[i] & 0x7fffffffu) > 0x7f800000 ? u[i] : r;  // NaN stays NaN
  }
  std::memcpy(v, u, sizeof u);
}

// One block of 64 elements (already converted to float, exact for bf16 and fp32), its absmax `a`, the 16
// NF4 values in the input dtype (as floats), `bf16`: round each result to bf16 as torch's bf16 ops do.
// Written as passes over the block (no data-dependent branch or table load) so that each vectorises.
static inline __attribute__((always_inline)) void block_codes(const float* x, float a, const float* table,
                                                               bool bf16, uint8_t* out) {
  const float div = a == 0.0f ? 1.0f : a;
  float v[kBlock], d_lo[kBlock], d_hi[kBlock];
  int lo[kBlock];
  for (int i = 0; i < kBlock; ++i) v[i] = x[i] / div;
  if (bf16) round_bf16_block(v);
  for (int i = 0; i < kBlock; ++i) {
    int count = 0;
    for (int k = 0; k < 16; ++k) count += table[k] <= v[i];
    const int l = count - 1;
    lo[i] = l < 0 ? 0 : (l > 14 ? 14 : l);
  }
  float t_lo[kBlock], t_hi[kBlock];  // table[lo], table[lo + 1], by selects (the inner loops vectorise)
  for (int i = 0; i < kBlock; ++i) {
    t_lo[i] = table[0];
    t_hi[i] = table[1];
  }
  for (int k = 1; k < 15; ++k) {
    const float a_k = table[k], b_k = table[k + 1];
    for (int i = 0; i < kBlock; ++i) {
      t_lo[i] = lo[i] == k ? a_k : t_lo[i];
      t_hi[i] = lo[i] == k ? b_k : t_hi[i];
    }
  }
  for (int i = 0; i < kBlock; ++i) {
    d_lo[i] = v[i] - t_lo[i];
    d_hi[i] = v[i] - t_hi[i];
  }
  if (bf16) {
    round_bf16_block(d_lo);
    round_bf16_block(d_hi);
  }
  uint8_t code[kBlock];
  for (int i = 0; i < kBlock; ++i) code[i] = static_cast<uint8_t>(lo[i] + (std::fabs(d_hi[i]) < std::fabs(d_lo[i])));
  for (int i = 0; i < kBlock / 2; ++i) out[i] = static_cast<uint8_t>(code[2 * i] << 4 | code[2 * i + 1]);
}

// Every block of a chunk: x (n = nblk * 64 elements, bf16 bits or fp32), absmax (nblk, x's dtype), the
// table as floats, into out (n / 2 bytes). Compiled for AVX2 and for the baseline ISA (target_clones:
// chosen once, at load, by the CPU; the operations are the same IEEE ones on both, so the codes are too).
#if defined(__x86_64__) || defined(__i386__)
#define NF4_CLONES __attribute__((target_clones("avx2", "default")))
#else
#define NF4_CLONES  // another architecture: its baseline ISA only
#endif

NF4_CLONES void codes(const void* x, const void* absmax, const float* table,
                      bool bf16, uint8_t* out, int64_t nblk) {
#pragma omp parallel for schedule(static)
  for (int64_t b = 0; b < nblk; ++b) {
    float xs[kBlock];
    float a;
    if (bf16) {
      const uint16_t* src = static_cast<const uint16_t*>(x) + b * kBlock;
      for (int i = 0; i < kBlock; ++i) xs[i] = bf16_to_float(src[i]);
      a = bf16_to_float(static_cast<const uint16_t*>(absmax)[b]);
    } else {
      std::memcpy(xs, static_cast<const float*>(x) + b * kBlock, sizeof xs);
      a = static_cast<const float*>(absmax)[b];
    }
    block_codes(xs, a, table, bf16, out + b * (kBlock / 2));
  }
}

}  // namespace nf4

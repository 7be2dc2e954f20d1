// Declarations shared by the ISA-independent part of the ops (csrc/adamw.cpp) and the per-ISA
// kernels (csrc/adamw_kernels.h): hyperparameters, the 8-bit code's constants, the kernel table.
// Plain C++ (no torch), so csrc/check_isa.cpp can build the kernels on their own.
#pragma once

#include <cstdint>

namespace megastream_ops {

constexpr int kBlock = 256;  // elements per int8 quantisation block (and per OpenMP work item)

enum class States { F32, BF16, I8 };
constexpr int kStateModes = 3;

// How the weights are stored and written: fp32 master (with or without the bf16 working copy),
// or bf16 weights with stochastic rounding and no master.
enum class Weights { F32, F32_WORKING, BF16_SR };
constexpr int kWeightModes = 3;

constexpr uint32_t kStateKey = 0x68e31da4u;  // decorrelates the state codes' draws from the weights'
constexpr uint32_t kGolden = 0x9e3779b1u;    // element index -> hash input: i * kGolden + key

// The 8-bit code (see csrc/adamw.cpp): 3 of float32's 23 mantissa bits kept; code 1 <-> 2^-15 of
// the block's absmax for m, 2^-31 for sqrt(v).
constexpr int kMantShift = 20;
constexpr int32_t kMBase = ((127 - 15) << 3) - 1;
constexpr int32_t kVBase = ((127 - 31) << 3) - 1;

// Scalar factors, computed in double and rounded once to float (as torch does with Python scalars).
struct Hyper {
  float decay;         // 1 - lr * weight_decay
  float one_m_beta1;   // 1 - beta1
  float beta2;
  float one_m_beta2;   // 1 - beta2
  float inv_bc2_sqrt;  // 1 / sqrt(1 - beta2^step): a multiply, not a second division per element
  float eps;
  float neg_step_size;  // -lr / (1 - beta1^step)
  float grad_scale;
  int64_t n_decay;      // elements [0, n_decay) get weight decay
  uint32_t key;
};

// One call's buffers (flat, n elements; the scales have one float per block of kBlock).
struct AdamwArgs {
  int64_t n;
  const void* grad;  // float32 or bfloat16 bits
  void* w;           // float32 or bfloat16 bits
  void* m;           // float32, bfloat16 bits or int8
  void* v;           // float32, bfloat16 bits or uint8
  float* m_scale;
  float* v_scale;
  uint16_t* working;  // bf16 working copy (Weights::F32_WORKING only)
  bool stream_working;  // `working` is 64-byte aligned: write it with non-temporal stores
  Hyper h;
};

// Process block b ([b * kBlock, min(n, (b + 1) * kBlock))).
using AdamwBlockFn = void (*)(const AdamwArgs&, int64_t b);
// dst[b0, b0 + count) += alpha * src (when src), and return the block's sum of squares (count <=
// kBlock; summed over 16 interleaved float lanes combined in a fixed tree: every ISA gives the
// same bits).
using SqnormBlockFn = float (*)(float* dst, const void* src, float alpha, int64_t b0, int count);

struct KernelTable {
  const char* name;
  AdamwBlockFn adamw[2][kWeightModes][kStateModes];  // [grad is bf16][Weights][States]
  SqnormBlockFn sqnorm[3];                           // src: none, float32, bfloat16
};

}  // namespace megastream_ops

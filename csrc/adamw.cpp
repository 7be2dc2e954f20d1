// megastream host optimizer ops: one fused pass over a layer's flat buffers.
//
//   megastream::adamw_step   AdamW for one unit: read the gradient (bf16 or fp32) from the pinned
//                            staging buffer, update weights and moments, write the working copy.
//   megastream::accumulate_sqnorm   dst += alpha * src (optional) and return ||dst||^2, one pass.
//
// Modes follow the tensors' dtypes:
//   weights  float32  (fp32 master; `working`, if defined, receives the bf16 working copy, RNE)
//            bfloat16 (no master: the bf16 weights are updated with stochastic rounding, from a
//                      counter-based hash of (seed, element index): reproducible, thread-count free)
//   states   float32 | bfloat16 (RNE) | int8 blockwise: m as int8, v as uint8, one fp32 scale per
//            block of kBlock elements for each (see "8-bit code" below)
// Every op has a pure-PyTorch reference in megastream/ops/reference.py, which is also the fallback
// when this file cannot be compiled; the two agree element for element (tests/test_ops.py).
//
// Built at first use by torch.utils.cpp_extension with -O3 -march=native -fopenmp, so the loops
// vectorise to AVX2 or AVX-512 as the machine has them (chosen at build time, cached per CPU).

#include <ATen/core/Tensor.h>
#include <torch/library.h>

#include <cmath>
#include <cstdint>
#include <algorithm>
#include <cstring>
#include <vector>

namespace {

// Small helpers must inline into the SIMD loops (an out-of-line call there scalarises the loop).
#define MS_INLINE inline __attribute__((always_inline))

constexpr int64_t kBlock = 256;  // elements per int8 quantisation block (and per OpenMP work item)

MS_INLINE uint32_t f32_bits(float f) { return __builtin_bit_cast(uint32_t, f); }
MS_INLINE float bits_f32(uint32_t u) { return __builtin_bit_cast(float, u); }
MS_INLINE float bf16_to_f32(uint16_t h) { return bits_f32(static_cast<uint32_t>(h) << 16); }

// Round to nearest even; NaN stays NaN. The helpers work on the float's bits with plain selects:
// gcc vectorises these, and gives up on some equivalent forms (memcpy punning, bool masks).
MS_INLINE uint32_t bf16_rne_bits(uint32_t u) {
  const uint32_t rounded = (u + 0x7fffu + ((u >> 16) & 1u)) >> 16;
  const uint32_t quiet_nan = (u >> 16) | 0x40u;
  return (u & 0x7fffffffu) > 0x7f800000u ? quiet_nan : rounded;
}

MS_INLINE uint16_t f32_to_bf16_rne(float f) { return static_cast<uint16_t>(bf16_rne_bits(f32_bits(f))); }

// murmur3's 32-bit finaliser: a good bijective mix for counter-based randomness.
MS_INLINE uint32_t fmix32(uint32_t h) {
  h ^= h >> 16;
  h *= 0x85ebca6bu;
  h ^= h >> 13;
  h *= 0xc2b2ae35u;
  h ^= h >> 16;
  return h;
}

// Round to nearest even without the NaN guard, for the moments: identical for every number and
// for arithmetic (quiet, default-payload) NaNs, and cheaper in the loop that is compute-bound.
MS_INLINE uint16_t f32_to_bf16_rne_fast(float f) {
  const uint32_t u = f32_bits(f);
  return static_cast<uint16_t>((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);
}

// Stochastic rounding to bf16: add 16 random bits below the kept mantissa, then truncate.
// Rounds the magnitude up with probability equal to the dropped fraction: unbiased. The bits are
// a hash of (key, element index): reproducible, independent of threading. Infinities and quiet
// NaNs pass through unchanged (their low 16 bits are zero, so nothing carries).
MS_INLINE uint16_t f32_to_bf16_sr(float f, uint32_t key, uint32_t i) {
  return static_cast<uint16_t>((f32_bits(f) + (fmix32(i * 0x9e3779b1u + key) >> 16)) >> 16);
}

// ---- 8-bit code ------------------------------------------------------------------------------
// A per-block "dynamic exponent" code (the idea of bitsandbytes' dynamic map, computed by bit
// arithmetic instead of a table): values are divided by the block's absmax, then kept as a tiny
// float with a 3-bit mantissa. m: sign + 4 exponent bits (15 binades below absmax); v is stored as
// sqrt(v) with 5 exponent bits (31 binades of sqrt(v), i.e. 62 of v). A linear int8 code would
// flush the many small second moments of a block to zero, and an update m / (sqrt(0) + eps)
// explodes; a logarithmic code keeps every magnitude within 2^-3 relative error (one code step,
// rounding stochastically) down to the floor. Smaller values flush to 0 (code 0).
constexpr int kMantShift = 20;  // keep 3 of float32's 23 mantissa bits
constexpr uint32_t kMBase = ((127u - 15u) << 3) - 1;  // code 1 <-> 2^-15
constexpr uint32_t kVBase = ((127u - 31u) << 3) - 1;  // code 1 <-> 2^-31

// y in [0, 1]; r: random bits below the kept mantissa (16 random bits shifted up to the top of
// the 20 dropped ones), so the code rounds up with probability equal to the dropped fraction (stochastic rounding keeps the moments unbiased: with round-to-nearest, per-step changes
// below half a code step would be lost, as small updates are with bf16 weights).
MS_INLINE uint32_t enc_mag(float y, uint32_t base, uint32_t maxcode, uint32_t r) {
  uint32_t c = (f32_bits(y) + r) >> kMantShift;
  c = c > base ? c - base : 0u;
  return c < maxcode ? c : maxcode;
}

MS_INLINE float dec_mag(uint32_t c, uint32_t base) {
  return c == 0 ? 0.0f : bits_f32((c + base) << kMantShift);
}

MS_INLINE int8_t enc_m(float m, float inv_scale, uint32_t r) {
  uint32_t c = enc_mag(std::fabs(m) * inv_scale, kMBase, 127u, r);
  return static_cast<int8_t>(m < 0 ? -static_cast<int32_t>(c) : static_cast<int32_t>(c));
}

MS_INLINE float dec_m(int8_t q, float scale) {
  int32_t c = q;
  float mag = dec_mag(static_cast<uint32_t>(c < 0 ? -c : c), kMBase) * scale;
  return c < 0 ? -mag : mag;
}

MS_INLINE uint8_t enc_v(float sqrt_v, float inv_scale, uint32_t r) {
  return static_cast<uint8_t>(enc_mag(sqrt_v * inv_scale, kVBase, 255u, r));
}

MS_INLINE float dec_v(uint8_t q, float scale) {  // returns sqrt(v)
  return dec_mag(q, kVBase) * scale;
}

enum class States { F32, BF16, I8 };
constexpr uint32_t kStateKey = 0x68e31da4u;  // decorrelates the state codes' draws from the weights'

// Scalar factors, computed in double and rounded once to float (as torch does with Python scalars).
struct Hyper {
  float decay;        // 1 - lr * weight_decay
  float one_m_beta1;  // 1 - beta1
  float beta2;
  float one_m_beta2;  // 1 - beta2
  float inv_bc2_sqrt; // 1 / sqrt(1 - beta2^step): a multiply, not a second division per element
  float eps;
  float neg_step_size;  // -lr / (1 - beta1^step)
  float grad_scale;
  int64_t n_decay;
  uint32_t key;
};

// The updated weight: into the fp32 master (and its bf16 working copy, rounded to nearest), or,
// without a master, into the bf16 weights with stochastic rounding.
template <bool kMasterF32>
MS_INLINE void store_weight(void* w, uint16_t* working, int64_t i, float p, uint32_t key, uint32_t idx) {
  if constexpr (kMasterF32) {
    static_cast<float*>(w)[i] = p;
    if (working) working[i] = f32_to_bf16_rne(p);
  } else {
    static_cast<uint16_t*>(w)[i] = f32_to_bf16_sr(p, key, idx);
  }
}

// One block [b0, b1) of one unit. Main memory is touched once: each input read once, each output
// written once.
template <typename G, bool kMasterF32, States S>
inline void adamw_block(int64_t b0, int64_t b1, const G* g, void* w, void* mp, void* vp, float* m_scale,
                        float* v_scale, uint16_t* working, const Hyper& h) {
  const int n = static_cast<int>(b1 - b0);  // 32-bit loop counters: int64 vector arithmetic is slow
  const int n_decay = static_cast<int>(std::min<int64_t>(std::max<int64_t>(h.n_decay - b0, 0), n));
  const uint32_t i0 = static_cast<uint32_t>(b0);  // element index for the random streams

  if constexpr (S != States::I8) {
    // fp32 / bf16 states: one fused loop, each element read and written once.
    const G* gs = g + b0;
#pragma omp simd
    for (int j = 0; j < n; ++j) {
      float gi;
      if constexpr (sizeof(G) == 2) gi = bf16_to_f32(reinterpret_cast<const uint16_t*>(gs)[j]);
      else gi = reinterpret_cast<const float*>(gs)[j];
      gi = gi * h.grad_scale;
      float p, m, v;
      if constexpr (kMasterF32) p = static_cast<float*>(w)[b0 + j];
      else p = bf16_to_f32(static_cast<uint16_t*>(w)[b0 + j]);
      if constexpr (S == States::F32) {
        m = static_cast<float*>(mp)[b0 + j];
        v = static_cast<float*>(vp)[b0 + j];
      } else {
        m = bf16_to_f32(static_cast<uint16_t*>(mp)[b0 + j]);
        v = bf16_to_f32(static_cast<uint16_t*>(vp)[b0 + j]);
      }
      const float decay = j < n_decay ? h.decay : 1.0f;
      m = m + (gi - m) * h.one_m_beta1;
      v = v * h.beta2 + (gi * h.one_m_beta2) * gi;
      const float denom = std::sqrt(v) * h.inv_bc2_sqrt + h.eps;
      p = p * decay + (m / denom) * h.neg_step_size;
      store_weight<kMasterF32>(w, working, b0 + j, p, h.key, i0 + j);
      if constexpr (S == States::F32) {
        static_cast<float*>(mp)[b0 + j] = m;
        static_cast<float*>(vp)[b0 + j] = v;
      } else {
        static_cast<uint16_t*>(mp)[b0 + j] = f32_to_bf16_rne_fast(m);
        static_cast<uint16_t*>(vp)[b0 + j] = f32_to_bf16_rne_fast(v);
      }
    }
    return;
  }

  // int8 states: the block's new maxima are needed before any moment code is written, so the new
  // m and sqrt(v) wait in L1-resident scratch while the weights are written; then one encode pass.
  alignas(64) float mb[kBlock], sb[kBlock];
  const int8_t* mq_in = static_cast<int8_t*>(mp) + b0;
  const uint8_t* vq_in = static_cast<uint8_t*>(vp) + b0;
  const float m_sc = m_scale[b0 / kBlock], v_sc = v_scale[b0 / kBlock];
  const G* gs = g + b0;
  float m_max = 0.f, v_max = 0.f;
#pragma omp simd reduction(max : m_max, v_max)
  for (int j = 0; j < n; ++j) {
    float gi;
    if constexpr (sizeof(G) == 2) gi = bf16_to_f32(reinterpret_cast<const uint16_t*>(gs)[j]);
    else gi = reinterpret_cast<const float*>(gs)[j];
    gi = gi * h.grad_scale;
    float p;
    if constexpr (kMasterF32) p = static_cast<float*>(w)[b0 + j];
    else p = bf16_to_f32(static_cast<uint16_t*>(w)[b0 + j]);
    const float m0 = dec_m(mq_in[j], m_sc);
    const float s0 = dec_v(vq_in[j], v_sc);
    const float decay = j < n_decay ? h.decay : 1.0f;
    const float m = m0 + (gi - m0) * h.one_m_beta1;
    const float sv = std::sqrt((s0 * s0) * h.beta2 + (gi * h.one_m_beta2) * gi);  // sqrt of the new v
    const float denom = sv * h.inv_bc2_sqrt + h.eps;
    p = p * decay + (m / denom) * h.neg_step_size;
    store_weight<kMasterF32>(w, working, b0 + j, p, h.key, i0 + j);
    mb[j] = m;
    sb[j] = sv;
    const float am = std::fabs(m);
    m_max = am > m_max ? am : m_max;  // not std::fmax: its NaN rules make gcc call libm per element
    v_max = sv > v_max ? sv : v_max;
  }
  m_scale[b0 / kBlock] = m_max;
  v_scale[b0 / kBlock] = v_max;
  const float im = m_max > 0 ? 1.0f / m_max : 0.f, iv = v_max > 0 ? 1.0f / v_max : 0.f;
  int8_t* mq = static_cast<int8_t*>(mp) + b0;
  uint8_t* vq = static_cast<uint8_t*>(vp) + b0;
#pragma omp simd
  for (int j = 0; j < n; ++j) {
    const uint32_t r = fmix32((i0 + j) * 0x9e3779b1u + (h.key ^ kStateKey));  // 16 random bits each
    mq[j] = enc_m(mb[j], im, (r >> 16) << 4);
    vq[j] = enc_v(sb[j], iv, (r & 0xffffu) << 4);
  }
}

template <typename G, bool kMasterF32, States S>
void adamw_run(int64_t n, const G* g, void* w, void* m, void* v, float* ms, float* vs, uint16_t* working,
               const Hyper& h) {
  const int64_t nblk = (n + kBlock - 1) / kBlock;
#pragma omp parallel for schedule(static)
  for (int64_t b = 0; b < nblk; ++b) {
    const int64_t b0 = b * kBlock, b1 = b0 + kBlock < n ? b0 + kBlock : n;
    adamw_block<G, kMasterF32, S>(b0, b1, g, w, m, v, ms, vs, working, h);
  }
}

template <typename G, bool kMasterF32>
void dispatch_states(States s, int64_t n, const G* g, void* w, void* m, void* v, float* ms, float* vs,
                     uint16_t* working, const Hyper& h) {
  switch (s) {
    case States::F32: return adamw_run<G, kMasterF32, States::F32>(n, g, w, m, v, ms, vs, working, h);
    case States::BF16: return adamw_run<G, kMasterF32, States::BF16>(n, g, w, m, v, ms, vs, working, h);
    case States::I8: return adamw_run<G, kMasterF32, States::I8>(n, g, w, m, v, ms, vs, working, h);
  }
}

void check_flat(const at::Tensor& t, const char* name, int64_t n) {
  TORCH_CHECK(t.device().is_cpu(), name, " must be a CPU tensor");
  TORCH_CHECK(t.is_contiguous(), name, " must be contiguous");
  TORCH_CHECK(t.numel() == n, name, " has ", t.numel(), " elements, expected ", n);
}

void adamw_step(at::Tensor weights, const at::Tensor& grad, at::Tensor exp_avg, at::Tensor exp_avg_sq,
                at::Tensor m_scale, at::Tensor v_scale, at::Tensor working, int64_t n_decay, double lr,
                double beta1, double beta2, double eps, double weight_decay, int64_t step, double grad_scale,
                int64_t key) {
  const int64_t n = weights.numel();
  check_flat(weights, "weights", n);
  check_flat(grad, "grad", n);
  check_flat(exp_avg, "exp_avg", n);
  check_flat(exp_avg_sq, "exp_avg_sq", n);
  const bool master = weights.scalar_type() == at::kFloat;
  TORCH_CHECK(master || weights.scalar_type() == at::kBFloat16, "weights must be float32 or bfloat16");
  TORCH_CHECK(grad.scalar_type() == at::kFloat || grad.scalar_type() == at::kBFloat16,
              "grad must be float32 or bfloat16");
  States s;
  const auto st = exp_avg.scalar_type();
  if (st == at::kFloat) s = States::F32;
  else if (st == at::kBFloat16) s = States::BF16;
  else {
    TORCH_CHECK(st == at::kChar && exp_avg_sq.scalar_type() == at::kByte,
                "int8 states: exp_avg int8, exp_avg_sq uint8");
    s = States::I8;
    const int64_t nblk = (n + kBlock - 1) / kBlock;
    check_flat(m_scale, "m_scale", nblk);
    check_flat(v_scale, "v_scale", nblk);
  }
  TORCH_CHECK(s == States::I8 || exp_avg_sq.scalar_type() == st, "exp_avg and exp_avg_sq dtypes differ");
  uint16_t* wk = nullptr;
  if (working.defined() && working.numel() > 0) {
    TORCH_CHECK(master && working.scalar_type() == at::kBFloat16, "working copy must be bf16 with an fp32 master");
    check_flat(working, "working", n);
    wk = reinterpret_cast<uint16_t*>(working.data_ptr());
  }
  Hyper h;
  h.decay = static_cast<float>(1.0 - lr * weight_decay);
  h.one_m_beta1 = static_cast<float>(1.0 - beta1);
  h.beta2 = static_cast<float>(beta2);
  h.one_m_beta2 = static_cast<float>(1.0 - beta2);
  h.inv_bc2_sqrt = static_cast<float>(1.0 / std::sqrt(1.0 - std::pow(beta2, static_cast<double>(step))));
  h.eps = static_cast<float>(eps);
  h.neg_step_size = static_cast<float>(-(lr / (1.0 - std::pow(beta1, static_cast<double>(step)))));
  h.grad_scale = static_cast<float>(grad_scale);
  h.n_decay = weight_decay != 0.0 ? n_decay : 0;
  h.key = static_cast<uint32_t>(key);
  float* ms = s == States::I8 ? m_scale.data_ptr<float>() : nullptr;
  float* vs = s == States::I8 ? v_scale.data_ptr<float>() : nullptr;
  void* w = weights.data_ptr();
  void* m = exp_avg.data_ptr();
  void* v = exp_avg_sq.data_ptr();
  if (grad.scalar_type() == at::kBFloat16) {
    auto* g = reinterpret_cast<const uint16_t*>(grad.data_ptr());
    if (master) dispatch_states<uint16_t, true>(s, n, g, w, m, v, ms, vs, wk, h);
    else dispatch_states<uint16_t, false>(s, n, g, w, m, v, ms, vs, wk, h);
  } else {
    auto* g = grad.data_ptr<float>();
    if (master) dispatch_states<float, true>(s, n, g, w, m, v, ms, vs, wk, h);
    else dispatch_states<float, false>(s, n, g, w, m, v, ms, vs, wk, h);
  }
}

// Per-block partial sums in parallel, then a serial sum in block order: the result does not depend
// on the thread count or timing (an OpenMP reduction's combination order is unspecified), which
// the exact-resume guarantee needs, since this norm feeds the clipping factor.
template <typename S>
double acc_sqnorm(float* dst, const S* src, float alpha, int64_t n) {
  const int64_t nblk = (n + kBlock - 1) / kBlock;
  std::vector<double> partial(nblk);
#pragma omp parallel for schedule(static)
  for (int64_t b = 0; b < nblk; ++b) {
    const int64_t b0 = b * kBlock, b1 = b0 + kBlock < n ? b0 + kBlock : n;
    float part = 0.f;
#pragma omp simd reduction(+ : part)
    for (int64_t i = b0; i < b1; ++i) {
      float d = dst[i];
      if (src) {
        float s;
        if constexpr (sizeof(S) == 2) s = bf16_to_f32(reinterpret_cast<const uint16_t*>(src)[i]);
        else s = reinterpret_cast<const float*>(src)[i];
        d = d + alpha * s;
        dst[i] = d;
      }
      part += d * d;
    }
    partial[b] = part;
  }
  double total = 0.0;
  for (int64_t b = 0; b < nblk; ++b) total += partial[b];
  return total;
}

double accumulate_sqnorm(at::Tensor dst, const c10::optional<at::Tensor>& src, double alpha) {
  const int64_t n = dst.numel();
  check_flat(dst, "dst", n);
  TORCH_CHECK(dst.scalar_type() == at::kFloat, "dst must be float32");
  float* d = dst.data_ptr<float>();
  if (!src.has_value()) return acc_sqnorm<float>(d, nullptr, 0.f, n);
  check_flat(*src, "src", n);
  if (src->scalar_type() == at::kBFloat16)
    return acc_sqnorm<uint16_t>(d, reinterpret_cast<const uint16_t*>(src->data_ptr()), static_cast<float>(alpha), n);
  TORCH_CHECK(src->scalar_type() == at::kFloat, "src must be float32 or bfloat16");
  return acc_sqnorm<float>(d, src->data_ptr<float>(), static_cast<float>(alpha), n);
}

}  // namespace

TORCH_LIBRARY(megastream, m) {
  m.def("adamw_step(Tensor(a!) weights, Tensor grad, Tensor(b!) exp_avg, Tensor(c!) exp_avg_sq, "
        "Tensor(d!) m_scale, Tensor(e!) v_scale, Tensor(f!) working, int n_decay, float lr, float beta1, "
        "float beta2, float eps, float weight_decay, int step, float grad_scale, int key) -> ()");
  m.def("accumulate_sqnorm(Tensor(a!) dst, Tensor? src, float alpha) -> float");
}

TORCH_LIBRARY_IMPL(megastream, CPU, m) {
  m.impl("adamw_step", &adamw_step);
  m.impl("accumulate_sqnorm", &accumulate_sqnorm);
}

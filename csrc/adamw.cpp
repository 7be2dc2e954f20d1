// megastream host optimizer ops: one fused pass over a layer's flat buffers.
//
//   megastream::adamw_step   AdamW for one unit: read the gradient (bf16 or fp32) from the pinned
//                            staging buffer, update weights and moments, write the working copy.
//   megastream::accumulate_sqnorm   dst += alpha * src (optional) and return ||dst||^2, one pass.
//   megastream::cpu_isa / cpu_isas / set_cpu_isa   which instruction-set path runs (see below).
//   megastream::nf4_codes    the 4-bit codes of a quantized base's weight at load (csrc/nf4.h).
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
// Instruction sets: the arithmetic is written once (csrc/adamw_kernels.h) over a small vector type
// and compiled three times into this one build, each in its own `#pragma GCC target` region:
// "avx512" (16 lanes; needs AVX-512 F/BW/DQ/VL), "avx2" (8 lanes; AVX2 with FMA and F16C, i.e.
// x86-64-v3) and "scalar" (one lane, the baseline ISA: any CPU). No -march=native: the build is the
// same on every machine, and the path is chosen once at load from the CPU's features (cpuid), the
// widest that it supports; MEGASTREAM_CPU_ISA=avx512|avx2|scalar, or megastream.ops.set_cpu_isa,
// picks another (an error if the CPU lacks it). All paths run the same operations in the same
// order, so their results are bit-identical to each other and to the reference: no fused
// multiply-add (the build has -ffp-contract=off, and the avx2 region does not even enable FMA),
// IEEE sqrt and division (vsqrtps / vdivps, no reciprocal approximations), bf16 rounding and the
// int8 code by integer bit arithmetic. AVX512-BF16's conversion instruction is not used: it
// flushes subnormal inputs to zero, which the reference does not. With NaNs in the inputs every path
// puts NaNs in the same places and the same int8 codes and scales (a NaN's own sign and payload may
// differ: IEEE leaves open which NaN operand propagates, and compilers commute operands); the
// reference differs there (torch's bf16 casts and amax treat NaNs their own way).
//
// 8-bit code: a per-block "dynamic exponent" code (the idea of bitsandbytes' dynamic map, computed
// by bit arithmetic instead of a table): values are divided by the block's absmax, then kept as a
// tiny float with a 3-bit mantissa. m: sign + 4 exponent bits (15 binades below absmax); v is stored
// as sqrt(v) with 5 exponent bits (31 binades of sqrt(v), i.e. 62 of v). A linear int8 code would
// flush the many small second moments of a block to zero, and an update m / (sqrt(0) + eps)
// explodes; a logarithmic code keeps every magnitude within 2^-3 relative error (one code step,
// rounding stochastically: with round-to-nearest, per-step changes below half a code step would be
// lost) down to the floor. Smaller values flush to 0 (code 0).
//
// Speed: every element is read and written once, in blocks of kBlock elements spread over OpenMP
// threads (guided schedule: a thread slowed by other work leaves the rest to the others); an
// aligned working copy is written with non-temporal stores (no read of the destination first).
// On a 2-core AVX2 EPYC the fp32 and bf16-state modes run near memory bandwidth and int8 states
// are compute-bound (README, "Measured"; benchmarks/optimizer.py).
//
// Built at first use by torch.utils.cpp_extension (megastream/ops/__init__.py) with -O3 -fopenmp
// -ffp-contract=off -fno-math-errno; csrc/check_isa.cpp builds the kernels alone.

#include <ATen/core/Tensor.h>
#include <torch/library.h>

#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <string>
#include <type_traits>

#include "nf4.h"
#include <vector>

#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#define MS_X86 1
#else
#define MS_X86 0
#endif

#include "adamw_common.h"

// The primitives must inline into the kernels' loops (an out-of-line call there costs more than
// the work it does).
#define MS_INLINE inline __attribute__((always_inline))

namespace ms_scalar {
#include "simd_scalar.h"
#include "adamw_kernels.h"
}  // namespace ms_scalar

#if MS_X86
#if defined(__clang__)
#pragma clang attribute push(__attribute__((target("avx2,f16c"))), apply_to = function)
#else
#pragma GCC push_options
#pragma GCC target("avx2,f16c")
#endif
namespace ms_avx2 {
#include "simd_avx2.h"
#include "adamw_kernels.h"
}  // namespace ms_avx2
#if defined(__clang__)
#pragma clang attribute pop
#pragma clang attribute push(__attribute__((target("avx512f,avx512bw,avx512dq,avx512vl,avx2,f16c"))), apply_to = function)
#else
#pragma GCC pop_options
#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512dq,avx512vl,avx2,f16c")
#endif
namespace ms_avx512 {
#include "simd_avx512.h"
#include "adamw_kernels.h"
}  // namespace ms_avx512
#if defined(__clang__)
#pragma clang attribute pop
#else
#pragma GCC pop_options
#endif
#endif  // MS_X86

namespace {

using namespace megastream_ops;

// ---- instruction-set paths ------------------------------------------------------------------

struct Isa {
  const KernelTable* table;
  bool (*supported)();
};

#if MS_X86
bool has_avx512() {
  __builtin_cpu_init();  // libgcc's cpuid probe also checks that the OS saves the wide registers
  return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
         __builtin_cpu_supports("avx512dq") && __builtin_cpu_supports("avx512vl");
}
bool has_avx2() {
  __builtin_cpu_init();
  return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c");
}
#endif
bool always() { return true; }

const Isa kIsas[] = {  // widest first
#if MS_X86
    {&ms_avx512::kTable, has_avx512},
    {&ms_avx2::kTable, has_avx2},
#endif
    {&ms_scalar::kTable, always},
};

const KernelTable* find_isa(const std::string& name, bool* known) {
  *known = false;
  for (const Isa& isa : kIsas) {
    if (name == isa.table->name) {
      *known = true;
      return isa.supported() ? isa.table : nullptr;
    }
  }
  return nullptr;
}

const KernelTable* best_isa() {
  for (const Isa& isa : kIsas)
    if (isa.supported()) return isa.table;
  return &ms_scalar::kTable;
}

// Chosen once at load: MEGASTREAM_CPU_ISA when it names a path this CPU has (the Python layer
// reports a bad value as an error), else the widest path it has.
const KernelTable* initial_isa() {
  const char* env = std::getenv("MEGASTREAM_CPU_ISA");
  if (env && *env && std::strcmp(env, "auto") != 0) {
    bool known;
    if (const KernelTable* t = find_isa(env, &known)) return t;
  }
  return best_isa();
}

std::atomic<const KernelTable*> g_isa{initial_isa()};

std::string cpu_isa() { return g_isa.load()->name; }

std::vector<std::string> cpu_isas() {
  std::vector<std::string> out;
  for (const Isa& isa : kIsas)
    if (isa.supported()) out.emplace_back(isa.table->name);
  return out;
}

std::string set_cpu_isa(const std::string& name) {
  if (name == "auto") {
    g_isa.store(best_isa());
    return cpu_isa();
  }
  bool known;
  const KernelTable* t = find_isa(name, &known);
  TORCH_CHECK(known, "unknown CPU instruction-set path '", name, "' (expected avx512, avx2, scalar or auto)");
  TORCH_CHECK(t != nullptr, "this CPU cannot run the '", name, "' path",
              name == "avx512" ? " (it needs AVX-512 F, BW, DQ and VL)" : " (it needs AVX2, FMA and F16C)");
  g_isa.store(t);
  return cpu_isa();
}

// ---- the ops ----------------------------------------------------------------------------------

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
  AdamwArgs a{};
  a.n = n;
  Weights wmode = master ? Weights::F32 : Weights::BF16_SR;
  if (working.defined() && working.numel() > 0) {
    TORCH_CHECK(master && working.scalar_type() == at::kBFloat16, "working copy must be bf16 with an fp32 master");
    check_flat(working, "working", n);
    a.working = reinterpret_cast<uint16_t*>(working.data_ptr());
    a.stream_working = reinterpret_cast<uintptr_t>(a.working) % 64 == 0;
    wmode = Weights::F32_WORKING;
  }
  Hyper& h = a.h;
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
  a.grad = grad.data_ptr();
  a.w = weights.data_ptr();
  a.m = exp_avg.data_ptr();
  a.v = exp_avg_sq.data_ptr();
  a.m_scale = s == States::I8 ? m_scale.data_ptr<float>() : nullptr;
  a.v_scale = s == States::I8 ? v_scale.data_ptr<float>() : nullptr;
  const AdamwBlockFn fn = g_isa.load()->adamw[grad.scalar_type() == at::kBFloat16][static_cast<int>(wmode)]
                                              [static_cast<int>(s)];
  const int64_t nblk = (n + kBlock - 1) / kBlock;
  // Guided: big contiguous chunks first, then smaller ones, so a thread slowed by other work on
  // its core leaves the rest to the others (each block's result does not depend on who runs it).
#pragma omp parallel
  {
#pragma omp for schedule(guided, 16) nowait
    for (int64_t b = 0; b < nblk; ++b) fn(a, b);
#if MS_X86
    if (a.stream_working) _mm_sfence();  // order this thread's non-temporal stores before the op returns
#endif
  }
}

// Per-block partial sums in parallel, then a serial sum in block order: the result does not depend
// on the thread count or timing (an OpenMP reduction's combination order is unspecified), which
// the exact-resume guarantee needs, since this norm feeds the clipping factor. Within a block the
// float sum runs over 16 interleaved lanes combined in a fixed order, the same on every path.
double accumulate_sqnorm(at::Tensor dst, const c10::optional<at::Tensor>& src, double alpha) {
  const int64_t n = dst.numel();
  check_flat(dst, "dst", n);
  TORCH_CHECK(dst.scalar_type() == at::kFloat, "dst must be float32");
  int kind = 0;
  const void* sp = nullptr;
  if (src.has_value()) {
    check_flat(*src, "src", n);
    TORCH_CHECK(src->scalar_type() == at::kFloat || src->scalar_type() == at::kBFloat16,
                "src must be float32 or bfloat16");
    kind = src->scalar_type() == at::kFloat ? 1 : 2;
    sp = src->data_ptr();
  }
  const SqnormBlockFn fn = g_isa.load()->sqnorm[kind];
  float* d = dst.data_ptr<float>();
  const float a = static_cast<float>(alpha);
  const int64_t nblk = (n + kBlock - 1) / kBlock;
  std::vector<double> partial(nblk);
#pragma omp parallel for schedule(guided, 16)
  for (int64_t b = 0; b < nblk; ++b) {
    const int64_t b0 = b * kBlock;
    partial[b] = fn(d, sp, a, b0, static_cast<int>(n - b0 < kBlock ? n - b0 : kBlock));
  }
  double total = 0.0;
  for (int64_t b = 0; b < nblk; ++b) total += partial[b];
  return total;
}

void nf4_codes(const at::Tensor& x, const at::Tensor& absmax, const at::Tensor& table, at::Tensor out) {
  const int64_t n = x.numel();
  TORCH_CHECK(n % nf4::kBlock == 0, "x must hold whole blocks of ", nf4::kBlock, " elements, has ", n);
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kBFloat16, "x must be float32 or bfloat16");
  TORCH_CHECK(absmax.scalar_type() == x.scalar_type() && table.scalar_type() == x.scalar_type(),
              "absmax and table must have x's dtype");
  TORCH_CHECK(out.scalar_type() == at::kByte, "out must be uint8");
  check_flat(x, "x", n);
  check_flat(absmax, "absmax", n / nf4::kBlock);
  check_flat(table, "table", 16);
  check_flat(out, "out", n / 2);
  const bool bf16 = x.scalar_type() == at::kBFloat16;
  float tab[16];
  for (int k = 0; k < 16; ++k)
    tab[k] = bf16 ? nf4::bf16_to_float(reinterpret_cast<const uint16_t*>(table.data_ptr())[k])
                  : table.data_ptr<float>()[k];
  nf4::codes(x.data_ptr(), absmax.data_ptr(), tab, bf16, out.data_ptr<uint8_t>(), n / nf4::kBlock);
}

}  // namespace

TORCH_LIBRARY(megastream, m) {
  m.def("adamw_step(Tensor(a!) weights, Tensor grad, Tensor(b!) exp_avg, Tensor(c!) exp_avg_sq, "
        "Tensor(d!) m_scale, Tensor(e!) v_scale, Tensor(f!) working, int n_decay, float lr, float beta1, "
        "float beta2, float eps, float weight_decay, int step, float grad_scale, int key) -> ()");
  m.def("accumulate_sqnorm(Tensor(a!) dst, Tensor? src, float alpha) -> float");
  m.def("cpu_isa() -> str", &cpu_isa);
  m.def("cpu_isas() -> str[]", &cpu_isas);
  m.def("set_cpu_isa(str isa) -> str", &set_cpu_isa);
  m.def("nf4_codes(Tensor x, Tensor absmax, Tensor table, Tensor(a!) out) -> ()");
}

TORCH_LIBRARY_IMPL(megastream, CPU, m) {
  m.impl("adamw_step", &adamw_step);
  m.impl("accumulate_sqnorm", &accumulate_sqnorm);
  m.impl("nf4_codes", &nf4_codes);
}

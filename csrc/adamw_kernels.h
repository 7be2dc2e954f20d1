// The ops' arithmetic, written once over a small vector abstraction `Vec` (csrc/simd_*.h) and
// instantiated once per instruction set by csrc/adamw.cpp: scalar (one lane), AVX2 (8) and AVX-512
// (16). Every path runs the same operations in the same order on each element, so they agree bit
// for bit with each other and with the pure-PyTorch reference (megastream/ops/reference.py).
//
// Included (no include guard, on purpose) inside a per-ISA namespace after that ISA's `Vec`; it
// defines `kTable`, that ISA's KernelTable. Defines no code outside the namespace and uses no
// library templates, so nothing compiled for a wider ISA can leak into the generic code.

using megastream_ops::AdamwArgs;
using megastream_ops::Hyper;
using megastream_ops::kBlock;
using megastream_ops::KernelTable;
using megastream_ops::States;
using megastream_ops::Weights;
using V = Vec;
using F = V::F;
using I = V::I;
constexpr int N = V::N;
static_assert(kBlock % 16 == 0 && 16 % N == 0, "a block is whole vectors, and 16 lanes whole vectors");

// murmur3's 32-bit finaliser, fmix32(h) = x ^ (x >> 16) with x = fmix32_mul(h): a good bijective mix
// for counter-based randomness. The callers use its top and bottom 16 bits; the top 16 bits of
// fmix32(h) are those of x, so they take x and skip the last xor where they can.
MS_INLINE I fmix32_mul(I h) {
  h = V::ixor(h, V::srl<16>(h));
  h = V::imul(h, V::iset(0x85ebca6bu));
  h = V::ixor(h, V::srl<13>(h));
  return V::imul(h, V::iset(0xc2b2ae35u));
}

// Round to nearest even; a NaN stays NaN (quiet, its sign and top payload bits kept).
MS_INLINE I bf16_rne(F x) {
  const I u = V::bits(x);
  const I rounded = V::srl<16>(V::iadd(V::iadd(u, V::iset(0x7fffu)), V::iand(V::srl<16>(u), V::iset(1u))));
  const I quiet_nan = V::ior(V::srl<16>(u), V::iset(0x40u));
  return V::iselect(V::icmpgt(V::iand(u, V::iset(0x7fffffffu)), V::iset(0x7f800000u)), quiet_nan, rounded);
}

// Round to nearest even without the NaN guard, for the moments: identical for every number and
// for arithmetic (quiet, default-payload) NaNs.
MS_INLINE I bf16_rne_fast(F x) {
  const I u = V::bits(x);
  return V::srl<16>(V::iadd(V::iadd(u, V::iset(0x7fffu)), V::iand(V::srl<16>(u), V::iset(1u))));
}

// Stochastic rounding to bf16: add 16 random bits (fmix32(h) >> 16) below the kept mantissa, then
// truncate. `h` is the element's hash input (index * kGolden + key).
MS_INLINE I bf16_sr(F x, I h) { return V::srl<16>(V::iadd(V::bits(x), V::srl<16>(fmix32_mul(h)))); }

// ---- 8-bit code (see csrc/adamw.cpp) ----
// y in [0, 1] (or NaN); r: 16 random bits. The raw code is the top bits of y rounded
// stochastically at the 20th bit: (bits(y) + (r << 4)) >> 20, computed as ((bits(y) >> 4) + r) >> 16,
// which is the same number (the low 4 bits of r << 4 are zero) but cannot wrap around 2^32 for a NaN
// with its sign bit set: a NaN always gets the largest code, whatever its sign and payload, as in
// the reference's int64 arithmetic. Vec::store_*codes_x4 subtract the base, floor at 0 and cap.
MS_INLINE I raw_code(F y, I r) { return V::srl<16>(V::iadd(V::srl<4>(V::bits(y)), r)); }

struct HyperV {
  F decay, one, omb1, beta2, omb2, inv_bc2, eps, neg_step, gscale;
  explicit HyperV(const Hyper& h)
      : decay(V::fset(h.decay)), one(V::fset(1.0f)), omb1(V::fset(h.one_m_beta1)), beta2(V::fset(h.beta2)),
        omb2(V::fset(h.one_m_beta2)), inv_bc2(V::fset(h.inv_bc2_sqrt)), eps(V::fset(h.eps)),
        neg_step(V::fset(h.neg_step_size)), gscale(V::fset(h.grad_scale)) {}
};

// Data moves in pairs of vectors, 2N consecutive elements, in the layout `kIl` that Vec defines:
// natural, or (AVX2, when every stream is 16 or 8 bits wide) interleaved the way unpacking and
// packing 16-bit halves leave it, which saves the cross-lane shuffles. Lane l of vector u of a pair
// holds element V::pair_index<kIl>(u)[l] of it; the per-element work does not care, the hash
// inputs and the weight-decay boundary use the index.

// The weight-decay factor of vector u of the pair at j: decay below n_decay, 1 from there on.
template <bool kIl>
MS_INLINE F decay_at(const HyperV& hv, int j, int u, int n_decay) {
  if (j + 2 * N <= n_decay) return hv.decay;
  if (j >= n_decay) return hv.one;
  return V::fselect(V::icmpgt(V::iset(static_cast<uint32_t>(n_decay - j)), V::template pair_index<kIl>(u)), hv.decay,
                    hv.one);
}

template <bool kIl, typename T>
MS_INLINE void load_x2(const T* p, F* x) {  // float32, or bfloat16 bits
  if constexpr (sizeof(T) == 2) V::template load_bf16x2<kIl>(reinterpret_cast<const uint16_t*>(p), x);
  else V::template load_f32x2<kIl>(reinterpret_cast<const float*>(p), x);
}

// The updated weights of the pair at j: into the fp32 master (and its bf16 working copy, rounded
// to nearest; with non-temporal stores when kStream), or, without a master, into the bf16 weights
// with stochastic rounding (`hw`: the two vectors' hash inputs).
template <bool kIl, Weights W, bool kStream>
MS_INLINE void store_weights(void* wp, uint16_t* wk, int j, const F* p, const I* hw) {
  if constexpr (W != Weights::BF16_SR) {
    V::template store_f32x2<kIl>(static_cast<float*>(wp) + j, p);
    if constexpr (W == Weights::F32_WORKING) {
      const I r[2] = {bf16_rne(p[0]), bf16_rne(p[1])};
      if constexpr (kStream) V::template stream_u16x2<kIl>(wk + j, r);
      else V::template store_u16x2<kIl>(wk + j, r);
    }
  } else {
    const I r[2] = {bf16_sr(p[0], hw[0]), bf16_sr(p[1], hw[1])};
    V::template store_u16x2<kIl>(static_cast<uint16_t*>(wp) + j, r);
  }
}

// The weights' loop: p = p * decay + ub (ub: each element's (m / denom) * -lr/bc1), stored.
template <bool kIl, Weights W, bool kStream>
MS_INLINE void update_weights(void* wp, uint16_t* wk, const float* ub, const HyperV& hv, I* hw, I pair_step,
                              int n_decay) {
  for (int j = 0; j < kBlock; j += 2 * N) {
    F p[2];
    if constexpr (W != Weights::BF16_SR) load_x2<kIl>(static_cast<const float*>(wp) + j, p);
    else load_x2<kIl>(static_cast<const uint16_t*>(wp) + j, p);
    for (int u = 0; u < 2; ++u) p[u] = V::add(V::mul(p[u], decay_at<kIl>(hv, j, u, n_decay)), V::loadf(ub + j + u * N));
    store_weights<kIl, W, kStream>(wp, wk, j, p, hw);
    for (int u = 0; u < 2; ++u) hw[u] = V::iadd(hw[u], pair_step);
  }
}

// One full block of kBlock elements: pointers at the block's first element, `i0` its index in the
// buffer (the random streams' counter), `n_decay` relative to the block, `ms`/`vs` its scales.
// Main memory is touched once: each input read once, each output written once. Two loops over the
// block: the moments and the step (m / denom) * -lr/bc1 into L1-resident scratch, then the weights.
// Each loop is short enough that the out-of-order core overlaps several iterations' square roots
// and divisions (measured: 8-15% faster per element than one fused loop on Zen 3); the arithmetic
// and its order are the same.
template <typename G, Weights W, States S, bool kStream>
void adamw_full(const G* g, void* wp, void* mp, void* vp, float* ms, float* vs, uint16_t* wk, const Hyper& h,
                uint32_t i0, int n_decay) {
  constexpr bool kIl = sizeof(G) == 2 && W == Weights::BF16_SR && S != States::F32;  // no 32-bit stream
  const HyperV hv(h);
  const I golden = V::iset(megastream_ops::kGolden);
  const I pair_step = V::iset(static_cast<uint32_t>(2 * N) * megastream_ops::kGolden);
  I idx[2];  // (i0 + j + lane's index) * kGolden for the pair at j, both vectors
  for (int u = 0; u < 2; ++u) idx[u] = V::imul(V::iadd(V::iset(i0), V::template pair_index<kIl>(u)), golden);
  I hw[2];  // the weights' hash inputs
  for (int u = 0; u < 2; ++u) hw[u] = V::iadd(idx[u], V::iset(h.key));
  float* mf = static_cast<float*>(mp);
  float* vf = static_cast<float*>(vp);
  uint16_t* mh = static_cast<uint16_t*>(mp);
  uint16_t* vh = static_cast<uint16_t*>(vp);

  alignas(64) float ub[kBlock];  // (m / denom) * -lr/bc1 of each element, in the pair layout
  if constexpr (S != States::I8) {
    for (int j = 0; j < kBlock; j += 2 * N) {
      F gi[2], m[2], v[2];
      load_x2<kIl>(g + j, gi);
      if constexpr (S == States::F32) {
        load_x2<kIl>(mf + j, m);
        load_x2<kIl>(vf + j, v);
      } else {
        load_x2<kIl>(mh + j, m);
        load_x2<kIl>(vh + j, v);
      }
      for (int u = 0; u < 2; ++u) {
        gi[u] = V::mul(gi[u], hv.gscale);
        m[u] = V::add(m[u], V::mul(V::sub(gi[u], m[u]), hv.omb1));
        v[u] = V::add(V::mul(v[u], hv.beta2), V::mul(V::mul(gi[u], hv.omb2), gi[u]));
        const F denom = V::add(V::mul(V::sqrt(v[u]), hv.inv_bc2), hv.eps);
        V::storef(ub + j + u * N, V::mul(V::div(m[u], denom), hv.neg_step));
      }
      if constexpr (S == States::F32) {
        V::template store_f32x2<kIl>(mf + j, m);
        V::template store_f32x2<kIl>(vf + j, v);
      } else {
        const I mr[2] = {bf16_rne_fast(m[0]), bf16_rne_fast(m[1])}, vr[2] = {bf16_rne_fast(v[0]), bf16_rne_fast(v[1])};
        V::template store_u16x2<kIl>(mh + j, mr);
        V::template store_u16x2<kIl>(vh + j, vr);
      }
    }
    update_weights<kIl, W, kStream>(wp, wk, ub, hv, hw, pair_step, n_decay);
    return;
  }

  // int8 states: the block's new maxima are needed before any moment code is written, so the new
  // m and sqrt(v) wait in L1-resident scratch (in the pair layout) too; the encode is a third loop.
  alignas(64) float mb[kBlock], sb[kBlock];
  const int8_t* mq = static_cast<const int8_t*>(mp);
  const uint8_t* vq = static_cast<const uint8_t*>(vp);
  const F msc = V::fset(*ms), vsc = V::fset(*vs);
  const I abs_mask = V::iset(0x7fffffffu);
  F m_max = V::fset(0.0f), v_max = V::fset(0.0f);
  for (int j = 0; j < kBlock; j += 2 * N) {
    F gi[2], m0[2], s0[2];
    load_x2<kIl>(g + j, gi);
    V::template load_m8x2<kIl>(mq + j, msc, m0);
    V::template load_v8x2<kIl>(vq + j, vsc, s0);
    for (int u = 0; u < 2; ++u) {
      gi[u] = V::mul(gi[u], hv.gscale);
      const F m = V::add(m0[u], V::mul(V::sub(gi[u], m0[u]), hv.omb1));
      const F sv = V::sqrt(V::add(V::mul(V::mul(s0[u], s0[u]), hv.beta2),
                                  V::mul(V::mul(gi[u], hv.omb2), gi[u])));  // sqrt of the new v
      const F denom = V::add(V::mul(sv, hv.inv_bc2), hv.eps);
      V::storef(ub + j + u * N, V::mul(V::div(m, denom), hv.neg_step));
      V::storef(mb + j + u * N, m);
      V::storef(sb + j + u * N, sv);
      m_max = V::fmax(V::fbits(V::iand(V::bits(m), abs_mask)), m_max);  // NaN never wins: the max ignores it
      v_max = V::fmax(sv, v_max);
    }
  }
  update_weights<kIl, W, kStream>(wp, wk, ub, hv, hw, pair_step, n_decay);
  const float mx = V::hmax(m_max), vx = V::hmax(v_max);
  *ms = mx;
  *vs = vx;
  const F im = V::fset(mx > 0 ? 1.0f / mx : 0.f), iv = V::fset(vx > 0 ? 1.0f / vx : 0.f);
  const I low16 = V::iset(0xffffu);
  const F zero = V::fset(0.0f);
  I hs[2];  // the codes' hash inputs
  for (int u = 0; u < 2; ++u) hs[u] = V::iadd(idx[u], V::iset(h.key ^ megastream_ops::kStateKey));
  for (int j = 0; j < kBlock; j += 4 * N) {  // two pairs
    I cm[4], cv[4];
    V::MF neg[4];
    for (int k = 0; k < 4; ++k) {
      const int jk = j + k * N;
      // r = fmix32(hs) = x ^ (x >> 16): m's code takes its top 16 bits (x >> 16), v's its bottom 16.
      const I x = fmix32_mul(hs[k & 1]);
      const I top = V::srl<16>(x);
      const F m = V::loadf(mb + jk);
      cm[k] = raw_code(V::mul(V::fbits(V::iand(V::bits(m), abs_mask)), im), top);
      neg[k] = V::fcmplt(m, zero);
      cv[k] = raw_code(V::mul(V::loadf(sb + jk), iv), V::iand(V::ixor(x, top), low16));
      if (k & 1) {
        hs[0] = V::iadd(hs[0], pair_step);
        hs[1] = V::iadd(hs[1], pair_step);
      }
    }
    V::template store_mcodes_x4<kIl>(static_cast<int8_t*>(mp) + j, cm, neg, megastream_ops::kMBase);
    V::template store_vcodes_x4<kIl>(static_cast<uint8_t*>(vp) + j, cv, megastream_ops::kVBase);
  }
}

// Block b of a call: full blocks run in place; the last, partial one runs on zero-padded copies
// (padding lanes give m = 0 and sqrt(v) = 0, or NaN, neither of which moves the block's maxima)
// whose first `count` elements are copied back.
template <typename G, Weights W, States S>
void adamw_block(const AdamwArgs& a, int64_t b) {
  constexpr int ws = W == Weights::BF16_SR ? 2 : 4;
  constexpr int ss = S == States::F32 ? 4 : S == States::BF16 ? 2 : 1;
  const int64_t b0 = b * kBlock;
  const int64_t rest = a.n - b0;
  const int count = rest < kBlock ? static_cast<int>(rest) : kBlock;
  const int64_t nd = a.h.n_decay - b0;
  const int n_decay = nd <= 0 ? 0 : nd >= kBlock ? kBlock : static_cast<int>(nd);
  const G* g = static_cast<const G*>(a.grad) + b0;
  char* w = static_cast<char*>(a.w) + b0 * ws;
  char* m = static_cast<char*>(a.m) + b0 * ss;
  char* v = static_cast<char*>(a.v) + b0 * ss;
  uint16_t* wk = W == Weights::F32_WORKING ? a.working + b0 : nullptr;
  float* ms = S == States::I8 ? a.m_scale + b : nullptr;
  float* vs = S == States::I8 ? a.v_scale + b : nullptr;
  if (count == kBlock) {
    if (W == Weights::F32_WORKING && a.stream_working)
      adamw_full<G, W, S, true>(g, w, m, v, ms, vs, wk, a.h, static_cast<uint32_t>(b0), n_decay);
    else
      adamw_full<G, W, S, false>(g, w, m, v, ms, vs, wk, a.h, static_cast<uint32_t>(b0), n_decay);
    return;
  }
  alignas(64) G lg[kBlock];
  alignas(64) char lw[kBlock * ws], lm[kBlock * ss], lv[kBlock * ss];
  alignas(64) uint16_t lwk[kBlock];
  __builtin_memset(lg, 0, sizeof lg);
  __builtin_memset(lw, 0, sizeof lw);
  __builtin_memset(lm, 0, sizeof lm);
  __builtin_memset(lv, 0, sizeof lv);
  __builtin_memcpy(lg, g, count * sizeof(G));
  __builtin_memcpy(lw, w, count * ws);
  __builtin_memcpy(lm, m, count * ss);
  __builtin_memcpy(lv, v, count * ss);
  adamw_full<G, W, S, false>(lg, lw, lm, lv, ms, vs, lwk, a.h, static_cast<uint32_t>(b0), n_decay);
  __builtin_memcpy(w, lw, count * ws);
  __builtin_memcpy(m, lm, count * ss);
  __builtin_memcpy(v, lv, count * ss);
  if (wk) __builtin_memcpy(wk, lwk, count * sizeof(uint16_t));
}

// dst[b0, b0 + count) += alpha * src, and the sum of d^2 over 16 interleaved lanes (see
// SqnormBlockFn). Whole groups of 16 in place; a last partial group on a copy whose padding lanes
// add exactly +0.
template <typename S>
MS_INLINE void sqnorm_group(float* d, const S* s, F alpha, F* acc) {
  for (int k = 0; k < 16 / N; ++k) {
    F x = V::loadf(d + k * N);
    if constexpr (!__is_same(S, void)) {
      F y;
      if constexpr (sizeof(S) == 2) y = V::fbits(V::sll<16>(V::load_u16(reinterpret_cast<const uint16_t*>(s) + k * N)));
      else y = V::loadf(reinterpret_cast<const float*>(s) + k * N);
      x = V::add(x, V::mul(alpha, y));
      V::storef(d + k * N, x);
    }
    acc[k] = V::add(acc[k], V::mul(x, x));
  }
}

template <typename S>
float sqnorm_block(float* dst, const void* src_v, float alpha, int64_t b0, int count) {
  using SE = typename std::conditional<__is_same(S, void), float, S>::type;  // element type for padding
  const S* src = static_cast<const S*>(src_v);
  float* d = dst + b0;
  const SE* s = src ? reinterpret_cast<const SE*>(src) + b0 : nullptr;
  const F a = V::fset(alpha);
  F acc[16 / N];
  for (int k = 0; k < 16 / N; ++k) acc[k] = V::fset(0.0f);
  int j = 0;
  for (; j + 16 <= count; j += 16) sqnorm_group<S>(d + j, reinterpret_cast<const S*>(s ? s + j : nullptr), a, acc);
  if (j < count) {
    const int r = count - j;
    alignas(64) float ld[16];
    alignas(64) SE ls[16];
    __builtin_memset(ld, 0, sizeof ld);
    __builtin_memset(ls, 0, sizeof ls);
    __builtin_memcpy(ld, d + j, r * sizeof(float));
    if (s) __builtin_memcpy(ls, s + j, r * sizeof(SE));
    F none[16 / N];  // squares of the whole padded group are not wanted: accumulate after zeroing
    for (int k = 0; k < 16 / N; ++k) none[k] = V::fset(0.0f);
    sqnorm_group<S>(ld, reinterpret_cast<const S*>(ls), a, none);
    __builtin_memcpy(d + j, ld, r * sizeof(float));
    for (int l = r; l < 16; ++l) ld[l] = 0.0f;
    sqnorm_group<void>(ld, nullptr, a, acc);
  }
  return V::reduce16(acc);
}

#define MS_ROW(G, W) \
  { adamw_block<G, W, States::F32>, adamw_block<G, W, States::BF16>, adamw_block<G, W, States::I8> }
#define MS_GRAD(G) \
  { MS_ROW(G, Weights::F32), MS_ROW(G, Weights::F32_WORKING), MS_ROW(G, Weights::BF16_SR) }
constexpr KernelTable kTable = {V::kName,
                                {MS_GRAD(float), MS_GRAD(uint16_t)},
                                {sqnorm_block<void>, sqnorm_block<float>, sqnorm_block<uint16_t>}};
#undef MS_GRAD
#undef MS_ROW

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

MS_INLINE F load_bf16(const uint16_t* p) { return V::fbits(V::sll<16>(V::load_u16(p))); }

template <typename G>
MS_INLINE F load_grad(const G* p) {
  if constexpr (sizeof(G) == 2) return load_bf16(reinterpret_cast<const uint16_t*>(p));
  else return V::loadf(reinterpret_cast<const float*>(p));
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
// y in [0, 1] (or NaN, with its sign bit clear); r: random bits below the kept mantissa. The raw
// code is the stochastically rounded top bits (< 2^12); Vec::store_*codes_x4 subtract the base,
// floor at 0 and cap at the largest code (127 with the sign for m, 255 for v).
MS_INLINE I raw_code(F y, I r) { return V::srl<megastream_ops::kMantShift>(V::iadd(V::bits(y), r)); }

// code -> magnitude relative to the block's scale; code 0 is exactly 0.
MS_INLINE F dec_mag(I c, int32_t base) {
  return V::fbits(V::izero_if(V::icmpeq(c, V::iset(0u)),
                              V::sll<megastream_ops::kMantShift>(V::iadd(c, V::iset(static_cast<uint32_t>(base))))));
}

MS_INLINE F dec_m(I q, F scale) {  // q: the int8 code, sign-extended
  const F mag = V::mul(dec_mag(V::iabs(q), megastream_ops::kMBase), scale);
  return V::fbits(V::ixor(V::bits(mag), V::iand(q, V::iset(0x80000000u))));  // c < 0 ? -mag : mag
}

MS_INLINE F dec_v(I q, F scale) { return V::mul(dec_mag(q, megastream_ops::kVBase), scale); }  // sqrt(v)

struct HyperV {
  F decay, one, omb1, beta2, omb2, inv_bc2, eps, neg_step, gscale;
  explicit HyperV(const Hyper& h)
      : decay(V::fset(h.decay)), one(V::fset(1.0f)), omb1(V::fset(h.one_m_beta1)), beta2(V::fset(h.beta2)),
        omb2(V::fset(h.one_m_beta2)), inv_bc2(V::fset(h.inv_bc2_sqrt)), eps(V::fset(h.eps)),
        neg_step(V::fset(h.neg_step_size)), gscale(V::fset(h.grad_scale)) {}
};

// The weight-decay factor of lanes [j, j + N): decay below n_decay, 1 from there on.
MS_INLINE F decay_at(const HyperV& hv, int j, int n_decay) {
  if (j + N <= n_decay) return hv.decay;
  if (j >= n_decay) return hv.one;
  return V::fselect(V::icmpgt(V::iset(static_cast<uint32_t>(n_decay - j)), V::iota()), hv.decay, hv.one);
}

template <Weights W>
MS_INLINE F load_weight(const void* wp, int j) {
  if constexpr (W != Weights::BF16_SR) return V::loadf(static_cast<const float*>(wp) + j);
  else return load_bf16(static_cast<const uint16_t*>(wp) + j);
}

// The updated weights of lanes [j, j + 2N): into the fp32 master (and its bf16 working copy,
// rounded to nearest; with non-temporal stores when kStream), or, without a master, into the bf16
// weights with stochastic rounding (`hw`: the hash inputs of the two vectors).
template <Weights W, bool kStream>
MS_INLINE void store_weights(void* wp, uint16_t* wk, int j, const F* p, const I* hw) {
  if constexpr (W != Weights::BF16_SR) {
    V::storef(static_cast<float*>(wp) + j, p[0]);
    V::storef(static_cast<float*>(wp) + j + N, p[1]);
    if constexpr (W == Weights::F32_WORKING) {
      if constexpr (kStream) V::stream_u16x2(wk + j, bf16_rne(p[0]), bf16_rne(p[1]));
      else V::store_u16x2(wk + j, bf16_rne(p[0]), bf16_rne(p[1]));
    }
  } else {
    V::store_u16x2(static_cast<uint16_t*>(wp) + j, bf16_sr(p[0], hw[0]), bf16_sr(p[1], hw[1]));
  }
}

// One full block of kBlock elements: pointers at the block's first element, `i0` its index in the
// buffer (the random streams' counter), `n_decay` relative to the block, `ms`/`vs` its scales.
// Main memory is touched once: each input read once, each output written once. Two vectors per
// step (four in the int8 encode), so that narrow results are packed into whole registers.
template <typename G, Weights W, States S, bool kStream>
void adamw_full(const G* g, void* wp, void* mp, void* vp, float* ms, float* vs, uint16_t* wk, const Hyper& h,
                uint32_t i0, int n_decay) {
  const HyperV hv(h);
  const I hstep = V::iset(static_cast<uint32_t>(N) * megastream_ops::kGolden);
  const I idx0 = V::imul(V::iadd(V::iset(i0), V::iota()), V::iset(megastream_ops::kGolden));  // i * kGolden
  I hw = V::iadd(idx0, V::iset(h.key));  // the weights' hash inputs, one vector ahead per vector

  if constexpr (S != States::I8) {
    for (int j = 0; j < kBlock; j += 2 * N) {
      F p[2], m[2], v[2];
      I hwu[2];
      for (int u = 0; u < 2; ++u) {
        const int ju = j + u * N;
        const F gi = V::mul(load_grad(g + ju), hv.gscale);
        if constexpr (S == States::F32) {
          m[u] = V::loadf(static_cast<float*>(mp) + ju);
          v[u] = V::loadf(static_cast<float*>(vp) + ju);
        } else {
          m[u] = load_bf16(static_cast<uint16_t*>(mp) + ju);
          v[u] = load_bf16(static_cast<uint16_t*>(vp) + ju);
        }
        m[u] = V::add(m[u], V::mul(V::sub(gi, m[u]), hv.omb1));                      // m + (g - m)(1 - b1)
        v[u] = V::add(V::mul(v[u], hv.beta2), V::mul(V::mul(gi, hv.omb2), gi));      // v b2 + (g (1 - b2)) g
        const F denom = V::add(V::mul(V::sqrt(v[u]), hv.inv_bc2), hv.eps);         // sqrt(v) / sqrt(bc2) + eps
        p[u] = V::add(V::mul(load_weight<W>(wp, ju), decay_at(hv, ju, n_decay)),
                      V::mul(V::div(m[u], denom), hv.neg_step));                     // p decay - lr/bc1 m / denom
        hwu[u] = hw;
        hw = V::iadd(hw, hstep);
      }
      store_weights<W, kStream>(wp, wk, j, p, hwu);
      if constexpr (S == States::F32) {
        for (int u = 0; u < 2; ++u) {
          V::storef(static_cast<float*>(mp) + j + u * N, m[u]);
          V::storef(static_cast<float*>(vp) + j + u * N, v[u]);
        }
      } else {
        V::store_u16x2(static_cast<uint16_t*>(mp) + j, bf16_rne_fast(m[0]), bf16_rne_fast(m[1]));
        V::store_u16x2(static_cast<uint16_t*>(vp) + j, bf16_rne_fast(v[0]), bf16_rne_fast(v[1]));
      }
    }
    return;
  }

  // int8 states: the block's new maxima are needed before any moment code is written, so the new
  // m and sqrt(v) wait in L1-resident scratch while the weights are written; then one encode pass.
  alignas(64) float mb[kBlock], sb[kBlock];
  const int8_t* mq = static_cast<const int8_t*>(mp);
  const uint8_t* vq = static_cast<const uint8_t*>(vp);
  const F msc = V::fset(*ms), vsc = V::fset(*vs);
  const I abs_mask = V::iset(0x7fffffffu);
  F m_max = V::fset(0.0f), v_max = V::fset(0.0f);
  for (int j = 0; j < kBlock; j += 2 * N) {
    F p[2];
    I hwu[2];
    for (int u = 0; u < 2; ++u) {
      const int ju = j + u * N;
      const F gi = V::mul(load_grad(g + ju), hv.gscale);
      const F m0 = dec_m(V::load_i8(mq + ju), msc);
      const F s0 = dec_v(V::load_u8(vq + ju), vsc);
      const F m = V::add(m0, V::mul(V::sub(gi, m0), hv.omb1));
      const F sv = V::sqrt(V::add(V::mul(V::mul(s0, s0), hv.beta2), V::mul(V::mul(gi, hv.omb2), gi)));  // sqrt(new v)
      const F denom = V::add(V::mul(sv, hv.inv_bc2), hv.eps);
      p[u] = V::add(V::mul(load_weight<W>(wp, ju), decay_at(hv, ju, n_decay)), V::mul(V::div(m, denom), hv.neg_step));
      V::storef(mb + ju, m);
      V::storef(sb + ju, sv);
      m_max = V::fmax(V::fbits(V::iand(V::bits(m), abs_mask)), m_max);  // NaN never wins: the max ignores it
      v_max = V::fmax(sv, v_max);
      hwu[u] = hw;
      hw = V::iadd(hw, hstep);
    }
    store_weights<W, kStream>(wp, wk, j, p, hwu);
  }
  const float mx = V::hmax(m_max), vx = V::hmax(v_max);
  *ms = mx;
  *vs = vx;
  const F im = V::fset(mx > 0 ? 1.0f / mx : 0.f), iv = V::fset(vx > 0 ? 1.0f / vx : 0.f);
  const I code_bits = V::iset(0xffff0u);
  const F zero = V::fset(0.0f);
  int8_t* mo = static_cast<int8_t*>(mp);
  uint8_t* vo = static_cast<uint8_t*>(vp);
  I hs = V::iadd(idx0, V::iset(h.key ^ megastream_ops::kStateKey));  // the codes' hash inputs
  for (int j = 0; j < kBlock; j += 4 * N) {
    I cm[4], cv[4];
    V::MF neg[4];
    for (int u = 0; u < 4; ++u) {
      const int ju = j + u * N;
      // r = fmix32(hs): 16 random bits for each code, shifted to the top of the 20 it drops:
      // m takes (r >> 16) << 4 = (x >> 16) << 4, v takes (r & 0xffff) << 4.
      const I x = fmix32_mul(hs);
      const I top = V::srl<16>(x);
      const I rm = V::sll<4>(top);
      const I rv = V::iand(V::sll<4>(V::ixor(x, top)), code_bits);
      const F m = V::loadf(mb + ju);
      cm[u] = raw_code(V::mul(V::fbits(V::iand(V::bits(m), abs_mask)), im), rm);
      neg[u] = V::fcmplt(m, zero);
      // sqrt(v) * iv is >= +0 or NaN; clearing the sign only matters for a NaN, whose code is then
      // 255 whatever its sign and payload (as in the reference's int64 arithmetic) rather than
      // depending on whether a negative NaN's bits wrap around 2^32 when r is added.
      cv[u] = raw_code(V::fbits(V::iand(V::bits(V::mul(V::loadf(sb + ju), iv)), abs_mask)), rv);
      hs = V::iadd(hs, hstep);
    }
    V::store_mcodes_x4(mo + j, cm, neg, megastream_ops::kMBase);
    V::store_vcodes_x4(vo + j, cv, megastream_ops::kVBase);
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
      x = V::add(x, V::mul(alpha, load_grad(s + k * N)));
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

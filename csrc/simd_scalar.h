// The portable "vector" of one lane: the fallback path, and the reference the wide paths must match
// bit for bit (each primitive below is the scalar meaning of the AVX2 / AVX-512 ones).
// Included inside a namespace by csrc/adamw.cpp; no includes of its own.

struct Vec {
  static constexpr int N = 1;
  static constexpr const char* kName = "scalar";
  using F = float;
  using I = uint32_t;
  using MF = bool;  // a float comparison's lanes
  using MI = bool;  // an integer comparison's lanes

  static MS_INLINE F fset(float x) { return x; }
  static MS_INLINE I iset(uint32_t x) { return x; }
  static MS_INLINE I iota() { return 0u; }

  static MS_INLINE F loadf(const float* p) { return *p; }
  static MS_INLINE void storef(float* p, F x) { *p = x; }
  static MS_INLINE I load_u16(const uint16_t* p) { return *p; }

  // Pairs of vectors: here two consecutive elements, in either layout.
  template <bool kIl> static MS_INLINE I pair_index(int u) { return static_cast<uint32_t>(u); }
  template <bool kIl> static MS_INLINE void load_f32x2(const float* p, F* x) { x[0] = p[0], x[1] = p[1]; }
  template <bool kIl> static MS_INLINE void store_f32x2(float* p, const F* x) { p[0] = x[0], p[1] = x[1]; }
  template <bool kIl> static MS_INLINE void load_bf16x2(const uint16_t* p, F* x) {
    for (int u = 0; u < 2; ++u) x[u] = fbits(static_cast<uint32_t>(p[u]) << 16);
  }
  template <bool kIl> static MS_INLINE void store_u16x2(uint16_t* p, const I* x) {  // lanes < 2^16
    for (int u = 0; u < 2; ++u) p[u] = static_cast<uint16_t>(x[u]);
  }
  template <bool kIl> static MS_INLINE void stream_u16x2(uint16_t* p, const I* x) { store_u16x2<kIl>(p, x); }

  // The 8-bit codes of a pair, decoded: code c -> magnitude bits (|c| + base) << 20 (0 for c = 0),
  // with m's sign, times the block's scale (sign before the multiply: the same number, and the same
  // NaN up to its sign, as negating after).
  template <bool kIl> static MS_INLINE void load_m8x2(const int8_t* p, F scale, F* x) {
    for (int u = 0; u < 2; ++u) {
      const int32_t c = p[u];
      const uint32_t a = static_cast<uint32_t>(c < 0 ? -c : c);
      x[u] = fbits((a == 0 ? 0u : (a + megastream_ops::kMBase) << megastream_ops::kMantShift) | (c < 0 ? 0x80000000u : 0u)) * scale;
    }
  }
  template <bool kIl> static MS_INLINE void load_v8x2(const uint8_t* p, F scale, F* x) {
    for (int u = 0; u < 2; ++u) x[u] = fbits(p[u] == 0 ? 0u : (p[u] + static_cast<uint32_t>(megastream_ops::kVBase)) << megastream_ops::kMantShift) * scale;
  }
  // Two pairs of raw 8-bit codes (0 <= c < 2^12): max(c - base, 0), capped at 127 and negated
  // where neg (m), or capped at 255 (v).
  template <bool kIl> static MS_INLINE void store_mcodes_x4(int8_t* p, const I* c, const MF* neg, int32_t base) {
    for (int u = 0; u < 4; ++u) {
      int32_t x = static_cast<int32_t>(c[u]) - base;
      x = x < 0 ? 0 : x > 127 ? 127 : x;
      p[u] = static_cast<int8_t>(neg[u] ? -x : x);
    }
  }
  template <bool kIl> static MS_INLINE void store_vcodes_x4(uint8_t* p, const I* c, int32_t base) {
    for (int u = 0; u < 4; ++u) {
      const int32_t x = static_cast<int32_t>(c[u]) - base;
      p[u] = static_cast<uint8_t>(x < 0 ? 0 : x > 255 ? 255 : x);
    }
  }

  static MS_INLINE F add(F a, F b) { return a + b; }
  static MS_INLINE F sub(F a, F b) { return a - b; }
  static MS_INLINE F mul(F a, F b) { return a * b; }
  static MS_INLINE F div(F a, F b) { return a / b; }
  static MS_INLINE F sqrt(F a) { return __builtin_sqrtf(a); }  // correctly rounded (-fno-math-errno)
  static MS_INLINE F fmax(F a, F b) { return a > b ? a : b; }  // x86 maxps: b when either is NaN

  static MS_INLINE I bits(F a) { return __builtin_bit_cast(uint32_t, a); }
  static MS_INLINE F fbits(I a) { return __builtin_bit_cast(float, a); }
  static MS_INLINE I iadd(I a, I b) { return a + b; }
  static MS_INLINE I imul(I a, I b) { return a * b; }  // low 32 bits
  static MS_INLINE I ixor(I a, I b) { return a ^ b; }
  static MS_INLINE I iand(I a, I b) { return a & b; }
  static MS_INLINE I ior(I a, I b) { return a | b; }
  template <int k> static MS_INLINE I srl(I a) { return a >> k; }
  template <int k> static MS_INLINE I sll(I a) { return a << k; }
  static MS_INLINE I iabs(I a) { return static_cast<int32_t>(a) < 0 ? 0u - a : a; }

  static MS_INLINE MI icmpgt(I a, I b) { return static_cast<int32_t>(a) > static_cast<int32_t>(b); }  // signed
  static MS_INLINE MI icmpeq(I a, I b) { return a == b; }
  static MS_INLINE MF fcmplt(F a, F b) { return a < b; }  // ordered: false with a NaN
  static MS_INLINE I iselect(MI m, I a, I b) { return m ? a : b; }
  static MS_INLINE F fselect(MI m, F a, F b) { return m ? a : b; }
  static MS_INLINE I izero_if(MI m, I a) { return m ? 0u : a; }

  static MS_INLINE float hmax(F a) { return a; }
  // Sum of 16 interleaved lanes (acc[l] holds lane l): (l, l+8), then (l, l+4), (l, l+2), (0, 1).
  static MS_INLINE float reduce16(const F* acc) {
    float t[8];
    for (int l = 0; l < 8; ++l) t[l] = acc[l] + acc[l + 8];
    for (int l = 0; l < 4; ++l) t[l] = t[l] + t[l + 4];
    for (int l = 0; l < 2; ++l) t[l] = t[l] + t[l + 2];
    return t[0] + t[1];
  }
};

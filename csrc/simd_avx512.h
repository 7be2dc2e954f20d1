// 16 lanes of AVX-512 (F/BW/DQ/VL). Same meaning, lane for lane, as csrc/simd_scalar.h. No FMA.
// Included inside a namespace and a `#pragma GCC target("avx512f,...")` region by csrc/adamw.cpp,
// after <immintrin.h>; csrc/check_isa.cpp also builds it against SIMDe's portable AVX-512, which is
// how this path is checked on machines without AVX-512.
//
// Not used: AVX512-BF16's vcvtneps2bf16. It rounds to nearest even, but treats subnormal inputs as
// zero (a subnormal moment or weight would become 0 instead of the nearest bf16), so it is not
// bit-identical to the reference; the integer rounding below costs a few cheap integer ops.

struct Vec {
  static constexpr int N = 16;
  static constexpr const char* kName = "avx512";
  using F = __m512;
  using I = __m512i;
  using MF = __mmask16;
  using MI = __mmask16;

  static MS_INLINE F fset(float x) { return _mm512_set1_ps(x); }
  static MS_INLINE I iset(uint32_t x) { return _mm512_set1_epi32(static_cast<int>(x)); }
  static MS_INLINE I iota() { return _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15); }

  static MS_INLINE F loadf(const float* p) { return _mm512_loadu_ps(p); }
  static MS_INLINE void storef(float* p, F x) { _mm512_storeu_ps(p, x); }
  static MS_INLINE I load_u16(const uint16_t* p) {
    return _mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
  }
  static MS_INLINE void store_u16(uint16_t* p, I x) {  // every lane < 2^16: truncation is exact
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), _mm512_cvtepi32_epi16(x));
  }

  // Pairs of vectors, 32 consecutive elements, always in the natural layout (lo = 0-15, hi =
  // 16-31): AVX-512's narrowing moves (vpmovdw, vpmovdb) keep the order.
  template <bool kIl> static MS_INLINE I pair_index(int u) { return _mm512_add_epi32(iota(), _mm512_set1_epi32(16 * u)); }
  template <bool kIl> static MS_INLINE void load_f32x2(const float* p, F* x) {
    x[0] = _mm512_loadu_ps(p);
    x[1] = _mm512_loadu_ps(p + 16);
  }
  template <bool kIl> static MS_INLINE void store_f32x2(float* p, const F* x) {
    _mm512_storeu_ps(p, x[0]);
    _mm512_storeu_ps(p + 16, x[1]);
  }
  template <bool kIl> static MS_INLINE void load_bf16x2(const uint16_t* p, F* x) {
    x[0] = fbits(sll<16>(load_u16(p)));
    x[1] = fbits(sll<16>(load_u16(p + 16)));
  }
  template <bool kIl> static MS_INLINE void store_u16x2(uint16_t* p, const I* x) {
    store_u16(p, x[0]);
    store_u16(p + 16, x[1]);
  }
  template <bool kIl> static MS_INLINE void stream_u16x2(uint16_t* p, const I* x) {  // p 64-byte aligned
    _mm512_stream_si512(reinterpret_cast<__m512i*>(p),
                        _mm512_inserti64x4(_mm512_castsi256_si512(_mm512_cvtepi32_epi16(x[0])), _mm512_cvtepi32_epi16(x[1]), 1));
  }

  // The 8-bit codes of a pair, decoded (see csrc/simd_scalar.h).
  template <bool kIl> static MS_INLINE void load_m8x2(const int8_t* p, F scale, F* x) {
    for (int u = 0; u < 2; ++u) {
      const __m512i c = _mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p + 16 * u)));
      const __m512i a = _mm512_abs_epi32(c);
      const __m512i t = _mm512_maskz_mov_epi32(_mm512_test_epi32_mask(a, a),  // 0 where c = 0
                                               _mm512_slli_epi32(_mm512_add_epi32(a, _mm512_set1_epi32(megastream_ops::kMBase)), megastream_ops::kMantShift));
      x[u] = _mm512_mul_ps(_mm512_castsi512_ps(_mm512_or_si512(t, _mm512_and_si512(c, _mm512_set1_epi32(static_cast<int>(0x80000000u))))),
                           scale);
    }
  }
  template <bool kIl> static MS_INLINE void load_v8x2(const uint8_t* p, F scale, F* x) {
    for (int u = 0; u < 2; ++u) {
      const __m512i c = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p + 16 * u)));
      const __m512i t = _mm512_maskz_mov_epi32(_mm512_test_epi32_mask(c, c),
                                               _mm512_slli_epi32(_mm512_add_epi32(c, _mm512_set1_epi32(megastream_ops::kVBase)), megastream_ops::kMantShift));
      x[u] = _mm512_mul_ps(_mm512_castsi512_ps(t), scale);
    }
  }

  // Two pairs of raw 8-bit codes (0 <= c < 2^12): max(c - base, 0), capped at 127 and negated
  // where neg (m), or capped at 255 (v).
  template <bool kIl> static MS_INLINE void store_mcodes_x4(int8_t* p, const I* c, const MF* neg, int32_t base) {
    for (int u = 0; u < 4; ++u) {
      const __m512i x = _mm512_min_epi32(_mm512_max_epi32(_mm512_sub_epi32(c[u], _mm512_set1_epi32(base)),
                                                          _mm512_setzero_si512()), _mm512_set1_epi32(127));
      _mm_storeu_si128(reinterpret_cast<__m128i*>(p + u * N),
                       _mm512_cvtepi32_epi8(_mm512_mask_sub_epi32(x, neg[u], _mm512_setzero_si512(), x)));
    }
  }
  template <bool kIl> static MS_INLINE void store_vcodes_x4(uint8_t* p, const I* c, int32_t base) {
    for (int u = 0; u < 4; ++u) {
      const __m512i x = _mm512_min_epi32(_mm512_max_epi32(_mm512_sub_epi32(c[u], _mm512_set1_epi32(base)),
                                                          _mm512_setzero_si512()), _mm512_set1_epi32(255));
      _mm_storeu_si128(reinterpret_cast<__m128i*>(p + u * N), _mm512_cvtepi32_epi8(x));
    }
  }

  static MS_INLINE F add(F a, F b) { return _mm512_add_ps(a, b); }
  static MS_INLINE F sub(F a, F b) { return _mm512_sub_ps(a, b); }
  static MS_INLINE F mul(F a, F b) { return _mm512_mul_ps(a, b); }
  static MS_INLINE F div(F a, F b) { return _mm512_div_ps(a, b); }
  static MS_INLINE F sqrt(F a) { return _mm512_sqrt_ps(a); }
  static MS_INLINE F fmax(F a, F b) { return _mm512_max_ps(a, b); }  // a > b ? a : b

  static MS_INLINE I bits(F a) { return _mm512_castps_si512(a); }
  static MS_INLINE F fbits(I a) { return _mm512_castsi512_ps(a); }
  static MS_INLINE I iadd(I a, I b) { return _mm512_add_epi32(a, b); }
  static MS_INLINE I imul(I a, I b) { return _mm512_mullo_epi32(a, b); }
  static MS_INLINE I ixor(I a, I b) { return _mm512_xor_si512(a, b); }
  static MS_INLINE I iand(I a, I b) { return _mm512_and_si512(a, b); }
  static MS_INLINE I ior(I a, I b) { return _mm512_or_si512(a, b); }
  template <int k> static MS_INLINE I srl(I a) { return _mm512_srli_epi32(a, k); }
  template <int k> static MS_INLINE I sll(I a) { return _mm512_slli_epi32(a, k); }
  static MS_INLINE I iabs(I a) { return _mm512_abs_epi32(a); }

  static MS_INLINE MI icmpgt(I a, I b) { return _mm512_cmpgt_epi32_mask(a, b); }
  static MS_INLINE MI icmpeq(I a, I b) { return _mm512_cmpeq_epi32_mask(a, b); }
  static MS_INLINE MF fcmplt(F a, F b) { return _mm512_cmp_ps_mask(a, b, _CMP_LT_OQ); }
  static MS_INLINE I iselect(MI m, I a, I b) { return _mm512_mask_blend_epi32(m, b, a); }
  static MS_INLINE F fselect(MI m, F a, F b) { return _mm512_mask_blend_ps(m, b, a); }
  static MS_INLINE I izero_if(MI m, I a) { return _mm512_maskz_mov_epi32(static_cast<__mmask16>(~m), a); }

  static MS_INLINE float hmax(F a) {  // no lane is NaN here, so the order does not matter
    const __m256 h = _mm256_max_ps(_mm512_castps512_ps256(a),
                                   _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(a), 1)));
    __m128 x = _mm_max_ps(_mm256_castps256_ps128(h), _mm256_extractf128_ps(h, 1));
    x = _mm_max_ps(x, _mm_movehl_ps(x, x));
    x = _mm_max_ss(x, _mm_shuffle_ps(x, x, 1));
    return _mm_cvtss_f32(x);
  }
  // acc[0] holds the 16 lanes; the tree of csrc/simd_scalar.h.
  static MS_INLINE float reduce16(const F* acc) {
    const __m512 a = acc[0];
    const __m256 s = _mm256_add_ps(_mm512_castps512_ps256(a),
                                   _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(a), 1)));  // (l, l+8)
    __m128 x = _mm_add_ps(_mm256_castps256_ps128(s), _mm256_extractf128_ps(s, 1));                // (l, l+4)
    x = _mm_add_ps(x, _mm_movehl_ps(x, x));                                                       // (l, l+2)
    return _mm_cvtss_f32(_mm_add_ss(x, _mm_shuffle_ps(x, x, 1)));                                  // (0, 1)
  }
};

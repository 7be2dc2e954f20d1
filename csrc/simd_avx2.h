// 8 lanes of AVX2 (256-bit). Same meaning, lane for lane, as csrc/simd_scalar.h. No FMA: every
// multiply and add is rounded on its own, as in the reference. Included inside a namespace and a
// `#pragma GCC target("avx2")` region by csrc/adamw.cpp, after <immintrin.h>.

struct Vec {
  static constexpr int N = 8;
  static constexpr const char* kName = "avx2";
  using F = __m256;
  using I = __m256i;
  using MF = __m256;   // all-ones / all-zeros lanes
  using MI = __m256i;

  static MS_INLINE F fset(float x) { return _mm256_set1_ps(x); }
  static MS_INLINE I iset(uint32_t x) { return _mm256_set1_epi32(static_cast<int>(x)); }
  static MS_INLINE I iota() { return _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7); }

  static MS_INLINE F loadf(const float* p) { return _mm256_loadu_ps(p); }
  static MS_INLINE void storef(float* p, F x) { _mm256_storeu_ps(p, x); }
  static MS_INLINE I load_u16(const uint16_t* p) {
    return _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
  }

  // Pairs of vectors, 16 consecutive elements. Natural layout: lo = elements 0-7, hi = 8-15.
  // Interleaved (kIl): lo = 0-3 and 8-11, hi = 4-7 and 12-15, what unpacking 16-bit halves gives
  // and what the in-lane packs take back: bf16 and int8 data then need no cross-lane shuffles.
  template <bool kIl> static MS_INLINE I pair_index(int u) {
    if constexpr (kIl) return u == 0 ? _mm256_setr_epi32(0, 1, 2, 3, 8, 9, 10, 11) : _mm256_setr_epi32(4, 5, 6, 7, 12, 13, 14, 15);
    else return _mm256_add_epi32(iota(), _mm256_set1_epi32(8 * u));
  }
  template <bool kIl> static MS_INLINE void load_f32x2(const float* p, F* x) {
    const __m256 a = _mm256_loadu_ps(p), b = _mm256_loadu_ps(p + 8);
    x[0] = kIl ? _mm256_permute2f128_ps(a, b, 0x20) : a;
    x[1] = kIl ? _mm256_permute2f128_ps(a, b, 0x31) : b;
  }
  template <bool kIl> static MS_INLINE void store_f32x2(float* p, const F* x) {
    _mm256_storeu_ps(p, kIl ? _mm256_permute2f128_ps(x[0], x[1], 0x20) : x[0]);
    _mm256_storeu_ps(p + 8, kIl ? _mm256_permute2f128_ps(x[0], x[1], 0x31) : x[1]);
  }
  template <bool kIl> static MS_INLINE void load_bf16x2(const uint16_t* p, F* x) {
    if constexpr (kIl) {  // (h << 16) | 0: the bf16 bits in the top half of each 32-bit lane
      const __m256i a = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
      x[0] = _mm256_castsi256_ps(_mm256_unpacklo_epi16(_mm256_setzero_si256(), a));
      x[1] = _mm256_castsi256_ps(_mm256_unpackhi_epi16(_mm256_setzero_si256(), a));
    } else {
      x[0] = fbits(sll<16>(load_u16(p)));
      x[1] = fbits(sll<16>(load_u16(p + 8)));
    }
  }
  // Lanes < 2^16, so the saturating pack is exact; it interleaves 4-element groups, which the
  // interleaved layout undoes and the natural one puts back with a qword permute.
  template <bool kIl> static MS_INLINE __m256i pack_u16x2(const I* x) {
    const __m256i t = _mm256_packus_epi32(x[0], x[1]);
    return kIl ? t : _mm256_permute4x64_epi64(t, 0xD8);
  }
  template <bool kIl> static MS_INLINE void store_u16x2(uint16_t* p, const I* x) {
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), pack_u16x2<kIl>(x));
  }
  template <bool kIl> static MS_INLINE void stream_u16x2(uint16_t* p, const I* x) {  // p 32-byte aligned
    _mm256_stream_si256(reinterpret_cast<__m256i*>(p), pack_u16x2<kIl>(x));
  }

  // The 8-bit codes of a pair, decoded (see csrc/simd_scalar.h). Interleaved: on 16 lanes of 16
  // bits, (|c| + base) << 4 and the sign are the top half of the float's bits, then unpacked.
  template <bool kIl> static MS_INLINE void load_m8x2(const int8_t* p, F scale, F* x) {
    if constexpr (kIl) {
      const __m256i c = _mm256_cvtepi8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
      const __m256i a = _mm256_abs_epi16(c);
      __m256i t = _mm256_slli_epi16(_mm256_add_epi16(a, _mm256_set1_epi16(static_cast<short>(megastream_ops::kMBase))), megastream_ops::kMantShift - 16);
      t = _mm256_andnot_si256(_mm256_cmpeq_epi16(a, _mm256_setzero_si256()), t);
      t = _mm256_or_si256(t, _mm256_and_si256(c, _mm256_set1_epi16(static_cast<short>(0x8000))));
      unpack_mul(t, scale, x);
    } else {
      for (int u = 0; u < 2; ++u) {
        const __m256i c = _mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p + 8 * u)));
        const __m256i a = _mm256_abs_epi32(c);
        __m256i t = _mm256_slli_epi32(_mm256_add_epi32(a, _mm256_set1_epi32(megastream_ops::kMBase)), megastream_ops::kMantShift);
        t = _mm256_andnot_si256(_mm256_cmpeq_epi32(a, _mm256_setzero_si256()), t);
        t = _mm256_or_si256(t, _mm256_and_si256(c, _mm256_set1_epi32(static_cast<int>(0x80000000u))));
        x[u] = _mm256_mul_ps(_mm256_castsi256_ps(t), scale);
      }
    }
  }
  template <bool kIl> static MS_INLINE void load_v8x2(const uint8_t* p, F scale, F* x) {
    if constexpr (kIl) {
      const __m256i c = _mm256_cvtepu8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
      __m256i t = _mm256_slli_epi16(_mm256_add_epi16(c, _mm256_set1_epi16(static_cast<short>(megastream_ops::kVBase))), megastream_ops::kMantShift - 16);
      t = _mm256_andnot_si256(_mm256_cmpeq_epi16(c, _mm256_setzero_si256()), t);
      unpack_mul(t, scale, x);
    } else {
      for (int u = 0; u < 2; ++u) {
        const __m256i c = _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p + 8 * u)));
        __m256i t = _mm256_slli_epi32(_mm256_add_epi32(c, _mm256_set1_epi32(megastream_ops::kVBase)), megastream_ops::kMantShift);
        t = _mm256_andnot_si256(_mm256_cmpeq_epi32(c, _mm256_setzero_si256()), t);
        x[u] = _mm256_mul_ps(_mm256_castsi256_ps(t), scale);
      }
    }
  }
  static MS_INLINE void unpack_mul(__m256i t, F scale, F* x) {
    x[0] = _mm256_mul_ps(_mm256_castsi256_ps(_mm256_unpacklo_epi16(_mm256_setzero_si256(), t)), scale);
    x[1] = _mm256_mul_ps(_mm256_castsi256_ps(_mm256_unpackhi_epi16(_mm256_setzero_si256(), t)), scale);
  }

  // Two pairs of raw 8-bit codes (0 <= c < 2^12): max(c - base, 0), capped at 127 and negated
  // where neg (m), or capped at 255 (v). On 16-bit lanes, half the work: an unsigned saturating
  // subtract floors at 0, the saturating pack to bytes is the cap. The two in-lane packs leave
  // 8-byte groups (interleaved layout) or 4-byte groups (natural) out of order; one permute each.
  static MS_INLINE __m256i codes16(I a, I b, int32_t base) {
    return _mm256_subs_epu16(_mm256_packus_epi32(a, b), _mm256_set1_epi16(static_cast<short>(base)));
  }
  template <bool kIl> static MS_INLINE __m256i order_x4(__m256i x) {
    if constexpr (kIl) return _mm256_permute4x64_epi64(x, 0xD8);
    else return _mm256_permutevar8x32_epi32(x, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7));
  }
  template <bool kIl> static MS_INLINE void store_mcodes_x4(int8_t* p, const I* c, const MF* neg, int32_t base) {
    const __m256i x = _mm256_packs_epi16(codes16(c[0], c[1], base), codes16(c[2], c[3], base));  // <= 127
    const __m256i s = _mm256_packs_epi16(_mm256_packs_epi32(_mm256_castps_si256(neg[0]), _mm256_castps_si256(neg[1])),
                                         _mm256_packs_epi32(_mm256_castps_si256(neg[2]), _mm256_castps_si256(neg[3])));
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), order_x4<kIl>(_mm256_sub_epi8(_mm256_xor_si256(x, s), s)));
  }
  template <bool kIl> static MS_INLINE void store_vcodes_x4(uint8_t* p, const I* c, int32_t base) {
    const __m256i x = _mm256_packus_epi16(codes16(c[0], c[1], base), codes16(c[2], c[3], base));  // <= 255
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), order_x4<kIl>(x));
  }

  static MS_INLINE F add(F a, F b) { return _mm256_add_ps(a, b); }
  static MS_INLINE F sub(F a, F b) { return _mm256_sub_ps(a, b); }
  static MS_INLINE F mul(F a, F b) { return _mm256_mul_ps(a, b); }
  static MS_INLINE F div(F a, F b) { return _mm256_div_ps(a, b); }
  static MS_INLINE F sqrt(F a) { return _mm256_sqrt_ps(a); }
  static MS_INLINE F fmax(F a, F b) { return _mm256_max_ps(a, b); }  // a > b ? a : b

  static MS_INLINE I bits(F a) { return _mm256_castps_si256(a); }
  static MS_INLINE F fbits(I a) { return _mm256_castsi256_ps(a); }
  static MS_INLINE I iadd(I a, I b) { return _mm256_add_epi32(a, b); }
  static MS_INLINE I imul(I a, I b) { return _mm256_mullo_epi32(a, b); }
  static MS_INLINE I ixor(I a, I b) { return _mm256_xor_si256(a, b); }
  static MS_INLINE I iand(I a, I b) { return _mm256_and_si256(a, b); }
  static MS_INLINE I ior(I a, I b) { return _mm256_or_si256(a, b); }
  template <int k> static MS_INLINE I srl(I a) { return _mm256_srli_epi32(a, k); }
  template <int k> static MS_INLINE I sll(I a) { return _mm256_slli_epi32(a, k); }
  static MS_INLINE I iabs(I a) { return _mm256_abs_epi32(a); }

  static MS_INLINE MI icmpgt(I a, I b) { return _mm256_cmpgt_epi32(a, b); }
  static MS_INLINE MI icmpeq(I a, I b) { return _mm256_cmpeq_epi32(a, b); }
  static MS_INLINE MF fcmplt(F a, F b) { return _mm256_cmp_ps(a, b, _CMP_LT_OQ); }
  static MS_INLINE I iselect(MI m, I a, I b) { return _mm256_blendv_epi8(b, a, m); }
  static MS_INLINE F fselect(MI m, F a, F b) { return _mm256_blendv_ps(b, a, _mm256_castsi256_ps(m)); }
  static MS_INLINE I izero_if(MI m, I a) { return _mm256_andnot_si256(m, a); }

  static MS_INLINE float hmax(F a) {  // no lane is NaN here, so the order does not matter
    __m128 x = _mm_max_ps(_mm256_castps256_ps128(a), _mm256_extractf128_ps(a, 1));
    x = _mm_max_ps(x, _mm_movehl_ps(x, x));
    x = _mm_max_ss(x, _mm_shuffle_ps(x, x, 1));
    return _mm_cvtss_f32(x);
  }
  // acc[0] holds lanes 0-7 of the 16, acc[1] lanes 8-15; the tree of csrc/simd_scalar.h.
  static MS_INLINE float reduce16(const F* acc) {
    const __m256 s = _mm256_add_ps(acc[0], acc[1]);                                      // (l, l+8)
    __m128 x = _mm_add_ps(_mm256_castps256_ps128(s), _mm256_extractf128_ps(s, 1));       // (l, l+4)
    x = _mm_add_ps(x, _mm_movehl_ps(x, x));                                              // (l, l+2)
    return _mm_cvtss_f32(_mm_add_ss(x, _mm_shuffle_ps(x, x, 1)));                         // (0, 1)
  }
};

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
  // Two vectors (lanes < 2^16) as 16 uint16: the in-lane pack interleaves 4-element groups
  // (a0-3 b0-3 a4-7 b4-7), the qword permute puts them back in order.
  static MS_INLINE __m256i pack_u16x2(I a, I b) { return _mm256_permute4x64_epi64(_mm256_packus_epi32(a, b), 0xD8); }
  static MS_INLINE void store_u16x2(uint16_t* p, I a, I b) {
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), pack_u16x2(a, b));
  }
  static MS_INLINE void stream_u16x2(uint16_t* p, I a, I b) {  // p 32-byte aligned
    _mm256_stream_si256(reinterpret_cast<__m256i*>(p), pack_u16x2(a, b));
  }
  // Four vectors of codes as 32 bytes: two in-lane packs leave 4-element groups in the order
  // a0 b0 c0 d0 a1 b1 c1 d1 (groups of 4), the dword permute restores a0 a1 b0 b1 c0 c1 d0 d1.
  static MS_INLINE __m256i order_x4(__m256i x) {
    return _mm256_permutevar8x32_epi32(x, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7));
  }
  // Four vectors of raw 8-bit codes (0 <= c < 2^12): max(c - base, 0), capped at 127 and negated
  // where neg (m), or capped at 255 (v). On 16-bit lanes, half the work: an unsigned saturating
  // subtract floors at 0, and the saturating pack to bytes is the cap.
  static MS_INLINE __m256i codes16(I a, I b, int32_t base) {
    return _mm256_subs_epu16(_mm256_packus_epi32(a, b), _mm256_set1_epi16(static_cast<short>(base)));
  }
  static MS_INLINE void store_mcodes_x4(int8_t* p, const I* c, const MF* neg, int32_t base) {
    const __m256i x = _mm256_packs_epi16(codes16(c[0], c[1], base), codes16(c[2], c[3], base));  // <= 127
    const __m256i s = _mm256_packs_epi16(_mm256_packs_epi32(_mm256_castps_si256(neg[0]), _mm256_castps_si256(neg[1])),
                                         _mm256_packs_epi32(_mm256_castps_si256(neg[2]), _mm256_castps_si256(neg[3])));
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), order_x4(_mm256_sub_epi8(_mm256_xor_si256(x, s), s)));
  }
  static MS_INLINE void store_vcodes_x4(uint8_t* p, const I* c, int32_t base) {
    const __m256i x = _mm256_packus_epi16(codes16(c[0], c[1], base), codes16(c[2], c[3], base));  // <= 255
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), order_x4(x));
  }
  static MS_INLINE I load_i8(const int8_t* p) {
    return _mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p)));
  }
  static MS_INLINE I load_u8(const uint8_t* p) {
    return _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p)));
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

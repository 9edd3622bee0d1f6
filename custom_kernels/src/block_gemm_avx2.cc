// AVX2 (no VNNI): u8 x s8 products summed in pairs in 16 bits (no saturation: 4-bit levels, |q| <= 127), then in
// fours in 32 bits. 8-bit levels would saturate, so their low and high nibbles are multiplied apart.
#include <algorithm>

#include <immintrin.h>

static inline __m256i dot_chunk(__m256i acc, __m256i w, __m256i q) {
  return _mm256_add_epi32(acc, _mm256_madd_epi16(_mm256_maddubs_epi16(w, q), _mm256_set1_epi16(1)));
}

static inline __m256i dot_chunk8(__m256i acc, __m256i w, __m256i q) {
  const __m256i low = _mm256_and_si256(w, _mm256_set1_epi8(0x0F));
  const __m256i high = _mm256_and_si256(_mm256_srli_epi16(w, 4), _mm256_set1_epi8(0x0F));
  const __m256i sums = _mm256_add_epi32(_mm256_madd_epi16(_mm256_maddubs_epi16(low, q), _mm256_set1_epi16(1)),
                                        _mm256_slli_epi32(_mm256_madd_epi16(_mm256_maddubs_epi16(high, q),
                                                                            _mm256_set1_epi16(1)), 4));
  return _mm256_add_epi32(acc, sums);
}

#define COLUMNS columns_avx2
#define QUANTIZE_ROW quantize_row_avx2
#define QUANTIZE_LEVELS quantize_levels_avx2
#define BYTE_DOTS byte_dots_avx2
#define BYTE_DOT_ROWS 2
#define HALVES_TO_FLOATS halves_to_floats_f16c  // defined here only (the VNNI unit uses the same)
#define FLOATS_TO_HALVES floats_to_halves_f16c
#define GEMM_COLUMNS 2
#include "block_gemm_simd.inl"

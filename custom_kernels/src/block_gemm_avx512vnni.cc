// AVX-512 VNNI: u8 x s8 products summed in fours in 32 bits by one instruction, exact for 4- and 8-bit levels;
// 256-bit registers (AVX512VL), 512-bit on the GEMM path.
#include <algorithm>

#include <immintrin.h>

static inline __m256i dot_chunk(__m256i acc, __m256i w, __m256i q) { return _mm256_dpbusd_epi32(acc, w, q); }
static inline __m256i dot_chunk8(__m256i acc, __m256i w, __m256i q) { return _mm256_dpbusd_epi32(acc, w, q); }

#define COLUMNS columns_avx512vnni
#define QUANTIZE_ROW quantize_row_avx512vnni
#define QUANTIZE_LEVELS quantize_levels_avx512vnni
#define BYTE_DOTS byte_dots_avx512vnni
#define BYTE_DOT_ROWS 4
#define QCOMPILE_LANES16 1
#define GEMM_COLUMNS 4
#include "block_gemm_simd.inl"

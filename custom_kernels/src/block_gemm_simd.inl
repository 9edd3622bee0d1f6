// The x86 column kernel, included by one translation unit per instruction set, which defines
//   COLUMNS, QUANTIZE_ROW, QUANTIZE_LEVELS, BYTE_DOTS the functions' names
//   dot_chunk(acc, w, q)            acc (8 x int32) + the products of 32 unsigned 4-bit levels w and 32 int8 q,
//                                   summed in fours (lane i: bytes 4i .. 4i + 3)
//   dot_chunk8(acc, w, q)           the same for 8-bit levels (0..255)
//   GEMM_COLUMNS                    columns the GEMM path computes together (as registers allow)
//   BYTE_DOT_ROWS                   rows BYTE_DOTS computes together with 4 columns (as registers allow)
//   QCOMPILE_LANES16                (if defined) the GEMM path's 512-bit registers
// Blocks are taken eight at a time, one per lane, so that their scales, zero points and the rows' sums load as
// vectors.
#include <algorithm>
#include <cfloat>
#include <cstring>

#include <immintrin.h>

#include "block_gemm.h"

namespace qcompile {
namespace {

constexpr int64_t kLanes = 8;
constexpr int kGemmRowsTogether = 2;

inline __m256i load(const void* p) { return _mm256_loadu_si256(static_cast<const __m256i*>(p)); }

// Eight blocks' sums, c[i] holding block i's in its 8 lanes -> their totals, block i in lane i.
inline __m256i sum_blocks(const __m256i c[kLanes]) {
  const __m256i c01 = _mm256_hadd_epi32(c[0], c[1]), c23 = _mm256_hadd_epi32(c[2], c[3]);
  const __m256i c45 = _mm256_hadd_epi32(c[4], c[5]), c67 = _mm256_hadd_epi32(c[6], c[7]);
  const __m256i c0123 = _mm256_hadd_epi32(c01, c23), c4567 = _mm256_hadd_epi32(c45, c67);
  return _mm256_add_epi32(_mm256_permute2x128_si256(c0123, c4567, 0x20),
                          _mm256_permute2x128_si256(c0123, c4567, 0x31));
}

// Eight 32-element blocks' sums, v[p] holding block 2p's in its low half and 2p + 1's in its high half -> their
// totals, block i in lane i.
inline __m256i sum_block_pairs(const __m256i v[kLanes / 2]) {
  const __m256i u = _mm256_hadd_epi32(_mm256_hadd_epi32(v[0], v[1]), _mm256_hadd_epi32(v[2], v[3]));
  return _mm256_permutevar8x32_epi32(u, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7));  // u: 0 2 4 6 1 3 5 7
}

// The 64 levels of 4-bit group g of a column from its 32 packed bytes (16 where the group is the short last one):
// the low nibbles (the group's even elements), the high ones (its odd elements); where Book, looked up in `book`
// (the code book's 16 levels in each 128-bit half).
template <bool Book = false>
inline void group_levels(const uint8_t* levels, int64_t g, bool short_group, __m256i& low, __m256i& high,
                         __m256i book = __m256i{}) {
  const __m256i packed = short_group
      ? _mm256_inserti128_si256(_mm256_setzero_si256(),
                                _mm_loadu_si128(reinterpret_cast<const __m128i*>(levels + g * kGroup / 2)), 0)
      : load(levels + g * kGroup / 2);
  const __m256i mask = _mm256_set1_epi8(0x0F);
  low = _mm256_and_si256(packed, mask);
  high = _mm256_and_si256(_mm256_srli_epi16(packed, 4), mask);
  if constexpr (Book) {
    low = _mm256_shuffle_epi8(book, low);
    high = _mm256_shuffle_epi8(book, high);
  }
}

// The weight's code book in both 128-bit halves (a register of zeros without one).
inline __m256i code_book_lanes(const BlockWeight& w) {
  if (w.code_book == nullptr) return _mm256_setzero_si256();
  return _mm256_broadcastsi128_si256(_mm_loadu_si128(reinterpret_cast<const __m128i*>(w.code_book)));
}

// dot_chunk, or dot_chunk8 for levels up to 255.
template <bool Wide>
inline __m256i dot_levels(__m256i acc, __m256i w, __m256i q) {
  return Wide ? dot_chunk8(acc, w, q) : dot_chunk(acc, w, q);
}

// Column n's zero points of blocks b0 .. b0 + 7.
inline __m256i zero_points8(const BlockWeight& w, int64_t n, int64_t b0) {
  if (w.zero_points == nullptr) return _mm256_set1_epi32(w.default_zero_point());
  if (w.bits == 8) {
    return _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(w.zero_points + n * w.k_blocks + b0)));
  }
  int32_t packed;  // four bytes, two nibbles each, low first
  std::memcpy(&packed, w.zero_points + n * ((w.k_blocks + 1) / 2) + b0 / 2, sizeof packed);
  const __m128i bytes = _mm_shuffle_epi8(_mm_cvtsi32_si128(packed),
                                         _mm_setr_epi8(0, 0, 1, 1, 2, 2, 3, 3, -1, -1, -1, -1, -1, -1, -1, -1));
  return _mm256_and_si256(_mm256_srlv_epi32(_mm256_cvtepu8_epi32(bytes), _mm256_setr_epi32(0, 4, 0, 4, 0, 4, 0, 4)),
                          _mm256_set1_epi32(0x0F));
}

// acc + (totals - zero points x the rows' level sums) x scales, eight blocks in the lanes.
inline __m256 add_scaled(__m256 acc, __m256i totals, __m256i zero_points, __m256i sums, __m256 scales) {
  const __m256i dot = _mm256_sub_epi32(totals, _mm256_mullo_epi32(zero_points, sums));
  return _mm256_fmadd_ps(_mm256_cvtepi32_ps(dot), scales, acc);
}

// The 64 levels of 8-bit group g of a column (32 where the group is the short last one), even elements first:
// the order of `group_levels`.
inline void group_levels8(const uint8_t* levels, int64_t g, bool short_group, __m256i& even, __m256i& odd) {
  const __m256i split = _mm256_setr_epi8(0, 2, 4, 6, 8, 10, 12, 14, 1, 3, 5, 7, 9, 11, 13, 15,
                                         0, 2, 4, 6, 8, 10, 12, 14, 1, 3, 5, 7, 9, 11, 13, 15);
  const __m256i first = _mm256_shuffle_epi8(load(levels + g * kGroup), split);  // per 128 bits: evens, odds
  const __m256i second = short_group ? _mm256_setzero_si256()
                                     : _mm256_shuffle_epi8(load(levels + g * kGroup + kGroup / 2), split);
  even = _mm256_permute4x64_epi64(_mm256_unpacklo_epi64(first, second), 0xD8);
  odd = _mm256_permute4x64_epi64(_mm256_unpackhi_epi64(first, second), 0xD8);
}

// Blocks b0 .. b0 + 7 of column n (fewer at the end): acc + their integer totals times their scales.
inline __m256 add_blocks(__m256 acc, __m256i totals, const BlockWeight& w, const QuantizedRows& a, int64_t m,
                         int64_t n, int64_t b0) {
  const int64_t at = m * a.row_blocks + b0, count = std::min(kLanes, w.k_blocks - b0);
  if (count == kLanes) {
    return add_scaled(acc, totals, zero_points8(w, n, b0), load(&a.sum[at]),
                      _mm256_mul_ps(_mm256_loadu_ps(w.scales + n * w.k_blocks + b0), _mm256_loadu_ps(&a.scale[at])));
  }
  alignas(32) int32_t zp[kLanes] = {}, sum[kLanes] = {};  // the last blocks: lanes past them scale by 0
  alignas(32) float scale[kLanes] = {};
  for (int64_t i = 0; i < count; ++i) {
    zp[i] = w.zero_point(n, b0 + i);
    sum[i] = a.sum[at + i];
    scale[i] = w.scales[n * w.k_blocks + b0 + i] * a.scale[at + i];
  }
  return add_scaled(acc, totals, load(zp), load(sum), _mm256_load_ps(scale));
}

// (lanes 0..3 + lanes 4..7), then (0 + 2) + (1 + 3): the order columns_portable follows.
inline float sum_lanes(__m256 acc) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(acc), _mm256_extractf128_ps(acc, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  return _mm_cvtss_f32(_mm_add_ss(s, _mm_shuffle_ps(s, s, 1)));
}

// The products of group g's 64 levels (4-bit, or a code book's where Book) and activations, added to acc.
template <bool Book>
inline __m256i dot_group(__m256i acc, const uint8_t* packed, int64_t g, bool short_group, const int8_t* q,
                         __m256i book) {
  __m256i low, high;
  group_levels<Book>(packed, g, short_group, low, high, book);
  return dot_levels<Book>(dot_levels<Book>(acc, low, load(q + g * kGroup)), high, load(q + g * kGroup + kGroup / 2));
}

// The integer totals of 8 whole 4-bit blocks from their packed bytes and activations; Groups: 64-element groups
// per block (0: blocks of 32, two per group). Unrolled: the streamed path's inner loop.
template <int Groups, bool Book>
inline __m256i block_totals(const uint8_t* packed, const int8_t* q, __m256i book) {
  if constexpr (Groups == 0) {
    __m256i v[kLanes / 2];
    for (int p = 0; p < kLanes / 2; ++p) v[p] = dot_group<Book>(_mm256_setzero_si256(), packed, p, false, q, book);
    return sum_block_pairs(v);
  } else {
    __m256i c[kLanes];
    for (int i = 0; i < kLanes; ++i) {
      c[i] = _mm256_setzero_si256();
      for (int g = i * Groups; g < (i + 1) * Groups; ++g) c[i] = dot_group<Book>(c[i], packed, g, false, q, book);
    }
    return sum_blocks(c);
  }
}

// Y[m, n] for 4-bit levels (a code book's where Book), unpacked from the column's stored bytes as they are read:
// whole steps of 8 blocks by `block_totals`, the rest (a short last group, fewer than 8 blocks) generically.
template <int Groups, bool Book>
float dot4(const BlockWeight& w, const QuantizedRows& a, int64_t m, int64_t n) {
  const uint8_t* levels = w.column(n);
  const int8_t* q = a.q.data() + m * a.padded_k;
  const int64_t block = w.block, k_blocks = w.k_blocks;
  // A column whose bytes are followed by enough of the weight's (its next columns') is read in whole steps up to
  // the padded row: the activations past K are zero, so what is read there adds nothing. The last columns stop at
  // their last whole step, and the rest goes the generic way.
  const int64_t zero_point_bytes = (k_blocks * w.bits + 7) / 8;
  const bool over_read = (n * k_blocks + a.row_blocks + 1) <= w.n * k_blocks &&
                         (w.zero_points == nullptr || n * zero_point_bytes + a.row_blocks <= w.n * zero_point_bytes);
  const int64_t whole = over_read ? a.row_blocks : k_blocks / kLanes * kLanes;
  const float* column_scales = w.scales + n * k_blocks;
  const float* row_scales = &a.scale[m * a.row_blocks];
  const int32_t* row_sums = &a.sum[m * a.row_blocks];
  const __m256i book = code_book_lanes(w);
  __m256 acc = _mm256_setzero_ps();
  for (int64_t b0 = 0; b0 < whole; b0 += kLanes) {
    const __m256i totals = block_totals<Groups, Book>(levels + b0 * block / 2, q + b0 * block, book);
    acc = add_scaled(acc, totals, zero_points8(w, n, b0), load(row_sums + b0),
                     _mm256_mul_ps(_mm256_loadu_ps(column_scales + b0), _mm256_loadu_ps(row_scales + b0)));
  }
  if (whole < k_blocks) {
    const bool odd_pairs = block < kGroup && k_blocks % 2;
    __m256i totals;
    if (Groups == 0) {
      __m256i v[kLanes / 2];
      for (int64_t p = 0; p < kLanes / 2; ++p) {
        const int64_t g = whole / 2 + p;
        v[p] = _mm256_setzero_si256();
        if (2 * g >= k_blocks) continue;
        v[p] = dot_group<Book>(v[p], levels, g, odd_pairs && 2 * g + 1 == k_blocks, q, book);
      }
      totals = sum_block_pairs(v);
    } else {
      __m256i c[kLanes];
      for (int64_t i = 0; i < kLanes; ++i) {
        c[i] = _mm256_setzero_si256();
        for (int64_t g = (whole + i) * Groups; whole + i < k_blocks && g < (whole + i + 1) * Groups; ++g) {
          c[i] = dot_group<Book>(c[i], levels, g, false, q, book);
        }
      }
      totals = sum_blocks(c);
    }
    acc = add_blocks(acc, totals, w, a, m, n, whole);
  }
  return sum_lanes(acc);
}

using Dot4 = float (*)(const BlockWeight&, const QuantizedRows&, int64_t, int64_t);

template <bool Book>
Dot4 dot4_for(int block) {
  switch (block) {
    case 32: return dot4<0, Book>;
    case 64: return dot4<1, Book>;
    case 128: return dot4<2, Book>;
    default: return dot4<4, Book>;
  }
}

float dot8(const BlockWeight& w, const QuantizedRows& a, int64_t m, int64_t n) {
  const int8_t* q = a.q.data() + m * a.padded_k;
  const uint8_t* levels = w.column(n);
  __m256 acc = _mm256_setzero_ps();
  for (int64_t b0 = 0; b0 < w.k_blocks; b0 += kLanes) {
    __m256i c[kLanes];
    for (int64_t i = 0; i < kLanes; ++i) {
      c[i] = _mm256_setzero_si256();
      if (b0 + i >= w.k_blocks) continue;
      for (int64_t k = (b0 + i) * w.block; k < (b0 + i + 1) * w.block; k += kGroup / 2) {
        c[i] = dot_chunk8(c[i], load(levels + k), load(q + k));
      }
    }
    acc = add_blocks(acc, sum_blocks(c), w, a, m, n, b0);
  }
  return sum_lanes(acc);
}

// The GEMM path's unpacked columns: levels (columns, padded_k) in the order of `QuantizedRows::q`, each step's
// scales as 8 lanes (columns, steps, 8), scale x zero point per block (columns, padded_blocks).
struct ColumnTile {
  int64_t count = 0;
  std::vector<uint8_t> levels;
  std::vector<float> step_scales, scaled_zero_points;
};

void unpack_columns(const BlockWeight& w, const QuantizedRows& a, int64_t n0, int64_t count, ColumnTile& tile) {
  tile.count = count;
  tile.levels.resize(static_cast<size_t>(count * a.padded_k));
  tile.step_scales.resize(static_cast<size_t>(count * a.steps * 8));
  tile.scaled_zero_points.assign(static_cast<size_t>(count * a.row_blocks), 0.0f);
  const bool odd_pairs = w.block < kGroup && w.k_blocks % 2;
  const int64_t groups = a.steps * a.groups_per_step;  // the weight's; the rest of padded_k is never read
  const __m256i book = code_book_lanes(w);
  for (int64_t c = 0; c < count; ++c) {
    const int64_t n = n0 + c;
    uint8_t* levels = &tile.levels[c * a.padded_k];
    for (int64_t g = 0; g < groups; ++g) {
      __m256i low, high;
      if (w.code_book) {
        group_levels<true>(w.column(n), g, odd_pairs && g == groups - 1, low, high, book);
      } else if (w.bits == 4) {
        group_levels(w.column(n), g, odd_pairs && g == groups - 1, low, high);
      } else {
        group_levels8(w.column(n), g, odd_pairs && g == groups - 1, low, high);
      }
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(levels + g * kGroup), low);
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(levels + g * kGroup + kGroup / 2), high);
    }
    step_lanes(w, w.scales + n * w.k_blocks, &tile.step_scales[c * a.steps * 8]);
    for (int64_t b = 0; b < w.k_blocks; ++b) {
      tile.scaled_zero_points[c * a.row_blocks + b] = w.scales[n * w.k_blocks + b] * w.zero_point(n, b);
    }
  }
}

// Y for rows m0 .. m0 + R and the tile's columns c0 .. c0 + C: integer dots over each step, scaled per lane into
// float accumulators; the zero points' term subtracted per block (lanes: 8 blocks); lanes summed at the end.
// Vector widths of the GEMM path. A 64-element group in `paired` order is one operand: two 256-bit halves dotted
// apart (Lanes8), or one 512-bit register (Lanes16: lanes i and i + 8 hold the same blocks' sums, so a step's 8
// scales serve both halves). Either way lanes are summed to 8 before the zero points' term.
struct Lanes8 {
  using Int = __m256i;
  using Float = __m256;
  struct Operand {
    __m256i low, high;
  };
  static Int zero() { return _mm256_setzero_si256(); }
  static Float zero_float() { return _mm256_setzero_ps(); }
  static Operand operand(const void* p) {
    return {load(p), load(static_cast<const uint8_t*>(p) + kGroup / 2)};
  }
  template <int Bits>
  static Int dot(Int acc, const Operand& w, const Operand& q) {
    return Bits == 4 ? dot_chunk(dot_chunk(acc, w.low, q.low), w.high, q.high)
                     : dot_chunk8(dot_chunk8(acc, w.low, q.low), w.high, q.high);
  }
  static Float lanes(const float* eight) { return _mm256_loadu_ps(eight); }
  static Float scaled(Float acc, Int dots, Float scales) {
    return _mm256_fmadd_ps(_mm256_cvtepi32_ps(dots), scales, acc);
  }
  static Float mul(Float a, Float b) { return _mm256_mul_ps(a, b); }
  static __m256 eight(Float acc) { return acc; }
};

#ifdef QCOMPILE_LANES16
struct Lanes16 {
  using Int = __m512i;
  using Float = __m512;
  using Operand = __m512i;
  static Int zero() { return _mm512_setzero_si512(); }
  static Float zero_float() { return _mm512_setzero_ps(); }
  static Operand operand(const void* p) { return _mm512_loadu_si512(p); }
  template <int Bits>
  static Int dot(Int acc, Operand w, Operand q) { return _mm512_dpbusd_epi32(acc, w, q); }
  static Float lanes(const float* eight) { return _mm512_broadcast_f32x8(_mm256_loadu_ps(eight)); }
  static Float scaled(Float acc, Int dots, Float scales) {
    return _mm512_fmadd_ps(_mm512_cvtepi32_ps(dots), scales, acc);
  }
  static Float mul(Float a, Float b) { return _mm512_mul_ps(a, b); }
  static __m256 eight(Float acc) {
    return _mm256_add_ps(_mm512_castps512_ps256(acc), _mm512_extractf32x8_ps(acc, 1));
  }
};
using GemmLanes = Lanes16;
#else
using GemmLanes = Lanes8;
#endif

// Y for rows m0 .. m0 + R and the tile's columns c0 .. c0 + C: integer dots over each step, scaled per lane into
// float accumulators; the zero points' term subtracted per block (lanes: 8 blocks); lanes summed at the end.
template <typename V, int Bits, int R, int C>
void gemm_block(const ColumnTile& tile, const QuantizedRows& a, int64_t m0, int64_t c0, int64_t n0, float* y,
                int64_t ldy) {
  const int64_t groups_per_step = a.groups_per_step, padded_k = a.padded_k;
  const uint8_t* levels = &tile.levels[c0 * padded_k];
  const int8_t* rows = a.q.data() + m0 * padded_k;
  typename V::Float acc[R][C];
  for (int r = 0; r < R; ++r)
    for (int c = 0; c < C; ++c) acc[r][c] = V::zero_float();
  for (int64_t s = 0; s < a.steps; ++s) {
    typename V::Int dots[R][C];
    for (int r = 0; r < R; ++r)
      for (int c = 0; c < C; ++c) dots[r][c] = V::zero();
    for (int64_t g = s * groups_per_step; g < (s + 1) * groups_per_step; ++g) {
      typename V::Operand w[C];
      for (int c = 0; c < C; ++c) w[c] = V::operand(levels + c * padded_k + g * kGroup);
      for (int r = 0; r < R; ++r) {
        const typename V::Operand q = V::operand(rows + r * padded_k + g * kGroup);
        for (int c = 0; c < C; ++c) dots[r][c] = V::template dot<Bits>(dots[r][c], w[c], q);
      }
    }
    for (int r = 0; r < R; ++r) {
      const typename V::Float row_scales = V::lanes(&a.step_scales[((m0 + r) * a.steps + s) * 8]);
      for (int c = 0; c < C; ++c) {
        const typename V::Float scales = V::mul(row_scales, V::lanes(&tile.step_scales[((c0 + c) * a.steps + s) * 8]));
        acc[r][c] = V::scaled(acc[r][c], dots[r][c], scales);
      }
    }
  }
  for (int r = 0; r < R; ++r) {
    for (int c = 0; c < C; ++c) {
      __m256 total = V::eight(acc[r][c]);
      for (int64_t b = 0; b < a.row_blocks; b += kLanes) {
        total = _mm256_fnmadd_ps(_mm256_loadu_ps(&tile.scaled_zero_points[(c0 + c) * a.row_blocks + b]),
                                 _mm256_loadu_ps(&a.scaled_sums[(m0 + r) * a.row_blocks + b]), total);
      }
      y[(m0 + r) * ldy + n0 + c0 + c] = sum_lanes(total);
    }
  }
}

// Y for every row and the tile's columns, rows and columns R and C at a time, the rest one at a time.
template <int Bits, int C>
void gemm_columns(const ColumnTile& tile, const QuantizedRows& a, int64_t n0, float* y, int64_t ldy) {
  const int64_t full = tile.count / C * C;
  for (int64_t m = 0; m < a.m; m += kGemmRowsTogether) {
    const bool two = m + 1 < a.m;
    for (int64_t c = 0; c < tile.count; c += c < full ? C : 1) {
      if (c < full) {
        two ? gemm_block<GemmLanes, Bits, kGemmRowsTogether, C>(tile, a, m, c, n0, y, ldy)
            : gemm_block<GemmLanes, Bits, 1, C>(tile, a, m, c, n0, y, ldy);
      } else {
        two ? gemm_block<GemmLanes, Bits, kGemmRowsTogether, 1>(tile, a, m, c, n0, y, ldy)
            : gemm_block<GemmLanes, Bits, 1, 1>(tile, a, m, c, n0, y, ldy);
      }
    }
  }
}

// `quantize_block` for a whole block (a multiple of 8 elements), 8 at a time, with the same arithmetic.
bool quantize_whole_block(const float* x, int64_t count, int32_t* levels, float& scale, int32_t& sum) {
  const __m256 magnitude = _mm256_castsi256_ps(_mm256_set1_epi32(0x7FFFFFFF));
  __m256 largest = _mm256_setzero_ps(), bad = _mm256_setzero_ps();
  for (int64_t i = 0; i < count; i += 8) {
    const __m256 v = _mm256_and_ps(_mm256_loadu_ps(x + i), magnitude);
    largest = _mm256_max_ps(largest, v);
    bad = _mm256_or_ps(bad, _mm256_cmp_ps(v, _mm256_set1_ps(FLT_MAX), _CMP_NLE_UQ));  // inf or NaN
  }
  scale = 0.0f;
  sum = 0;
  if (_mm256_movemask_ps(bad)) return false;
  alignas(32) float lanes[8];
  _mm256_store_ps(lanes, largest);
  const float amax = *std::max_element(lanes, lanes + 8);
  if (amax == 0.0f) return true;
  const __m256 inverse = _mm256_set1_ps(127.0f / amax), shift = _mm256_set1_ps(12582912.0f);  // round_even's
  __m256i sums = _mm256_setzero_si256();
  for (int64_t i = 0; i < count; i += 8) {
    const __m256 rounded = _mm256_sub_ps(_mm256_add_ps(_mm256_mul_ps(_mm256_loadu_ps(x + i), inverse), shift), shift);
    const __m256i level = _mm256_cvttps_epi32(
        _mm256_min_ps(_mm256_max_ps(rounded, _mm256_set1_ps(-127.0f)), _mm256_set1_ps(127.0f)));
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(levels + i), level);
    sums = _mm256_add_epi32(sums, level);
  }
  alignas(32) int32_t parts[8];
  _mm256_store_si256(reinterpret_cast<__m256i*>(parts), sums);
  for (int32_t part : parts) sum += part;
  scale = amax / 127.0f;
  return true;
}

// 32 levels (int32, within -127..127) as bytes in order.
inline __m256i pack32(const int32_t* levels) {
  const __m256i low = _mm256_packs_epi32(load(levels), load(levels + 8));
  const __m256i high = _mm256_packs_epi32(load(levels + 16), load(levels + 24));
  return _mm256_permutevar8x32_epi32(_mm256_packs_epi16(low, high), _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7));
}

constexpr int kByteDotColumns = 4;

// BYTE_DOTS for R rows and C columns, each pair's sum in a register of its own.
template <int R, int C>
void byte_dots_tile(const uint8_t* w, int64_t ldw, const int8_t* q, int64_t ldq, int64_t count, int32_t* dots,
                    int64_t ld) {
  __m256i acc[R][C];
  for (int r = 0; r < R; ++r)
    for (int c = 0; c < C; ++c) acc[r][c] = _mm256_setzero_si256();
  for (int64_t i = 0; i < count; i += 32) {
    __m256i columns[C];
    for (int c = 0; c < C; ++c) columns[c] = load(w + c * ldw + i);
    for (int r = 0; r < R; ++r) {
      const __m256i row = load(q + r * ldq + i);
      for (int c = 0; c < C; ++c) acc[r][c] = dot_chunk8(acc[r][c], columns[c], row);
    }
  }
  for (int r = 0; r < R; ++r) {
    for (int c = 0; c < C; ++c) {
      const __m128i half = _mm_add_epi32(_mm256_castsi256_si128(acc[r][c]), _mm256_extracti128_si256(acc[r][c], 1));
      const __m128i pair = _mm_add_epi32(half, _mm_unpackhi_epi64(half, half));
      dots[r * ld + c] = _mm_cvtsi128_si32(_mm_add_epi32(pair, _mm_shuffle_epi32(pair, 1)));
    }
  }
}

// R rows with every column: kByteDotColumns at a time, then one at a time.
template <int R>
void byte_dots_rows(const uint8_t* w, int64_t ldw, int64_t columns, const int8_t* q, int64_t ldq, int64_t count,
                    int32_t* dots, int64_t ld) {
  const int64_t full = columns / kByteDotColumns * kByteDotColumns;
  for (int64_t c = 0; c < full; c += kByteDotColumns) {
    byte_dots_tile<R, kByteDotColumns>(w + c * ldw, ldw, q, ldq, count, dots + c, ld);
  }
  for (int64_t c = full; c < columns; ++c) byte_dots_tile<R, 1>(w + c * ldw, ldw, q, ldq, count, dots + c, ld);
}

}  // namespace

void BYTE_DOTS(const uint8_t* w, int64_t ldw, int64_t columns, const int8_t* q, int64_t ldq, int64_t rows,
               int64_t count, int32_t* dots, int64_t ld) {
  if (rows == 1) {  // one column at a time: the weight read as one stream, which the prefetchers follow
    for (int64_t c = 0; c < columns; ++c) byte_dots_tile<1, 1>(w + c * ldw, ldw, q, ldq, count, dots + c, ld);
    return;
  }
  for (int64_t r = 0; r < rows; r += BYTE_DOT_ROWS) {
    const int8_t* q_rows = q + r * ldq;
    int32_t* out = dots + r * ld;
    switch (std::min<int64_t>(BYTE_DOT_ROWS, rows - r)) {
      case 4: byte_dots_rows<4>(w, ldw, columns, q_rows, ldq, count, out, ld); break;
      case 3: byte_dots_rows<3>(w, ldw, columns, q_rows, ldq, count, out, ld); break;
      case 2: byte_dots_rows<2>(w, ldw, columns, q_rows, ldq, count, out, ld); break;
      default: byte_dots_rows<1>(w, ldw, columns, q_rows, ldq, count, out, ld);
    }
  }
}

#ifdef HALVES_TO_FLOATS
void HALVES_TO_FLOATS(const uint16_t* halves, float* floats, int64_t count) {
  int64_t i = 0;
  for (; i + 8 <= count; i += 8) {
    _mm256_storeu_ps(floats + i, _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(halves + i))));
  }
  halves_to_floats_portable(halves + i, floats + i, count - i);
}

void FLOATS_TO_HALVES(const float* floats, uint16_t* halves, int64_t count) {
  int64_t i = 0;
  for (; i + 8 <= count; i += 8) {
    _mm_storeu_si128(reinterpret_cast<__m128i*>(halves + i),
                     _mm256_cvtps_ph(_mm256_loadu_ps(floats + i), _MM_FROUND_TO_NEAREST_INT));
  }
  floats_to_halves_portable(floats + i, halves + i, count - i);
}
#endif

bool QUANTIZE_LEVELS(const float* x, int64_t count, int8_t* q, float& scale, int32_t& sum) {
  thread_local std::vector<int32_t> levels;
  levels.resize(static_cast<size_t>(count));
  if (!quantize_whole_block(x, count, levels.data(), scale, sum)) return false;
  if (scale == 0.0f) {  // all zeros: no levels written
    std::memset(q, 0, static_cast<size_t>(count));
    return true;
  }
  for (int64_t i = 0; i < count; i += 32) _mm256_storeu_si256(reinterpret_cast<__m256i*>(q + i), pack32(&levels[i]));
  return true;
}

void QUANTIZE_ROW(const float* a, int64_t row, const BlockWeight& w, QuantizedRows& out) {
  thread_local std::vector<int32_t> levels;
  levels.assign(static_cast<size_t>(out.padded_k), 0);
  const float* x = a + row * w.k;
  for (int64_t b = 0; b < w.k_blocks; ++b) {
    const int64_t begin = b * w.block, count = std::min<int64_t>(w.block, w.k - begin);
    float scale;
    int32_t sum;
    const bool finite = count == w.block ? quantize_whole_block(x + begin, count, &levels[begin], scale, sum)
                                         : quantize_block(x + begin, count, &levels[begin], scale, sum);
    if (!finite) std::fill_n(&levels[begin], count, 0);
    set_block(row, b, finite, scale, sum, out);
  }
  int8_t* q = out.q.data() + row * out.padded_k;
  const __m256i split = _mm256_setr_epi8(0, 2, 4, 6, 8, 10, 12, 14, 1, 3, 5, 7, 9, 11, 13, 15,
                                         0, 2, 4, 6, 8, 10, 12, 14, 1, 3, 5, 7, 9, 11, 13, 15);
  for (int64_t g = 0; g * kGroup < w.k; ++g) {
    __m256i first = pack32(&levels[g * kGroup]), second = pack32(&levels[g * kGroup + kGroup / 2]);
    if (out.paired) {  // group_levels8's reordering: even elements, then odd ones
      first = _mm256_shuffle_epi8(first, split);
      second = _mm256_shuffle_epi8(second, split);
      const __m256i even = _mm256_permute4x64_epi64(_mm256_unpacklo_epi64(first, second), 0xD8);
      second = _mm256_permute4x64_epi64(_mm256_unpackhi_epi64(first, second), 0xD8);
      first = even;
    }
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(q + g * kGroup), first);
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(q + g * kGroup + kGroup / 2), second);
  }
  finish_row(row, w, out);
}

void COLUMNS(const BlockWeight& w, const QuantizedRows& a, int64_t n0, int64_t n1, float* y, int64_t ldy) {
  if (a.m >= kGemmRows) {
    thread_local ColumnTile tile;
    unpack_columns(w, a, n0, n1 - n0, tile);
    if (!w.wide_levels()) {
      gemm_columns<4, GEMM_COLUMNS>(tile, a, n0, y, ldy);
    } else {
      gemm_columns<8, GEMM_COLUMNS>(tile, a, n0, y, ldy);
    }
    return;
  }
  const Dot4 dot4 = w.code_book ? dot4_for<true>(w.block) : dot4_for<false>(w.block);
  for (int64_t n = n0; n < n1; ++n) {
    for (int64_t m = 0; m < a.m; ++m) y[m * ldy + n] = w.bits == 4 ? dot4(w, a, m, n) : dot8(w, a, m, n);
  }
}

}  // namespace qcompile

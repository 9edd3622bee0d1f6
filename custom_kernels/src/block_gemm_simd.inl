// The x86 column kernel, included by one translation unit per instruction set, which defines
//   COLUMNS                         the function's name
//   dot_chunk(acc, w, q)            acc (8 x int32) + the products of 32 unsigned 4-bit levels w and 32 int8 q,
//                                   summed in fours (lane i: bytes 4i .. 4i + 3)
//   dot_chunk8(acc, w, q)           the same for 8-bit levels (0..255)
//   GEMM_COLUMNS                    columns the GEMM path computes together (as registers allow)
// Blocks are taken eight at a time, one per lane, so that their scales, zero points and the rows' sums load as
// vectors.
#include <algorithm>
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
// the low nibbles (the group's even elements), the high ones (its odd elements).
inline void group_levels(const uint8_t* levels, int64_t g, bool short_group, __m256i& low, __m256i& high) {
  const __m256i packed = short_group
      ? _mm256_inserti128_si256(_mm256_setzero_si256(),
                                _mm_loadu_si128(reinterpret_cast<const __m128i*>(levels + g * kGroup / 2)), 0)
      : load(levels + g * kGroup / 2);
  const __m256i mask = _mm256_set1_epi8(0x0F);
  low = _mm256_and_si256(packed, mask);
  high = _mm256_and_si256(_mm256_srli_epi16(packed, 4), mask);
}

// Blocks b0 .. b0 + 7 of column n (fewer at the end): acc + their integer totals times their scales.
inline __m256 add_blocks(__m256 acc, __m256i totals, const BlockWeight& w, const QuantizedRows& a, int64_t m,
                         int64_t n, int64_t b0) {
  const int64_t at = m * a.k_blocks + b0, count = std::min(kLanes, w.k_blocks - b0);
  __m256i zero_points, sums;
  __m256 scales;
  if (count == kLanes) {
    if (w.zero_points == nullptr) {
      zero_points = _mm256_set1_epi32(w.bits == 4 ? 8 : 128);
    } else if (w.bits == 4) {  // four bytes, two nibbles each, low first
      int32_t packed;
      std::memcpy(&packed, w.zero_points + n * ((w.k_blocks + 1) / 2) + b0 / 2, sizeof packed);
      const __m128i bytes = _mm_shuffle_epi8(_mm_cvtsi32_si128(packed),
                                             _mm_setr_epi8(0, 0, 1, 1, 2, 2, 3, 3, -1, -1, -1, -1, -1, -1, -1, -1));
      zero_points = _mm256_and_si256(_mm256_srlv_epi32(_mm256_cvtepu8_epi32(bytes),
                                                       _mm256_setr_epi32(0, 4, 0, 4, 0, 4, 0, 4)),
                                     _mm256_set1_epi32(0x0F));
    } else {
      zero_points = _mm256_cvtepu8_epi32(
          _mm_loadl_epi64(reinterpret_cast<const __m128i*>(w.zero_points + n * w.k_blocks + b0)));
    }
    sums = load(&a.sum[at]);
    scales = _mm256_mul_ps(_mm256_loadu_ps(w.scales + n * w.k_blocks + b0), _mm256_loadu_ps(&a.scale[at]));
  } else {  // the last blocks: lanes past them scale by 0
    alignas(32) int32_t zp[kLanes] = {}, sum[kLanes] = {};
    alignas(32) float scale[kLanes] = {};
    for (int64_t i = 0; i < count; ++i) {
      zp[i] = w.zero_point(n, b0 + i);
      sum[i] = a.sum[at + i];
      scale[i] = w.scales[n * w.k_blocks + b0 + i] * a.scale[at + i];
    }
    zero_points = load(zp);
    sums = load(sum);
    scales = _mm256_load_ps(scale);
  }
  const __m256i dot = _mm256_sub_epi32(totals, _mm256_mullo_epi32(zero_points, sums));
  return _mm256_fmadd_ps(_mm256_cvtepi32_ps(dot), scales, acc);
}

// (lanes 0..3 + lanes 4..7), then (0 + 2) + (1 + 3): the order columns_portable follows.
inline float sum_lanes(__m256 acc) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(acc), _mm256_extractf128_ps(acc, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  return _mm_cvtss_f32(_mm_add_ss(s, _mm_shuffle_ps(s, s, 1)));
}

// Y[m, n] for 4-bit levels, unpacked from the column's stored bytes as they are read.
float dot4(const BlockWeight& w, const uint8_t* levels, const QuantizedRows& a, int64_t m, int64_t n) {
  const int8_t* q = a.q.data() + m * a.padded_k;
  const int64_t groups = w.block / kGroup;  // per block; 0: a 32-element block is half a group
  const bool odd_pairs = w.block < kGroup && w.k_blocks % 2;
  __m256 acc = _mm256_setzero_ps();
  for (int64_t b0 = 0; b0 < w.k_blocks; b0 += kLanes) {
    __m256i totals;
    __m256i low, high;
    if (groups == 0) {
      __m256i v[kLanes / 2];
      for (int64_t p = 0; p < kLanes / 2; ++p) {
        const int64_t g = b0 / 2 + p;
        v[p] = _mm256_setzero_si256();
        if (2 * g >= w.k_blocks) continue;
        group_levels(levels, g, odd_pairs && 2 * g + 1 == w.k_blocks, low, high);
        v[p] = dot_chunk(dot_chunk(v[p], low, load(q + g * kGroup)), high, load(q + g * kGroup + kGroup / 2));
      }
      totals = sum_block_pairs(v);
    } else {
      __m256i c[kLanes];
      for (int64_t i = 0; i < kLanes; ++i) {
        c[i] = _mm256_setzero_si256();
        if (b0 + i >= w.k_blocks) continue;
        for (int64_t g = (b0 + i) * groups; g < (b0 + i + 1) * groups; ++g) {
          group_levels(levels, g, false, low, high);
          c[i] = dot_chunk(dot_chunk(c[i], low, load(q + g * kGroup)), high, load(q + g * kGroup + kGroup / 2));
        }
      }
      totals = sum_blocks(c);
    }
    acc = add_blocks(acc, totals, w, a, m, n, b0);
  }
  return sum_lanes(acc);
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
  tile.scaled_zero_points.assign(static_cast<size_t>(count * a.padded_blocks), 0.0f);
  const bool odd_pairs = w.block < kGroup && w.k_blocks % 2;
  const int64_t groups = a.padded_k / kGroup;
  for (int64_t c = 0; c < count; ++c) {
    const int64_t n = n0 + c;
    uint8_t* levels = &tile.levels[c * a.padded_k];
    for (int64_t g = 0; g < groups; ++g) {
      __m256i low, high;
      group_levels(w.column(n), g, odd_pairs && g == groups - 1, low, high);
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(levels + g * kGroup), low);
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(levels + g * kGroup + kGroup / 2), high);
    }
    step_lanes(w, w.scales + n * w.k_blocks, &tile.step_scales[c * a.steps * 8]);
    for (int64_t b = 0; b < w.k_blocks; ++b) {
      tile.scaled_zero_points[c * a.padded_blocks + b] = w.scales[n * w.k_blocks + b] * w.zero_point(n, b);
    }
  }
}

// Y for rows m0 .. m0 + R and the tile's columns c0 .. c0 + C: integer dots over each step, scaled per lane into
// float accumulators; the zero points' term subtracted per block (lanes: 8 blocks); lanes summed at the end.
template <int R, int C>
void gemm_block(const ColumnTile& tile, const QuantizedRows& a, int64_t m0, int64_t c0, int64_t n0, float* y,
                int64_t ldy) {
  const int64_t groups_per_step = a.padded_k / kGroup / a.steps;
  __m256 acc[R][C];
  for (int r = 0; r < R; ++r)
    for (int c = 0; c < C; ++c) acc[r][c] = _mm256_setzero_ps();
  for (int64_t s = 0; s < a.steps; ++s) {
    __m256i dots[R][C];
    for (int r = 0; r < R; ++r)
      for (int c = 0; c < C; ++c) dots[r][c] = _mm256_setzero_si256();
    for (int64_t g = s * groups_per_step; g < (s + 1) * groups_per_step; ++g) {
      __m256i low[C], high[C];
      for (int c = 0; c < C; ++c) {
        low[c] = load(&tile.levels[(c0 + c) * a.padded_k + g * kGroup]);
        high[c] = load(&tile.levels[(c0 + c) * a.padded_k + g * kGroup + kGroup / 2]);
      }
      for (int r = 0; r < R; ++r) {
        const int8_t* q = a.q.data() + (m0 + r) * a.padded_k + g * kGroup;
        const __m256i q_low = load(q), q_high = load(q + kGroup / 2);
        for (int c = 0; c < C; ++c) dots[r][c] = dot_chunk(dot_chunk(dots[r][c], low[c], q_low), high[c], q_high);
      }
    }
    for (int r = 0; r < R; ++r) {
      const __m256 row_scales = _mm256_loadu_ps(&a.step_scales[((m0 + r) * a.steps + s) * 8]);
      for (int c = 0; c < C; ++c) {
        const __m256 scales = _mm256_mul_ps(row_scales, _mm256_loadu_ps(&tile.step_scales[((c0 + c) * a.steps + s) * 8]));
        acc[r][c] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(dots[r][c]), scales, acc[r][c]);
      }
    }
  }
  for (int64_t b = 0; b < a.padded_blocks; b += kLanes) {
    for (int r = 0; r < R; ++r) {
      const __m256 sums = _mm256_loadu_ps(&a.scaled_sums[(m0 + r) * a.padded_blocks + b]);
      for (int c = 0; c < C; ++c) {
        acc[r][c] = _mm256_fnmadd_ps(_mm256_loadu_ps(&tile.scaled_zero_points[(c0 + c) * a.padded_blocks + b]), sums,
                                     acc[r][c]);
      }
    }
  }
  for (int r = 0; r < R; ++r)
    for (int c = 0; c < C; ++c) y[(m0 + r) * ldy + n0 + c0 + c] = sum_lanes(acc[r][c]);
}

// Y for every row and the tile's columns, rows and columns R and C at a time, the rest one at a time.
template <int C>
void gemm_columns(const ColumnTile& tile, const QuantizedRows& a, int64_t n0, float* y, int64_t ldy) {
  const int64_t full = tile.count / C * C;
  for (int64_t m = 0; m < a.m; m += kGemmRowsTogether) {
    const bool two = m + 1 < a.m;
    for (int64_t c = 0; c < tile.count; c += c < full ? C : 1) {
      if (c < full) {
        two ? gemm_block<kGemmRowsTogether, C>(tile, a, m, c, n0, y, ldy) : gemm_block<1, C>(tile, a, m, c, n0, y, ldy);
      } else {
        two ? gemm_block<kGemmRowsTogether, 1>(tile, a, m, c, n0, y, ldy) : gemm_block<1, 1>(tile, a, m, c, n0, y, ldy);
      }
    }
  }
}

}  // namespace

void COLUMNS(const BlockWeight& w, const QuantizedRows& a, int64_t n0, int64_t n1, float* y, int64_t ldy) {
  if (w.bits == 4 && a.m >= kGemmRows) {
    thread_local ColumnTile tile;
    unpack_columns(w, a, n0, n1 - n0, tile);
    gemm_columns<GEMM_COLUMNS>(tile, a, n0, y, ldy);
    return;
  }
  for (int64_t n = n0; n < n1; ++n) {
    for (int64_t m = 0; m < a.m; ++m) {
      y[m * ldy + n] = w.bits == 4 ? dot4(w, w.column(n), a, m, n) : dot8(w, a, m, n);
    }
  }
}

}  // namespace qcompile

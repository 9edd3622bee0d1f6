// Block-quantized weights times activations quantized to int8 per block: the arithmetic of BlockQuantMatMul
// (ops/block_quant_matmul.py holds its numpy reference, which defines every rounding).
//
// Y[m, n] = sum over blocks b of  sw[n, b] * sa[m, b] * (sum_k qa[m, k] * w[n, k] - zp[n, b] * sum_k qa[m, k])
// with w the unsigned stored levels (0..15 or 0..255; with a code book, code_book[stored 4-bit index] + 128), zp
// their zero point (128 with a code book), qa = rint(a * 127 / max|a|) per block of A's row. The integer sums
// are exact; the blocks' float terms are added in the same order by every instruction set's one-row path (the
// same Y, bit for bit), in another by the GEMM paths (within float32 rounding).
#pragma once

#include <cstddef>
#include <cstdint>
#include <vector>

namespace qcompile {

constexpr int64_t kGroup = 64;     // K elements whose 4-bit levels one 32-byte load holds
constexpr int64_t kMaxBlock = 256;

// The weight as MatMulNBits stores it: B (N, k_blocks, block * bits / 8), scales (N * k_blocks), zero points
// (N * ceil(k_blocks * bits / 8), packed like B) or none (8, or 128 at 8 bits). With a code book (4 bits only)
// the stored 4-bit values index 16 levels 0..255 around the zero point 128.
struct BlockWeight {
  int64_t k, n, k_blocks;
  int bits, block;
  const uint8_t* data;
  const float* scales;
  const uint8_t* zero_points;
  const uint8_t* code_book = nullptr;  // 16 levels, or none

  const uint8_t* column(int64_t n_) const { return data + n_ * k_blocks * (block * bits / 8); }
  int32_t zero_point(int64_t n_, int64_t b) const;
  // Levels up to 255 (8 bits, or a code book's): the 8-bit dot products, which AVX2 computes in two halves.
  bool wide_levels() const { return bits == 8 || code_book != nullptr; }
  int32_t default_zero_point() const { return wide_levels() ? 128 : 8; }
};

// A's rows quantized: q (m, padded_k) int8 and per block its scale and level sum (m, row_blocks), each row
// zero-padded to whole steps of 8 blocks. Where `paired` (4-bit weights, and every weight on the GEMM path) each
// group of 64 elements along K holds its even elements first, then its odd ones: the order in which 32 packed
// bytes' low and high nibbles unpack.
struct QuantizedRows {
  int64_t m = 0, row_blocks = 0, padded_k = 0;
  bool paired = false;
  std::vector<int8_t> q;
  std::vector<float> scale;
  std::vector<int32_t> sum;
  // For the x86 GEMM path (m >= kGemmRows): per row, each step's scales as 8 lanes
  // (`step_lanes`), and scale x sum per block (`scaled_sums`, row_blocks each).
  int64_t steps = 0, groups_per_step = 0;
  std::vector<float> step_scales, scaled_sums;
};

// Rows of A from which the x86 kernels compute a GEMM: each column's levels unpacked once, in `paired` order.
constexpr int64_t kGemmRows = 3;

// Quantizing A: the buffers sized for m rows (zeros), then each row (rows are independent: threads may share them
// out) by a `RowQuantizer`, which quantizes the blocks, sets their scales and sums (`set_block`), and ends with
// `finish_row`. `quantize_block` quantizes one block's `count` elements into levels; false where one is NaN or inf.
void prepare_rows(int64_t m, const BlockWeight& w, QuantizedRows& out);
bool quantize_block(const float* x, int64_t count, int32_t* levels, float& scale, int32_t& sum);
void set_block(int64_t row, int64_t b, bool finite, float scale, int32_t sum, QuantizedRows& out);
void finish_row(int64_t row, const BlockWeight& w, QuantizedRows& out);
// x rounded to the nearest integer, ties to even, for |x| < 2^22: the float addition rounds (in the default
// rounding mode), where nearbyint would call the maths library on CPUs without SSE4.1. (Without -ffast-math the
// compiler keeps (x + c) - c as it is.)
inline float round_even(float x) {
  constexpr float kShift = 12582912.0f;  // 1.5 x 2^23
  return (x + kShift) - kShift;
}

using RowQuantizer = void (*)(const float* a, int64_t row, const BlockWeight& w, QuantizedRows& out);

// The GEMM steps: a block of 64 or more elements, or a pair of 32-element blocks (one 64-element group); a
// step's 8 lanes hold its block's scale, or the pair's first scale in lanes 0..3 and the second in 4..7.
int64_t gemm_steps(const BlockWeight& w);
void step_lanes(const BlockWeight& w, const float* block_scales, float* lanes);

// Y[m, n] for every row m and the columns n in [n0, n1) (y has row stride ldy).
using ColumnKernel = void (*)(const BlockWeight& w, const QuantizedRows& a, int64_t n0, int64_t n1, float* y,
                              int64_t ldy);

void quantize_row_portable(const float*, int64_t, const BlockWeight&, QuantizedRows&);
void columns_portable(const BlockWeight&, const QuantizedRows&, int64_t, int64_t, float*, int64_t);
#ifdef QCOMPILE_X86
void quantize_row_avx2(const float*, int64_t, const BlockWeight&, QuantizedRows&);
void columns_avx2(const BlockWeight&, const QuantizedRows&, int64_t, int64_t, float*, int64_t);
void quantize_row_avx512vnni(const float*, int64_t, const BlockWeight&, QuantizedRows&);
void columns_avx512vnni(const BlockWeight&, const QuantizedRows&, int64_t, int64_t, float*, int64_t);
#endif

// dots[r * ld + c] = sum_i w[c * ldw + i] * q[r * ldq + i] over `count` bytes (a multiple of 32) for `rows` rows
// of q and `columns` of w: unsigned 8-bit levels times int8, every row with every column (OutlierSplitMatMul).
using ByteDots = void (*)(const uint8_t* w, int64_t ldw, int64_t columns, const int8_t* q, int64_t ldq, int64_t rows,
                          int64_t count, int32_t* dots, int64_t ld);

void byte_dots_portable(const uint8_t*, int64_t, int64_t, const int8_t*, int64_t, int64_t, int64_t, int32_t*, int64_t);
#ifdef QCOMPILE_X86
void byte_dots_avx2(const uint8_t*, int64_t, int64_t, const int8_t*, int64_t, int64_t, int64_t, int32_t*, int64_t);
void byte_dots_avx512vnni(const uint8_t*, int64_t, int64_t, const int8_t*, int64_t, int64_t, int64_t, int32_t*,
                          int64_t);
#endif

// `count` values (a multiple of 32) quantized with one scale, as `quantize_block`, into int8 q; false, q left as it
// is, where one is NaN or inf (OutlierSplitMatMul's rows).
using RowLevels = bool (*)(const float* x, int64_t count, int8_t* q, float& scale, int32_t& sum);

bool quantize_levels_portable(const float*, int64_t, int8_t*, float&, int32_t&);
#ifdef QCOMPILE_X86
bool quantize_levels_avx2(const float*, int64_t, int8_t*, float&, int32_t&);
bool quantize_levels_avx512vnni(const float*, int64_t, int8_t*, float&, int32_t&);
#endif

// float16 activations: `count` values to float32 (exact), and float32 to float16 (to nearest, ties to even; past
// 65504 to infinity, as numpy's astype).
using HalvesToFloats = void (*)(const uint16_t* halves, float* floats, int64_t count);
using FloatsToHalves = void (*)(const float* floats, uint16_t* halves, int64_t count);

void halves_to_floats_portable(const uint16_t*, float*, int64_t);
void floats_to_halves_portable(const float*, uint16_t*, int64_t);
#ifdef QCOMPILE_X86
void halves_to_floats_f16c(const uint16_t*, float*, int64_t);  // chosen with the AVX2 kernels, F16C checked too
void floats_to_halves_f16c(const float*, uint16_t*, int64_t);
#endif

struct Kernels {
  RowQuantizer quantize_row;
  ColumnKernel columns;
  ByteDots byte_dots;
  RowLevels quantize_levels;
  HalvesToFloats to_floats;
  FloatsToHalves to_halves;
};

// The fastest kernels this CPU runs (QCOMPILE_KERNELS_ISA asks for slower ones).
Kernels best_kernels();

}  // namespace qcompile

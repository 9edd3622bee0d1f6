// The parts of the block GEMM every CPU runs: activation quantization, the portable kernel, the choice of kernel.
#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <string>
#include <vector>

#include "block_gemm.h"

namespace qcompile {

int32_t BlockWeight::zero_point(int64_t n_, int64_t b) const {
  if (zero_points == nullptr) return default_zero_point();
  const uint8_t* zp = zero_points + n_ * ((k_blocks * bits + 7) / 8);
  return bits == 4 ? (zp[b / 2] >> (4 * (b % 2))) & 0x0F : zp[b];
}

// Where element k of a row goes in `QuantizedRows::q`.
static inline int64_t q_position(bool paired, int64_t k) {
  if (!paired) return k;
  const int64_t i = k % kGroup;
  return k - i + (i % 2 ? kGroup / 2 : 0) + i / 2;
}

void prepare_rows(int64_t m, const BlockWeight& w, QuantizedRows& out) {
  out.m = m;
  out.row_blocks = (w.k_blocks + 7) / 8 * 8;
  out.padded_k = out.row_blocks * w.block;
  out.paired = w.bits == 4 || m >= kGemmRows;
  out.q.assign(static_cast<size_t>(m * out.padded_k), 0);
  out.scale.assign(static_cast<size_t>(m * out.row_blocks), 0.0f);
  out.sum.assign(static_cast<size_t>(m * out.row_blocks), 0);
  if (m < kGemmRows) return;
  out.steps = gemm_steps(w);
  out.groups_per_step = std::max<int64_t>(w.block / kGroup, 1);
  out.step_scales.assign(static_cast<size_t>(m * out.steps * 8), 0.0f);
  out.scaled_sums.assign(static_cast<size_t>(m * out.row_blocks), 0.0f);
}

bool quantize_block(const float* x, int64_t count, int32_t* levels, float& scale, int32_t& sum) {
  float amax = 0.0f;
  bool finite = true;
  for (int64_t i = 0; i < count; ++i) {
    amax = std::max(amax, std::fabs(x[i]));
    finite = finite && std::isfinite(x[i]);
  }
  scale = 0.0f;
  sum = 0;
  if (!finite) return false;
  if (amax == 0.0f) return true;
  const float inverse = 127.0f / amax;
  for (int64_t i = 0; i < count; ++i) {
    levels[i] = static_cast<int32_t>(std::clamp(round_even(x[i] * inverse), -127.0f, 127.0f));
    sum += levels[i];
  }
  scale = amax / 127.0f;
  return true;
}

void set_block(int64_t row, int64_t b, bool finite, float scale, int32_t sum, QuantizedRows& out) {
  const int64_t at = row * out.row_blocks + b;
  out.scale[at] = finite ? scale : NAN;  // a block holding NaN or inf: its products are NaN, as a float matmul's
  out.sum[at] = sum;
}

void finish_row(int64_t row, const BlockWeight& w, QuantizedRows& out) {
  if (out.m < kGemmRows) return;
  const int64_t at = row * out.row_blocks;
  step_lanes(w, &out.scale[at], &out.step_scales[row * out.steps * 8]);
  for (int64_t b = 0; b < w.k_blocks; ++b) out.scaled_sums[at + b] = out.scale[at + b] * out.sum[at + b];
}

void quantize_row_portable(const float* a, int64_t row, const BlockWeight& w, QuantizedRows& out) {
  const float* x = a + row * w.k;
  int8_t* q = out.q.data() + row * out.padded_k;
  int32_t levels[kMaxBlock];
  for (int64_t b = 0; b < w.k_blocks; ++b) {
    const int64_t begin = b * w.block, count = std::min<int64_t>(w.block, w.k - begin);
    float scale;
    int32_t sum;
    std::fill(levels, levels + count, 0);
    const bool finite = quantize_block(x + begin, count, levels, scale, sum);
    for (int64_t i = 0; i < count; ++i) q[q_position(out.paired, begin + i)] = static_cast<int8_t>(levels[i]);
    set_block(row, b, finite, scale, sum, out);
  }
  finish_row(row, w, out);
}

int64_t gemm_steps(const BlockWeight& w) { return w.block < kGroup ? (w.k_blocks + 1) / 2 : w.k_blocks; }

void step_lanes(const BlockWeight& w, const float* block_scales, float* lanes) {
  for (int64_t s = 0; s < gemm_steps(w); ++s) {
    for (int lane = 0; lane < 8; ++lane) {
      const int64_t b = w.block < kGroup ? 2 * s + lane / 4 : s;
      lanes[s * 8 + lane] = b < w.k_blocks ? block_scales[b] : 0.0f;
    }
  }
}

// Level k of a column's stored bytes.
static inline int32_t stored_level(const BlockWeight& w, const uint8_t* column, int64_t k) {
  if (w.bits == 8) return column[k];
  const int32_t nibble = (column[k / 2] >> (4 * (k % 2))) & 0x0F;
  return w.code_book ? w.code_book[nibble] : nibble;
}

void columns_portable(const BlockWeight& w, const QuantizedRows& a, int64_t n0, int64_t n1, float* y, int64_t ldy) {
  const int64_t block = w.block;
  for (int64_t n = n0; n < n1; ++n) {
    const uint8_t* column = w.column(n);
    for (int64_t m = 0; m < a.m; ++m) {
      const int8_t* q = a.q.data() + m * a.padded_k;
      float lanes[8] = {};  // block b adds into lane b % 8, summed as the x86 one-row path sums its vector's lanes
      for (int64_t b = 0; b < w.k_blocks; ++b) {
        int32_t dot = 0;
        for (int64_t k = b * block; k < (b + 1) * block; ++k) {
          dot += stored_level(w, column, k) * q[q_position(a.paired, k)];
        }
        const int64_t at = m * a.row_blocks + b;
        dot -= w.zero_point(n, b) * a.sum[at];
        lanes[b % 8] = std::fma(static_cast<float>(dot), w.scales[n * w.k_blocks + b] * a.scale[at], lanes[b % 8]);
      }
      y[m * ldy + n] =
          ((lanes[0] + lanes[4]) + (lanes[2] + lanes[6])) + ((lanes[1] + lanes[5]) + (lanes[3] + lanes[7]));
    }
  }
}

void byte_dots_portable(const uint8_t* w, int64_t ldw, int64_t columns, const int8_t* q, int64_t ldq, int64_t rows,
                        int64_t count, int32_t* dots, int64_t ld) {
  for (int64_t r = 0; r < rows; ++r) {
    for (int64_t c = 0; c < columns; ++c) {
      int32_t dot = 0;
      for (int64_t i = 0; i < count; ++i) dot += int32_t{w[c * ldw + i]} * q[r * ldq + i];
      dots[r * ld + c] = dot;
    }
  }
}

bool quantize_levels_portable(const float* x, int64_t count, int8_t* q, float& scale, int32_t& sum) {
  thread_local std::vector<int32_t> levels;
  levels.assign(static_cast<size_t>(count), 0);
  if (!quantize_block(x, count, levels.data(), scale, sum)) return false;
  for (int64_t i = 0; i < count; ++i) q[i] = static_cast<int8_t>(levels[i]);
  return true;
}

void halves_to_floats_portable(const uint16_t* halves, float* floats, int64_t count) {
  for (int64_t i = 0; i < count; ++i) {
    const uint32_t h = halves[i], sign = (h & 0x8000u) << 16, exponent = (h >> 10) & 0x1F, mantissa = h & 0x3FF;
    if (exponent == 0) {  // zero or subnormal: mantissa x 2^-24
      const float magnitude = std::ldexp(static_cast<float>(mantissa), -24);
      floats[i] = sign ? -magnitude : magnitude;
      continue;
    }
    const uint32_t bits = sign | (exponent == 0x1F ? 0x7F800000u | (mantissa << 13)  // infinity, NaN
                                                   : ((exponent + 112) << 23) | (mantissa << 13));
    std::memcpy(&floats[i], &bits, sizeof bits);
  }
}

void floats_to_halves_portable(const float* floats, uint16_t* halves, int64_t count) {
  constexpr uint32_t kInfinity = 0x7F800000u, kHalfOverflow = 0x477FF000u;  // 65520: rounds to infinity
  constexpr uint32_t kSmallestNormal = 0x38800000u;                           // 2^-14
  for (int64_t i = 0; i < count; ++i) {
    uint32_t bits;
    std::memcpy(&bits, &floats[i], sizeof bits);
    const uint32_t sign = (bits >> 16) & 0x8000u, magnitude = bits & 0x7FFFFFFFu;
    uint32_t h;
    if (magnitude > kInfinity) {
      h = 0x7E00u | ((magnitude >> 13) & 0x3FF);  // NaN, quiet
    } else if (magnitude >= kHalfOverflow) {
      h = 0x7C00u;
    } else if (magnitude >= kSmallestNormal) {  // the mantissa rounded at bit 13, ties to even, carrying on
      h = (magnitude + 0xFFFu + ((magnitude >> 13) & 1u) - 0x38000000u) >> 13;
    } else {  // subnormal: x / 2^-24 rounded (exact product; 1024 is the smallest normal's encoding)
      h = static_cast<uint32_t>(round_even(std::fabs(floats[i]) * 16777216.0f));
    }
    halves[i] = static_cast<uint16_t>(sign | h);
  }
}

Kernels best_kernels() {
  // QCOMPILE_KERNELS_ISA asks for a slower kernel than the best (tests compare them on one machine).
  const char* wanted = std::getenv("QCOMPILE_KERNELS_ISA");
  const std::string choice = wanted ? wanted : "";
#ifdef QCOMPILE_X86
  __builtin_cpu_init();
  const bool avx2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c");
  const bool vnni = avx2 && __builtin_cpu_supports("avx512vnni") && __builtin_cpu_supports("avx512vl") &&
                    __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512dq");
  if (vnni && (choice.empty() || choice == "avx512vnni")) {
    return {quantize_row_avx512vnni, columns_avx512vnni, byte_dots_avx512vnni, quantize_levels_avx512vnni,
            halves_to_floats_f16c, floats_to_halves_f16c};
  }
  if (avx2 && choice != "portable") {
    return {quantize_row_avx2,     columns_avx2,          byte_dots_avx2, quantize_levels_avx2,
            halves_to_floats_f16c, floats_to_halves_f16c};
  }
#endif
  return {quantize_row_portable,     columns_portable,         byte_dots_portable, quantize_levels_portable,
          halves_to_floats_portable, floats_to_halves_portable};
}

}  // namespace qcompile

// bfloat16 outputs rounded by AVX512-BF16, where the CPU has it (avx512_bf16_usable()): the
// stage of bfloat16 lines of unit stride in place of InRegisters (csrc/cpu/in_registers.h), in
// ops whose tensors fill at most half the last-level cache (rounds_bfloat16_natively, bn_lines.h).
//
// InRegisters rounds 8 floats to bfloat16 in 9 vector instructions (store8), more than the rest
// of an eval step, where float16's F16C takes one: the eval forward at 32x64x56x56 took twice
// float16's time. vcvtneps2bf16 rounds 16 in one, but it is an AVX-512 instruction, which the
// passes' 8-value loops (compiled for AVX2, to run on any CPU that has it) cannot inline. So this
// stage runs InRegisters' loops with its bfloat16 outputs written as floats into a buffer in L1,
// a chunk at a time, and rounds each chunk in one call (round_to_bfloat16).
//
// The instruction rounds as c10 does (to nearest even) but for two kinds of floats: it flushes
// denormals to zero and keeps a NaN's sign and payload, where c10 rounds the first and gives
// 0x7FC0 for the second. A step of 16 that holds either takes c10's conversion instead: the same
// bits as InRegisters.
#pragma once
#include "cpu/element_cast.h"

#if defined(CNNKERN_IN_REGISTERS) && (defined(__clang__) || __GNUC__ >= 10)
#define CNNKERN_AVX512_BF16_LOOPS 1
#include <c10/util/BFloat16.h>
#include <c10/util/Exception.h>

#include <algorithm>
#include <array>
#include <cstdint>
#include <cstdlib>
#include <cstring>

#include "cpu/in_registers.h"
#include "cpu/line.h"
#include "cpu/stage.h"

#define CNNKERN_AVX512_BF16 __attribute__((target("avx512f,avx512bw,avx512dq,avx512vl,avx512bf16")))

namespace cnnkern::cpu {

// Whether bfloat16 lines that convert in registers may round their outputs by AVX512-BF16 (in
// ops within half the last-level cache: rounds_bfloat16_natively, bn_lines.h): where the CPU has
// it (and AVX512 BW, DQ and VL), unless CNNKERN_CPU_AVX512_BF16=0 (read once per process; the
// tests use it to check InRegisters' rounding against this one).
inline bool avx512_bf16_usable() {
  static const bool use = [] {
    const char* env = std::getenv("CNNKERN_CPU_AVX512_BF16");
    const bool allowed = env == nullptr || std::strcmp(env, "0") != 0;
    return allowed && converts_in_registers() && __builtin_cpu_supports("avx512bf16") &&
           __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512dq") &&
           __builtin_cpu_supports("avx512vl");
  }();
  return use;
}

// dst[i] = src[i] rounded to bfloat16 as c10 rounds, i < count <= 16, `lanes` their mask.
CNNKERN_AVX512_BF16 inline void round16_to_bfloat16(const float* src, c10::BFloat16* dst, int64_t count,
                                                    __mmask16 lanes) {
  // fpclass categories: quiet NaN (0x01), denormal (0x20), signalling NaN (0x80).
  constexpr int kNanOrDenormal = 0x01 | 0x20 | 0x80;
  const __m512 v = _mm512_maskz_loadu_ps(lanes, src);
  if (_mm512_fpclass_ps_mask(v, kNanOrDenormal) != 0) {
    for (int64_t i = 0; i < count; ++i) dst[i] = c10::BFloat16(src[i]);
  } else {
    _mm256_mask_storeu_epi16(dst, lanes, reinterpret_cast<__m256i>(_mm512_cvtneps_pbh(v)));
  }
}

// dst[i] = src[i] rounded to bfloat16 as c10 rounds, i < n.
CNNKERN_AVX512_BF16 inline void round_to_bfloat16(const float* src, c10::BFloat16* dst, int64_t n) {
  int64_t i = 0;
  for (; i + 16 <= n; i += 16) round16_to_bfloat16(src + i, dst + i, 16, 0xFFFF);
  if (i < n) round16_to_bfloat16(src + i, dst + i, n - i, _cvtu32_mask16((1u << (n - i)) - 1));
}

// An output line of the stage: elements [k0, k0 + kChunk) of a bfloat16 line, as floats in its
// buffer, element k at p[k - k0].
CNNKERN_AVX2_F16C inline void store8(const ChunkLine<float>& line, int64_t k, __m256 v) {
  _mm256_storeu_ps(&line[k], v);
}

// The stage: InRegisters' loops, kChunk elements at a time (a multiple of the sums' lanes, as
// float16's Stage, so that the sums add in the same order as in one chunk). Its inputs are the
// lines as they are; its bfloat16 outputs are buffered and rounded when a chunk's loop returns.
template <int64_t kChunkSize>
class BFloat16Outputs : public InRegisters {
 public:
  static constexpr int64_t kChunk = kChunkSize;
  // Output lines per chunk: the most a loop writes is 4 lines (a group of the short-line sums)
  // of 1 tensor, or 1 line of 2 (grad_input and grad_residual).
  static constexpr int kSlots = 4;

  BFloat16Outputs() = default;
  BFloat16Outputs(const BFloat16Outputs&) = delete;
  BFloat16Outputs& operator=(const BFloat16Outputs&) = delete;

  // Calls f(c0, c1) for the chunks [c0, c1) of [k0, k1) in order, and rounds what f wrote
  // through out() when it returns.
  template <typename F>
  void for_chunks(int64_t k0, int64_t k1, const F& f) {
    for (int64_t c0 = k0; c0 < k1; c0 += kChunk) {
      const int64_t size = std::min(kChunk, k1 - c0);
      k0_ = c0;
      outputs_ = 0;
      f(c0, c0 + size);
      for (int i = 0; i < outputs_; ++i) round_to_bfloat16(slot(i), pending_[i], size);
    }
  }

  using InRegisters::out;
  // A bfloat16 line the loop writes (every element of the chunk); an absent tensor's (a null
  // line) is never written, and stays null.
  ChunkLine<float> out(const Line<c10::BFloat16, Unit>& line) {
    if (line.p == nullptr) return {nullptr, k0_};
    TORCH_INTERNAL_ASSERT(outputs_ < kSlots);
    pending_[outputs_] = line.p + k0_;
    return {slot(outputs_++), k0_};
  }

 private:
  float* slot(int i) { return buffer_.data() + kChunk * i; }

  alignas(64) std::array<float, kChunk * kSlots> buffer_;
  std::array<c10::BFloat16*, kSlots> pending_;
  int64_t k0_ = 0;
  int outputs_ = 0;
};

}  // namespace cnnkern::cpu
#endif

// The CPU kernels' choices of loops on this machine (declared in features.h): those that
// depend on the CPU and on the CNNKERN_CPU_* variables (the README names them).
#include "cpu/features.h"

#include <cstdint>
#include <limits>
#include <string>

#include "cpu/bn_lines.h"

namespace cnnkern::cpu {

namespace {

// " in ops within N MiB", or nothing where there is no limit (the cache's size is unknown).
std::string within(int64_t bytes) {
  if (bytes == std::numeric_limits<int64_t>::max()) return "";
  return " in ops within " + std::to_string(bytes >> 20) + " MiB";
}

}  // namespace

std::string features() {
  if (!converts_in_registers()) return "portable loops (no AVX2 and F16C here, or CNNKERN_CPU_IN_REGISTERS=0)";
  std::string s = "16-bit values convert in registers (AVX2, F16C)";
#ifdef CNNKERN_AVX512_BF16_LOOPS
  if (avx512_bf16_usable()) s += "; bfloat16 outputs round by AVX512-BF16" + within(bfloat16_rounding_bytes());
#endif
  const int64_t threshold = stream_threshold();
  if (threshold == 0) {
    s += "; float32 outputs always stream";
  } else if (threshold < std::numeric_limits<int64_t>::max()) {
    s += "; float32 outputs stream past " + std::to_string(threshold >> 20) + " MiB";
  }
  return s;
}

}  // namespace cnnkern::cpu

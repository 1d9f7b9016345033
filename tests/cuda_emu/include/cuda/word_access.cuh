// The emulator's csrc/cuda/word_access.cuh (its include path comes first): the same whole-word
// loads and stores, failing the launch with "misaligned address" where a GPU would fault.
#pragma once
#include "emulator.h"

namespace cnnkern::cuda {

template <typename Word>
Word load_word(const Word* p) {
  if (!::cuda_emu::aligned(p)) return ::cuda_emu::misaligned("load", p, sizeof(Word)), Word{};
  return *p;
}

template <typename Word>
void store_word(Word* p, const Word& word) {
  if (!::cuda_emu::aligned(p)) return ::cuda_emu::misaligned("store", p, sizeof(Word));
  *p = word;
}

}  // namespace cnnkern::cuda

// Stand-in for <cooperative_groups.h> in the CPU emulation: the grid group of a cooperative
// launch, and its barrier (see ../emulator.h).
#pragma once
#include "../emulator.h"

namespace cooperative_groups {

struct grid_group {
  void sync() const { ::cuda_emu::grid_sync(); }
};

inline grid_group this_grid() { return {}; }

}  // namespace cooperative_groups

// What the kernels that use Intel AMX tiles share (q4_amx.cpp, markov_chain.cpp): the tile
// configuration's layout and the permission Linux asks a process to request before its first
// tile instruction.  native.py hashes this header into every kernel library's name, so a
// change here rebuilds them.

#pragma once

#include <sys/syscall.h>
#include <unistd.h>

#include <cstdint>

namespace dspark_amx {

// The 64 bytes LDTILECFG reads: palette 1, then bytes per row and rows of tiles 0..15.
struct alignas(64) TileConfig {
  uint8_t palette = 1;
  uint8_t start_row = 0;
  uint8_t reserved[14] = {};
  uint16_t colsb[16] = {};
  uint8_t rows[16] = {};
};

// Linux hands out the AMX register state only to a process that asks for it; a CPU without
// tiles refuses (false).
inline bool request_amx() {
  constexpr long kArchReqXcompPerm = 0x1023;
  constexpr long kXfeatureXtiledata = 18;
  return syscall(SYS_arch_prctl, kArchReqXcompPerm, kXfeatureXtiledata) == 0;
}

}  // namespace dspark_amx

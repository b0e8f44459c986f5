// CRC-32C (Castagnoli), the checksum of snapshots and of their transfer pieces: one
// definition for the server and the clients. Header-only; thread-safe.
#ifndef SPARSEKV_COMMON_CRC32C_H_
#define SPARSEKV_COMMON_CRC32C_H_

#include <cstdint>
#include <string_view>

namespace sparsekv {

// CRC-32C of `data`, continuing from `crc` (0 to start): Crc32c(b, Crc32c(a)) == Crc32c(a+b).
inline uint32_t Crc32c(std::string_view data, uint32_t crc = 0) {
  struct Table {
    uint32_t t[256];
    Table() {
      for (uint32_t i = 0; i < 256; ++i) {
        uint32_t c = i;
        for (int k = 0; k < 8; ++k) c = (c & 1) ? (c >> 1) ^ 0x82f63b78u : c >> 1;
        t[i] = c;
      }
    }
  };
  static const Table table;
  crc = ~crc;
  for (unsigned char c : data) crc = table.t[(crc ^ c) & 0xff] ^ (crc >> 8);
  return ~crc;
}

}  // namespace sparsekv

#endif  // SPARSEKV_COMMON_CRC32C_H_

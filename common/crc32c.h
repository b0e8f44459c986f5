// CRC-32C (Castagnoli), the checksum of snapshots and of their transfer pieces: one
// definition for the server and the clients. Header-only; thread-safe.
#ifndef SPARSEKV_COMMON_CRC32C_H_
#define SPARSEKV_COMMON_CRC32C_H_

#include <cstddef>
#include <cstdint>
#include <cstring>
#include <string_view>

#if defined(__x86_64__)
#include <cpuid.h>
#endif

namespace sparsekv {
namespace crc32c_internal {

// One byte at a time: ~0.5 GB/s, for CPUs without the CRC32 instruction.
inline uint32_t Table(const unsigned char* p, size_t n, uint32_t crc) {
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
  for (; n > 0; --n, ++p) crc = table.t[(crc ^ *p) & 0xff] ^ (crc >> 8);
  return crc;
}

#if defined(__x86_64__)
// SSE4.2's CRC32 instruction computes CRC-32C, 8 bytes at a time: an order of magnitude
// faster than the table, so checksumming is not what limits snapshot writes and restores.
__attribute__((target("sse4.2"))) inline uint32_t Sse42(const unsigned char* p, size_t n,
                                                        uint32_t crc) {
  uint64_t c = crc;
  for (; n >= 8; n -= 8, p += 8) {
    uint64_t v;
    std::memcpy(&v, p, 8);
    c = __builtin_ia32_crc32di(c, v);
  }
  uint32_t c32 = static_cast<uint32_t>(c);
  for (; n > 0; --n, ++p) c32 = __builtin_ia32_crc32qi(c32, *p);
  return c32;
}

inline bool HasSse42() {
  unsigned a = 0, b = 0, c = 0, d = 0;
  return __get_cpuid(1, &a, &b, &c, &d) != 0 && (c & bit_SSE4_2) != 0;
}
#endif

}  // namespace crc32c_internal

// CRC-32C of `data`, continuing from `crc` (0 to start): Crc32c(b, Crc32c(a)) == Crc32c(a+b).
inline uint32_t Crc32c(std::string_view data, uint32_t crc = 0) {
  const auto* p = reinterpret_cast<const unsigned char*>(data.data());
#if defined(__x86_64__)
  static const bool sse42 = crc32c_internal::HasSse42();
  if (sse42) return ~crc32c_internal::Sse42(p, data.size(), ~crc);
#endif
  return ~crc32c_internal::Table(p, data.size(), ~crc);
}

}  // namespace sparsekv

#endif  // SPARSEKV_COMMON_CRC32C_H_

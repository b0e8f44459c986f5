// Entry point of the `sparsekv` command-line client; everything else is in commands.cc so
// that tests can run the CLI in-process.
#include <malloc.h>

#include <iostream>
#include <string>
#include <vector>

#include "clients/cli/commands.h"

int main(int argc, char** argv) {
  // Serve multi-MiB gRPC buffers from the heap, not from a fresh mmap per message: glibc's
  // default (mmap from 128 KiB, munmap on free) cost the upload path a page fault per 4 KiB of
  // every message, 28% of the client's CPU in `sparsekv bench --workload=prefill`.
  mallopt(M_MMAP_THRESHOLD, 32 << 20);
  mallopt(M_TRIM_THRESHOLD, 64 << 20);
  const std::vector<std::string> args(argv, argv + argc);
  return sparsekv::cli::RunCli(args, std::cout, std::cerr);
}

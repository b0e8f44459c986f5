// Entry point of the `sparsekv` command-line client; everything else is in commands.cc so
// that tests can run the CLI in-process.
#include <iostream>
#include <string>
#include <vector>

#include "clients/cli/commands.h"

int main(int argc, char** argv) {
  const std::vector<std::string> args(argv, argv + argc);
  return sparsekv::cli::RunCli(args, std::cout, std::cerr);
}

// The `sparsekv` CLI's subcommands and exit-status policy.
//
// RunCli is the whole program minus main(): it parses arguments (args.h), runs one
// subcommand against a server through KvCacheClient, prints a human-readable report or one
// JSON object (--json) to `out`, and errors to `err` as `error: CODE_NAME: message`.
//
// Exit status: 0 success; 1 the server returned an error; 2 usage error (bad flags or
// arguments, unreadable or unsuitable .npy, unwritable output file); 3 the server could not be
// reached (could not connect within --timeout, or UNAVAILABLE).
//
// Thread-safety: RunCli sets global flags; call it from one thread at a time.
#ifndef SPARSEKV_CLIENTS_CLI_COMMANDS_H_
#define SPARSEKV_CLIENTS_CLI_COMMANDS_H_

#include <ostream>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/strings/string_view.h"

namespace sparsekv::cli {

inline constexpr int kExitOk = 0;
inline constexpr int kExitServerError = 1;
inline constexpr int kExitUsage = 2;
inline constexpr int kExitUnreachable = 3;

// An InvalidArgument status that RunCli reports as a usage error (exit status 2).
absl::Status UsageError(absl::string_view message);

// `status` (not OK) marked so that RunCli reports it with exit status `exit_code`.
absl::Status WithExitCode(absl::Status status, int exit_code);

// The exit status for `status`: 0 for OK; the code set by UsageError/WithExitCode if any;
// 3 for UNAVAILABLE; otherwise 1.
int ExitCodeFor(const absl::Status& status);

// Runs the CLI with `args` (args[0] is the program name) and returns the exit status.
int RunCli(const std::vector<std::string>& args, std::ostream& out, std::ostream& err);

}  // namespace sparsekv::cli

#endif  // SPARSEKV_CLIENTS_CLI_COMMANDS_H_

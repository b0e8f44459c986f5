// Command-line parsing of the `sparsekv` CLI: subcommands over Abseil flags.
//
// Every option is an ABSL_FLAG (declared below), so flags keep Abseil's typed parsing
// (durations such as "10s", numbers, booleans) and help strings. The argv walk itself is ours
// rather than absl::ParseCommandLine, because that function exits the process with status 1 on
// a bad flag, while the CLI promises exit status 2 for usage errors, and because each
// subcommand accepts only its own flags: `sparsekv list --layers 3` is an error, not a
// silently ignored option.
//
// Thread-safety: ParseArgs writes the global flag values; call it from one thread, once per
// process (tests wrap it in absl::FlagSaver).
#ifndef SPARSEKV_CLIENTS_CLI_ARGS_H_
#define SPARSEKV_CLIENTS_CLI_ARGS_H_

#include <cstdint>
#include <set>
#include <string>
#include <vector>

#include "absl/flags/declare.h"
#include "absl/status/statusor.h"
#include "absl/time/time.h"

// Global.
ABSL_DECLARE_FLAG(std::string, server);
ABSL_DECLARE_FLAG(absl::Duration, timeout);
ABSL_DECLARE_FLAG(bool, json);
ABSL_DECLARE_FLAG(std::string, tls_ca_file);
ABSL_DECLARE_FLAG(std::string, tls_cert_file);
ABSL_DECLARE_FLAG(std::string, tls_key_file);
ABSL_DECLARE_FLAG(std::string, tls_server_name);
ABSL_DECLARE_FLAG(std::string, token);
ABSL_DECLARE_FLAG(std::string, in);
ABSL_DECLARE_FLAG(std::string, to);
ABSL_DECLARE_FLAG(bool, keep);
ABSL_DECLARE_FLAG(std::string, via);
ABSL_DECLARE_FLAG(std::string, peers);
// create / list.
ABSL_DECLARE_FLAG(uint32_t, layers);
ABSL_DECLARE_FLAG(uint32_t, kv_heads);
ABSL_DECLARE_FLAG(uint32_t, q_heads);
ABSL_DECLARE_FLAG(uint32_t, head_dim);
ABSL_DECLARE_FLAG(std::string, dtype);
ABSL_DECLARE_FLAG(std::string, id);
ABSL_DECLARE_FLAG(std::string, tenant);
ABSL_DECLARE_FLAG(absl::Duration, ttl);
ABSL_DECLARE_FLAG(std::vector<std::string>, label);
ABSL_DECLARE_FLAG(float, k_sparsity);
ABSL_DECLARE_FLAG(float, v_sparsity);
ABSL_DECLARE_FLAG(std::string, k_layer_sparsity);
ABSL_DECLARE_FLAG(std::string, v_layer_sparsity);
ABSL_DECLARE_FLAG(std::string, k_direction);
ABSL_DECLARE_FLAG(std::string, v_direction);
ABSL_DECLARE_FLAG(std::string, k_scoring);
ABSL_DECLARE_FLAG(std::string, v_scoring);
ABSL_DECLARE_FLAG(uint32_t, dense_window);
ABSL_DECLARE_FLAG(uint32_t, chunk_tokens);
ABSL_DECLARE_FLAG(uint32_t, group_tokens);
ABSL_DECLARE_FLAG(std::string, decode_compute);
ABSL_DECLARE_FLAG(uint32_t, page_size);
// append.
ABSL_DECLARE_FLAG(std::string, k);
ABSL_DECLARE_FLAG(std::string, v);
ABSL_DECLARE_FLAG(uint32_t, layer_begin);
ABSL_DECLARE_FLAG(int64_t, message_bytes);
// attend.
ABSL_DECLARE_FLAG(int32_t, layer);
ABSL_DECLARE_FLAG(std::string, q);
ABSL_DECLARE_FLAG(std::string, new_k);
ABSL_DECLARE_FLAG(std::string, new_v);
ABSL_DECLARE_FLAG(bool, lse);
ABSL_DECLARE_FLAG(std::string, out);
ABSL_DECLARE_FLAG(float, scale);
ABSL_DECLARE_FLAG(int32_t, show);
// read.
ABSL_DECLARE_FLAG(std::string, k_out);
ABSL_DECLARE_FLAG(std::string, v_out);
ABSL_DECLARE_FLAG(bool, float32);
// bench, demo.
ABSL_DECLARE_FLAG(std::string, workload);
ABSL_DECLARE_FLAG(uint32_t, sessions);
ABSL_DECLARE_FLAG(uint64_t, context);
ABSL_DECLARE_FLAG(float, sparsity);
ABSL_DECLARE_FLAG(absl::Duration, duration);
ABSL_DECLARE_FLAG(uint64_t, requests);
ABSL_DECLARE_FLAG(uint32_t, concurrency);
ABSL_DECLARE_FLAG(uint32_t, inflight);
ABSL_DECLARE_FLAG(uint32_t, channels);
ABSL_DECLARE_FLAG(bool, append);
ABSL_DECLARE_FLAG(int32_t, server_pid);
ABSL_DECLARE_FLAG(uint64_t, seed);
ABSL_DECLARE_FLAG(uint32_t, steps);

namespace sparsekv::cli {

// A subcommand: its name, positional arguments, the flags it takes and a one-line summary.
struct CommandSpec {
  const char* name;
  const char* positional;  // e.g. "ID"; "" when none
  int min_positional;
  int max_positional;
  std::vector<const char*> flags;  // besides the global ones
  const char* summary;
};

// Every subcommand, in the order `help` lists them.
const std::vector<CommandSpec>& Commands();

// The flags every subcommand takes (server, timeout, json).
const std::vector<const char*>& GlobalFlags();

// The parsed command line.
struct Invocation {
  std::string command;                  // "help" when none was given
  std::vector<std::string> positional;  // arguments after the command
  std::set<std::string> flags_set;      // flags given on the command line
  std::vector<std::string> labels;      // every --label value, in order (the flag repeats)

  bool Has(const std::string& flag) const { return flags_set.count(flag) > 0; }
};

// Parses `args` (args[0], the program name, is skipped): first resets every CLI flag to its
// default, then sets the flags `args` names.
// Accepted forms: --name=value, --name value, -name..., --bool, --nobool, and "--" to end
// the options; flags may come before or after the subcommand. "-h"/"--help" mean `help`.
// Dashes in a flag name read as underscores (--decode-compute is --decode_compute).
// Returns InvalidArgument with a message for the user on: an unknown subcommand or flag, a
// flag the subcommand does not take, a missing or unparsable value, a wrong number of
// positional arguments.
absl::StatusOr<Invocation> ParseArgs(const std::vector<std::string>& args);

// Usage text: the list of subcommands when `command` is empty, else that command's synopsis
// and flags with their help strings and defaults.
std::string UsageText(const std::string& command);

}  // namespace sparsekv::cli

#endif  // SPARSEKV_CLIENTS_CLI_ARGS_H_

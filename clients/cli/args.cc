#include "clients/cli/args.h"

#include <algorithm>
#include <cstring>
#include <utility>

#include "absl/flags/commandlineflag.h"
#include "absl/flags/flag.h"
#include "absl/flags/reflection.h"
#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "absl/strings/string_view.h"

ABSL_FLAG(std::string, server, "localhost:50051", "sparsekv server address, HOST:PORT");
ABSL_FLAG(absl::Duration, timeout, absl::Seconds(10),
          "deadline of each call (and of connecting), e.g. 10s, 500ms, 2m");
ABSL_FLAG(bool, json, false, "print one JSON object instead of human-readable text");
ABSL_FLAG(std::string, tls_ca_file, "",
          "PEM CA certificates that sign the server's certificate: connect with TLS (empty and "
          "no --tls_cert_file: plaintext)");
ABSL_FLAG(std::string, tls_cert_file, "",
          "PEM client certificate chain for mutual TLS (with --tls_key_file)");
ABSL_FLAG(std::string, tls_key_file, "", "PEM private key of --tls_cert_file");
ABSL_FLAG(std::string, tls_server_name, "",
          "name to check the server certificate against instead of the --server host");
ABSL_FLAG(std::string, token, "",
          "bearer token for a server with --auth=token (empty: the SPARSEKV_TOKEN environment "
          "variable, if set); never printed");

ABSL_FLAG(uint32_t, layers, 0,
          "transformer layers of the session (create: required; bench, demo: defaults)");
ABSL_FLAG(uint32_t, kv_heads, 0,
          "key/value heads per layer (create: required; bench, demo: defaults)");
ABSL_FLAG(
    uint32_t, q_heads, 0,
    "query heads per layer, a multiple of --kv_heads (create: required; bench, demo: defaults)");
ABSL_FLAG(uint32_t, head_dim, 0,
          "elements per head vector, 1..512 (create: required; bench, demo: defaults)");
ABSL_FLAG(std::string, dtype, "float16", "cache storage dtype: float16, bfloat16 or float32");
ABSL_FLAG(std::string, id, "", "session id to use (empty: the server picks one)");
ABSL_FLAG(std::string, tenant, "", "tenant (create: empty = default; list: empty = all)");
ABSL_FLAG(absl::Duration, ttl, absl::ZeroDuration(),
          "idle time before the server may evict the session, e.g. 3600s (0: server default)");
ABSL_FLAG(std::vector<std::string>, label, {}, "label KEY=VALUE; repeat the flag for more");
ABSL_FLAG(float, k_sparsity, 0.0f, "fraction of K elements pruned, in [0, 1)");
ABSL_FLAG(float, v_sparsity, 0.0f, "fraction of V elements pruned, in [0, 1)");
ABSL_FLAG(std::string, k_layer_sparsity, "",
          "per-layer K sparsity, one comma-separated value per layer (overrides --k_sparsity)");
ABSL_FLAG(std::string, v_layer_sparsity, "",
          "per-layer V sparsity, one comma-separated value per layer (overrides --v_sparsity)");
ABSL_FLAG(std::string, k_direction, "", "K pruning direction: per_token or per_channel");
ABSL_FLAG(std::string, v_direction, "", "V pruning direction: per_token or per_channel");
ABSL_FLAG(std::string, k_scoring, "", "K scoring: magnitude or output_aware");
ABSL_FLAG(std::string, v_scoring, "", "V scoring: magnitude or output_aware");
ABSL_FLAG(uint32_t, dense_window, 0, "newest tokens never pruned (0: server default, 32)");
ABSL_FLAG(uint32_t, chunk_tokens, 0, "tokens per compressed chunk (0: server default, 256)");
ABSL_FLAG(uint32_t, group_tokens, 0, "tokens per per-channel group, 32 or 64 (0: default 32)");
ABSL_FLAG(std::string, decode_compute, "",
          "decode arithmetic of the sessions: f32, or f16 (fp16 products, ~2.5x less compute "
          "for ~1e-3 relative attention error; takes effect for float16 caches on CPUs with "
          "AVX512-FP16, otherwise f32) (empty: server default, f32)");
ABSL_FLAG(uint32_t, page_size, 0, "sessions per ListSessions page (0: server default)");

ABSL_FLAG(std::string, k, "",
          "keys .npy (<f4 or <f2): [layers, tokens, kv_heads, head_dim] or "
          "[tokens, kv_heads, head_dim] for one layer");
ABSL_FLAG(std::string, v, "", "values .npy, same shape as --k");
ABSL_FLAG(uint32_t, layer_begin, 0, "first layer the upload goes to");
ABSL_FLAG(int64_t, message_bytes, (4 << 20) - (64 << 10),
          "largest K+V payload per AppendKV message; the upload is split along tokens");

ABSL_FLAG(int32_t, layer, -1, "layer (attend: required; read: default all layers)");
ABSL_FLAG(std::string, q, "", "query .npy [q_heads, head_dim] (required)");
ABSL_FLAG(std::string, new_k, "", "new token's key .npy [kv_heads, head_dim], appended first");
ABSL_FLAG(std::string, new_v, "", "new token's value .npy [kv_heads, head_dim]");
ABSL_FLAG(bool, lse, false, "also return the log-sum-exp of the scores per query head");
ABSL_FLAG(std::string, out, "",
          "attend: write the attention output to this .npy (float32); export: the snapshot file");
ABSL_FLAG(std::string, in, "", "import: the snapshot file to read");
ABSL_FLAG(std::string, to, "", "migrate: the server (HOST:PORT) that takes the session over");
ABSL_FLAG(bool, keep, false, "migrate: keep the session on the source server too");
ABSL_FLAG(std::string, via, "",
          "drain: the router (HOST:PORT) that routes by x-session-id; sessions are imported "
          "through it");
ABSL_FLAG(std::string, peers, "",
          "drain: the replicas the router routes to now, HOST:PORT,... (without --server)");
ABSL_FLAG(float, scale, 0.0f, "softmax scale (0: 1/sqrt(head_dim))");
ABSL_FLAG(int32_t, show, 8, "values per head in the human-readable output");

ABSL_FLAG(std::string, k_out, "", "write the keys to this .npy");
ABSL_FLAG(std::string, v_out, "", "write the values to this .npy");
ABSL_FLAG(bool, float32, false,
          "write float32 even when the cache is float16 (bfloat16 is always written as float32)");

ABSL_FLAG(std::string, workload, "decode",
          "bench workload: prefill, decode, decode_stream, mixed or sessions");
ABSL_FLAG(uint32_t, sessions, 4, "sessions the workload decodes over (sessions workload: 1000)");
ABSL_FLAG(uint64_t, context, 4096,
          "tokens per layer uploaded before decoding (sessions workload: 256; demo: 8192)");
ABSL_FLAG(float, sparsity, 0.0f,
          "K and V sparsity of the sessions, per-token magnitude (mixed: 0.7; demo: 0.7)");
ABSL_FLAG(absl::Duration, duration, absl::Seconds(10), "length of the timed phase, e.g. 10s");
ABSL_FLAG(uint64_t, requests, 0, "stop the timed phase after this many requests (0: --duration)");
ABSL_FLAG(uint32_t, concurrency, 1, "client threads (decode_stream: streams)");
ABSL_FLAG(uint32_t, inflight, 1, "decode_stream: requests in flight per stream (pipelining)");
ABSL_FLAG(uint32_t, channels, 0, "gRPC channels, each its own connection (0: one per thread)");
ABSL_FLAG(bool, append, false, "each decode step also appends a new token (mixed: always)");
ABSL_FLAG(int32_t, server_pid, 0,
          "pid of a local server: its CPU time gives requests per second per server core");
ABSL_FLAG(uint64_t, seed, 1, "seed of the synthetic data");
ABSL_FLAG(uint32_t, steps, 32, "decode steps per layer and session");

namespace sparsekv::cli {
namespace {

const CommandSpec* FindCommand(absl::string_view name) {
  for (const CommandSpec& c : Commands()) {
    if (name == c.name) return &c;
  }
  return nullptr;
}

bool IsBoolFlag(const absl::CommandLineFlag& flag) { return flag.IsOfType<bool>(); }

// Whether `name` is one of our flags (Abseil registers a few of its own, such as --flagfile,
// which the CLI does not offer).
bool IsOurFlag(absl::string_view name) {
  for (const char* g : GlobalFlags()) {
    if (name == g) return true;
  }
  for (const CommandSpec& c : Commands()) {
    for (const char* f : c.flags) {
      if (name == f) return true;
    }
  }
  return false;
}

void ResetFlag(const char* name) {
  absl::CommandLineFlag* flag = absl::FindCommandLineFlag(name);
  std::string error;
  if (flag != nullptr) flag->ParseFrom(flag->DefaultValue(), &error);
}

}  // namespace

const std::vector<const char*>& GlobalFlags() {
  static const auto* flags = new std::vector<const char*>{
      "server",       "timeout",         "json", "tls_ca_file", "tls_cert_file",
      "tls_key_file", "tls_server_name", "token"};
  return *flags;
}

const std::vector<CommandSpec>& Commands() {
  static const auto* commands = new std::vector<CommandSpec>{
      {"create",
       "",
       0,
       0,
       {"layers",           "kv_heads",     "q_heads",
        "head_dim",         "dtype",        "id",
        "tenant",           "ttl",          "label",
        "k_sparsity",       "v_sparsity",   "k_layer_sparsity",
        "v_layer_sparsity", "k_direction",  "v_direction",
        "k_scoring",        "v_scoring",    "dense_window",
        "chunk_tokens",     "group_tokens", "decode_compute"},
       "create a session; prints it, id first"},
      {"list", "", 0, 0, {"tenant", "page_size"}, "list sessions (all pages)"},
      {"get", "ID", 1, 1, {}, "show a session and its statistics"},
      {"delete", "ID", 1, 1, {}, "delete a session"},
      {"append",
       "ID",
       1,
       1,
       {"k", "v", "layer_begin", "message_bytes"},
       "upload K/V from .npy files (AppendKV stream)"},
      {"attend",
       "ID",
       1,
       1,
       {"layer", "q", "new_k", "new_v", "lse", "out", "scale", "show"},
       "one decode step: attention of q over a layer's cache"},
      {"read",
       "ID",
       1,
       1,
       {"layer", "k_out", "v_out", "float32"},
       "read the cache back (dense) into .npy files"},
      {"flush", "ID", 1, 1, {}, "compress every eligible token now"},
      {"export", "ID", 1, 1, {"out"}, "write a session's snapshot to a file (--out)"},
      {"import", "", 0, 0, {"in"}, "add the session a snapshot file holds (--in)"},
      {"migrate",
       "ID",
       1,
       1,
       {"to", "keep"},
       "move a session to another server (--to), bit-identical; deleted here unless --keep"},
      {"drain",
       "",
       0,
       0,
       {"via", "peers"},
       "move every session off --server to the replicas a router (--via) now sends them to"},
      {"info", "", 0, 0, {}, "show server information"},
      {"health", "", 0, 0, {}, "check server health (exit status 0 only when SERVING)"},
      {"bench",
       "",
       0,
       0,
       {"workload", "sessions", "layers", "kv_heads", "q_heads", "head_dim", "dtype", "context",
        "sparsity", "duration", "requests", "concurrency", "inflight", "channels", "append",
        "message_bytes", "server_pid", "seed", "decode_compute"},
       "load generator: latency percentiles, histogram, throughput"},
      {"demo",
       "",
       0,
       0,
       {"layers", "kv_heads", "q_heads", "head_dim", "context", "sparsity", "steps", "seed",
        "decode_compute"},
       "dense vs pruned session on synthetic K/V: memory, sparsity, speed, error"},
      {"help", "[COMMAND]", 0, 1, {}, "show usage"},
  };
  return *commands;
}

absl::StatusOr<Invocation> ParseArgs(const std::vector<std::string>& args) {
  // Start from the defaults, so that parsing depends on `args` alone even when a process
  // (a test) runs the CLI several times.
  for (const char* name : GlobalFlags()) ResetFlag(name);
  for (const CommandSpec& c : Commands()) {
    for (const char* name : c.flags) ResetFlag(name);
  }
  Invocation inv;
  std::vector<std::pair<std::string, std::string>> assignments;
  std::vector<std::string> words;
  bool options_done = false;
  for (size_t i = 1; i < args.size(); ++i) {
    const std::string& arg = args[i];
    if (options_done || arg.size() < 2 || arg[0] != '-') {
      words.push_back(arg);
      continue;
    }
    if (arg == "--") {
      options_done = true;
      continue;
    }
    if (arg == "-h" || arg == "--help" || arg == "-help") {
      inv.command = "help";
      continue;
    }
    absl::string_view body(arg);
    body.remove_prefix(absl::StartsWith(body, "--") ? 2 : 1);
    std::string name, value;
    bool has_value = false;
    const size_t eq = body.find('=');
    if (eq != absl::string_view::npos) {
      name = std::string(body.substr(0, eq));
      value = std::string(body.substr(eq + 1));
      has_value = true;
    } else {
      name = std::string(body);
    }
    const std::string typed = name;
    std::replace(name.begin(), name.end(), '-', '_');
    absl::CommandLineFlag* flag = IsOurFlag(name) ? absl::FindCommandLineFlag(name) : nullptr;
    if (flag == nullptr && !has_value && absl::StartsWith(name, "no")) {
      // --noNAME sets boolean NAME to false.
      const std::string positive = name.substr(2);
      absl::CommandLineFlag* b =
          IsOurFlag(positive) ? absl::FindCommandLineFlag(positive) : nullptr;
      if (b != nullptr && IsBoolFlag(*b)) {
        assignments.emplace_back(positive, "false");
        continue;
      }
    }
    if (flag == nullptr) {
      return absl::InvalidArgumentError(absl::StrCat("unknown flag --", typed));
    }
    if (!has_value) {
      if (IsBoolFlag(*flag)) {
        value = "true";
      } else if (i + 1 < args.size()) {
        value = args[++i];
      } else {
        return absl::InvalidArgumentError(absl::StrCat("flag --", name, " needs a value"));
      }
    }
    assignments.emplace_back(name, value);
  }

  size_t first_positional = 0;
  if (inv.command.empty()) {
    if (words.empty()) {
      inv.command = "help";
    } else {
      inv.command = words[0];
      first_positional = 1;
    }
  }
  const CommandSpec* spec = FindCommand(inv.command);
  if (spec == nullptr) {
    return absl::InvalidArgumentError(
        absl::StrCat("unknown command '", inv.command, "' (see 'sparsekv help')"));
  }
  inv.positional.assign(words.begin() + first_positional, words.end());
  const int n = static_cast<int>(inv.positional.size());
  if (inv.command != "help" && (n < spec->min_positional || n > spec->max_positional)) {
    if (spec->max_positional == 0) {
      return absl::InvalidArgumentError(
          absl::StrCat("'", spec->name, "' takes no arguments, got '", inv.positional[0], "'"));
    }
    return absl::InvalidArgumentError(absl::StrCat(
        "usage: sparsekv ", spec->name, " ", spec->positional, " [flags] (got ", n, " arguments)"));
  }

  for (const auto& [name, value] : assignments) {
    bool allowed = false;
    for (const char* g : GlobalFlags()) allowed |= name == g;
    for (const char* f : spec->flags) allowed |= name == f;
    if (!allowed && inv.command != "help") {
      return absl::InvalidArgumentError(
          absl::StrCat("flag --", name, " does not apply to '", spec->name, "'"));
    }
    if (name == "label") {
      // Abseil's vector flags take a comma list and a repeat replaces the value; the CLI
      // instead collects one KEY=VALUE per occurrence, so values may contain commas.
      inv.labels.push_back(value);
      inv.flags_set.insert(name);
      continue;
    }
    absl::CommandLineFlag* flag = absl::FindCommandLineFlag(name);
    std::string error;
    if (!flag->ParseFrom(value, &error)) {
      return absl::InvalidArgumentError(
          absl::StrCat("invalid value '", value, "' for --", name, ": ", error));
    }
    inv.flags_set.insert(name);
  }
  return inv;
}

std::string UsageText(const std::string& command) {
  std::string out;
  const CommandSpec* spec = command.empty() ? nullptr : FindCommand(command);
  auto describe_flags = [&out](const std::vector<const char*>& names) {
    size_t width = 0;
    for (const char* name : names) width = std::max(width, std::strlen(name));
    for (const char* name : names) {
      const absl::CommandLineFlag* flag = absl::FindCommandLineFlag(name);
      if (flag == nullptr) continue;
      absl::StrAppend(&out, "  --", name, std::string(width - std::strlen(name) + 2, ' '),
                      flag->Help());
      const std::string def = flag->DefaultValue();
      if (!def.empty() && def != "0" && def != "false" && def != "-1" && def != "0s") {
        absl::StrAppend(&out, " (default ", def, ")");
      }
      out += "\n";
    }
  };
  if (spec == nullptr || command == "help") {
    out =
        "usage: sparsekv [--server=HOST:PORT] [--timeout=10s] [--json] COMMAND [ARGS] [flags]\n"
        "\ncommands:\n";
    for (const CommandSpec& c : Commands()) {
      const std::string synopsis = absl::StrCat(c.name, " ", c.positional);
      absl::StrAppend(&out, "  ", synopsis,
                      std::string(synopsis.size() < 18 ? 18 - synopsis.size() : 1, ' '), c.summary,
                      "\n");
    }
    out += "\nglobal flags:\n";
    describe_flags(GlobalFlags());
    out +=
        "\n'sparsekv help COMMAND' shows a command's flags.\n"
        "exit status: 0 ok, 1 server error, 2 usage error, 3 server unreachable\n";
    return out;
  }
  absl::StrAppend(&out, "usage: sparsekv ", spec->name, " ", spec->positional, " [flags]\n",
                  spec->summary, "\n");
  if (!spec->flags.empty()) {
    out += "\nflags:\n";
    describe_flags(spec->flags);
  }
  out += "\nglobal flags:\n";
  describe_flags(GlobalFlags());
  return out;
}

}  // namespace sparsekv::cli

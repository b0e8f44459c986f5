#include "clients/cli/commands.h"

#include <algorithm>
#include <cstring>
#include <fstream>
#include <iterator>
#include <map>
#include <memory>
#include <utility>

#include "absl/flags/flag.h"
#include "absl/strings/ascii.h"
#include "absl/strings/cord.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "absl/strings/str_join.h"
#include "absl/strings/str_split.h"
#include "absl/strings/strip.h"
#include "absl/time/time.h"
#include "clients/cli/args.h"
#include "clients/cli/bench.h"
#include "clients/cli/channel.h"
#include "clients/cli/demo.h"
#include "clients/cli/drain.h"
#include "clients/cli/json_writer.h"
#include "clients/cli/npy.h"
#include "clients/cli/snapshot_transfer.h"
#include "clients/cli/table.h"
#include "clients/cli/tensor_util.h"
#include "clients/cpp/kv_cache_client.h"
#include "common/dtype.h"
#include "common/status_macros.h"

namespace sparsekv::cli {
namespace {

constexpr char kExitPayload[] = "type.sparsekv.dev/cli.exit_code";

// What every command works with.
struct Context {
  const Invocation& inv;
  std::ostream& out;
  bool json;
  std::unique_ptr<KvCacheClient> client;
  std::ostream* err = nullptr;  // progress (bench) and hints (demo)

  // Connects to --server. Local argument checks come before this, so that a usage error is
  // reported as such even when no server runs. Returns UNAVAILABLE (exit 3) on failure.
  absl::Status Connect() {
    SPARSEKV_ASSIGN_OR_RETURN(
        client, OpenClient(absl::GetFlag(FLAGS_server), absl::GetFlag(FLAGS_timeout)));
    return WithExitCode(client->WaitForConnected(), kExitUnreachable);
  }

  const std::string& id() const { return inv.positional[0]; }
};

absl::StatusOr<NpyArray> ReadNpyArg(const std::string& flag, const std::string& path) {
  if (path.empty()) return UsageError(absl::StrCat("--", flag, " is required"));
  absl::StatusOr<NpyArray> array = ReadNpyFile(path);
  if (!array.ok()) return UsageError(absl::StrCat("--", flag, ": ", array.status().message()));
  return array;
}

absl::Status WriteNpyArg(const std::string& path, const NpyArray& array) {
  const absl::Status status = WriteNpyFile(path, array);
  // A path the user cannot write to is an argument problem, not a server one.
  if (!status.ok()) return UsageError(status.message());
  return status;
}

std::string ShapeString(const std::vector<int64_t>& shape) {
  return absl::StrCat("[", absl::StrJoin(shape, ", "), "]");
}

// "PRUNE_DIRECTION_PER_TOKEN" -> "per_token": the spelling the flags use.
std::string EnumShortName(const std::string& full, absl::string_view prefix) {
  return absl::AsciiStrToLower(absl::StripPrefix(full, prefix));
}

std::string DirectionName(v1::PruneDirection d) {
  return EnumShortName(v1::PruneDirection_Name(d), "PRUNE_DIRECTION_");
}

std::string ScoringName(v1::Scoring s) { return EnumShortName(v1::Scoring_Name(s), "SCORING_"); }

std::string FormatUnixMs(int64_t ms) {
  if (ms == 0) return "-";
  return absl::FormatTime("%Y-%m-%dT%H:%M:%E3SZ", absl::FromUnixMillis(ms), absl::UTCTimeZone());
}

std::string FormatFloat(float v) { return absl::StrFormat("%.6g", v); }

// Labels sorted by key, so output does not depend on map iteration order.
std::vector<std::pair<std::string, std::string>> SortedLabels(const v1::Session& s) {
  std::vector<std::pair<std::string, std::string>> labels(s.labels().begin(), s.labels().end());
  std::sort(labels.begin(), labels.end());
  return labels;
}

void WriteStatsJson(const v1::SessionStats& st, JsonWriter& w) {
  w.BeginObject();
  w.Key("tokens_per_layer").BeginArray();
  for (uint64_t t : st.tokens_per_layer()) w.Uint(t);
  w.EndArray();
  w.Key("tokens_total").Uint(st.tokens_total());
  w.Key("bytes_dense").Uint(st.bytes_dense());
  w.Key("bytes_compressed").Uint(st.bytes_compressed());
  w.Key("bytes_dense_equivalent").Uint(st.bytes_dense_equivalent());
  w.Key("achieved_sparsity_k").Float(st.achieved_sparsity_k());
  w.Key("achieved_sparsity_v").Float(st.achieved_sparsity_v());
  w.Key("scoring_in_force_k").String(ScoringName(st.scoring_in_force_k()));
  w.Key("scoring_in_force_v").String(ScoringName(st.scoring_in_force_v()));
  w.Key("pruning_backlog_tokens").Uint(st.pruning_backlog_tokens());
  w.Key("decode_steps").Uint(st.decode_steps());
  w.Key("chunks").Uint(st.chunks());
  w.Key("chunks_output_aware_k").Uint(st.chunks_output_aware_k());
  w.Key("chunks_output_aware_v").Uint(st.chunks_output_aware_v());
  w.Key("decode_compute_in_force").String(DecodeComputeName(st.decode_compute_in_force()));
  w.EndObject();
}

void WriteTensorPolicyJson(const v1::TensorPolicy& p, JsonWriter& w) {
  w.BeginObject();
  w.Key("sparsity").Float(p.sparsity());
  w.Key("direction").String(DirectionName(p.direction()));
  w.Key("scoring").String(ScoringName(p.scoring()));
  if (p.layer_sparsity_size() > 0) {
    w.Key("layer_sparsity").BeginArray();
    for (float x : p.layer_sparsity()) w.Float(x);
    w.EndArray();
  }
  w.EndObject();
}

void WriteSessionJson(const v1::Session& s, JsonWriter& w) {
  w.BeginObject();
  w.Key("id").String(s.id());
  w.Key("tenant").String(s.tenant());
  const v1::Layout& l = s.layout();
  w.Key("layout").BeginObject();
  w.Key("num_layers").Uint(l.num_layers());
  w.Key("num_kv_heads").Uint(l.num_kv_heads());
  w.Key("num_q_heads").Uint(l.num_q_heads());
  w.Key("head_dim").Uint(l.head_dim());
  w.Key("dtype").String(WireDTypeName(l.dtype()));
  w.EndObject();
  const v1::Policy& p = s.policy();
  w.Key("policy").BeginObject();
  w.Key("k");
  WriteTensorPolicyJson(p.k(), w);
  w.Key("v");
  WriteTensorPolicyJson(p.v(), w);
  w.Key("dense_window").Uint(p.dense_window());
  w.Key("chunk_tokens").Uint(p.chunk_tokens());
  w.Key("group_tokens").Uint(p.group_tokens());
  w.Key("decode_compute").String(DecodeComputeName(p.decode_compute()));
  w.EndObject();
  w.Key("ttl_seconds").Uint(s.ttl_seconds());
  w.Key("labels").BeginObject();
  for (const auto& [k, v] : SortedLabels(s)) w.Key(k).String(v);
  w.EndObject();
  w.Key("create_time_unix_ms").Int(s.create_time_unix_ms());
  w.Key("last_access_time_unix_ms").Int(s.last_access_time_unix_ms());
  w.Key("stats");
  WriteStatsJson(s.stats(), w);
  w.EndObject();
}

// "name  value" lines with the values aligned.
class KeyValues {
 public:
  KeyValues& Add(const std::string& key, const std::string& value) {
    rows_.emplace_back(key, value);
    return *this;
  }
  std::string Render() const {
    size_t width = 0;
    for (const auto& r : rows_) width = std::max(width, r.first.size());
    std::string out;
    for (const auto& [k, v] : rows_) {
      absl::StrAppend(&out, k, std::string(width - k.size() + 2, ' '), v, "\n");
    }
    return out;
  }

 private:
  std::vector<std::pair<std::string, std::string>> rows_;
};

void AddStatsRows(const v1::SessionStats& st, KeyValues& kv) {
  const uint64_t held = st.bytes_dense() + st.bytes_compressed();
  std::string bytes =
      absl::StrCat("dense=", st.bytes_dense(), " compressed=", st.bytes_compressed(),
                   " dense_equivalent=", st.bytes_dense_equivalent());
  if (held > 0) {
    absl::StrAppend(&bytes, absl::StrFormat(" (%.2fx smaller)",
                                            static_cast<double>(st.bytes_dense_equivalent()) /
                                                static_cast<double>(held)));
  }
  kv.Add("tokens", absl::StrCat("total=", st.tokens_total(), " per_layer=[",
                                absl::StrJoin(st.tokens_per_layer(), ", "), "]"))
      .Add("bytes", bytes)
      .Add("achieved_sparsity", absl::StrCat("k=", FormatFloat(st.achieved_sparsity_k()),
                                             " v=", FormatFloat(st.achieved_sparsity_v())))
      .Add("scoring_in_force", absl::StrCat("k=", ScoringName(st.scoring_in_force_k()),
                                            " v=", ScoringName(st.scoring_in_force_v())))
      .Add("decode_compute_in_force", DecodeComputeName(st.decode_compute_in_force()))
      .Add("pruning_backlog", absl::StrCat(st.pruning_backlog_tokens(), " tokens"))
      .Add("decode_steps", absl::StrCat(st.decode_steps()));
}

std::string SessionText(const v1::Session& s) {
  const v1::Layout& l = s.layout();
  const v1::Policy& p = s.policy();
  auto policy = [](const v1::TensorPolicy& t) {
    std::string layers;
    if (t.layer_sparsity_size() > 0) {
      std::vector<std::string> v;
      for (float s : t.layer_sparsity()) v.push_back(FormatFloat(s));
      layers = absl::StrCat(" per_layer=[", absl::StrJoin(v, ","), "]");
    }
    return absl::StrCat("sparsity=", FormatFloat(t.sparsity()), layers, " ",
                        DirectionName(t.direction()), " ", ScoringName(t.scoring()));
  };
  std::vector<std::string> labels;
  for (const auto& [k, v] : SortedLabels(s)) labels.push_back(absl::StrCat(k, "=", v));
  KeyValues kv;
  kv.Add("session", s.id())
      .Add("tenant", s.tenant())
      .Add("layout", absl::StrCat("layers=", l.num_layers(), " kv_heads=", l.num_kv_heads(),
                                  " q_heads=", l.num_q_heads(), " head_dim=", l.head_dim(),
                                  " dtype=", WireDTypeName(l.dtype())))
      .Add("policy_k", policy(p.k()))
      .Add("policy_v", policy(p.v()))
      .Add("windows", absl::StrCat("dense_window=", p.dense_window(), " chunk_tokens=",
                                   p.chunk_tokens(), " group_tokens=", p.group_tokens()))
      .Add("decode_compute", DecodeComputeName(p.decode_compute()))
      .Add("ttl", absl::StrCat(s.ttl_seconds(), "s"))
      .Add("labels", labels.empty() ? "-" : absl::StrJoin(labels, " "))
      .Add("created", FormatUnixMs(s.create_time_unix_ms()))
      .Add("last_access", FormatUnixMs(s.last_access_time_unix_ms()));
  AddStatsRows(s.stats(), kv);
  return kv.Render();
}

absl::Status PrintSession(Context& ctx, const v1::Session& s) {
  if (ctx.json) {
    JsonWriter w;
    WriteSessionJson(s, w);
    ctx.out << w.str() << "\n";
  } else {
    ctx.out << SessionText(s);
  }
  return absl::OkStatus();
}

absl::StatusOr<v1::PruneDirection> ParseDirection(const std::string& flag,
                                                  const std::string& value) {
  if (value.empty()) return v1::PRUNE_DIRECTION_UNSPECIFIED;
  if (value == "per_token") return v1::PRUNE_DIRECTION_PER_TOKEN;
  if (value == "per_channel") return v1::PRUNE_DIRECTION_PER_CHANNEL;
  return UsageError(
      absl::StrCat("--", flag, ": unknown direction '", value, "' (per_token or per_channel)"));
}

// "0.8,0.75,0.3" -> repeated float; the server checks the count and range.
absl::Status ParseLayerSparsity(const std::string& flag, const std::string& value,
                                v1::TensorPolicy* out) {
  if (value.empty()) return absl::OkStatus();
  for (absl::string_view part : absl::StrSplit(value, ',')) {
    float s = 0.0f;
    if (!absl::SimpleAtof(absl::StripAsciiWhitespace(part), &s)) {
      return UsageError(
          absl::StrCat("--", flag, " wants comma-separated numbers, got '", part, "'"));
    }
    out->add_layer_sparsity(s);
  }
  return absl::OkStatus();
}

absl::StatusOr<v1::Scoring> ParseScoring(const std::string& flag, const std::string& value) {
  if (value.empty()) return v1::SCORING_UNSPECIFIED;
  if (value == "magnitude") return v1::SCORING_MAGNITUDE;
  if (value == "output_aware") return v1::SCORING_OUTPUT_AWARE;
  return UsageError(
      absl::StrCat("--", flag, ": unknown scoring '", value, "' (magnitude or output_aware)"));
}

absl::Status CmdCreate(Context& ctx) {
  for (const char* f : {"layers", "kv_heads", "q_heads", "head_dim"}) {
    if (!ctx.inv.Has(f)) {
      return UsageError(absl::StrCat(
          "create needs --layers, --kv_heads, --q_heads and --head_dim (missing --", f, ")"));
    }
  }
  v1::CreateSessionRequest req;
  req.set_session_id(absl::GetFlag(FLAGS_id));
  req.set_tenant(absl::GetFlag(FLAGS_tenant));
  v1::Layout* l = req.mutable_layout();
  l->set_num_layers(absl::GetFlag(FLAGS_layers));
  l->set_num_kv_heads(absl::GetFlag(FLAGS_kv_heads));
  l->set_num_q_heads(absl::GetFlag(FLAGS_q_heads));
  l->set_head_dim(absl::GetFlag(FLAGS_head_dim));
  absl::StatusOr<v1::DType> dtype = ParseWireDType(absl::GetFlag(FLAGS_dtype));
  if (!dtype.ok()) return UsageError(absl::StrCat("--dtype: ", dtype.status().message()));
  l->set_dtype(*dtype);

  v1::Policy* p = req.mutable_policy();
  p->mutable_k()->set_sparsity(absl::GetFlag(FLAGS_k_sparsity));
  p->mutable_v()->set_sparsity(absl::GetFlag(FLAGS_v_sparsity));
  SPARSEKV_RETURN_IF_ERROR(ParseLayerSparsity(
      "k_layer_sparsity", absl::GetFlag(FLAGS_k_layer_sparsity), p->mutable_k()));
  SPARSEKV_RETURN_IF_ERROR(ParseLayerSparsity(
      "v_layer_sparsity", absl::GetFlag(FLAGS_v_layer_sparsity), p->mutable_v()));
  SPARSEKV_ASSIGN_OR_RETURN(v1::PruneDirection kd,
                            ParseDirection("k_direction", absl::GetFlag(FLAGS_k_direction)));
  SPARSEKV_ASSIGN_OR_RETURN(v1::PruneDirection vd,
                            ParseDirection("v_direction", absl::GetFlag(FLAGS_v_direction)));
  SPARSEKV_ASSIGN_OR_RETURN(v1::Scoring ks,
                            ParseScoring("k_scoring", absl::GetFlag(FLAGS_k_scoring)));
  SPARSEKV_ASSIGN_OR_RETURN(v1::Scoring vs,
                            ParseScoring("v_scoring", absl::GetFlag(FLAGS_v_scoring)));
  p->mutable_k()->set_direction(kd);
  p->mutable_v()->set_direction(vd);
  p->mutable_k()->set_scoring(ks);
  p->mutable_v()->set_scoring(vs);
  p->set_dense_window(absl::GetFlag(FLAGS_dense_window));
  p->set_chunk_tokens(absl::GetFlag(FLAGS_chunk_tokens));
  p->set_group_tokens(absl::GetFlag(FLAGS_group_tokens));
  absl::StatusOr<v1::DecodeCompute> compute =
      ParseDecodeCompute(absl::GetFlag(FLAGS_decode_compute));
  if (!compute.ok()) {
    return UsageError(absl::StrCat("--decode_compute: ", compute.status().message()));
  }
  p->set_decode_compute(*compute);

  const absl::Duration ttl = absl::GetFlag(FLAGS_ttl);
  if (ttl < absl::ZeroDuration()) return UsageError("--ttl must not be negative");
  // Round up: a TTL of 0.5s must not turn into 0, which means "server default".
  req.set_ttl_seconds(
      static_cast<uint64_t>(absl::ToInt64Seconds(absl::Ceil(ttl, absl::Seconds(1)))));

  for (const std::string& label : ctx.inv.labels) {
    const size_t eq = label.find('=');
    if (eq == std::string::npos || eq == 0) {
      return UsageError(absl::StrCat("--label wants KEY=VALUE, got '", label, "'"));
    }
    const std::string key = label.substr(0, eq);
    if (req.labels().count(key) > 0) {
      return UsageError(absl::StrCat("--label ", key, " given twice"));
    }
    (*req.mutable_labels())[key] = label.substr(eq + 1);
  }

  SPARSEKV_RETURN_IF_ERROR(ctx.Connect());
  SPARSEKV_ASSIGN_OR_RETURN(v1::Session s, ctx.client->CreateSession(req));
  return PrintSession(ctx, s);
}

absl::Status CmdList(Context& ctx) {
  SPARSEKV_RETURN_IF_ERROR(ctx.Connect());
  SPARSEKV_ASSIGN_OR_RETURN(
      std::vector<v1::Session> sessions,
      ctx.client->ListAllSessions(absl::GetFlag(FLAGS_tenant), absl::GetFlag(FLAGS_page_size)));
  if (ctx.json) {
    JsonWriter w;
    w.BeginObject().Key("sessions").BeginArray();
    for (const v1::Session& s : sessions) WriteSessionJson(s, w);
    w.EndArray().Key("count").Uint(sessions.size()).EndObject();
    ctx.out << w.str() << "\n";
    return absl::OkStatus();
  }
  Table table({"ID", "TENANT", "LAYERS", "HEADS(KV/Q)", "HEAD_DIM", "DTYPE", "TOKENS", "BYTES"});
  for (const v1::Session& s : sessions) {
    const v1::Layout& l = s.layout();
    table.AddRow({s.id(), s.tenant(), absl::StrCat(l.num_layers()),
                  absl::StrCat(l.num_kv_heads(), "/", l.num_q_heads()), absl::StrCat(l.head_dim()),
                  WireDTypeName(l.dtype()), absl::StrCat(s.stats().tokens_total()),
                  absl::StrCat(s.stats().bytes_dense() + s.stats().bytes_compressed())});
  }
  ctx.out << table.Render();
  return absl::OkStatus();
}

absl::Status CmdGet(Context& ctx) {
  SPARSEKV_RETURN_IF_ERROR(ctx.Connect());
  SPARSEKV_ASSIGN_OR_RETURN(v1::Session s, ctx.client->GetSession(ctx.id()));
  return PrintSession(ctx, s);
}

absl::Status CmdDelete(Context& ctx) {
  SPARSEKV_RETURN_IF_ERROR(ctx.Connect());
  SPARSEKV_ASSIGN_OR_RETURN(v1::DeleteSessionResponse r, ctx.client->DeleteSession(ctx.id()));
  if (ctx.json) {
    JsonWriter w;
    w.BeginObject().Key("session_id").String(ctx.id()).Key("deleted").Bool(true);
    w.Key("bytes_freed").Uint(r.bytes_freed()).EndObject();
    ctx.out << w.str() << "\n";
  } else {
    ctx.out << "deleted " << ctx.id() << " (" << r.bytes_freed() << " bytes freed)\n";
  }
  return absl::OkStatus();
}

void PrintMoved(Context& ctx, const char* verb, const v1::Session& s, size_t bytes) {
  if (ctx.json) {
    JsonWriter w;
    w.BeginObject().Key("session_id").String(s.id()).Key(verb).Bool(true);
    w.Key("snapshot_bytes").Uint(bytes).Key("tokens_total").Uint(s.stats().tokens_total());
    w.EndObject();
    ctx.out << w.str() << "\n";
  } else {
    ctx.out << verb << " " << s.id() << " (" << s.stats().tokens_total() << " tokens, " << bytes
            << " snapshot bytes)\n";
  }
}

absl::Status CmdExport(Context& ctx) {
  const std::string path = absl::GetFlag(FLAGS_out);
  if (path.empty())
    return WithExitCode(absl::InvalidArgumentError("--out is required"), kExitUsage);
  SPARSEKV_RETURN_IF_ERROR(ctx.Connect());
  SPARSEKV_ASSIGN_OR_RETURN(std::string bytes, ExportBytes(ctx.client.get(), ctx.id()));
  std::ofstream f(path, std::ios::binary | std::ios::trunc);
  f.write(bytes.data(), static_cast<std::streamsize>(bytes.size()));
  f.close();
  if (!f) return absl::UnavailableError(absl::StrCat("cannot write ", path));
  SPARSEKV_ASSIGN_OR_RETURN(v1::Session s, ctx.client->GetSession(ctx.id()));
  PrintMoved(ctx, "exported", s, bytes.size());
  return absl::OkStatus();
}

absl::Status CmdImport(Context& ctx) {
  const std::string path = absl::GetFlag(FLAGS_in);
  if (path.empty()) return WithExitCode(absl::InvalidArgumentError("--in is required"), kExitUsage);
  std::ifstream f(path, std::ios::binary);
  if (!f) return WithExitCode(absl::NotFoundError(absl::StrCat("cannot read ", path)), kExitUsage);
  const std::string bytes((std::istreambuf_iterator<char>(f)), std::istreambuf_iterator<char>());
  SPARSEKV_RETURN_IF_ERROR(ctx.Connect());
  SPARSEKV_ASSIGN_OR_RETURN(v1::Session s, ctx.client->ImportSession(SnapshotPieces(bytes)));
  PrintMoved(ctx, "imported", s, bytes.size());
  return absl::OkStatus();
}

// Export here, import there, then (unless --keep) delete here: the session is never absent
// from both, and a failed import leaves it where it was.
absl::Status CmdMigrate(Context& ctx) {
  const std::string to = absl::GetFlag(FLAGS_to);
  if (to.empty()) return WithExitCode(absl::InvalidArgumentError("--to is required"), kExitUsage);
  SPARSEKV_RETURN_IF_ERROR(ctx.Connect());
  SPARSEKV_ASSIGN_OR_RETURN(std::unique_ptr<KvCacheClient> dest,
                            OpenClient(to, absl::GetFlag(FLAGS_timeout)));
  KvCacheClient& target = *dest;
  SPARSEKV_RETURN_IF_ERROR(WithExitCode(target.WaitForConnected(), kExitUnreachable));
  SPARSEKV_ASSIGN_OR_RETURN(std::string bytes, ExportBytes(ctx.client.get(), ctx.id()));
  SPARSEKV_ASSIGN_OR_RETURN(v1::Session s, target.ImportSession(SnapshotPieces(bytes)));
  if (!absl::GetFlag(FLAGS_keep)) {
    SPARSEKV_RETURN_IF_ERROR(ctx.client->DeleteSession(ctx.id()).status());
  }
  PrintMoved(ctx, "migrated", s, bytes.size());
  return absl::OkStatus();
}

absl::Status CmdAppend(Context& ctx) {
  SPARSEKV_ASSIGN_OR_RETURN(NpyArray k, ReadNpyArg("k", absl::GetFlag(FLAGS_k)));
  SPARSEKV_ASSIGN_OR_RETURN(NpyArray v, ReadNpyArg("v", absl::GetFlag(FLAGS_v)));
  if (k.shape != v.shape) {
    return UsageError(absl::StrCat("--k and --v shapes differ: ", ShapeString(k.shape), " vs ",
                                   ShapeString(v.shape)));
  }
  if (k.shape.size() == 3) {
    // [tokens, kv_heads, head_dim]: one layer, at --layer_begin.
    k.shape.insert(k.shape.begin(), 1);
    v.shape = k.shape;
  } else if (k.shape.size() != 4) {
    return UsageError(absl::StrCat(
        "--k/--v must be [layers, tokens, kv_heads, head_dim] or [tokens, kv_heads, head_dim], "
        "got ",
        ShapeString(k.shape)));
  }
  const int64_t layers = k.shape[0], tokens = k.shape[1];
  if (layers == 0 || tokens == 0 || k.shape[2] == 0 || k.shape[3] == 0) {
    return UsageError(absl::StrCat("--k/--v hold no data: shape ", ShapeString(k.shape)));
  }
  const int64_t message_bytes = absl::GetFlag(FLAGS_message_bytes);
  if (message_bytes <= 0) return UsageError("--message_bytes must be positive");
  const int64_t row_bytes =
      k.shape[2] * k.shape[3] *
      static_cast<int64_t>(std::max(NpyDTypeSize(k.dtype), NpyDTypeSize(v.dtype)));
  const std::vector<AppendPiece> pieces =
      PlanAppendPieces(layers, tokens, row_bytes, message_bytes);
  const uint32_t layer_begin = absl::GetFlag(FLAGS_layer_begin);

  SPARSEKV_RETURN_IF_ERROR(ctx.Connect());
  size_t next = 0;
  SPARSEKV_ASSIGN_OR_RETURN(
      v1::AppendKVResponse r, ctx.client->AppendKV([&](v1::AppendKVRequest* req) {
        if (next == pieces.size()) return false;
        const AppendPiece& piece = pieces[next++];
        req->set_session_id(ctx.id());
        req->set_layer_begin(layer_begin + static_cast<uint32_t>(piece.layer_begin));
        SliceForAppend(k, piece, req->mutable_k());
        SliceForAppend(v, piece, req->mutable_v());
        return true;
      }));
  if (ctx.json) {
    JsonWriter w;
    w.BeginObject().Key("session_id").String(ctx.id());
    w.Key("messages").Uint(r.messages()).Key("tokens_appended").Uint(r.tokens_appended());
    w.Key("tokens_per_layer").BeginArray();
    for (uint64_t t : r.tokens_per_layer()) w.Uint(t);
    w.EndArray().EndObject();
    ctx.out << w.str() << "\n";
  } else {
    KeyValues kv;
    kv.Add("session", ctx.id())
        .Add("messages", absl::StrCat(r.messages()))
        .Add("tokens_appended", absl::StrCat(r.tokens_appended()))
        .Add("tokens_per_layer", absl::StrCat("[", absl::StrJoin(r.tokens_per_layer(), ", "), "]"));
    ctx.out << kv.Render();
  }
  return absl::OkStatus();
}

absl::Status CmdAttend(Context& ctx) {
  if (!ctx.inv.Has("layer") || absl::GetFlag(FLAGS_layer) < 0) {
    return UsageError("attend needs --layer L (L >= 0)");
  }
  SPARSEKV_ASSIGN_OR_RETURN(NpyArray q, ReadNpyArg("q", absl::GetFlag(FLAGS_q)));
  const std::string new_k_path = absl::GetFlag(FLAGS_new_k);
  const std::string new_v_path = absl::GetFlag(FLAGS_new_v);
  if (new_k_path.empty() != new_v_path.empty()) {
    return UsageError("--new_k and --new_v go together: give both or neither");
  }
  const int32_t show = absl::GetFlag(FLAGS_show);
  if (show < 0) return UsageError("--show must not be negative");
  v1::DecodeRequest req;
  req.set_out_dtype(v1::DTYPE_FLOAT32);
  v1::DecodeItem* item = req.add_items();
  item->set_session_id(ctx.id());
  item->set_layer(static_cast<uint32_t>(absl::GetFlag(FLAGS_layer)));
  // Shapes are passed through unchecked: the server validates them against the session.
  *item->mutable_q() = NpyToTensor(q);
  if (!new_k_path.empty()) {
    SPARSEKV_ASSIGN_OR_RETURN(NpyArray nk, ReadNpyArg("new_k", new_k_path));
    SPARSEKV_ASSIGN_OR_RETURN(NpyArray nv, ReadNpyArg("new_v", new_v_path));
    *item->mutable_new_k() = NpyToTensor(nk);
    *item->mutable_new_v() = NpyToTensor(nv);
  }
  item->set_want_lse(absl::GetFlag(FLAGS_lse));
  item->set_scale(absl::GetFlag(FLAGS_scale));
  const std::string out_path = absl::GetFlag(FLAGS_out);

  SPARSEKV_RETURN_IF_ERROR(ctx.Connect());
  SPARSEKV_ASSIGN_OR_RETURN(v1::DecodeResponse resp, ctx.client->Decode(req));
  if (resp.results_size() != 1) {
    return absl::InternalError(
        absl::StrCat("server returned ", resp.results_size(), " results for 1 item"));
  }
  const v1::DecodeResult& res = resp.results(0);
  absl::StatusOr<std::vector<float>> out = TensorToFloats(res.out());
  if (!out.ok()) {
    return absl::InternalError(absl::StrCat("bad output tensor: ", out.status().message()));
  }
  std::vector<int64_t> shape(res.out().shape().begin(), res.out().shape().end());
  // Rows are query heads; a result that is not 2-D is shown as one row.
  const int64_t cols = shape.size() == 2 ? shape[1] : static_cast<int64_t>(out->size());
  const int64_t rows = cols > 0 ? static_cast<int64_t>(out->size()) / cols : 0;
  std::vector<float> lse;
  if (item->want_lse()) {
    absl::StatusOr<std::vector<float>> l = TensorToFloats(res.lse());
    if (!l.ok()) return absl::InternalError(absl::StrCat("bad lse tensor: ", l.status().message()));
    lse = std::move(*l);
  }

  if (!out_path.empty()) {
    NpyArray a;
    a.dtype = NpyDType::kFloat32;
    a.shape = shape;
    a.data.assign(reinterpret_cast<const char*>(out->data()), out->size() * sizeof(float));
    SPARSEKV_RETURN_IF_ERROR(WriteNpyArg(out_path, a));
  }

  if (ctx.json) {
    JsonWriter w;
    w.BeginObject().Key("session_id").String(ctx.id());
    w.Key("layer").Int(absl::GetFlag(FLAGS_layer));
    w.Key("tokens_attended").Uint(res.tokens_attended());
    w.Key("shape").BeginArray();
    for (int64_t d : shape) w.Int(d);
    w.EndArray();
    w.Key("out").BeginArray();
    for (int64_t r = 0; r < rows; ++r) {
      w.BeginArray();
      for (int64_t c = 0; c < cols; ++c) w.Float((*out)[r * cols + c]);
      w.EndArray();
    }
    w.EndArray();
    if (item->want_lse()) {
      w.Key("lse").BeginArray();
      for (float x : lse) w.Float(x);
      w.EndArray();
    }
    if (!out_path.empty()) w.Key("out_file").String(out_path);
    w.EndObject();
    ctx.out << w.str() << "\n";
    return absl::OkStatus();
  }
  ctx.out << "session " << ctx.id() << "  layer " << absl::GetFlag(FLAGS_layer)
          << "  tokens_attended " << res.tokens_attended() << "  out " << ShapeString(shape)
          << " float32\n";
  const int64_t shown = std::min<int64_t>(show, cols);
  std::vector<std::string> header = {"HEAD"};
  if (item->want_lse()) header.push_back("LSE");
  header.push_back(absl::StrCat("OUT[0:", shown, "]", shown < cols ? " ..." : ""));
  Table table(header);
  for (int64_t r = 0; r < rows; ++r) {
    std::vector<std::string> row = {absl::StrCat(r)};
    if (item->want_lse()) {
      row.push_back(static_cast<size_t>(r) < lse.size() ? FormatFloat(lse[r]) : "-");
    }
    std::vector<std::string> values;
    for (int64_t c = 0; c < shown; ++c) values.push_back(FormatFloat((*out)[r * cols + c]));
    row.push_back(absl::StrJoin(values, " "));
    table.AddRow(std::move(row));
  }
  ctx.out << table.Render();
  if (!out_path.empty()) ctx.out << "wrote " << out_path << "\n";
  return absl::OkStatus();
}

// One layer's rows as read back, stitched from the ReadKV messages.
struct LayerRows {
  std::map<uint64_t, std::pair<std::string, std::string>> pieces;  // token_begin -> (k, v)
  int64_t rows = 0;
};

absl::Status CmdRead(Context& ctx) {
  const std::string k_path = absl::GetFlag(FLAGS_k_out);
  const std::string v_path = absl::GetFlag(FLAGS_v_out);
  if (k_path.empty() && v_path.empty()) return UsageError("read needs --k_out and/or --v_out");
  const int32_t layer = absl::GetFlag(FLAGS_layer);
  if (ctx.inv.Has("layer") && layer < 0) return UsageError("--layer must not be negative");
  const bool one_layer = layer >= 0;

  SPARSEKV_RETURN_IF_ERROR(ctx.Connect());
  SPARSEKV_ASSIGN_OR_RETURN(v1::Session session, ctx.client->GetSession(ctx.id()));
  const v1::Layout& layout = session.layout();
  if (one_layer && static_cast<uint32_t>(layer) >= layout.num_layers()) {
    return UsageError(absl::StrCat("--layer ", layer, " out of range: session has ",
                                   layout.num_layers(), " layers"));
  }
  v1::ReadKVRequest req;
  req.set_session_id(ctx.id());
  req.set_layer_begin(one_layer ? static_cast<uint32_t>(layer) : 0);
  req.set_layer_count(one_layer ? 1 : 0);
  const uint32_t first = req.layer_begin();
  const uint32_t count = one_layer ? 1 : layout.num_layers();
  const int64_t heads = layout.num_kv_heads(), dim = layout.head_dim();
  std::vector<LayerRows> layers(count);
  v1::DType stored = layout.dtype() == v1::DTYPE_UNSPECIFIED ? v1::DTYPE_FLOAT16 : layout.dtype();

  SPARSEKV_RETURN_IF_ERROR(
      ctx.client->ReadKV(req, [&](const v1::ReadKVResponse& r) -> absl::Status {
        if (r.layer() < first || r.layer() - first >= count) {
          return absl::InternalError(
              absl::StrCat("ReadKV returned layer ", r.layer(), " outside the requested range"));
        }
        const v1::Tensor& k = r.k();
        const v1::Tensor& v = r.v();
        if (k.shape_size() != 3 || k.shape(1) != heads || k.shape(2) != dim ||
            v.shape_size() != 3 || v.shape(0) != k.shape(0) || v.shape(1) != heads ||
            v.shape(2) != dim || k.dtype() != v.dtype() || WireDTypeSize(k.dtype()) == 0 ||
            static_cast<int64_t>(k.data().size()) !=
                k.shape(0) * heads * dim * static_cast<int64_t>(WireDTypeSize(k.dtype())) ||
            v.data().size() != k.data().size()) {
          return absl::InternalError(
              absl::StrCat("ReadKV returned a malformed message for layer ", r.layer()));
        }
        stored = k.dtype();
        LayerRows& lr = layers[r.layer() - first];
        lr.pieces[r.token_begin()] = {k.data(), v.data()};
        lr.rows += k.shape(0);
        return absl::OkStatus();
      }));

  // Every layer must be covered from token 0 without gaps or overlaps.
  const size_t elem = WireDTypeSize(stored);
  const size_t row_bytes = static_cast<size_t>(heads * dim) * elem;
  int64_t tokens = -1;
  std::vector<int64_t> tokens_per_layer;
  for (uint32_t i = 0; i < count; ++i) {
    uint64_t expect = 0;
    for (const auto& [begin, kv] : layers[i].pieces) {
      if (begin != expect) {
        return absl::InternalError(
            absl::StrCat("ReadKV left a gap in layer ", first + i, " at token ", expect));
      }
      expect += kv.first.size() / row_bytes;
    }
    tokens_per_layer.push_back(layers[i].rows);
    if (tokens < 0) tokens = layers[i].rows;
    if (tokens != layers[i].rows) {
      return UsageError(absl::StrCat("layers hold different token counts [",
                                     absl::StrJoin(tokens_per_layer, ", "),
                                     ", ...]; read them one at a time with --layer"));
    }
  }
  if (tokens < 0) tokens = 0;

  // float16 is written as stored (exact); bfloat16 has no .npy dtype and goes out as float32.
  const bool as_f32 = absl::GetFlag(FLAGS_float32) || stored != v1::DTYPE_FLOAT16;
  NpyArray karr, varr;
  karr.dtype = varr.dtype = as_f32 ? NpyDType::kFloat32 : NpyDType::kFloat16;
  if (!one_layer) karr.shape.push_back(count);
  for (int64_t d : {tokens, heads, dim}) karr.shape.push_back(d);
  varr.shape = karr.shape;
  const DType kd = stored == v1::DTYPE_FLOAT32   ? DType::kFloat32
                   : stored == v1::DTYPE_FLOAT16 ? DType::kFloat16
                                                 : DType::kBFloat16;
  auto append = [&](const std::string& raw, std::string* dst) {
    if (!as_f32 || stored == v1::DTYPE_FLOAT32) {
      dst->append(raw);
      return;
    }
    const size_t n = raw.size() / elem;
    std::vector<uint16_t> src(n);
    std::memcpy(src.data(), raw.data(), raw.size());
    std::vector<float> f(n);
    for (size_t i = 0; i < n; ++i) f[i] = LoadAsFloat(kd, src.data(), i);
    dst->append(reinterpret_cast<const char*>(f.data()), n * sizeof(float));
  };
  for (const LayerRows& lr : layers) {
    for (const auto& [begin, kv] : lr.pieces) {
      append(kv.first, &karr.data);
      append(kv.second, &varr.data);
    }
  }
  if (!k_path.empty()) SPARSEKV_RETURN_IF_ERROR(WriteNpyArg(k_path, karr));
  if (!v_path.empty()) SPARSEKV_RETURN_IF_ERROR(WriteNpyArg(v_path, varr));

  if (ctx.json) {
    JsonWriter w;
    w.BeginObject().Key("session_id").String(ctx.id());
    w.Key("layer_begin").Uint(first).Key("layer_count").Uint(count);
    w.Key("tokens").Int(tokens);
    w.Key("stored_dtype").String(WireDTypeName(stored));
    w.Key("npy_dtype").String(NpyDTypeDescr(karr.dtype));
    w.Key("shape").BeginArray();
    for (int64_t d : karr.shape) w.Int(d);
    w.EndArray();
    if (!k_path.empty()) w.Key("k_out").String(k_path);
    if (!v_path.empty()) w.Key("v_out").String(v_path);
    w.EndObject();
    ctx.out << w.str() << "\n";
  } else {
    KeyValues kv;
    kv.Add("session", ctx.id())
        .Add("layers", one_layer ? absl::StrCat(first) : absl::StrCat("0..", count - 1))
        .Add("tokens", absl::StrCat(tokens))
        .Add("stored_dtype", WireDTypeName(stored))
        .Add("written", absl::StrCat(ShapeString(karr.shape), " ", NpyDTypeDescr(karr.dtype)));
    if (!k_path.empty()) kv.Add("k_out", k_path);
    if (!v_path.empty()) kv.Add("v_out", v_path);
    ctx.out << kv.Render();
  }
  return absl::OkStatus();
}

absl::Status CmdFlush(Context& ctx) {
  SPARSEKV_RETURN_IF_ERROR(ctx.Connect());
  SPARSEKV_ASSIGN_OR_RETURN(v1::FlushResponse r, ctx.client->Flush(ctx.id()));
  if (ctx.json) {
    JsonWriter w;
    w.BeginObject().Key("session_id").String(ctx.id());
    w.Key("tokens_compressed").Uint(r.tokens_compressed());
    w.Key("tokens_left_dense").Uint(r.tokens_left_dense()).Key("stats");
    WriteStatsJson(r.stats(), w);
    w.EndObject();
    ctx.out << w.str() << "\n";
  } else {
    KeyValues kv;
    kv.Add("session", ctx.id()).Add("tokens_compressed", absl::StrCat(r.tokens_compressed()));
    kv.Add("tokens_left_dense", absl::StrCat(r.tokens_left_dense()));
    AddStatsRows(r.stats(), kv);
    ctx.out << kv.Render();
  }
  return absl::OkStatus();
}

void WriteServerInfoJson(const v1::ServerInfo& i, JsonWriter& w) {
  w.Key("version").String(i.version());
  w.Key("git_commit").String(i.git_commit());
  w.Key("kernel_backend").String(i.kernel_backend());
  w.Key("kernel_variant").String(i.kernel_variant());
  w.Key("max_message_bytes").Uint(i.max_message_bytes());
  w.Key("host_budget_bytes").Uint(i.host_budget_bytes());
  w.Key("host_bytes_used").Uint(i.host_bytes_used());
  w.Key("sessions").Uint(i.sessions());
  w.Key("unimplemented_rpcs").BeginArray();
  for (const std::string& r : i.unimplemented_rpcs()) w.String(r);
  w.EndArray();
}

void AddServerInfoRows(const v1::ServerInfo& i, KeyValues& kv) {
  kv.Add("version", i.version())
      .Add("git_commit", i.git_commit())
      .Add("kernel", absl::StrCat(i.kernel_backend(), "/", i.kernel_variant()))
      .Add("max_message_bytes", absl::StrCat(i.max_message_bytes()))
      .Add("host_budget_bytes",
           i.host_budget_bytes() == 0 ? "unlimited" : absl::StrCat(i.host_budget_bytes()))
      .Add("host_bytes_used", absl::StrCat(i.host_bytes_used()))
      .Add("sessions", absl::StrCat(i.sessions()))
      .Add("unimplemented_rpcs",
           i.unimplemented_rpcs().empty() ? "-" : absl::StrJoin(i.unimplemented_rpcs(), " "));
}

absl::Status CmdInfo(Context& ctx) {
  SPARSEKV_RETURN_IF_ERROR(ctx.Connect());
  SPARSEKV_ASSIGN_OR_RETURN(v1::ServerInfo info, ctx.client->GetServerInfo());
  if (ctx.json) {
    JsonWriter w;
    w.BeginObject();
    WriteServerInfoJson(info, w);
    w.EndObject();
    ctx.out << w.str() << "\n";
  } else {
    KeyValues kv;
    AddServerInfoRows(info, kv);
    ctx.out << kv.Render();
  }
  return absl::OkStatus();
}

absl::Status CmdBenchCommand(Context& ctx) { return CmdBench(ctx.inv, ctx.out, *ctx.err); }

absl::Status CmdDemoCommand(Context& ctx) { return CmdDemo(ctx.inv, ctx.out, *ctx.err); }

absl::Status CmdDrainCommand(Context& ctx) { return CmdDrain(ctx.inv, ctx.out, *ctx.err); }

absl::Status CmdHealth(Context& ctx) {
  SPARSEKV_RETURN_IF_ERROR(ctx.Connect());
  SPARSEKV_ASSIGN_OR_RETURN(HealthStatus health, ctx.client->CheckHealth());
  // Server info is extra detail: a health check must not fail because of it.
  absl::StatusOr<v1::ServerInfo> info = ctx.client->GetServerInfo();
  if (ctx.json) {
    JsonWriter w;
    w.BeginObject().Key("status").String(HealthStatusName(health));
    w.Key("server").String(absl::GetFlag(FLAGS_server));
    if (info.ok()) {
      WriteServerInfoJson(*info, w);
    } else {
      w.Key("server_info_error").String(info.status().ToString());
    }
    w.EndObject();
    ctx.out << w.str() << "\n";
  } else {
    KeyValues kv;
    kv.Add("status", HealthStatusName(health)).Add("server", absl::GetFlag(FLAGS_server));
    if (info.ok()) {
      AddServerInfoRows(*info, kv);
    } else {
      kv.Add("server_info", info.status().ToString());
    }
    ctx.out << kv.Render();
  }
  if (health != HealthStatus::kServing) {
    return WithExitCode(
        absl::UnavailableError(absl::StrCat("server reports ", HealthStatusName(health))),
        kExitServerError);
  }
  return absl::OkStatus();
}

}  // namespace

absl::Status UsageError(absl::string_view message) {
  return WithExitCode(absl::InvalidArgumentError(message), kExitUsage);
}

absl::Status WithExitCode(absl::Status status, int exit_code) {
  if (!status.ok()) status.SetPayload(kExitPayload, absl::Cord(absl::StrCat(exit_code)));
  return status;
}

int ExitCodeFor(const absl::Status& status) {
  if (status.ok()) return kExitOk;
  if (absl::optional<absl::Cord> code = status.GetPayload(kExitPayload)) {
    const std::string s(*code);
    if (!s.empty()) return s[0] - '0';
  }
  if (status.code() == absl::StatusCode::kUnavailable) return kExitUnreachable;
  return kExitServerError;
}

int RunCli(const std::vector<std::string>& args, std::ostream& out, std::ostream& err) {
  absl::StatusOr<Invocation> inv = ParseArgs(args);
  if (!inv.ok()) {
    err << "error: " << inv.status().message() << "\n";
    err << "run 'sparsekv help' for usage\n";
    return kExitUsage;
  }
  if (inv->command == "help") {
    out << UsageText(inv->positional.empty() ? "" : inv->positional[0]);
    return kExitOk;
  }
  if (absl::GetFlag(FLAGS_timeout) <= absl::ZeroDuration()) {
    err << "error: --timeout must be positive\n";
    return kExitUsage;
  }
  Context ctx{*inv, out, absl::GetFlag(FLAGS_json), nullptr, &err};
  using Handler = absl::Status (*)(Context&);
  static const auto* handlers = new std::map<std::string, Handler>{
      {"create", CmdCreate},      {"list", CmdList},          {"get", CmdGet},
      {"delete", CmdDelete},      {"append", CmdAppend},      {"attend", CmdAttend},
      {"read", CmdRead},          {"flush", CmdFlush},        {"info", CmdInfo},
      {"export", CmdExport},      {"import", CmdImport},      {"migrate", CmdMigrate},
      {"health", CmdHealth},      {"bench", CmdBenchCommand}, {"demo", CmdDemoCommand},
      {"drain", CmdDrainCommand},
  };
  const absl::Status status = handlers->at(inv->command)(ctx);
  const int code = ExitCodeFor(status);
  if (code == kExitUsage) {
    err << "error: " << status.message() << "\n";
  } else if (code != kExitOk) {
    err << "error: " << absl::StatusCodeToString(status.code()) << ": " << status.message() << "\n";
  }
  return code;
}

}  // namespace sparsekv::cli

#include "clients/cli/drain.h"

#include <algorithm>
#include <chrono>
#include <memory>
#include <string>
#include <utility>
#include <vector>

#include "absl/flags/flag.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "absl/strings/str_join.h"
#include "absl/strings/str_split.h"
#include "absl/strings/strip.h"
#include "absl/time/clock.h"
#include "absl/time/time.h"
#include "clients/cli/channel.h"
#include "clients/cli/commands.h"
#include "clients/cli/json_writer.h"
#include "clients/cli/snapshot_transfer.h"
#include "clients/cpp/kv_cache_client.h"
#include "common/status_macros.h"
#include "grpcpp/grpcpp.h"
#include "sparsekv/v1/kv_cache.grpc.pb.h"

namespace sparsekv::cli {
namespace {

// KvCacheClient::ImportSession cannot route (the pieces carry no session id); the drain's
// import must, so that the router picks the replica (deploy/local/nginx.conf.in, deploy/k8s
// ingress hash kSessionHeader). Only the one call the drain makes through the router.
class RoutedImporter {
 public:
  RoutedImporter(const std::string& target, std::shared_ptr<grpc::Channel> channel,
                 absl::Duration timeout)
      : target_(target),
        channel_(std::move(channel)),
        stub_(v1::KvCacheService::NewStub(channel_)),
        timeout_(timeout) {}

  absl::Status WaitForConnected() {
    if (channel_->WaitForConnected(Deadline())) return absl::OkStatus();
    return absl::UnavailableError(absl::StrCat("cannot connect to the router ", target_, " within ",
                                               absl::FormatDuration(timeout_)));
  }

  // ImportSession of `pieces` with x-session-id: `id`.
  absl::StatusOr<v1::Session> Import(const std::string& id,
                                     const std::vector<v1::SessionChunk>& pieces) {
    grpc::ClientContext context;
    context.set_deadline(Deadline());
    context.AddMetadata(kSessionHeader, id);
    AddBearerToken(&context, Token());
    v1::Session session;
    std::unique_ptr<grpc::ClientWriter<v1::SessionChunk>> writer =
        stub_->ImportSession(&context, &session);
    for (const v1::SessionChunk& piece : pieces) {
      // Write fails once the call has ended (an error); Finish returns that error.
      if (!writer->Write(piece)) break;
    }
    writer->WritesDone();
    SPARSEKV_RETURN_IF_ERROR(FromGrpcStatus(writer->Finish()));
    return session;
  }

 private:
  std::chrono::system_clock::time_point Deadline() const {
    return std::chrono::system_clock::now() + absl::ToChronoNanoseconds(timeout_);
  }

  std::string target_;
  std::shared_ptr<grpc::Channel> channel_;
  std::unique_ptr<v1::KvCacheService::Stub> stub_;
  absl::Duration timeout_;
};

struct Peer {
  std::string address;
  std::unique_ptr<KvCacheClient> client;
};

// "a:1, b:2" -> {"a:1", "b:2"}; usage errors for an empty list, an empty or repeated entry, or
// the draining replica itself.
absl::StatusOr<std::vector<std::string>> ParsePeers(const std::string& value,
                                                    const std::string& server) {
  std::vector<std::string> peers;
  for (absl::string_view part : absl::StrSplit(value, ',')) {
    const std::string peer(absl::StripAsciiWhitespace(part));
    if (peer.empty()) return UsageError("--peers: empty entry in the list");
    if (peer == server) {
      return UsageError(absl::StrCat("--peers names the draining replica ", server,
                                     "; list the replicas the router routes to now"));
    }
    for (const std::string& p : peers) {
      if (p == peer) return UsageError(absl::StrCat("--peers names ", peer, " twice"));
    }
    peers.push_back(peer);
  }
  return peers;
}

// The peers that hold session `id` (GetSession answers), in --peers order.
absl::StatusOr<std::vector<std::string>> Holders(std::vector<Peer>& peers, const std::string& id) {
  std::vector<std::string> holders;
  for (Peer& p : peers) {
    absl::StatusOr<v1::Session> s = p.client->GetSession(id);
    if (s.ok()) {
      holders.push_back(p.address);
    } else if (s.status().code() != absl::StatusCode::kNotFound) {
      return absl::Status(s.status().code(), absl::StrCat("GetSession ", id, " on ", p.address,
                                                          ": ", s.status().message()));
    }
  }
  return holders;
}

struct Moved {
  std::string id;
  std::string to;
  uint64_t tokens = 0;
  size_t snapshot_bytes = 0;
};

struct Conflict {
  std::string id;
  std::vector<std::string> held_by;
};

}  // namespace

absl::Status CmdDrain(const Invocation& inv, std::ostream& out, std::ostream& /*err*/) {
  const std::string server = absl::GetFlag(FLAGS_server);
  const std::string via = absl::GetFlag(FLAGS_via);
  if (via.empty()) return UsageError("drain needs --via=ROUTER (HOST:PORT)");
  if (via == server) return UsageError("--via names --server: the router must be another address");
  if (absl::GetFlag(FLAGS_peers).empty()) {
    return UsageError("drain needs --peers=HOST:PORT,... (the replicas the router routes to now)");
  }
  SPARSEKV_ASSIGN_OR_RETURN(std::vector<std::string> peer_addresses,
                            ParsePeers(absl::GetFlag(FLAGS_peers), server));
  const absl::Duration timeout = absl::GetFlag(FLAGS_timeout);
  const bool json = absl::GetFlag(FLAGS_json);

  SPARSEKV_ASSIGN_OR_RETURN(std::unique_ptr<KvCacheClient> source_client,
                            OpenClient(server, timeout));
  KvCacheClient& source = *source_client;
  SPARSEKV_RETURN_IF_ERROR(WithExitCode(source.WaitForConnected(), kExitUnreachable));
  SPARSEKV_ASSIGN_OR_RETURN(std::shared_ptr<grpc::Channel> via_channel, OpenChannel(via));
  RoutedImporter router(via, std::move(via_channel), timeout);
  SPARSEKV_RETURN_IF_ERROR(WithExitCode(router.WaitForConnected(), kExitUnreachable));
  std::vector<Peer> peers;
  for (const std::string& address : peer_addresses) {
    SPARSEKV_ASSIGN_OR_RETURN(std::unique_ptr<KvCacheClient> peer, OpenClient(address, timeout));
    peers.push_back({address, std::move(peer)});
    SPARSEKV_RETURN_IF_ERROR(
        WithExitCode(peers.back().client->WaitForConnected(), kExitUnreachable));
  }

  const absl::Time start = absl::Now();
  SPARSEKV_ASSIGN_OR_RETURN(std::vector<v1::Session> sessions, source.ListAllSessions(""));
  std::vector<Moved> moved;
  std::vector<std::string> gone;
  std::vector<Conflict> conflicts;
  // Adds where the drain stood to an error that stops it.
  auto stopped = [&](const absl::Status& status, const std::string& id) {
    return absl::Status(status.code(),
                        absl::StrCat("session ", id, ": ", status.message(), " (", moved.size(),
                                     " of ", sessions.size(), " sessions moved before it)"));
  };

  for (const v1::Session& listed : sessions) {
    const std::string& id = listed.id();
    absl::StatusOr<std::string> bytes = ExportBytes(&source, id);
    if (bytes.status().code() == absl::StatusCode::kNotFound) {
      gone.push_back(id);  // expired or deleted since the listing
      continue;
    }
    if (!bytes.ok()) return stopped(bytes.status(), id);

    absl::StatusOr<v1::Session> imported = router.Import(id, SnapshotPieces(*bytes));
    if (imported.status().code() == absl::StatusCode::kAlreadyExists) {
      SPARSEKV_ASSIGN_OR_RETURN(std::vector<std::string> holders, Holders(peers, id));
      if (holders.empty()) {
        return stopped(
            absl::FailedPreconditionError(absl::StrCat(
                "the router ", via,
                " delivered its import to a replica that already holds it, and none of "
                "--peers does: the router still routes it to ",
                server,
                " (or to a replica missing from --peers). Take the replica out of the "
                "router and reload it first (deploy/local/drain.sh does); nothing of this "
                "session was changed")),
            id);
      }
      conflicts.push_back({id, std::move(holders)});
      continue;
    }
    if (!imported.ok()) return stopped(imported.status(), id);

    // Exact by construction (the router chose), but checked: a replica the router routes to
    // and --peers omits would otherwise end up holding sessions nobody knows about.
    SPARSEKV_ASSIGN_OR_RETURN(std::vector<std::string> holders, Holders(peers, id));
    if (holders.size() != 1) {
      return stopped(absl::FailedPreconditionError(absl::StrCat(
                         "imported through the router, then found on ", holders.size(),
                         " of --peers (", absl::StrJoin(holders, ","),
                         ") instead of exactly one; its copy on ", server, " is kept")),
                     id);
    }
    absl::Status deleted = source.DeleteSession(id).status();
    if (!deleted.ok() && deleted.code() != absl::StatusCode::kNotFound) {
      return stopped(deleted, id);
    }
    moved.push_back({id, holders[0], imported->stats().tokens_total(), bytes->size()});
    if (!json) {
      out << "moved " << id << " -> " << holders[0] << " (" << moved.back().tokens << " tokens, "
          << bytes->size() << " snapshot bytes)\n";
      out.flush();  // progress, line by line, for whoever watches a long drain
    }
  }
  const double seconds = absl::ToDoubleSeconds(absl::Now() - start);

  SPARSEKV_ASSIGN_OR_RETURN(std::vector<v1::Session> left, source.ListAllSessions(""));
  std::vector<std::string> left_ids;
  for (const v1::Session& s : left) left_ids.push_back(s.id());

  if (json) {
    JsonWriter w;
    w.BeginObject().Key("server").String(server).Key("via").String(via);
    w.Key("sessions_listed").Uint(sessions.size());
    w.Key("moved").BeginArray();
    for (const Moved& m : moved) {
      w.BeginObject().Key("session_id").String(m.id).Key("to").String(m.to);
      w.Key("tokens_total").Uint(m.tokens).Key("snapshot_bytes").Uint(m.snapshot_bytes);
      w.EndObject();
    }
    w.EndArray().Key("gone").BeginArray();
    for (const std::string& id : gone) w.String(id);
    w.EndArray().Key("conflicts").BeginArray();
    for (const Conflict& c : conflicts) {
      w.BeginObject().Key("session_id").String(c.id).Key("held_by").BeginArray();
      for (const std::string& h : c.held_by) w.String(h);
      w.EndArray().EndObject();
    }
    w.EndArray().Key("remaining").BeginArray();
    for (const std::string& id : left_ids) w.String(id);
    w.EndArray().Key("seconds").Double(seconds).EndObject();
    out << w.str() << "\n";
  } else {
    out << "drained " << server << " through " << via << ": " << moved.size() << " moved, "
        << gone.size() << " gone meanwhile, " << conflicts.size() << " conflicts, "
        << left_ids.size() << " remaining, in " << absl::StrFormat("%.2f", seconds) << " s\n";
    for (const Conflict& c : conflicts) {
      out << "conflict: " << c.id << " is already on " << absl::StrJoin(c.held_by, ",")
          << "; the copy on " << server << " was kept\n";
    }
  }
  if (!left_ids.empty()) {
    // Name a few; --json lists them all.
    const size_t named = std::min<size_t>(left_ids.size(), 10);
    return absl::FailedPreconditionError(
        absl::StrCat(left_ids.size(), " sessions remain on ", server, " (",
                     absl::StrJoin(left_ids.begin(), left_ids.begin() + named, ","),
                     named < left_ids.size() ? ",..." : "",
                     "): conflicts, or sessions created there during the drain"));
  }
  return absl::OkStatus();
}

}  // namespace sparsekv::cli

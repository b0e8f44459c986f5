// `sparsekv drain`: moves every session off one replica of a set that a router spreads over
// by the x-session-id header with a consistent hash (deploy/local/drain.sh, nginx).
//
// The router must already have been reconfigured without the draining replica (--server):
// then the replica that should hold a session is, by definition, the one the router sends its
// id to, and the exact way to reach it is to go through the router. For each session listed
// on --server, in order:
//   1. export it from --server (checked pieces, as `export`);
//   2. import it through the router (--via) with x-session-id set to its id, so the router
//      delivers it to the owner of that id;
//   3. check that exactly one of --peers (the replicas the router routes to now) holds it,
//      and name that one;
//   4. delete it on --server.
// A session that vanished from --server meanwhile (TTL, deleted) is counted as gone. An import
// refused with ALREADY_EXISTS while one of --peers holds the id (someone recreated the session
// there) is a conflict: --server keeps its copy, the drain goes on and reports it. An import
// refused with ALREADY_EXISTS while no peer holds the id means the router still routes it to
// --server (or to a replica missing from --peers): the drain stops with FAILED_PRECONDITION
// before deleting anything of that session.
//
// Success (exit 0) means --server holds no session at the end; otherwise the report names
// what is left and the exit status is 1. Running it again resumes.
//
// Thread-safety: call from one thread.
#ifndef SPARSEKV_CLIENTS_CLI_DRAIN_H_
#define SPARSEKV_CLIENTS_CLI_DRAIN_H_

#include <ostream>

#include "absl/status/status.h"
#include "clients/cli/args.h"

namespace sparsekv::cli {

// The `drain` subcommand: --server is the draining replica, --via the router, --peers the
// remaining replicas (comma-separated HOST:PORT). Progress lines go to `out` (one JSON object
// at the end with --json); `err` is unused.
absl::Status CmdDrain(const Invocation& inv, std::ostream& out, std::ostream& err);

}  // namespace sparsekv::cli

#endif  // SPARSEKV_CLIENTS_CLI_DRAIN_H_

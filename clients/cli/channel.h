// The channels the CLI opens: plaintext, or TLS / mutual TLS from the --tls_* flags, with no
// limit on received message size (the server bounds what it sends); and the clients on them,
// which send the bearer token of --token or SPARSEKV_TOKEN.
#ifndef SPARSEKV_CLIENTS_CLI_CHANNEL_H_
#define SPARSEKV_CLIENTS_CLI_CHANNEL_H_

#include <grpcpp/grpcpp.h>

#include <memory>
#include <string>

#include "absl/status/statusor.h"
#include "absl/time/time.h"
#include "clients/cpp/kv_cache_client.h"

namespace sparsekv::cli {

// A channel to `target` with the credentials the --tls_* flags ask for. `own_connection`: a
// TCP connection of its own rather than one shared with other channels to the same target
// (bench --channels). InvalidArgument (a usage error) for TLS files that cannot be read.
absl::StatusOr<std::shared_ptr<grpc::Channel>> OpenChannel(const std::string& target,
                                                           bool own_connection = false);

// The bearer token calls send: --token, else the SPARSEKV_TOKEN environment variable, else
// none ("").
std::string Token();

// A client on `channel` that sends Token() with every call.
std::unique_ptr<KvCacheClient> NewClient(std::shared_ptr<grpc::Channel> channel,
                                         absl::Duration timeout, const std::string& target);

// A client of `target` on OpenChannel(target), sending Token().
absl::StatusOr<std::unique_ptr<KvCacheClient>> OpenClient(const std::string& target,
                                                          absl::Duration timeout);

}  // namespace sparsekv::cli

#endif  // SPARSEKV_CLIENTS_CLI_CHANNEL_H_

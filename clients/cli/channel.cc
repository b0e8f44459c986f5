#include "clients/cli/channel.h"

#include <cstdlib>
#include <utility>

#include "absl/flags/flag.h"
#include "absl/status/status.h"
#include "absl/strings/str_cat.h"
#include "clients/cli/args.h"
#include "clients/cli/commands.h"
#include "common/pem_file.h"
#include "common/status_macros.h"

namespace sparsekv::cli {
namespace {

// A usage error (exit code 2) when the file is not readable PEM.
absl::StatusOr<std::string> ReadPem(const std::string& path, const char* flag) {
  absl::StatusOr<std::string> text = ReadPemFile(path, flag);
  if (!text.ok()) return UsageError(text.status().message());
  return text;
}

absl::StatusOr<std::shared_ptr<grpc::ChannelCredentials>> Credentials() {
  const std::string ca = absl::GetFlag(FLAGS_tls_ca_file);
  const std::string cert = absl::GetFlag(FLAGS_tls_cert_file);
  const std::string key = absl::GetFlag(FLAGS_tls_key_file);
  if (cert.empty() != key.empty()) {
    return UsageError("--tls_cert_file and --tls_key_file go together (mutual TLS)");
  }
  if (ca.empty() && cert.empty()) return grpc::InsecureChannelCredentials();
  grpc::SslCredentialsOptions ssl;
  if (!ca.empty()) {
    SPARSEKV_ASSIGN_OR_RETURN(ssl.pem_root_certs, ReadPem(ca, "--tls_ca_file"));
  }
  if (!cert.empty()) {
    SPARSEKV_ASSIGN_OR_RETURN(ssl.pem_cert_chain, ReadPem(cert, "--tls_cert_file"));
    SPARSEKV_ASSIGN_OR_RETURN(ssl.pem_private_key, ReadPem(key, "--tls_key_file"));
  }
  return grpc::SslCredentials(ssl);
}

}  // namespace

absl::StatusOr<std::shared_ptr<grpc::Channel>> OpenChannel(const std::string& target,
                                                           bool own_connection) {
  SPARSEKV_ASSIGN_OR_RETURN(std::shared_ptr<grpc::ChannelCredentials> creds, Credentials());
  grpc::ChannelArguments args;
  args.SetMaxReceiveMessageSize(-1);
  args.SetMaxSendMessageSize(-1);
  // Without this, channels to one target share one TCP connection (global subchannel pool).
  if (own_connection) args.SetInt(GRPC_ARG_USE_LOCAL_SUBCHANNEL_POOL, 1);
  const std::string name = absl::GetFlag(FLAGS_tls_server_name);
  if (!name.empty()) args.SetSslTargetNameOverride(name);
  return grpc::CreateCustomChannel(target, creds, args);
}

std::string Token() {
  std::string token = absl::GetFlag(FLAGS_token);
  if (token.empty()) {
    const char* env = std::getenv("SPARSEKV_TOKEN");
    if (env != nullptr) token = env;
  }
  return token;
}

std::unique_ptr<KvCacheClient> NewClient(std::shared_ptr<grpc::Channel> channel,
                                         absl::Duration timeout, const std::string& target) {
  auto client = std::make_unique<KvCacheClient>(std::move(channel), timeout, target);
  client->set_token(Token());
  return client;
}

absl::StatusOr<std::unique_ptr<KvCacheClient>> OpenClient(const std::string& target,
                                                          absl::Duration timeout) {
  SPARSEKV_ASSIGN_OR_RETURN(std::shared_ptr<grpc::Channel> channel, OpenChannel(target));
  return NewClient(std::move(channel), timeout, target);
}

}  // namespace sparsekv::cli

// The client library and the CLI (RunCli, in-process) against a small fake KvCacheService.
// The fake stores uploads verbatim and answers Decode with q itself, so these tests check the
// client side (streams, paging, splitting, .npy handling, output and exit codes), not the
// numerics, which cli_e2e_test.sh checks against the real server.
#include "clients/cli/commands.h"

#include <cstring>
#include <map>
#include <memory>
#include <sstream>
#include <string>
#include <vector>

#include "absl/flags/reflection.h"
#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "absl/synchronization/mutex.h"
#include "clients/cli/npy.h"
#include "clients/cpp/kv_cache_client.h"
#include "grpcpp/grpcpp.h"
#include "grpcpp/health_check_service_interface.h"
#include "gtest/gtest.h"

namespace sparsekv::cli {
namespace {

using ::grpc::ServerContext;
using ::grpc::Status;
using ::grpc::StatusCode;

class FakeService final : public v1::KvCacheService::Service {
 public:
  Status CreateSession(ServerContext*, const v1::CreateSessionRequest* req,
                       v1::Session* resp) override {
    absl::MutexLock lock(&mu_);
    v1::Session s;
    s.set_id(req->session_id().empty() ? absl::StrCat("gen-", sessions_.size())
                                       : req->session_id());
    if (sessions_.count(s.id())) return Status(StatusCode::ALREADY_EXISTS, "duplicate id");
    s.set_tenant(req->tenant().empty() ? "default" : req->tenant());
    *s.mutable_layout() = req->layout();
    *s.mutable_policy() = req->policy();
    last_policy_ = req->policy();
    s.mutable_stats()->set_decode_compute_in_force(in_force_);
    s.set_ttl_seconds(req->ttl_seconds());
    *s.mutable_labels() = req->labels();
    s.set_create_time_unix_ms(1700000000000);
    for (uint32_t l = 0; l < req->layout().num_layers(); ++l) {
      s.mutable_stats()->add_tokens_per_layer(0);
    }
    sessions_[s.id()] = s;
    *resp = s;
    return Status::OK;
  }

  Status GetSession(ServerContext*, const v1::GetSessionRequest* req, v1::Session* resp) override {
    absl::MutexLock lock(&mu_);
    auto it = sessions_.find(req->session_id());
    if (it == sessions_.end()) return Status(StatusCode::NOT_FOUND, "no such session");
    *resp = it->second;
    return Status::OK;
  }

  // One session per page, to exercise page following.
  Status ListSessions(ServerContext*, const v1::ListSessionsRequest* req,
                      v1::ListSessionsResponse* resp) override {
    absl::MutexLock lock(&mu_);
    auto it = sessions_.upper_bound(req->page_token());
    if (req->page_token().empty()) it = sessions_.begin();
    while (it != sessions_.end() && !req->tenant().empty() &&
           it->second.tenant() != req->tenant()) {
      ++it;
    }
    if (it == sessions_.end()) return Status::OK;
    *resp->add_sessions() = it->second;
    if (std::next(it) != sessions_.end()) resp->set_next_page_token(it->first);
    return Status::OK;
  }

  Status DeleteSession(ServerContext*, const v1::DeleteSessionRequest* req,
                       v1::DeleteSessionResponse* resp) override {
    absl::MutexLock lock(&mu_);
    if (sessions_.erase(req->session_id()) == 0) return Status(StatusCode::NOT_FOUND, "gone");
    resp->set_bytes_freed(123);
    return Status::OK;
  }

  Status AppendKV(ServerContext*, grpc::ServerReader<v1::AppendKVRequest>* reader,
                  v1::AppendKVResponse* resp) override {
    v1::AppendKVRequest req;
    absl::MutexLock lock(&mu_);
    while (reader->Read(&req)) {
      auto it = sessions_.find(req.session_id());
      if (it == sessions_.end()) return Status(StatusCode::NOT_FOUND, "no such session");
      const int64_t layers = req.k().shape(0), tokens = req.k().shape(1);
      const size_t layer_bytes = req.k().data().size() / layers;
      for (int64_t l = 0; l < layers; ++l) {
        const uint32_t layer = req.layer_begin() + static_cast<uint32_t>(l);
        if (layer >= it->second.layout().num_layers()) {
          return Status(StatusCode::INVALID_ARGUMENT, "layer out of range");
        }
        Piece p;
        p.token_begin = it->second.stats().tokens_per_layer(layer);
        p.tokens = tokens;
        p.dtype = req.k().dtype();
        p.k = req.k().data().substr(l * layer_bytes, layer_bytes);
        p.v = req.v().data().substr(l * layer_bytes, layer_bytes);
        stored_[{req.session_id(), layer}].push_back(p);
        it->second.mutable_stats()->set_tokens_per_layer(layer, p.token_begin + tokens);
      }
      resp->set_messages(resp->messages() + 1);
      resp->set_tokens_appended(resp->tokens_appended() + layers * tokens);
      *resp->mutable_tokens_per_layer() = it->second.stats().tokens_per_layer();
    }
    return Status::OK;
  }

  Status Decode(ServerContext*, const v1::DecodeRequest* req, v1::DecodeResponse* resp) override {
    absl::MutexLock lock(&mu_);
    for (const v1::DecodeItem& item : req->items()) {
      auto it = sessions_.find(item.session_id());
      if (it == sessions_.end()) return Status(StatusCode::NOT_FOUND, "no such session");
      const v1::Layout& l = it->second.layout();
      if (item.q().shape_size() != 2 || item.q().shape(0) != l.num_q_heads() ||
          item.q().shape(1) != l.head_dim() || item.q().dtype() != v1::DTYPE_FLOAT32) {
        return Status(StatusCode::INVALID_ARGUMENT, "q must be [q_heads, head_dim] float32");
      }
      v1::DecodeResult* r = resp->add_results();
      *r->mutable_out() = item.q();
      r->set_tokens_attended(it->second.stats().tokens_per_layer(item.layer()));
      if (item.want_lse()) {
        r->mutable_lse()->set_dtype(v1::DTYPE_FLOAT32);
        r->mutable_lse()->add_shape(l.num_q_heads());
        std::vector<float> lse(l.num_q_heads(), 1.5f);
        r->mutable_lse()->set_data(
            std::string(reinterpret_cast<const char*>(lse.data()), lse.size() * sizeof(float)));
      }
    }
    resp->set_request_id(req->request_id());
    return Status::OK;
  }

  Status DecodeStream(
      ServerContext*,
      grpc::ServerReaderWriter<v1::DecodeResponse, v1::DecodeRequest>* stream) override {
    v1::DecodeRequest req;
    while (stream->Read(&req)) {
      v1::DecodeResponse resp;
      Status s = Decode(nullptr, &req, &resp);
      if (!s.ok()) {
        resp.Clear();
        resp.set_request_id(req.request_id());
        resp.set_error_code(s.error_code());
        resp.set_error_message(s.error_message());
      }
      stream->Write(resp);
    }
    return Status::OK;
  }

  // One message per stored piece, so the client has to stitch several per layer.
  Status ReadKV(ServerContext*, const v1::ReadKVRequest* req,
                grpc::ServerWriter<v1::ReadKVResponse>* writer) override {
    absl::MutexLock lock(&mu_);
    auto it = sessions_.find(req->session_id());
    if (it == sessions_.end()) return Status(StatusCode::NOT_FOUND, "no such session");
    const v1::Layout& l = it->second.layout();
    const uint32_t end =
        req->layer_count() == 0 ? l.num_layers() : req->layer_begin() + req->layer_count();
    for (uint32_t layer = req->layer_begin(); layer < end; ++layer) {
      for (const Piece& p : stored_[{req->session_id(), layer}]) {
        v1::ReadKVResponse r;
        r.set_layer(layer);
        r.set_token_begin(p.token_begin);
        for (v1::Tensor* t : {r.mutable_k(), r.mutable_v()}) {
          t->set_dtype(p.dtype);
          t->add_shape(p.tokens);
          t->add_shape(l.num_kv_heads());
          t->add_shape(l.head_dim());
        }
        r.mutable_k()->set_data(p.k);
        r.mutable_v()->set_data(p.v);
        writer->Write(r);
      }
    }
    return Status::OK;
  }

  Status GetServerInfo(ServerContext*, const v1::GetServerInfoRequest*,
                       v1::ServerInfo* resp) override {
    resp->set_version("fake-1");
    resp->set_kernel_backend("cpu");
    resp->set_kernel_variant("scalar");
    resp->add_unimplemented_rpcs("Flush");
    return Status::OK;
  }

  int64_t append_messages() {
    absl::MutexLock lock(&mu_);
    int64_t n = 0;
    for (const auto& [key, pieces] : stored_) n += pieces.size();
    return n;
  }

  // What CreateSession reports as the decode arithmetic in force.
  void set_in_force(v1::DecodeCompute c) {
    absl::MutexLock lock(&mu_);
    in_force_ = c;
  }
  v1::Policy last_policy() {
    absl::MutexLock lock(&mu_);
    return last_policy_;
  }

 private:
  struct Piece {
    uint64_t token_begin;
    int64_t tokens;
    v1::DType dtype;
    std::string k, v;
  };
  absl::Mutex mu_;
  std::map<std::string, v1::Session> sessions_ ABSL_GUARDED_BY(mu_);
  v1::Policy last_policy_ ABSL_GUARDED_BY(mu_);
  v1::DecodeCompute in_force_ ABSL_GUARDED_BY(mu_) = v1::DECODE_COMPUTE_UNSPECIFIED;
  std::map<std::pair<std::string, uint32_t>, std::vector<Piece>> stored_ ABSL_GUARDED_BY(mu_);
};

class CliTest : public testing::Test {
 protected:
  void SetUp() override {
    grpc::EnableDefaultHealthCheckService(true);
    grpc::ServerBuilder builder;
    int port = 0;
    builder.AddListeningPort("127.0.0.1:0", grpc::InsecureServerCredentials(), &port);
    builder.RegisterService(&service_);
    server_ = builder.BuildAndStart();
    ASSERT_NE(server_, nullptr);
    target_ = absl::StrCat("127.0.0.1:", port);
    dir_ = testing::TempDir();
  }

  void TearDown() override { server_->Shutdown(); }

  struct Result {
    int code;
    std::string out, err;
  };

  Result Run(std::vector<std::string> args) {
    args.insert(args.begin(), {"sparsekv", "--server=" + target_, "--timeout=5s"});
    std::ostringstream out, err;
    const int code = RunCli(args, out, err);
    return {code, out.str(), err.str()};
  }

  std::string WriteFloats(const std::string& name, std::vector<int64_t> shape,
                          const std::vector<float>& values) {
    NpyArray a;
    a.dtype = NpyDType::kFloat32;
    a.shape = std::move(shape);
    a.data.assign(reinterpret_cast<const char*>(values.data()), values.size() * sizeof(float));
    const std::string path = dir_ + "/" + name;
    EXPECT_TRUE(WriteNpyFile(path, a).ok());
    return path;
  }

  absl::FlagSaver flag_saver_;
  FakeService service_;
  std::unique_ptr<grpc::Server> server_;
  std::string target_;
  std::string dir_;
};

std::vector<float> Iota(size_t n, float scale) {
  std::vector<float> v(n);
  for (size_t i = 0; i < n; ++i) v[i] = scale * static_cast<float>(i) - 1.0f;
  return v;
}

TEST_F(CliTest, HealthReportsServingAndServerInfo) {
  Result r = Run({"health"});
  EXPECT_EQ(r.code, kExitOk) << r.err;
  EXPECT_TRUE(absl::StrContains(r.out, "SERVING")) << r.out;
  EXPECT_TRUE(absl::StrContains(r.out, "fake-1"));
  EXPECT_TRUE(absl::StrContains(r.out, "cpu/scalar"));
  r = Run({"--json", "health"});
  EXPECT_EQ(r.code, kExitOk);
  EXPECT_TRUE(absl::StartsWith(r.out, "{\"status\":\"SERVING\"")) << r.out;
}

TEST_F(CliTest, HealthFailsWhenNotServing) {
  server_->GetHealthCheckService()->SetServingStatus(false);
  const Result r = Run({"health"});
  EXPECT_EQ(r.code, kExitServerError);
  EXPECT_TRUE(absl::StrContains(r.out, "NOT_SERVING"));
  EXPECT_TRUE(absl::StrContains(r.err, "NOT_SERVING"));
}

TEST_F(CliTest, UnreachableServerExitsThree) {
  std::ostringstream out, err;
  // Port 1 on loopback: nothing listens there.
  const int code =
      RunCli({"sparsekv", "--server=127.0.0.1:1", "--timeout=300ms", "info"}, out, err);
  EXPECT_EQ(code, kExitUnreachable);
  EXPECT_TRUE(absl::StartsWith(err.str(), "error: UNAVAILABLE: ")) << err.str();
}

TEST_F(CliTest, UsageErrorsExitTwoBeforeConnecting) {
  std::ostringstream out, err;
  EXPECT_EQ(RunCli({"sparsekv", "--server=127.0.0.1:1", "create", "--layers=2"}, out, err),
            kExitUsage);
  EXPECT_TRUE(absl::StrContains(err.str(), "--kv_heads")) << err.str();
  EXPECT_EQ(Run({"attend", "s", "--layer=0", "--q=/nonexistent.npy"}).code, kExitUsage);
  EXPECT_EQ(Run({"create", "--layers=1", "--kv_heads=1", "--q_heads=1", "--head_dim=4",
                 "--label=novalue"})
                .code,
            kExitUsage);
  EXPECT_EQ(
      Run({"create", "--layers=1", "--kv_heads=1", "--q_heads=1", "--head_dim=4", "--dtype=int4"})
          .code,
      kExitUsage);
  EXPECT_EQ(Run({"bogus"}).code, kExitUsage);
  EXPECT_EQ(Run({"--timeout=0s", "info"}).code, kExitUsage);
  const Result help = Run({});
  EXPECT_EQ(help.code, kExitOk);
  EXPECT_TRUE(absl::StrContains(help.out, "usage: sparsekv"));
}

TEST_F(CliTest, CreateGetListDelete) {
  Result r = Run({"create", "--id=s1", "--layers=2", "--kv_heads=2", "--q_heads=4", "--head_dim=8",
                  "--tenant=t1", "--ttl=90s", "--label", "team=x,y", "--label", "b=2"});
  ASSERT_EQ(r.code, kExitOk) << r.err;
  EXPECT_TRUE(absl::StartsWith(r.out, "session  ")) << r.out;
  EXPECT_TRUE(absl::StrContains(r.out.substr(0, r.out.find('\n')), "s1"));
  EXPECT_TRUE(absl::StrContains(r.out, "b=2 team=x,y"));
  EXPECT_TRUE(absl::StrContains(r.out, "90s"));
  EXPECT_TRUE(absl::StrContains(r.out, "dtype=float16"));
  r = Run({"--json", "create", "--layers=1", "--kv_heads=1", "--q_heads=1", "--head_dim=4",
           "--dtype=float32"});
  ASSERT_EQ(r.code, kExitOk) << r.err;
  EXPECT_TRUE(absl::StartsWith(r.out, "{\"id\":\"gen-1\",\"tenant\":\"default\"")) << r.out;

  r = Run({"create", "--id=s1", "--layers=1", "--kv_heads=1", "--q_heads=1", "--head_dim=4"});
  EXPECT_EQ(r.code, kExitServerError);
  EXPECT_TRUE(absl::StartsWith(r.err, "error: ALREADY_EXISTS: ")) << r.err;

  r = Run({"list"});  // two pages of one session each
  ASSERT_EQ(r.code, kExitOk) << r.err;
  EXPECT_TRUE(absl::StrContains(r.out, "gen-1")) << r.out;
  EXPECT_TRUE(absl::StrContains(r.out, "s1"));
  EXPECT_TRUE(absl::StrContains(r.out, "2/4"));
  r = Run({"--json", "list", "--tenant=t1"});
  ASSERT_EQ(r.code, kExitOk);
  EXPECT_TRUE(absl::StrContains(r.out, "\"count\":1")) << r.out;

  r = Run({"get", "s1", "--json"});
  ASSERT_EQ(r.code, kExitOk);
  EXPECT_TRUE(absl::StrContains(r.out, "\"labels\":{\"b\":\"2\",\"team\":\"x,y\"}")) << r.out;

  EXPECT_EQ(Run({"delete", "s1"}).code, kExitOk);
  r = Run({"get", "s1"});
  EXPECT_EQ(r.code, kExitServerError);
  EXPECT_EQ(r.err, "error: NOT_FOUND: no such session\n");
}

TEST_F(CliTest, CreatePassesDecodeComputeAndShowsItAndItsUse) {
  service_.set_in_force(v1::DECODE_COMPUTE_FLOAT32);
  Result r = Run({"create", "--id=c16", "--layers=1", "--kv_heads=1", "--q_heads=2", "--head_dim=8",
                  "--decode-compute", "f16"});
  ASSERT_EQ(r.code, kExitOk) << r.err;
  EXPECT_TRUE(absl::StrContains(r.out, "decode_compute           f16\n")) << r.out;
  EXPECT_TRUE(absl::StrContains(r.out, "decode_compute_in_force  f32\n")) << r.out;
  EXPECT_EQ(service_.last_policy().decode_compute(), v1::DECODE_COMPUTE_FLOAT16);
  r = Run({"--json", "get", "c16"});
  ASSERT_EQ(r.code, kExitOk) << r.err;
  EXPECT_TRUE(absl::StrContains(r.out, "\"group_tokens\":0,\"decode_compute\":\"f16\"}")) << r.out;
  EXPECT_TRUE(absl::StrContains(r.out, "\"decode_compute_in_force\":\"f32\"")) << r.out;
  // Not given: the server default (unspecified on the wire).
  r = Run({"create", "--id=c32", "--layers=1", "--kv_heads=1", "--q_heads=2", "--head_dim=8"});
  ASSERT_EQ(r.code, kExitOk) << r.err;
  EXPECT_EQ(service_.last_policy().decode_compute(), v1::DECODE_COMPUTE_UNSPECIFIED);
  r = Run({"create", "--layers=1", "--kv_heads=1", "--q_heads=2", "--head_dim=8",
           "--decode_compute=f64"});
  EXPECT_EQ(r.code, kExitUsage);
  EXPECT_TRUE(absl::StrContains(r.err, "--decode_compute: unknown decode compute 'f64'")) << r.err;
}

TEST_F(CliTest, AppendSplitsIntoMessagesAndReadStitchesThemBack) {
  ASSERT_EQ(Run({"create", "--id=s", "--layers=3", "--kv_heads=2", "--q_heads=2", "--head_dim=4",
                 "--dtype=float32"})
                .code,
            kExitOk);
  // [2 layers, 5 tokens, 2 heads, 4 dims] at layers 1..2; a row is 32 bytes, K+V of one
  // token of both layers 128 bytes: a 256-byte budget gives 2 tokens per message.
  const std::vector<float> k = Iota(80, 0.5f), v = Iota(80, -0.25f);
  const std::string kp = WriteFloats("k.npy", {2, 5, 2, 4}, k);
  const std::string vp = WriteFloats("v.npy", {2, 5, 2, 4}, v);
  Result r = Run({"append", "s", "--k", kp, "--v", vp, "--layer_begin=1", "--message_bytes=256"});
  ASSERT_EQ(r.code, kExitOk) << r.err;
  EXPECT_TRUE(absl::StrContains(r.out, "messages          3")) << r.out;
  EXPECT_TRUE(absl::StrContains(r.out, "tokens_appended   10"));
  EXPECT_TRUE(absl::StrContains(r.out, "[0, 5, 5]"));
  EXPECT_EQ(service_.append_messages(), 6);  // 3 messages x 2 layers

  // One layer, [tokens, heads, dim], into layer 0.
  const std::string k0 = WriteFloats("k0.npy", {5, 2, 4}, Iota(40, 1.0f));
  r = Run({"--json", "append", "s", "--k", k0, "--v", k0});
  ASSERT_EQ(r.code, kExitOk) << r.err;
  EXPECT_TRUE(absl::StrContains(r.out, "\"tokens_per_layer\":[5,5,5]")) << r.out;

  const std::string ko = dir_ + "/k_out.npy", vo = dir_ + "/v_out.npy";
  r = Run({"read", "s", "--layer=2", "--k_out", ko, "--v_out", vo});
  ASSERT_EQ(r.code, kExitOk) << r.err;
  absl::StatusOr<NpyArray> kr = ReadNpyFile(ko), vr = ReadNpyFile(vo);
  ASSERT_TRUE(kr.ok() && vr.ok());
  EXPECT_EQ(kr->shape, (std::vector<int64_t>{5, 2, 4}));
  EXPECT_EQ(kr->dtype, NpyDType::kFloat32);
  EXPECT_EQ(kr->data, std::string(reinterpret_cast<const char*>(k.data() + 40), 160));
  EXPECT_EQ(vr->data, std::string(reinterpret_cast<const char*>(v.data() + 40), 160));

  r = Run({"read", "s", "--k_out", ko});
  ASSERT_EQ(r.code, kExitOk) << r.err;
  kr = ReadNpyFile(ko);
  ASSERT_TRUE(kr.ok());
  EXPECT_EQ(kr->shape, (std::vector<int64_t>{3, 5, 2, 4}));
  EXPECT_EQ(kr->data.substr(160), std::string(reinterpret_cast<const char*>(k.data()), 320));

  // Mismatched K/V shapes and a missing --v are usage errors.
  EXPECT_EQ(Run({"append", "s", "--k", kp, "--v", k0}).code, kExitUsage);
  EXPECT_EQ(Run({"append", "s", "--k", kp}).code, kExitUsage);
  // The server's own errors pass through.
  r = Run({"append", "nope", "--k", kp, "--v", vp});
  EXPECT_EQ(r.code, kExitServerError);
  EXPECT_TRUE(absl::StrContains(r.err, "NOT_FOUND"));
}

TEST_F(CliTest, AttendPrintsTableJsonAndWritesOut) {
  ASSERT_EQ(Run({"create", "--id=s", "--layers=1", "--kv_heads=1", "--q_heads=2", "--head_dim=12",
                 "--dtype=float32"})
                .code,
            kExitOk);
  const std::vector<float> q = Iota(24, 0.125f);
  const std::string qp = WriteFloats("q.npy", {2, 12}, q);
  const std::string out = dir_ + "/out.npy";
  Result r = Run({"attend", "s", "--layer=0", "--q", qp, "--lse", "--out", out});
  ASSERT_EQ(r.code, kExitOk) << r.err;
  EXPECT_TRUE(absl::StrContains(r.out, "OUT[0:8] ...")) << r.out;
  EXPECT_TRUE(absl::StrContains(r.out, "1.5")) << r.out;
  absl::StatusOr<NpyArray> o = ReadNpyFile(out);
  ASSERT_TRUE(o.ok());
  EXPECT_EQ(o->shape, (std::vector<int64_t>{2, 12}));
  EXPECT_EQ(o->data, std::string(reinterpret_cast<const char*>(q.data()), 96));

  r = Run({"--json", "attend", "s", "--layer=0", "--q", qp});
  ASSERT_EQ(r.code, kExitOk) << r.err;
  EXPECT_TRUE(absl::StrContains(r.out, "\"shape\":[2,12],\"out\":[[-1,-0.875,")) << r.out;
  EXPECT_FALSE(absl::StrContains(r.out, "lse"));

  r = Run({"attend", "missing", "--layer=0", "--q", qp});
  EXPECT_EQ(r.code, kExitServerError);
  EXPECT_TRUE(absl::StrContains(r.err, "NOT_FOUND"));
  const std::string bad = WriteFloats("bad_q.npy", {3, 12}, Iota(36, 1.0f));
  r = Run({"attend", "s", "--layer=0", "--q", bad});
  EXPECT_EQ(r.code, kExitServerError);
  EXPECT_TRUE(absl::StrContains(r.err, "INVALID_ARGUMENT"));
  EXPECT_EQ(Run({"attend", "s", "--q", qp}).code, kExitUsage);  // no --layer
  EXPECT_EQ(Run({"attend", "s", "--layer=0", "--q", qp, "--new_k", qp}).code, kExitUsage);
}

TEST_F(CliTest, UnimplementedFlushIsAServerError) {
  ASSERT_EQ(
      Run({"create", "--id=s", "--layers=1", "--kv_heads=1", "--q_heads=1", "--head_dim=4"}).code,
      kExitOk);
  const Result r = Run({"flush", "s"});
  EXPECT_EQ(r.code, kExitServerError);
  EXPECT_TRUE(absl::StartsWith(r.err, "error: UNIMPLEMENTED: ")) << r.err;
}

TEST_F(CliTest, ClientDecodeStreamAnswersInOrderAndReportsItemErrors) {
  KvCacheClient client(target_, absl::Seconds(5));
  v1::CreateSessionRequest create;
  create.set_session_id("s");
  create.mutable_layout()->set_num_layers(1);
  create.mutable_layout()->set_num_kv_heads(1);
  create.mutable_layout()->set_num_q_heads(1);
  create.mutable_layout()->set_head_dim(2);
  ASSERT_TRUE(client.CreateSession(create).ok());

  std::unique_ptr<DecodeStream> stream = client.OpenDecodeStream(absl::Seconds(10));
  for (uint64_t i = 1; i <= 3; ++i) {
    v1::DecodeRequest req;
    req.set_request_id(i);
    v1::DecodeItem* item = req.add_items();
    item->set_session_id(i == 2 ? "unknown" : "s");
    item->mutable_q()->set_dtype(v1::DTYPE_FLOAT32);
    item->mutable_q()->add_shape(1);
    item->mutable_q()->add_shape(2);
    const float q[2] = {static_cast<float>(i), 0.0f};
    item->mutable_q()->set_data(std::string(reinterpret_cast<const char*>(q), sizeof(q)));
    ASSERT_TRUE(stream->Send(req));
  }
  ASSERT_TRUE(stream->WritesDone());
  v1::DecodeResponse resp;
  for (uint64_t i = 1; i <= 3; ++i) {
    ASSERT_TRUE(stream->Recv(&resp));
    EXPECT_EQ(resp.request_id(), i);
    EXPECT_EQ(resp.error_code(), i == 2 ? static_cast<int>(StatusCode::NOT_FOUND) : 0);
    EXPECT_EQ(resp.results_size(), i == 2 ? 0 : 1);
  }
  EXPECT_FALSE(stream->Recv(&resp));
  EXPECT_TRUE(stream->Finish().ok());

  absl::StatusOr<std::vector<v1::Session>> all = client.ListAllSessions("");
  ASSERT_TRUE(all.ok());
  EXPECT_EQ(all->size(), 1u);
  absl::StatusOr<HealthStatus> health = client.CheckHealth();
  ASSERT_TRUE(health.ok()) << health.status();
  EXPECT_EQ(*health, HealthStatus::kServing);
  EXPECT_EQ(client.CheckHealth("no.such.Service").status().code(), absl::StatusCode::kNotFound);
  EXPECT_EQ(client.ExportSession("s").status().code(), absl::StatusCode::kUnimplemented);
}

}  // namespace
}  // namespace sparsekv::cli

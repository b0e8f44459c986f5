// Writes the seed corpus of service_fuzz into a folder (tests/fuzz/corpus is its output,
// committed): valid requests of every RPC serialized as bytes (raw mode, against each preset
// session), request sequences that reach compression, decode and read-back, structured-mode
// programs, and a few edge cases (unparseable messages inside streams, issue #11's
// new_k/new_v dtype mismatch, NaN values, empty messages).
//
//   service_fuzz_seeds OUT_DIR
//
// Deterministic: the same binary writes the same files.
#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <string>
#include <vector>

#include "common/crc32c.h"
#include "kernels/dtype.h"
#include "sparsekv/v1/kv_cache.pb.h"
#include "tests/fuzz/fuzz_format.h"

namespace sparsekv::fuzz {
namespace {

std::string out_dir;
int written = 0;

void Write(const std::string& name, const std::string& bytes) {
  const std::string path = out_dir + "/" + name;
  FILE* f = std::fopen(path.c_str(), "wb");
  if (!f) {
    std::perror(path.c_str());
    std::exit(1);
  }
  std::fwrite(bytes.data(), 1, bytes.size(), f);
  std::fclose(f);
  ++written;
}

// Deterministic small values in [-1, 1).
float Value(uint32_t i) {
  uint32_t x = i * 2654435761u + 12345u;
  x ^= x >> 15;
  return static_cast<float>(x % 2000u) / 1000.0f - 1.0f;
}

v1::Tensor MakeTensor(v1::DType dtype, std::vector<int64_t> shape, uint32_t seed,
                      float poison = 0.0f) {
  v1::Tensor t;
  t.set_dtype(dtype);
  int64_t n = 1;
  for (int64_t d : shape) {
    t.add_shape(d);
    n *= d;
  }
  std::string* data = t.mutable_data();
  for (int64_t i = 0; i < n; ++i) {
    float v = Value(seed + static_cast<uint32_t>(i));
    if (poison != 0.0f && i == n / 2) v = poison;
    if (dtype == v1::DTYPE_FLOAT32) {
      data->append(reinterpret_cast<const char*>(&v), 4);
    } else {
      const uint16_t h =
          dtype == v1::DTYPE_FLOAT16 ? kernels::FloatToHalf(v) : kernels::FloatToBFloat16(v);
      data->append(reinterpret_cast<const char*>(&h), 2);
    }
  }
  return t;
}

v1::DType Storage(const Preset& p) { return static_cast<v1::DType>(p.dtype); }

std::string AppendMsg(const Preset& p, int layer_begin, int layers, int tokens, uint32_t seed,
                      int obs_tokens = 0, float poison = 0.0f) {
  v1::AppendKVRequest r;
  r.set_session_id(kPresetId);
  r.set_layer_begin(layer_begin);
  *r.mutable_k() = MakeTensor(Storage(p), {layers, tokens, p.kv_heads, p.head_dim}, seed, poison);
  *r.mutable_v() = MakeTensor(Storage(p), {layers, tokens, p.kv_heads, p.head_dim}, seed + 7);
  if (obs_tokens > 0) {
    *r.mutable_obs_q() =
        MakeTensor(Storage(p), {layers, obs_tokens, p.q_heads, p.head_dim}, seed + 11);
  }
  return r.SerializeAsString();
}

v1::DecodeRequest DecodeReq(const Preset& p, int layer, bool new_token, uint64_t request_id,
                            uint32_t seed) {
  v1::DecodeRequest r;
  r.set_request_id(request_id);
  v1::DecodeItem* it = r.add_items();
  it->set_session_id(kPresetId);
  it->set_layer(layer);
  *it->mutable_q() = MakeTensor(v1::DTYPE_FLOAT32, {p.q_heads, p.head_dim}, seed);
  if (new_token) {
    *it->mutable_new_k() = MakeTensor(Storage(p), {p.kv_heads, p.head_dim}, seed + 1);
    *it->mutable_new_v() = MakeTensor(Storage(p), {p.kv_heads, p.head_dim}, seed + 2);
  }
  it->set_want_lse(true);
  return r;
}

template <typename Message>
std::string Id(Message m) {
  m.set_session_id(kPresetId);
  return m.SerializeAsString();
}

std::string RawHeader(int preset) {
  std::string s;
  s.push_back(static_cast<char>(kModeRaw));
  s.push_back(static_cast<char>(preset));
  return s;
}

void RawSeeds() {
  const std::string kGarbage("\xff\xff\xff\xff", 4);
  // Every RPC once, valid, against preset 0 (and a few tokens first where that matters).
  const Preset& p = kPresets[0];
  const std::string prefill = AppendMsg(p, 0, p.layers, 8, 1);
  {
    v1::CreateSessionRequest c;
    c.set_session_id("fz1");
    c.set_tenant("a");
    c.mutable_layout()->set_num_layers(1);
    c.mutable_layout()->set_num_kv_heads(1);
    c.mutable_layout()->set_num_q_heads(2);
    c.mutable_layout()->set_head_dim(16);
    c.mutable_policy()->mutable_k()->set_sparsity(0.5f);
    (*c.mutable_labels())["model"] = "docs";
    std::string s = RawHeader(0);
    PutRawOp(&s, kCreateSession, {c.SerializeAsString()});
    Write("raw-create-session", s);
  }
  std::string s;
  s = RawHeader(0);
  PutRawOp(&s, kGetSession, {Id(v1::GetSessionRequest())});
  Write("raw-get-session", s);
  s = RawHeader(0);
  {
    v1::ListSessionsRequest l;
    l.set_page_size(1);
    PutRawOp(&s, kListSessions, {l.SerializeAsString()});
  }
  Write("raw-list-sessions", s);
  s = RawHeader(0);
  PutRawOp(&s, kDeleteSession, {Id(v1::DeleteSessionRequest())});
  PutRawOp(&s, kGetSession, {Id(v1::GetSessionRequest())});
  Write("raw-delete-session", s);
  s = RawHeader(0);
  PutRawOp(&s, kAppendKV, {AppendMsg(p, 0, 1, 8, 1, 2), AppendMsg(p, 1, 1, 8, 2)});
  Write("raw-append-kv", s);
  s = RawHeader(0);
  PutRawOp(&s, kAppendKV, {prefill});
  PutRawOp(&s, kDecode, {DecodeReq(p, 1, true, 5, 3).SerializeAsString()});
  Write("raw-decode", s);
  s = RawHeader(0);
  PutRawOp(&s, kAppendKV, {prefill});
  PutRawOp(&s, kDecodeStream,
           {DecodeReq(p, 0, true, 1, 4).SerializeAsString(),
            DecodeReq(p, 1, false, 2, 5).SerializeAsString(),
            DecodeReq(p, 0, true, 3, 6).SerializeAsString()});
  Write("raw-decode-stream", s);
  s = RawHeader(0);
  PutRawOp(&s, kAppendKV, {AppendMsg(p, 0, 1, 12, 7)});
  PutRawOp(&s, kFlush, {Id(v1::FlushRequest())});
  Write("raw-flush", s);
  s = RawHeader(0);
  PutRawOp(&s, kAppendKV, {prefill});
  {
    v1::ReadKVRequest r;
    r.set_session_id(kPresetId);
    r.set_layer_begin(1);
    r.set_token_begin(2);
    r.set_token_count(5);
    PutRawOp(&s, kReadKV, {r.SerializeAsString()});
  }
  Write("raw-read-kv", s);
  s = RawHeader(0);
  {
    v1::ExportSessionRequest e;
    e.set_session_id(kPresetId);
    PutRawOp(&s, kExportSession, {e.SerializeAsString()});
    // Pieces with valid transport checksums around bytes that are not a snapshot.
    v1::SessionChunk c;
    c.set_format_version(1);
    c.set_data("SKVSNAP");
    c.set_crc32c(Crc32c(c.data()));
    v1::SessionChunk last;
    last.set_format_version(1);
    last.set_offset(7);
    last.set_data(std::string("\0\1\0\0\0", 5));
    last.set_crc32c(Crc32c(last.data()));
    last.set_last(true);
    PutRawOp(&s, kImportSession, {c.SerializeAsString(), last.SerializeAsString()});
  }
  Write("raw-export-import", s);
  s = RawHeader(kNumPresets);
  PutRawOp(&s, kGetServerInfo, {std::string()});
  Write("raw-server-info", s);

  // Per preset: upload past the compression threshold, decode, flush, read back, stream.
  for (int i = 0; i < kNumPresets; ++i) {
    const Preset& q = kPresets[i];
    // Small seeds: at most ~1k elements per tensor; Flush then compresses what is past the
    // dense window.
    const int layers = q.head_dim * q.kv_heads > 256 ? 1 : q.layers;
    const int tokens = std::max(1, std::min(12, 1024 / (layers * q.kv_heads * q.head_dim)));
    s = RawHeader(i);
    PutRawOp(&s, kAppendKV, {AppendMsg(q, 0, layers, tokens, 100 + i, 1)});
    PutRawOp(&s, kDecode, {DecodeReq(q, 0, true, 9, 200 + i).SerializeAsString()});
    PutRawOp(&s, kFlush, {Id(v1::FlushRequest())});
    PutRawOp(&s, kDecodeStream,
             {DecodeReq(q, q.layers - 1, true, 10, 300 + i).SerializeAsString(),
              DecodeReq(q, 0, false, 11, 400 + i).SerializeAsString()});
    v1::ReadKVRequest r;
    r.set_session_id(kPresetId);
    PutRawOp(&s, kReadKV, {r.SerializeAsString()});
    PutRawOp(&s, kGetSession, {Id(v1::GetSessionRequest())});
    Write("raw-sequence-preset" + std::to_string(i), s);
  }

  // Edge cases.
  for (int m = 0; m < kNumMethods; ++m) {  // bytes that do not parse
    s = RawHeader(0);
    PutRawOp(&s, static_cast<Method>(m), {kGarbage});
    Write(std::string("raw-garbage-") + kMethods[m].name, s);
  }
  s = RawHeader(0);  // AppendKV [valid, unparseable, valid] (issue #11)
  PutRawOp(&s, kAppendKV, {prefill, kGarbage, prefill});
  Write("raw-append-garbage-middle", s);
  s = RawHeader(0);  // DecodeStream [valid, unparseable, valid] (issue #11)
  PutRawOp(&s, kAppendKV, {prefill});
  PutRawOp(&s, kDecodeStream,
           {DecodeReq(p, 0, false, 1, 1).SerializeAsString(), kGarbage,
            DecodeReq(p, 0, false, 2, 2).SerializeAsString()});
  Write("raw-decode-stream-garbage-middle", s);
  s = RawHeader(0);  // new_k float32 with new_v float16 (issue #11's over-read)
  {
    v1::DecodeRequest d = DecodeReq(p, 0, true, 3, 9);
    *d.mutable_items(0)->mutable_new_k() =
        MakeTensor(v1::DTYPE_FLOAT32, {p.kv_heads, p.head_dim}, 1);
    *d.mutable_items(0)->mutable_new_v() =
        MakeTensor(v1::DTYPE_FLOAT16, {p.kv_heads, p.head_dim}, 2);
    PutRawOp(&s, kDecode, {d.SerializeAsString()});
  }
  Write("raw-decode-new-kv-dtype-mismatch", s);
  s = RawHeader(0);  // a NaN in K
  PutRawOp(&s, kAppendKV, {AppendMsg(p, 0, 1, 4, 5, 0, std::nanf(""))});
  Write("raw-append-nan", s);
  s = RawHeader(0);  // two items, the second over nothing valid: nothing may be appended
  {
    v1::DecodeRequest d = DecodeReq(p, 0, true, 4, 10);
    *d.add_items() = d.items(0);
    d.mutable_items(1)->set_layer(7);
    PutRawOp(&s, kDecode, {d.SerializeAsString()});
    PutRawOp(&s, kGetSession, {Id(v1::GetSessionRequest())});
  }
  Write("raw-decode-batch-partial", s);
  s = RawHeader(0);  // empty messages everywhere
  for (int m = 0; m < kNumMethods; ++m) PutRawOp(&s, static_cast<Method>(m), {std::string()});
  Write("raw-empty-messages", s);
  s = RawHeader(0);  // cancelled upload
  PutRawOp(&s, kAppendKV, {prefill, prefill}, kFlagCancel);
  Write("raw-append-cancelled", s);
}

// Structured mode. Choice bytes follow service_fuzz.cc's readers (index 0 = default).
std::string StructHeader(uint8_t seed, int sessions,
                         const std::vector<std::vector<uint8_t>>& specs) {
  std::string s;
  s.push_back(static_cast<char>(kModeStructured));
  s.push_back(static_cast<char>(seed));
  s.push_back(static_cast<char>(sessions - 1));
  for (const auto& spec : specs) {
    s.push_back(static_cast<char>(spec.size()));
    s.append(spec.begin(), spec.end());
  }
  return s;
}

void StructuredSeeds() {
  // Create spec order: id, layers, kv, qmult, dim, dtype, k{sparsity, direction, scoring,
  // layer_sparsity}, v{...}, dense_window, chunk, group, compute, ttl, tenant, labels.
  const std::vector<uint8_t> kDefault = {};
  const std::vector<uint8_t> kPerChannelBf16 = {0, 0, 0, 0, 0, 1, 2, 2, 2, 0, 0, 1, 1, 0, 1, 2, 1};
  const std::vector<uint8_t> kF32LayerSparsity = {0, 1, 2, 1, 2, 2, 0, 1, 2, 1, 0,
                                                  0, 0, 1, 1, 0, 0, 0, 0, 1, 1};
  // Append choices: session, nmsgs, cancel, then per message: mixed-id, layer_begin,
  // layers mode, tokens, k dtype, v dtype, shape mut, byte mut, k class, v class, obs mode,
  // obs tokens, obs class, seed.
  const std::vector<uint8_t> kAppend300 = {0, 0, 0, 0, 0, 0, 8, 1, 0, 0, 0, 0, 0, 1, 1, 0, 1};
  const std::vector<uint8_t> kAppendSmall = {0, 1, 0, 0, 0, 0, 3, 0, 0, 0, 0, 0, 0, 0, 0, 0,
                                             2, 0, 1, 1, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 3};
  // Decode choices: nitems, out dtype, request id, then per item: session, layer, q dtype,
  // shape mut, byte mut, q class, new token mode, new class, want_lse, scale, new dtype, seed.
  const std::vector<uint8_t> kDecodeLse = {0, 0, 1, 0, 1, 0, 0, 0, 0, 1, 0, 1, 0, 1, 5};
  const std::vector<uint8_t> kDecodeTwo = {1, 2, 2, 0, 0, 0, 0, 0, 0, 1, 0, 1, 2, 0,
                                           6, 1, 0, 1, 0, 0, 0, 1, 0, 0, 1, 1, 7};

  std::string s = StructHeader(1, 1, {kDefault});
  for (int op = 0; op < kNumOps; ++op) {
    if (op == kOpRaw || op == kOpCreate || op == kOpDeleteSession) continue;
    PutOp(&s, static_cast<Op>(op), {});
  }
  PutOp(&s, kOpDeleteSession, {});
  Write("struct-every-op", s);

  s = StructHeader(2, 1, {kDefault});
  PutOp(&s, kOpAppend, kAppend300);
  PutOp(&s, kOpDecode, kDecodeLse);
  PutOp(&s, kOpFlush, {});
  PutOp(&s, kOpReadKV, {0, 0, 0, 2, 3});
  PutOp(&s, kOpDecodeStream, {2, 0, 15, 0, 0, 0, 0, 0, 0, 0, 0, 1, 0, 1, 0, 0, 1, 9});
  PutOp(&s, kOpServerInfo, {});
  Write("struct-compress-decode-read", s);

  s = StructHeader(3, 2, {kPerChannelBf16, kF32LayerSparsity});
  PutOp(&s, kOpAppend, kAppendSmall);
  PutOp(&s, kOpAppend, {1, 0, 0, 0, 0, 0, 6, 1, 0, 0, 0, 0, 0, 1, 2, 0, 4});
  PutOp(&s, kOpDecode, kDecodeTwo);
  PutOp(&s, kOpFlush, {1});
  PutOp(&s, kOpListSessions, {0, 2});
  PutOp(&s, kOpGetSession, {1});
  PutOp(&s, kOpDeleteSession, {0});
  PutOp(&s, kOpDecode, kDecodeTwo);
  Write("struct-two-sessions", s);

  s = StructHeader(4, 1, {kDefault});  // bad values and shapes that must be rejected
  PutOp(&s, kOpAppend, {0, 0, 0, 0, 0, 0, 1, 0, 0, 0, 0, 2, 0});  // NaN in K
  PutOp(&s, kOpAppend, {0, 0, 0, 0, 0, 0, 1, 0, 0, 0, 0, 6, 0});  // fp16 overflow
  PutOp(&s, kOpAppend, {0, 0, 0, 0, 0, 0, 1, 0, 0, 1, 0, 0, 0});  // wrong kv heads
  PutOp(&s, kOpAppend, {0, 0, 0, 0, 0, 0, 1, 0, 0, 0, 1, 0, 0});  // byte length - 1
  PutOp(&s, kOpDecode, {0, 0, 0, 0, 0, 0, 0, 0, 0, 3});           // f32 K, f16 V new token
  PutOp(&s, kOpDecode, {0, 0, 0, 0, 0, 0, 0, 0, 2});              // NaN query
  PutOp(&s, kOpDecode, {1, 0, 0, 0, 0, 0, 0, 0, 0, 1, 0, 0, 0, 0, 0, 0, 5});  // 2nd item bad layer
  PutOp(&s, kOpGetSession, {});
  Write("struct-rejects", s);

  s = StructHeader(5, 1, {{0, 3, 3, 1, 3}});  // widest layout, over the budget quickly
  for (int i = 0; i < 4; ++i) PutOp(&s, kOpAppend, {0, 0, 0, 0, 0, 0, 7, 1});
  PutOp(&s, kOpServerInfo, {});
  Write("struct-budget", s);

  s = StructHeader(6, 1, {kDefault});  // raw op inside a structured program
  {
    std::string raw;
    v1::GetSessionRequest g;
    g.set_session_id("s0");
    PutRawOp(&raw, kGetSession, {g.SerializeAsString()});
    PutOp(&s, kOpRaw, std::vector<uint8_t>(raw.begin(), raw.end()));
  }
  PutOp(&s, kOpCreate, {0, 1, 1, 1, 5});
  PutOp(&s, kOpSnapshot, {0, 1, 2});
  Write("struct-raw-create-snapshot", s);

  // Snapshot choices: session, mode (0 round trip, 1 import over the live original, 2 content
  // mutated with checksums fixed, 3 transport damage), split (0 as exported, 1 7-byte pieces,
  // 2 one piece), cancel, then mode 2: count-1, (record, offset lo, offset hi, op, value)*,
  // delete-first; mode 3: damage kind.
  s = StructHeader(8, 1, {kPerChannelBf16});
  PutOp(&s, kOpAppend, kAppend300);
  PutOp(&s, kOpDecode, kDecodeLse);
  PutOp(&s, kOpSnapshot, {0, 0, 1});
  PutOp(&s, kOpReadKV, {});
  PutOp(&s, kOpDecode, kDecodeLse);
  PutOp(&s, kOpSnapshot, {0, 2, 0, 0, 1, 0, 9, 0, 2, 3, 0});
  PutOp(&s, kOpSnapshot, {0, 3, 2, 0, 4});
  Write("struct-snapshot-round-trip", s);

  s = StructHeader(7, 1, {{0, 4}});  // invalid layouts
  PutOp(&s, kOpCreate, {0, 0, 4, 4});
  PutOp(&s, kOpCreate, {3});
  PutOp(&s, kOpCreate, {0, 0, 0, 0, 0, 0, 6});
  Write("struct-bad-creates", s);
}

}  // namespace
}  // namespace sparsekv::fuzz

int main(int argc, char** argv) {
  if (argc != 2) {
    std::fprintf(stderr, "usage: %s OUT_DIR\n", argv[0]);
    return 2;
  }
  sparsekv::fuzz::out_dir = argv[1];
  sparsekv::fuzz::RawSeeds();
  sparsekv::fuzz::StructuredSeeds();
  std::printf("wrote %d seeds to %s\n", sparsekv::fuzz::written, argv[1]);
  return 0;
}

// The byte format of service_fuzz inputs, shared by the fuzz target and the seed generator
// (make_seeds.cc). Every byte string is a valid input: missing bytes read as 0, and index 0 of
// every choice table is the common, valid value, so a short input is a valid request sequence.
//
//   input      := mode rest
//   mode       := byte; even = raw, odd = structured
//
// Raw mode: request bytes chosen by the fuzzer reach the service's own parser.
//   rest       := preset raw_op*
//   preset     := byte; < kNumPresets creates session "fz0" with kPresets[preset] first
//                 (raw requests naming "fz0" then reach core/); otherwise no session
//   raw_op     := op_byte body
//   op_byte    := method (low 4 bits, modulo kNumMethods) | kFlagCancel (0x10: cancel the
//                 call after its messages are written)
//   body       := unary or server-streaming method: message
//                 client- or bidi-streaming method: count (byte, modulo 9) message*count
//   message    := len_lo len_hi bytes[len]   (len clipped to what is left)
//
// Structured mode: requests built as valid protos, with fields mutated from the input, and
// checked against a model of every session (tokens per layer, all-or-nothing).
//   rest       := seed nsessions create_spec* op*
//   seed       := byte (seeds the value generator)
//   nsessions  := byte; 1 + nsessions % 2 sessions created first
//   create_spec:= len bytes[len]   (choices, read in the order of ReadCreate in service_fuzz.cc)
//   op         := op_code len bytes[len]  (op_code modulo kNumOps; the bytes are its choices)
// Each op's choice bytes are read from their own slice, so inserting or deleting a byte in one
// op leaves the others as they were.
#ifndef SPARSEKV_TESTS_FUZZ_FUZZ_FORMAT_H_
#define SPARSEKV_TESTS_FUZZ_FUZZ_FORMAT_H_

#include <cstdint>
#include <string>
#include <vector>

namespace sparsekv::fuzz {

enum class Kind { kUnary, kClientStream, kServerStream, kBidi };

struct MethodInfo {
  const char* name;
  const char* path;
  Kind kind;
};

enum Method {
  kCreateSession,
  kGetSession,
  kListSessions,
  kDeleteSession,
  kAppendKV,
  kDecode,
  kDecodeStream,
  kFlush,
  kReadKV,
  kExportSession,
  kImportSession,
  kGetServerInfo,
  kNumMethods
};

inline constexpr MethodInfo kMethods[kNumMethods] = {
    {"CreateSession", "/sparsekv.v1.KvCacheService/CreateSession", Kind::kUnary},
    {"GetSession", "/sparsekv.v1.KvCacheService/GetSession", Kind::kUnary},
    {"ListSessions", "/sparsekv.v1.KvCacheService/ListSessions", Kind::kUnary},
    {"DeleteSession", "/sparsekv.v1.KvCacheService/DeleteSession", Kind::kUnary},
    {"AppendKV", "/sparsekv.v1.KvCacheService/AppendKV", Kind::kClientStream},
    {"Decode", "/sparsekv.v1.KvCacheService/Decode", Kind::kUnary},
    {"DecodeStream", "/sparsekv.v1.KvCacheService/DecodeStream", Kind::kBidi},
    {"Flush", "/sparsekv.v1.KvCacheService/Flush", Kind::kUnary},
    {"ReadKV", "/sparsekv.v1.KvCacheService/ReadKV", Kind::kServerStream},
    {"ExportSession", "/sparsekv.v1.KvCacheService/ExportSession", Kind::kServerStream},
    {"ImportSession", "/sparsekv.v1.KvCacheService/ImportSession", Kind::kClientStream},
    {"GetServerInfo", "/sparsekv.v1.KvCacheService/GetServerInfo", Kind::kUnary},
};

inline constexpr uint8_t kModeRaw = 0;
inline constexpr uint8_t kModeStructured = 1;
inline constexpr uint8_t kFlagCancel = 0x10;
inline constexpr int kMaxStreamMessages = 8;  // count byte is taken modulo 9

// Sessions the raw mode creates as "fz0" before its requests.
struct Preset {
  int layers, kv_heads, q_heads, head_dim;
  int dtype;  // sparsekv.v1.DType value
  float k_sparsity, v_sparsity;
  int k_direction, v_direction;  // sparsekv.v1.PruneDirection value
  int k_scoring, v_scoring;      // sparsekv.v1.Scoring value
  int dense_window, chunk_tokens, group_tokens;
  int decode_compute;  // sparsekv.v1.DecodeCompute value
};
inline constexpr char kPresetId[] = "fz0";
inline constexpr Preset kPresets[] = {
    // fp16, per-token output-aware 50%, compresses after 4 + 32 tokens
    {2, 2, 4, 32, 2, 0.5f, 0.5f, 1, 1, 2, 2, 4, 32, 32, 1},
    // fp32, dense
    {1, 1, 1, 8, 1, 0.0f, 0.0f, 0, 0, 0, 0, 0, 0, 0, 0},
    // bf16, per-channel K 70% output-aware, per-token V 50% magnitude
    {2, 2, 8, 64, 3, 0.7f, 0.5f, 2, 1, 2, 1, 1, 64, 32, 1},
    // fp16, widest layout the fuzz server allows, fp16 arithmetic asked for
    {4, 8, 8, 128, 2, 0.7f, 0.7f, 1, 1, 2, 2, 8, 32, 32, 2},
    // fp32, odd head_dim, per-channel groups of 64, both tensors per-channel
    {1, 4, 8, 3, 1, 0.3f, 0.9f, 2, 2, 2, 1, 0, 64, 64, 1},
    // fp16, three layers, GQA 2, magnitude
    {3, 1, 2, 16, 2, 0.9f, 0.2f, 1, 1, 1, 1, 2, 32, 32, 1},
};
inline constexpr int kNumPresets = sizeof(kPresets) / sizeof(kPresets[0]);

// Structured-mode operations.
enum Op {
  kOpAppend,
  kOpDecode,
  kOpDecodeStream,
  kOpFlush,
  kOpReadKV,
  kOpGetSession,
  kOpListSessions,
  kOpDeleteSession,
  kOpServerInfo,
  kOpSnapshot,
  kOpRaw,
  kOpCreate,
  kNumOps
};

// Appends one raw-mode message (length-prefixed).
inline void PutMessage(std::string* out, const std::string& msg) {
  const size_t n = msg.size() > 0xffff ? 0xffff : msg.size();
  out->push_back(static_cast<char>(n & 0xff));
  out->push_back(static_cast<char>(n >> 8));
  out->append(msg, 0, n);
}

// Appends one raw-mode op: the method and its messages (one for unary and server-streaming
// methods).
inline void PutRawOp(std::string* out, Method m, const std::vector<std::string>& msgs,
                     uint8_t flags = 0) {
  out->push_back(static_cast<char>(m | flags));
  const Kind k = kMethods[m].kind;
  if (k == Kind::kUnary || k == Kind::kServerStream) {
    PutMessage(out, msgs.empty() ? std::string() : msgs[0]);
    return;
  }
  const size_t n = msgs.size() > kMaxStreamMessages ? kMaxStreamMessages : msgs.size();
  out->push_back(static_cast<char>(n));
  for (size_t i = 0; i < n; ++i) PutMessage(out, msgs[i]);
}

// Appends one structured op with its choice bytes.
inline void PutOp(std::string* out, Op op, const std::vector<uint8_t>& choices) {
  out->push_back(static_cast<char>(op));
  out->push_back(static_cast<char>(choices.size()));
  out->append(choices.begin(), choices.end());
}

}  // namespace sparsekv::fuzz

#endif  // SPARSEKV_TESTS_FUZZ_FUZZ_FORMAT_H_

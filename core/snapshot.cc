#include "core/snapshot.h"

#include <cstring>
#include <utility>

#include "absl/strings/str_cat.h"
#include "common/status_macros.h"
#include "core/session_store.h"

namespace sparsekv {
namespace {

constexpr char kMagic[8] = {'S', 'K', 'V', 'S', 'N', 'A', 'P', '\0'};
enum RecordType : uint32_t { kHeader = 1, kLayer = 2, kEnd = 3 };

// Little-endian appends.
class Writer {
 public:
  void U8(uint8_t v) { out_.push_back(static_cast<char>(v)); }
  void U32(uint32_t v) { Raw(&v, 4); }
  void U64(uint64_t v) { Raw(&v, 8); }
  void I32(int32_t v) { Raw(&v, 4); }
  void I64(int64_t v) { Raw(&v, 8); }
  void F32(float v) { Raw(&v, 4); }
  void Str(std::string_view s) {
    U64(s.size());
    out_.append(s.data(), s.size());
  }
  void Raw(const void* p, size_t n) { out_.append(static_cast<const char*>(p), n); }
  std::string& out() { return out_; }

 private:
  std::string out_;
};

// Bounds-checked little-endian reads: after the first failure every read fails and returns 0.
class Reader {
 public:
  explicit Reader(std::string_view s) : s_(s) {}
  bool ok() const { return ok_; }
  size_t left() const { return s_.size() - pos_; }
  size_t pos() const { return pos_; }
  uint8_t U8() { return Get<uint8_t>(); }
  uint32_t U32() { return Get<uint32_t>(); }
  uint64_t U64() { return Get<uint64_t>(); }
  int32_t I32() { return Get<int32_t>(); }
  int64_t I64() { return Get<int64_t>(); }
  float F32() { return Get<float>(); }
  double F64() { return Get<double>(); }
  std::string_view Bytes(uint64_t n) {
    if (!ok_ || n > left()) {
      ok_ = false;
      return {};
    }
    std::string_view v = s_.substr(pos_, n);
    pos_ += n;
    return v;
  }
  std::string Str() { return std::string(Bytes(U64())); }
  // A count of items of at least `item_bytes` each: fails when the bytes left cannot hold
  // them, so no allocation is sized by an unchecked count.
  uint64_t Count(size_t item_bytes) {
    const uint64_t n = U64();
    if (!ok_ || (item_bytes > 0 && n > left() / item_bytes)) ok_ = false;
    return ok_ ? n : 0;
  }

 private:
  template <typename T>
  T Get() {
    T v{};
    std::string_view b = Bytes(sizeof(T));
    if (ok_) std::memcpy(&v, b.data(), sizeof(T));
    return v;
  }
  std::string_view s_;
  size_t pos_ = 0;
  bool ok_ = true;
};

void PutRecord(Writer* w, uint32_t type, const std::string& payload) {
  w->U32(type);
  w->U64(payload.size());
  w->out().append(payload);
  w->U32(Crc32c(payload));
}

void PutTensorPolicy(Writer* w, const TensorPolicy& p) {
  w->F32(p.sparsity);
  w->U8(static_cast<uint8_t>(p.direction));
  w->U8(static_cast<uint8_t>(p.scoring));
  w->U64(p.layer_sparsity.size());
  for (float s : p.layer_sparsity) w->F32(s);
}

void PutFormat(Writer* w, const kernels::SectionFormat& f) {
  w->U8(static_cast<uint8_t>(f.kind));
  w->I32(f.head_dim);
  w->I32(f.tokens);
  w->I32(f.group);
  w->I32(f.k);
  w->U8(static_cast<uint8_t>(f.dtype));
}

std::string HeaderPayload(const SessionImage& image) {
  const SessionInfo& i = image.info;
  Writer w;
  w.Str(i.id);
  w.Str(i.tenant);
  w.I32(i.layout.num_layers);
  w.I32(i.layout.num_kv_heads);
  w.I32(i.layout.num_q_heads);
  w.I32(i.layout.head_dim);
  w.U8(static_cast<uint8_t>(i.layout.dtype));
  PutTensorPolicy(&w, i.policy.k);
  PutTensorPolicy(&w, i.policy.v);
  w.I32(i.policy.dense_window);
  w.I32(i.policy.chunk_tokens);
  w.I32(i.policy.group_tokens);
  w.U8(static_cast<uint8_t>(i.policy.decode_compute));
  w.I64(absl::ToInt64Seconds(i.ttl));
  w.I64(absl::ToUnixMillis(i.create_time));
  w.U64(i.labels.size());
  for (const auto& [k, v] : i.labels) {
    w.Str(k);
    w.Str(v);
  }
  w.I64(image.decode_steps);
  return std::move(w.out());
}

std::string LayerPayload(int index, const LayerImage& l) {
  Writer w;
  w.U32(static_cast<uint32_t>(index));
  w.U64(l.chunks.size());
  for (const LayerImage::Chunk& c : l.chunks) {
    PutFormat(&w, c.k_format);
    PutFormat(&w, c.v_format);
    w.U8(static_cast<uint8_t>((c.k_output_aware ? 1 : 0) | (c.v_output_aware ? 2 : 0)));
    w.Str(c.data);
  }
  w.I64(l.tail_tokens);
  w.I32(l.tail_first_row);
  w.Str(l.tail_k);
  w.Str(l.tail_v);
  w.U64(l.tail_mass.size());
  w.Raw(l.tail_mass.data(), l.tail_mass.size() * sizeof(float));
  w.U64(l.q_energy.size());
  w.Raw(l.q_energy.data(), l.q_energy.size() * sizeof(double));
  w.U8(l.queries_seen ? 1 : 0);
  return std::move(w.out());
}

// Strings travel as proto3 `string` fields (valid UTF-8 only): a snapshot cannot bring in
// what no CreateSession could.
bool ValidUtf8(std::string_view s) {
  size_t i = 0;
  while (i < s.size()) {
    const unsigned char c = static_cast<unsigned char>(s[i]);
    int extra;
    uint32_t cp;
    if (c < 0x80) {
      ++i;
      continue;
    } else if ((c & 0xe0) == 0xc0) {
      extra = 1;
      cp = c & 0x1f;
    } else if ((c & 0xf0) == 0xe0) {
      extra = 2;
      cp = c & 0x0f;
    } else if ((c & 0xf8) == 0xf0) {
      extra = 3;
      cp = c & 0x07;
    } else {
      return false;
    }
    if (i + extra >= s.size()) return false;  // truncated sequence
    for (int k = 1; k <= extra; ++k) {
      const unsigned char d = static_cast<unsigned char>(s[i + k]);
      if ((d & 0xc0) != 0x80) return false;
      cp = (cp << 6) | (d & 0x3f);
    }
    static constexpr uint32_t kMin[4] = {0, 0x80, 0x800, 0x10000};
    if (cp < kMin[extra] || cp > 0x10ffff || (cp >= 0xd800 && cp <= 0xdfff)) return false;
    i += static_cast<size_t>(extra) + 1;
  }
  return true;
}

absl::Status Corrupt(const std::string& what) {
  return absl::DataLossError(absl::StrCat("snapshot is damaged: ", what));
}

// Enum bytes outside their range are refused here; everything else by the validators.
absl::Status ReadEnum(Reader* r, uint8_t max, const char* what, uint8_t* out) {
  *out = r->U8();
  if (r->ok() && *out > max) {
    return absl::InvalidArgumentError(absl::StrCat("snapshot ", what, ": unknown value ", *out));
  }
  return absl::OkStatus();
}

absl::Status ReadTensorPolicy(Reader* r, const char* which, TensorPolicy* p) {
  p->sparsity = r->F32();
  uint8_t e = 0;
  SPARSEKV_RETURN_IF_ERROR(ReadEnum(r, 1, "policy direction", &e));
  p->direction = static_cast<PruneDirection>(e);
  SPARSEKV_RETURN_IF_ERROR(ReadEnum(r, 1, "policy scoring", &e));
  p->scoring = static_cast<Scoring>(e);
  const uint64_t n = r->Count(sizeof(float));
  for (uint64_t i = 0; i < n; ++i) p->layer_sparsity.push_back(r->F32());
  return absl::OkStatus();
}

absl::Status ReadFormat(Reader* r, kernels::SectionFormat* f) {
  uint8_t e = 0;
  SPARSEKV_RETURN_IF_ERROR(ReadEnum(r, 2, "section kind", &e));
  f->kind = static_cast<kernels::SectionKind>(e);
  f->head_dim = r->I32();
  f->tokens = r->I32();
  f->group = r->I32();
  f->k = r->I32();
  SPARSEKV_RETURN_IF_ERROR(ReadEnum(r, 2, "section dtype", &e));
  f->dtype = static_cast<DType>(e);
  return absl::OkStatus();
}

absl::Status ParseHeader(std::string_view payload, const SessionLimits& limits,
                         SessionImage* image) {
  Reader r(payload);
  SessionInfo& i = image->info;
  i.id = r.Str();
  i.tenant = r.Str();
  i.layout.num_layers = r.I32();
  i.layout.num_kv_heads = r.I32();
  i.layout.num_q_heads = r.I32();
  i.layout.head_dim = r.I32();
  uint8_t e = 0;
  SPARSEKV_RETURN_IF_ERROR(ReadEnum(&r, 2, "layout dtype", &e));
  i.layout.dtype = static_cast<DType>(e);
  SPARSEKV_RETURN_IF_ERROR(ReadTensorPolicy(&r, "k", &i.policy.k));
  SPARSEKV_RETURN_IF_ERROR(ReadTensorPolicy(&r, "v", &i.policy.v));
  i.policy.dense_window = r.I32();
  i.policy.chunk_tokens = r.I32();
  i.policy.group_tokens = r.I32();
  SPARSEKV_RETURN_IF_ERROR(ReadEnum(&r, 1, "decode_compute", &e));
  i.policy.decode_compute = static_cast<DecodeCompute>(e);
  const int64_t ttl = r.I64();
  const int64_t created = r.I64();
  const uint64_t labels = r.Count(16);
  for (uint64_t n = 0; n < labels && r.ok(); ++n) {
    std::string key = r.Str();
    i.labels[std::move(key)] = r.Str();
  }
  image->decode_steps = r.I64();
  if (!r.ok() || r.left() != 0) return Corrupt("header record has the wrong length");
  if (ttl < 0 || ttl > int64_t{10} * 365 * 24 * 3600 || image->decode_steps < 0) {
    return absl::InvalidArgumentError("snapshot header: ttl or counters out of range");
  }
  i.ttl = absl::Seconds(ttl);
  i.create_time = absl::FromUnixMillis(created);
  SPARSEKV_RETURN_IF_ERROR(ValidateSessionId(i.id, limits.max_id_bytes));
  if (i.tenant.empty() || i.tenant.size() > static_cast<size_t>(limits.max_id_bytes)) {
    return absl::InvalidArgumentError("snapshot header: tenant empty or too long");
  }
  SPARSEKV_RETURN_IF_ERROR(ValidateLabels(i.labels, limits));
  bool utf8 = ValidUtf8(i.tenant);
  for (const auto& [k, v] : i.labels) utf8 = utf8 && ValidUtf8(k) && ValidUtf8(v);
  if (!utf8) return absl::InvalidArgumentError("snapshot header: tenant or label not UTF-8");
  SPARSEKV_RETURN_IF_ERROR(ValidateLayout(i.layout, limits));
  SPARSEKV_RETURN_IF_ERROR(ValidatePolicy(i.policy, i.layout));
  return absl::OkStatus();
}

absl::Status ParseLayer(std::string_view payload, int expected, LayerImage* l) {
  Reader r(payload);
  if (r.U32() != static_cast<uint32_t>(expected)) return Corrupt("layers out of order");
  const uint64_t chunks = r.Count(2 * 18 + 1 + 8);
  for (uint64_t n = 0; n < chunks && r.ok(); ++n) {
    LayerImage::Chunk c;
    SPARSEKV_RETURN_IF_ERROR(ReadFormat(&r, &c.k_format));
    SPARSEKV_RETURN_IF_ERROR(ReadFormat(&r, &c.v_format));
    const uint8_t flags = r.U8();
    c.k_output_aware = flags & 1;
    c.v_output_aware = flags & 2;
    c.data = r.Str();
    l->chunks.push_back(std::move(c));
  }
  l->tail_tokens = r.I64();
  l->tail_first_row = r.I32();
  l->tail_k = r.Str();
  l->tail_v = r.Str();
  const uint64_t mass = r.Count(sizeof(float));
  std::string_view m = r.Bytes(mass * sizeof(float));
  if (r.ok() && mass > 0) {  // memcpy with an empty vector's null data is undefined
    l->tail_mass.resize(mass);
    std::memcpy(l->tail_mass.data(), m.data(), m.size());
  }
  const uint64_t energy = r.Count(sizeof(double));
  std::string_view q = r.Bytes(energy * sizeof(double));
  if (r.ok() && energy > 0) {
    l->q_energy.resize(energy);
    std::memcpy(l->q_energy.data(), q.data(), q.size());
  }
  l->queries_seen = r.U8() != 0;
  if (!r.ok() || r.left() != 0) {
    return Corrupt(absl::StrCat("layer ", expected, " record has the wrong length"));
  }
  return absl::OkStatus();
}

}  // namespace

std::string SerializeSnapshot(const SessionImage& image) {
  Writer w;
  w.Raw(kMagic, sizeof(kMagic));
  w.U32(kSnapshotVersion);
  PutRecord(&w, kHeader, HeaderPayload(image));
  for (size_t l = 0; l < image.layers.size(); ++l) {
    PutRecord(&w, kLayer, LayerPayload(static_cast<int>(l), image.layers[l]));
  }
  Writer end;
  end.U32(static_cast<uint32_t>(image.layers.size()));
  end.U32(Crc32c(w.out()));
  PutRecord(&w, kEnd, end.out());
  return std::move(w.out());
}

absl::StatusOr<SessionImage> ParseSnapshot(std::string_view bytes, const SessionLimits& limits) {
  Reader r(bytes);
  std::string_view magic = r.Bytes(sizeof(kMagic));
  if (!r.ok() || std::memcmp(magic.data(), kMagic, sizeof(kMagic)) != 0) {
    return Corrupt("not a sparsekv snapshot (bad magic)");
  }
  const uint32_t version = r.U32();
  if (!r.ok()) return Corrupt("truncated header");
  if (version != kSnapshotVersion) {
    return absl::FailedPreconditionError(absl::StrCat(
        "snapshot format version ", version, "; this server reads version ", kSnapshotVersion));
  }
  SessionImage image;
  bool header = false;
  for (int record = 0;; ++record) {
    const size_t start = r.pos();
    const uint32_t type = r.U32();
    const uint64_t size = r.U64();
    std::string_view payload = r.Bytes(size);
    const uint32_t crc = r.U32();
    if (!r.ok()) return Corrupt(absl::StrCat("record ", record, " is truncated"));
    if (Crc32c(payload) != crc) {
      return Corrupt(absl::StrCat("record ", record, " fails its checksum"));
    }
    if (type == kHeader && !header) {
      SPARSEKV_RETURN_IF_ERROR(ParseHeader(payload, limits, &image));
      header = true;
      continue;
    }
    if (!header) return Corrupt("the first record is not the session header");
    if (type == kLayer && static_cast<int>(image.layers.size()) < image.info.layout.num_layers) {
      image.layers.emplace_back();
      SPARSEKV_RETURN_IF_ERROR(
          ParseLayer(payload, static_cast<int>(image.layers.size()) - 1, &image.layers.back()));
      continue;
    }
    if (type != kEnd) return Corrupt(absl::StrCat("record ", record, " is out of place"));
    Reader e(payload);
    const uint32_t layers = e.U32();
    const uint32_t whole = e.U32();
    if (!e.ok() || e.left() != 0 || layers != static_cast<uint32_t>(image.info.layout.num_layers) ||
        image.layers.size() != layers) {
      return Corrupt("layers are missing");
    }
    if (whole != Crc32c(bytes.substr(0, start))) return Corrupt("the whole-file checksum fails");
    if (r.left() != 0) return Corrupt("bytes after the end record");
    return image;
  }
}

}  // namespace sparsekv

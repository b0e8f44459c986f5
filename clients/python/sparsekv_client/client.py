"""Python client of the sparsekv gRPC service (sparsekv.v1.KvCacheService).

Numpy arrays in and out; every RPC error is raised as SparsekvError(code, message) with the
gRPC status code name. See ../README.md for the API and examples.
"""

import dataclasses
import os
import queue
import struct
import threading
from typing import Dict, Iterator, List, Optional, Sequence, Tuple

import grpc
import numpy as np

from . import tensors as T
from ._proto import (HEALTH_SERVICE, METHODS, SERVICE, HealthCheckRequest, HealthCheckResponse,
                     message_class, pb)

DEFAULT_TARGET = "localhost:50051"
# The environment variable a Client reads its bearer token from when given none.
TOKEN_ENV = "SPARSEKV_TOKEN"
# AppendKV messages are kept at or below this many tensor bytes (the server's default
# --max_message_bytes is 64 MiB; small messages keep memory and latency low on both sides).
DEFAULT_APPEND_MESSAGE_BYTES = 4 << 20
# ImportSession pieces: the size the server exports in (its ReadKV/ExportSession pieces are at
# most 2 MiB), far under any --max_message_bytes.
DEFAULT_IMPORT_PIECE_BYTES = 2 << 20
# A snapshot starts with this magic and its u32 little-endian format version (core/snapshot.h).
SNAPSHOT_MAGIC = b"SKVSNAP\0"
SNAPSHOT_FORMAT_VERSION = 1

_CODE_BY_NUMBER = {c.value[0]: c for c in grpc.StatusCode}


# ---------------------------------------------------------------------------------------------
# errors

class SparsekvError(Exception):
    """A failed sparsekv call.

    code: gRPC status code name ("NOT_FOUND", "INVALID_ARGUMENT", ...);
    message: the server's (or gRPC's) message; status: the grpc.StatusCode (or None);
    request_id: for DecodeStream error responses, the request they answer."""

    def __init__(self, code, message, status=None, request_id=None):
        super().__init__("%s: %s" % (code, message))
        self.code = code
        self.message = message
        self.status = status
        self.request_id = request_id

    @classmethod
    def from_rpc_error(cls, e):
        status = e.code() if hasattr(e, "code") else None
        name = status.name if status is not None else "UNKNOWN"
        details = e.details() if hasattr(e, "details") else str(e)
        return cls(name, details or "", status)

    @classmethod
    def from_code_number(cls, number, message, request_id=None):
        status = _CODE_BY_NUMBER.get(int(number))
        return cls(status.name if status else "CODE_%d" % number, message, status, request_id)


# ---------------------------------------------------------------------------------------------
# CRC-32C (Castagnoli, reflected polynomial 0x82F63B78): the checksum of each snapshot piece.
# zlib's crc32 is the IEEE polynomial, so this is computed here with a byte table: about 8 MB/s
# in CPython (0.25 s for a full 2 MiB piece, 20 ms for a 150 KB session).

def _crc32c_table():
    table = []
    for i in range(256):
        c = i
        for _ in range(8):
            c = (c >> 1) ^ 0x82F63B78 if c & 1 else c >> 1
        table.append(c)
    return tuple(table)


_CRC32C_TABLE = _crc32c_table()


def crc32c(data, crc=0):
    """CRC-32C of `data` (bytes-like), continuing from `crc` (0 to start):
    crc32c(b, crc32c(a)) == crc32c(a + b)."""
    table = _CRC32C_TABLE
    c = crc ^ 0xFFFFFFFF
    for b in memoryview(data).cast("B"):
        c = table[(c ^ b) & 0xFF] ^ (c >> 8)
    return c ^ 0xFFFFFFFF


def snapshot_pieces(snapshot, piece_bytes=DEFAULT_IMPORT_PIECE_BYTES, format_version=None):
    """Splits a snapshot (ExportSession's bytes) into the SessionChunk messages ImportSession
    takes: each with its offset, data, CRC-32C and format version, the final one with
    last=True (an empty snapshot is one empty last piece). format_version None reads it from
    the snapshot's header; bytes without one go as SNAPSHOT_FORMAT_VERSION (and the server
    refuses them with DATA_LOSS)."""
    snapshot = bytes(snapshot)
    piece_bytes = int(piece_bytes)
    if piece_bytes < 1:
        raise ValueError("piece_bytes must be >= 1, got %d" % piece_bytes)
    if format_version is None:
        format_version = SNAPSHOT_FORMAT_VERSION
        if snapshot.startswith(SNAPSHOT_MAGIC) and len(snapshot) >= len(SNAPSHOT_MAGIC) + 4:
            format_version = struct.unpack_from("<I", snapshot, len(SNAPSHOT_MAGIC))[0]
    offset = 0
    while True:
        data = snapshot[offset:offset + piece_bytes]
        last = offset + len(data) == len(snapshot)
        yield pb.SessionChunk(format_version=int(format_version), offset=offset, data=data,
                              last=last, crc32c=crc32c(data))
        offset += len(data)
        if last:
            return


# ---------------------------------------------------------------------------------------------
# plain-Python views of the API messages

_DIRECTIONS = {"unspecified": 0, "per_token": 1, "per_channel": 2}
_SCORINGS = {"unspecified": 0, "magnitude": 1, "output_aware": 2}
_DECODE_COMPUTES = {"unspecified": 0, "f32": 1, "float32": 1, "fp32": 1, "f16": 2,
                    "float16": 2, "fp16": 2}
_DIRECTION_NAMES = {v: k for k, v in _DIRECTIONS.items()}
_SCORING_NAMES = {v: k for k, v in _SCORINGS.items()}
_DECODE_COMPUTE_NAMES = {0: "unspecified", 1: "f32", 2: "f16"}


def _enum(value, table, what):
    if isinstance(value, (int, np.integer)):
        return int(value)
    key = str(value).lower().replace("-", "_")
    for prefix in ("prune_direction_", "scoring_", "decode_compute_"):
        if key.startswith(prefix):
            key = key[len(prefix):]
    if key == "oa":
        key = "output_aware"
    if key == "mag":
        key = "magnitude"
    if key not in table:
        raise ValueError("unknown %s %r (one of %s)" % (what, value, ", ".join(table)))
    return table[key]


@dataclasses.dataclass
class TensorPolicy:
    """Pruning of K or of V. direction: 'per_token' | 'per_channel'; scoring: 'magnitude' |
    'output_aware' | 'unspecified' (the server default: output-aware, the policy that measured
    best on real models; see the project README)."""
    sparsity: float = 0.0
    direction: str = "per_token"
    scoring: str = "unspecified"
    # Optional per-layer sparsities ([num_layers]) overriding `sparsity`.
    layer_sparsity: List[float] = dataclasses.field(default_factory=list)

    def to_proto(self):
        return pb.TensorPolicy(sparsity=float(self.sparsity),
                               direction=_enum(self.direction, _DIRECTIONS, "direction"),
                               scoring=_enum(self.scoring, _SCORINGS, "scoring"),
                               layer_sparsity=[float(x) for x in self.layer_sparsity])

    @classmethod
    def from_proto(cls, m):
        return cls(m.sparsity, _DIRECTION_NAMES.get(m.direction, m.direction),
                   _SCORING_NAMES.get(m.scoring, m.scoring), list(m.layer_sparsity))


@dataclasses.dataclass
class Policy:
    """Session pruning policy. 0 fields take the server defaults (window 32, chunk 256,
    group 32).

    decode_compute: arithmetic of decode steps, 'f32' | 'f16' | 'unspecified' (the server
    default, f32). 'f16' computes products and short sums in fp16: about 2.5x less compute
    for ~1e-3 relative attention-output error, on float16 caches and servers whose CPU has
    AVX512-FP16 only (elsewhere the session runs f32; SessionStats.decode_compute_in_force
    says which applies)."""
    k: TensorPolicy = dataclasses.field(default_factory=TensorPolicy)
    v: TensorPolicy = dataclasses.field(default_factory=TensorPolicy)
    dense_window: int = 0
    chunk_tokens: int = 0
    group_tokens: int = 0
    decode_compute: str = "unspecified"

    @classmethod
    def uniform(cls, sparsity, direction="per_token", scoring="unspecified", **kw):
        """The same TensorPolicy for K and V."""
        return cls(k=TensorPolicy(sparsity, direction, scoring),
                   v=TensorPolicy(sparsity, direction, scoring), **kw)

    @classmethod
    def calibrated(cls, path, sparsity, **kw):
        """Per-token K and V with the per-layer sparsities (mean `sparsity`) and the scoring of
        a calibration file (sparsekv_client.allocation; written by
        examples/calibrate_llama.py). Measured to beat a uniform policy of the same bytes by a
        wide margin on docs-byte-10m (README, "Quality on real models")."""
        from .allocation import load_allocation
        scoring, k_layers, v_layers = load_allocation(path, sparsity)
        return cls(k=TensorPolicy(sparsity, "per_token", scoring, k_layers),
                   v=TensorPolicy(sparsity, "per_token", scoring, v_layers), **kw)

    def to_proto(self):
        return pb.Policy(k=self.k.to_proto(), v=self.v.to_proto(),
                         dense_window=int(self.dense_window), chunk_tokens=int(self.chunk_tokens),
                         group_tokens=int(self.group_tokens),
                         decode_compute=_enum(self.decode_compute, _DECODE_COMPUTES,
                                              "decode_compute"))

    @classmethod
    def from_proto(cls, m):
        return cls(TensorPolicy.from_proto(m.k), TensorPolicy.from_proto(m.v), m.dense_window,
                   m.chunk_tokens, m.group_tokens,
                   _DECODE_COMPUTE_NAMES.get(m.decode_compute, m.decode_compute))


@dataclasses.dataclass
class Layout:
    num_layers: int
    num_kv_heads: int
    num_q_heads: int
    head_dim: int
    dtype: str  # 'float16' | 'bfloat16' | 'float32'


@dataclasses.dataclass
class SessionStats:
    tokens_per_layer: List[int]
    tokens_total: int
    bytes_dense: int
    bytes_compressed: int
    bytes_dense_equivalent: int
    achieved_sparsity_k: float
    achieved_sparsity_v: float
    scoring_in_force_k: str
    scoring_in_force_v: str
    pruning_backlog_tokens: int
    decode_steps: int
    chunks: int
    chunks_output_aware_k: int
    chunks_output_aware_v: int
    decode_compute_in_force: str  # 'f32' | 'f16': the arithmetic decode steps run with

    @property
    def compression_ratio(self):
        """(bytes_dense + bytes_compressed) / bytes_dense_equivalent (1.0 = dense)."""
        if not self.bytes_dense_equivalent:
            return 1.0
        return (self.bytes_dense + self.bytes_compressed) / self.bytes_dense_equivalent

    @classmethod
    def from_proto(cls, m):
        return cls(list(m.tokens_per_layer), m.tokens_total, m.bytes_dense, m.bytes_compressed,
                   m.bytes_dense_equivalent, m.achieved_sparsity_k, m.achieved_sparsity_v,
                   _SCORING_NAMES.get(m.scoring_in_force_k, m.scoring_in_force_k),
                   _SCORING_NAMES.get(m.scoring_in_force_v, m.scoring_in_force_v),
                   m.pruning_backlog_tokens, m.decode_steps, m.chunks, m.chunks_output_aware_k,
                   m.chunks_output_aware_v,
                   _DECODE_COMPUTE_NAMES.get(m.decode_compute_in_force,
                                             m.decode_compute_in_force))


@dataclasses.dataclass
class SessionInfo:
    id: str
    tenant: str
    layout: Layout
    policy: Policy
    ttl_seconds: int
    labels: Dict[str, str]
    create_time_unix_ms: int
    last_access_time_unix_ms: int
    stats: SessionStats
    proto: object = dataclasses.field(repr=False, default=None)  # the Session message

    @classmethod
    def from_proto(cls, m):
        lay = m.layout
        return cls(m.id, m.tenant,
                   Layout(lay.num_layers, lay.num_kv_heads, lay.num_q_heads, lay.head_dim,
                          T.NAMES.get(lay.dtype, "float16")),
                   Policy.from_proto(m.policy), m.ttl_seconds, dict(m.labels),
                   m.create_time_unix_ms, m.last_access_time_unix_ms,
                   SessionStats.from_proto(m.stats), m)


@dataclasses.dataclass
class AppendResult:
    messages: int
    tokens_appended: int
    tokens_per_layer: List[int]


@dataclasses.dataclass
class FlushResult:
    tokens_compressed: int
    stats: SessionStats
    # eligible tokens left dense because their chunk did not fit the byte budget
    tokens_left_dense: int = 0


@dataclasses.dataclass
class ServerInfo:
    version: str
    git_commit: str
    kernel_backend: str
    kernel_variant: str
    max_message_bytes: int
    host_budget_bytes: int
    host_bytes_used: int
    sessions: int
    unimplemented_rpcs: List[str]


@dataclasses.dataclass
class DecodeItem:
    """One session's part of a decode step: q [q_heads, head_dim]; optional new_k/new_v
    [kv_heads, head_dim] appended before attending. Arrays float32 or float16."""
    session_id: str
    layer: int
    q: np.ndarray
    new_k: Optional[np.ndarray] = None
    new_v: Optional[np.ndarray] = None
    want_lse: bool = False
    scale: float = 0.0

    def to_proto(self, wire_dtype=None):
        m = pb.DecodeItem(session_id=self.session_id, layer=int(self.layer),
                          want_lse=bool(self.want_lse), scale=float(self.scale))
        m.q.CopyFrom(T.to_tensor(self.q, wire_dtype))
        if (self.new_k is None) != (self.new_v is None):
            raise ValueError("new_k and new_v go together (both or neither)")
        if self.new_k is not None:
            m.new_k.CopyFrom(T.to_tensor(self.new_k, wire_dtype))
            m.new_v.CopyFrom(T.to_tensor(self.new_v, wire_dtype))
        return m


@dataclasses.dataclass
class DecodeResult:
    out: np.ndarray            # [q_heads, head_dim], float32 (float16 when out_dtype asks)
    lse: Optional[np.ndarray]  # [q_heads] float32 natural-log LSE, or None
    tokens_attended: int

    @classmethod
    def from_proto(cls, m):
        lse = T.from_tensor(m.lse) if m.HasField("lse") else None
        return cls(T.from_tensor(m.out), lse, m.tokens_attended)


# ---------------------------------------------------------------------------------------------
# TLS

def _read_pem(x):
    if x is None:
        return None
    if isinstance(x, bytes):
        return x
    if isinstance(x, str) and "-----BEGIN" in x:
        return x.encode("ascii")
    with open(os.fspath(x), "rb") as f:
        return f.read()


@dataclasses.dataclass
class TlsOptions:
    """TLS for the channel. Each of root_certs, cert_chain, private_key is PEM bytes, a PEM
    string or a file path. root_certs None = the system roots; cert_chain + private_key give
    mutual TLS. server_name_override sets the name checked against the server certificate
    (tests, IP targets)."""
    root_certs: object = None
    cert_chain: object = None
    private_key: object = None
    server_name_override: Optional[str] = None

    def channel_credentials(self):
        if (self.cert_chain is None) != (self.private_key is None):
            raise ValueError("cert_chain and private_key go together (mutual TLS)")
        return grpc.ssl_channel_credentials(root_certificates=_read_pem(self.root_certs),
                                            private_key=_read_pem(self.private_key),
                                            certificate_chain=_read_pem(self.cert_chain))

    def channel_options(self):
        if self.server_name_override:
            return [("grpc.ssl_target_name_override", self.server_name_override)]
        return []


# ---------------------------------------------------------------------------------------------
# client

class Client:
    """A connection to one sparsekv server.

    Client(target="localhost:50051", timeout=10.0, tls=None, metadata=None, options=None,
           token=None)
      timeout: default deadline in seconds for unary calls and bulk streams (None = none);
               every method takes timeout= to override it. DecodeStream has no deadline
               unless given one.
      tls: None (plaintext) or TlsOptions.
      metadata: extra (key, value) pairs sent with every call.
      token: bearer token for a server with --auth=token, sent as
               `authorization: Bearer TOKEN` with every call; None = the SPARSEKV_TOKEN
               environment variable if set; "" = none. Never printed (not in repr).
      session_header: also send x-session-id (the consistent-hash routing key of
               DESIGN.md section 6) with every session-scoped call.
    Usable as a context manager; close() closes the channel."""

    def __init__(self, target=DEFAULT_TARGET, timeout=10.0, tls=None, metadata=None,
                 options=None, session_header=True,
                 append_message_bytes=DEFAULT_APPEND_MESSAGE_BYTES, token=None):
        self.target = target
        self.timeout = timeout
        self.metadata = list(metadata or [])
        if token is None:
            token = os.environ.get(TOKEN_ENV, "")
        if token:
            self.metadata.append(("authorization", "Bearer " + token))
        self.session_header = session_header
        self.append_message_bytes = int(append_message_bytes)
        opts = [("grpc.max_send_message_length", -1), ("grpc.max_receive_message_length", -1)]
        opts += list(options or [])
        if tls is not None:
            if not isinstance(tls, TlsOptions):
                raise TypeError("tls must be a TlsOptions or None")
            self.channel = grpc.secure_channel(target, tls.channel_credentials(),
                                               options=opts + tls.channel_options())
        else:
            self.channel = grpc.insecure_channel(target, options=opts)
        self._calls = {}
        for name, (kind, req, resp) in METHODS.items():
            factory = getattr(self.channel, kind)
            self._calls[name] = factory("/%s/%s" % (SERVICE, name),
                                        request_serializer=lambda m: m.SerializeToString(),
                                        response_deserializer=message_class(resp).FromString)
        self._health = self.channel.unary_unary(
            "/%s/Check" % HEALTH_SERVICE, request_serializer=lambda m: m.SerializeToString(),
            response_deserializer=HealthCheckResponse.FromString)

    # -- plumbing ---------------------------------------------------------------------------
    def close(self):
        self.channel.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
        return False

    def _md(self, session_id=None):
        md = list(self.metadata)
        if self.session_header and session_id:
            md.append(("x-session-id", session_id))
        return md or None

    def _timeout(self, timeout):
        return self.timeout if timeout is None else timeout

    def _unary(self, name, request, session_id=None, timeout=None):
        try:
            return self._calls[name](request, timeout=self._timeout(timeout),
                                     metadata=self._md(session_id))
        except grpc.RpcError as e:
            raise SparsekvError.from_rpc_error(e) from None

    def wait_ready(self, timeout=10.0):
        """Blocks until the channel is connected; SparsekvError UNAVAILABLE on timeout."""
        try:
            grpc.channel_ready_future(self.channel).result(timeout=timeout)
        except grpc.FutureTimeoutError:
            raise SparsekvError("UNAVAILABLE", "no connection to %s within %.1f s"
                                % (self.target, timeout), grpc.StatusCode.UNAVAILABLE) from None

    # -- server -----------------------------------------------------------------------------
    def health(self, service="", timeout=None):
        """Standard gRPC health check (grpc.health.v1.Health/Check) of `service` ('' = the
        whole server): 'SERVING', 'NOT_SERVING', ...; an unknown service name raises
        SparsekvError NOT_FOUND (sparsekv-server's default health service registers only
        '')."""
        try:
            r = self._health(HealthCheckRequest(service=service),
                             timeout=self._timeout(timeout), metadata=self._md())
        except grpc.RpcError as e:
            raise SparsekvError.from_rpc_error(e) from None
        return HealthCheckResponse.DESCRIPTOR.enum_types_by_name["ServingStatus"] \
            .values_by_number[r.status].name

    def server_info(self, timeout=None):
        m = self._unary("GetServerInfo", pb.GetServerInfoRequest(), timeout=timeout)
        return ServerInfo(m.version, m.git_commit, m.kernel_backend, m.kernel_variant,
                          m.max_message_bytes, m.host_budget_bytes, m.host_bytes_used,
                          m.sessions, list(m.unimplemented_rpcs))

    # -- sessions ---------------------------------------------------------------------------
    def create_session(self, layers, kv_heads, q_heads, head_dim, dtype="float16",
                       policy=None, session_id="", tenant="", ttl_seconds=0, labels=None,
                       timeout=None):
        """Creates a session; returns its SessionInfo (id filled in when server-generated)."""
        req = pb.CreateSessionRequest(session_id=session_id, tenant=tenant,
                                      ttl_seconds=int(ttl_seconds))
        req.layout.CopyFrom(pb.Layout(num_layers=int(layers), num_kv_heads=int(kv_heads),
                                      num_q_heads=int(q_heads), head_dim=int(head_dim),
                                      dtype=T.dtype_enum(dtype)))
        if policy is not None:
            req.policy.CopyFrom(policy.to_proto())
        for k, v in (labels or {}).items():
            req.labels[k] = v
        return SessionInfo.from_proto(self._unary("CreateSession", req, session_id, timeout))

    def get_session(self, session_id, timeout=None):
        return SessionInfo.from_proto(
            self._unary("GetSession", pb.GetSessionRequest(session_id=session_id), session_id,
                        timeout))

    def list_sessions(self, tenant="", page_size=0, timeout=None) -> Iterator[SessionInfo]:
        """Iterates over every session (of `tenant`, or all), fetching pages as needed."""
        token = ""
        while True:
            r = self._unary("ListSessions", pb.ListSessionsRequest(
                tenant=tenant, page_size=int(page_size), page_token=token), timeout=timeout)
            for s in r.sessions:
                yield SessionInfo.from_proto(s)
            token = r.next_page_token
            if not token:
                return

    def delete_session(self, session_id, timeout=None):
        """Deletes a session; returns the cache bytes freed."""
        return self._unary("DeleteSession", pb.DeleteSessionRequest(session_id=session_id),
                           session_id, timeout).bytes_freed

    # -- bulk upload ------------------------------------------------------------------------
    def _append_messages(self, session_id, k, v, layer_begin, obs_q, wire_dtype, max_bytes):
        L, Tn = k.shape[0], k.shape[1]
        itemsize = 2 if (wire_dtype in ("float16", "bfloat16", T.FLOAT16, T.BFLOAT16) or
                         (wire_dtype is None and k.dtype == np.float16)) else 4
        row = int(np.prod(k.shape[2:])) * itemsize * 2  # K + V of one token of one layer
        layers_per_msg = L if row * L <= max_bytes else max(1, max_bytes // max(1, row))
        for l0 in range(0, L, layers_per_msg):
            l1 = min(L, l0 + layers_per_msg)
            tokens_per_msg = max(1, max_bytes // max(1, row * (l1 - l0)))
            starts = list(range(0, Tn, tokens_per_msg)) or [0]
            for t0 in starts:
                t1 = min(Tn, t0 + tokens_per_msg)
                m = pb.AppendKVRequest(session_id=session_id, layer_begin=layer_begin + l0)
                m.k.CopyFrom(T.to_tensor(k[l0:l1, t0:t1], wire_dtype))
                m.v.CopyFrom(T.to_tensor(v[l0:l1, t0:t1], wire_dtype))
                if obs_q is not None and t0 == starts[-1]:
                    # after the last tokens of these layers: the queries see the whole prefix
                    m.obs_q.CopyFrom(T.to_tensor(obs_q[l0:l1], wire_dtype))
                yield m

    def append_kv(self, session_id, k, v, layer_begin=0, obs_q=None, wire_dtype=None,
                  max_message_bytes=None, timeout=None):
        """Uploads K/V [layers, tokens, kv_heads, head_dim] (float32 or float16 arrays; the
        server converts to the session dtype) for layers [layer_begin, layer_begin+layers).

        Split into AppendKV messages of <= max_message_bytes (default 4 MiB) along tokens
        (and layers when one token of all layers is larger). obs_q [layers, obs_tokens,
        q_heads, head_dim]: observation-window queries for output-aware scoring, sent with
        the last message of each layer block so that they see the whole upload.
        Returns AppendResult."""
        k = np.asarray(k)
        v = np.asarray(v)
        if k.ndim != 4 or k.shape != v.shape:
            raise ValueError("k and v must both be [layers, tokens, kv_heads, head_dim], got "
                             "%s and %s" % (k.shape, v.shape))
        if obs_q is not None:
            obs_q = np.asarray(obs_q)
            if obs_q.ndim != 4 or obs_q.shape[0] != k.shape[0]:
                raise ValueError("obs_q must be [layers, obs_tokens, q_heads, head_dim] with "
                                 "the layers of k")
        msgs = self._append_messages(session_id, k, v, int(layer_begin), obs_q, wire_dtype,
                                     int(max_message_bytes or self.append_message_bytes))
        try:
            r = self._calls["AppendKV"](msgs, timeout=self._timeout(timeout),
                                        metadata=self._md(session_id))
        except grpc.RpcError as e:
            raise SparsekvError.from_rpc_error(e) from None
        return AppendResult(r.messages, r.tokens_appended, list(r.tokens_per_layer))

    # -- decode -----------------------------------------------------------------------------
    def decode(self, session_id, layer, q, new_k=None, new_v=None, want_lse=False, scale=0.0,
               out_dtype=None, timeout=None) -> Tuple[np.ndarray, Optional[np.ndarray]]:
        """One layer's decode step for one session: appends new_k/new_v [kv_heads, head_dim]
        if given, then attends with q [q_heads, head_dim]. Returns (out [q_heads, head_dim],
        lse [q_heads] or None)."""
        r = self.decode_batch([DecodeItem(session_id, layer, q, new_k, new_v, want_lse, scale)],
                              out_dtype=out_dtype, timeout=timeout)[0]
        return r.out, r.lse

    def decode_batch(self, items: Sequence[DecodeItem], out_dtype=None, request_id=0,
                     timeout=None) -> List[DecodeResult]:
        """One Decode RPC with several items (sessions and/or layers). All items are
        validated before any is applied."""
        req = _decode_request(items, out_dtype, request_id)
        sid = items[0].session_id if items else None
        r = self._unary("Decode", req, sid, timeout)
        return [DecodeResult.from_proto(x) for x in r.results]

    def decode_stream(self, out_dtype=None, timeout=None, session_id=None):
        """Opens a DecodeStream (see DecodeStream). session_id only sets the routing header."""
        return DecodeStream(self, out_dtype=out_dtype, timeout=timeout, session_id=session_id)

    # -- maintenance ------------------------------------------------------------------------
    def flush(self, session_id, timeout=None) -> FlushResult:
        """Compresses every eligible token now; returns once the chunks are published."""
        r = self._unary("Flush", pb.FlushRequest(session_id=session_id), session_id, timeout)
        return FlushResult(r.tokens_compressed, SessionStats.from_proto(r.stats), r.tokens_left_dense)

    def flush_many(self, session_ids, timeout=None) -> List[FlushResult]:
        """Flush of several sessions, issued concurrently (one RPC each)."""
        futs = [(sid, self._calls["Flush"].future(pb.FlushRequest(session_id=sid),
                                                  timeout=self._timeout(timeout),
                                                  metadata=self._md(sid)))
                for sid in session_ids]
        out = []
        for sid, f in futs:
            try:
                r = f.result()
            except grpc.RpcError as e:
                raise SparsekvError.from_rpc_error(e) from None
            out.append(FlushResult(r.tokens_compressed, SessionStats.from_proto(r.stats), r.tokens_left_dense))
        return out

    def read_kv_layers(self, session_id, layer_begin=0, layer_count=0, token_begin=0,
                       token_count=0, timeout=None):
        """Yields (layer, token_begin, k, v) per layer, k/v [rows, kv_heads, head_dim] in the
        session's storage dtype (float16 / float32; bfloat16 comes as float32); pruned
        elements read as 0. The server's pieces of one layer are joined."""
        req = pb.ReadKVRequest(session_id=session_id, layer_begin=int(layer_begin),
                               layer_count=int(layer_count), token_begin=int(token_begin),
                               token_count=int(token_count))
        cur = None
        try:
            for m in self._calls["ReadKV"](req, timeout=self._timeout(timeout),
                                           metadata=self._md(session_id)):
                k, v = T.from_tensor(m.k), T.from_tensor(m.v)
                if cur is not None and cur[0] == m.layer:
                    cur[2].append(k)
                    cur[3].append(v)
                    continue
                if cur is not None:
                    yield cur[0], cur[1], np.concatenate(cur[2]), np.concatenate(cur[3])
                cur = (m.layer, m.token_begin, [k], [v])
        except grpc.RpcError as e:
            raise SparsekvError.from_rpc_error(e) from None
        if cur is not None:
            yield cur[0], cur[1], np.concatenate(cur[2]), np.concatenate(cur[3])

    # -- snapshots and migration ------------------------------------------------------------
    def export_session(self, session_id, timeout=None) -> bytes:
        """The session's snapshot (ExportSession): compressed chunks byte for byte, dense
        tail, scoring statistics, policy, layout, labels and counters, versioned and
        checksummed. Each piece is checked as it arrives: its offset must continue the bytes
        so far, its CRC-32C must match, its format version must be the first piece's, and the
        stream must end with a last piece; otherwise SparsekvError DATA_LOSS."""
        parts, offset, last, version = [], 0, False, None
        try:
            for m in self._calls["ExportSession"](
                    pb.ExportSessionRequest(session_id=session_id),
                    timeout=self._timeout(timeout), metadata=self._md(session_id)):
                where = "ExportSession piece %d" % len(parts)
                if last:
                    raise SparsekvError("DATA_LOSS", "%s comes after the last piece" % where)
                if m.offset != offset:
                    raise SparsekvError("DATA_LOSS", "%s starts at byte %d, expected %d"
                                        % (where, m.offset, offset))
                if crc32c(m.data) != m.crc32c:
                    raise SparsekvError("DATA_LOSS", "%s fails its checksum" % where)
                if version is not None and m.format_version != version:
                    raise SparsekvError("DATA_LOSS", "%s has format version %d, the first had %d"
                                        % (where, m.format_version, version))
                version = m.format_version
                parts.append(m.data)
                offset += len(m.data)
                last = m.last
        except grpc.RpcError as e:
            raise SparsekvError.from_rpc_error(e) from None
        if not last:
            raise SparsekvError("DATA_LOSS", "ExportSession ended before the last piece (%d bytes)"
                                % offset)
        return b"".join(parts)

    def import_session(self, snapshot, piece_bytes=DEFAULT_IMPORT_PIECE_BYTES, session_id=None,
                       format_version=None, timeout=None) -> SessionInfo:
        """Adds the session of a snapshot (export_session's bytes, from this server or
        another) under the id it carries; returns its SessionInfo. It reads and decodes
        bit-identically to the exported one. Sent as ImportSession pieces of piece_bytes (see
        snapshot_pieces). session_id only sets the routing header (x-session-id), for imports
        through a session router. Errors: ALREADY_EXISTS (id taken), DATA_LOSS (damaged,
        truncated or not a snapshot), FAILED_PRECONDITION (another format version),
        RESOURCE_EXHAUSTED (over a budget); nothing is added then."""
        return self.import_session_pieces(snapshot_pieces(snapshot, piece_bytes, format_version),
                                          session_id=session_id, timeout=timeout)

    def import_session_pieces(self, pieces, session_id=None, timeout=None) -> SessionInfo:
        """ImportSession of SessionChunk messages sent as given (offsets, checksums and
        versions unchecked here: the server checks them)."""
        try:
            m = self._calls["ImportSession"](iter(pieces), timeout=self._timeout(timeout),
                                             metadata=self._md(session_id))
        except grpc.RpcError as e:
            raise SparsekvError.from_rpc_error(e) from None
        return SessionInfo.from_proto(m)

    def migrate(self, session_id, to_client, delete=True, timeout=None) -> SessionInfo:
        """Moves a session to the server of `to_client`: export here, import there (with the
        session's routing header), then delete here (delete=False keeps it). Returns the
        imported SessionInfo. The copy is the session as of the export: writes to it here
        after the export are not in it, so stop sending calls for the session first. If the
        import fails, the session stays here untouched and the error is raised."""
        snapshot = self.export_session(session_id, timeout=timeout)
        info = to_client.import_session(snapshot, session_id=session_id, timeout=timeout)
        if delete:
            self.delete_session(session_id, timeout=timeout)
        return info

    def read_kv(self, session_id, layer_begin=0, layer_count=0, token_begin=0, token_count=0,
                timeout=None) -> Tuple[np.ndarray, np.ndarray]:
        """Dense reconstruction as (k, v), each [layers, tokens, kv_heads, head_dim]. Raises
        ValueError when the layers hold different token counts (use read_kv_layers)."""
        parts = list(self.read_kv_layers(session_id, layer_begin, layer_count, token_begin,
                                         token_count, timeout))
        if not parts:
            raise ValueError("ReadKV returned no layers")
        rows = {p[2].shape[0] for p in parts}
        if len(rows) != 1:
            raise ValueError("layers hold different token counts %s; use read_kv_layers"
                             % sorted(rows))
        return np.stack([p[2] for p in parts]), np.stack([p[3] for p in parts])


def _decode_request(items, out_dtype, request_id):
    req = pb.DecodeRequest(out_dtype=T.dtype_enum(out_dtype), request_id=int(request_id))
    for it in items:
        req.items.append(it.to_proto() if isinstance(it, DecodeItem) else it)
    return req


_CLOSE = object()


class DecodeStream:
    """One DecodeStream RPC kept open for many decode steps (lowest latency per step).

        with client.decode_stream() as s:
            out, lse = s.decode(sid, layer, q, new_k, new_v)          # one item
            results = s.step([DecodeItem(...), DecodeItem(...)])      # batch
            rid = s.send(items); ...; results = s.recv()              # pipelined

    Responses come in request order. A failed request raises SparsekvError (code from the
    server's error response, request_id set) from recv()/step() and the stream stays usable;
    a failure of the whole stream (server gone, deadline) raises SparsekvError too and ends
    it."""

    def __init__(self, client, out_dtype=None, timeout=None, session_id=None):
        self._client = client
        self._out_dtype = T.dtype_enum(out_dtype)
        self._q = queue.Queue()
        self._pending = []
        self._next_id = 1
        self._closed = False
        self._lock = threading.Lock()
        self._call = client._calls["DecodeStream"](self._requests(), timeout=timeout,
                                                   metadata=client._md(session_id))

    def _requests(self):
        while True:
            m = self._q.get()
            if m is _CLOSE:
                return
            yield m

    def send(self, items, request_id=None) -> int:
        """Queues one request (a list of DecodeItem, or DecodeItem protos); returns its id."""
        if self._closed:
            raise SparsekvError("FAILED_PRECONDITION", "DecodeStream is closed")
        with self._lock:
            rid = self._next_id if request_id is None else int(request_id)
            self._next_id = rid + 1
            self._pending.append(rid)
        self._q.put(_decode_request(items, self._out_dtype, rid))
        return rid

    def recv(self) -> List[DecodeResult]:
        """Results of the oldest request not yet received."""
        if not self._pending:
            raise SparsekvError("FAILED_PRECONDITION", "recv() without a pending request")
        try:
            r = next(self._call)
        except StopIteration:
            raise SparsekvError("UNAVAILABLE", "DecodeStream ended by the server") from None
        except grpc.RpcError as e:
            self._closed = True
            raise SparsekvError.from_rpc_error(e) from None
        rid = self._pending.pop(0)
        if r.request_id != rid:
            raise SparsekvError("INTERNAL", "response for request %d, expected %d"
                                % (r.request_id, rid))
        if r.error_code:
            raise SparsekvError.from_code_number(r.error_code, r.error_message, rid)
        return [DecodeResult.from_proto(x) for x in r.results]

    def step(self, items) -> List[DecodeResult]:
        self.send(items)
        return self.recv()

    def decode(self, session_id, layer, q, new_k=None, new_v=None, want_lse=False, scale=0.0):
        r = self.step([DecodeItem(session_id, layer, q, new_k, new_v, want_lse, scale)])[0]
        return r.out, r.lse

    def close(self):
        """Half-closes the stream and waits for the server to end it."""
        if self._closed:
            return
        self._closed = True
        self._q.put(_CLOSE)
        try:
            for _ in self._call:  # drains responses to requests never received
                pass
        except grpc.RpcError as e:
            if e.code() != grpc.StatusCode.CANCELLED:
                raise SparsekvError.from_rpc_error(e) from None

    def cancel(self):
        self._closed = True
        self._call.cancel()
        self._q.put(_CLOSE)

    def __enter__(self):
        return self

    def __exit__(self, exc_type, *exc):
        if exc_type is None:
            self.close()
        else:
            self.cancel()
        return False

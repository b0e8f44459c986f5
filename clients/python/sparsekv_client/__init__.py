"""sparsekv_client: Python client of the sparsekv KV-cache service (sparsekv.v1).

    from sparsekv_client import Client, Policy
    with Client("localhost:50051") as c:
        s = c.create_session(layers=2, kv_heads=2, q_heads=8, head_dim=64,
                             policy=Policy.uniform(0.5))
        c.append_kv(s.id, k, v)                     # [layers, tokens, kv_heads, head_dim]
        out, lse = c.decode(s.id, 0, q, want_lse=True)

Needs grpcio, protobuf (any version >= 3.20) and numpy; no generated stubs (see _proto.py).
"""

from .client import (AppendResult, Client, DecodeItem, DecodeResult, DecodeStream, FlushResult,
                     Layout, Policy, ServerInfo, SessionInfo, SessionStats, SparsekvError,
                     TensorPolicy, TlsOptions, crc32c, snapshot_pieces)
from .tensors import from_tensor, to_tensor
from ._proto import pb

__version__ = "0.1.0"

__all__ = ["AppendResult", "Client", "DecodeItem", "DecodeResult", "DecodeStream",
           "FlushResult", "Layout", "Policy", "ServerInfo", "SessionInfo", "SessionStats",
           "SparsekvError", "TensorPolicy", "TlsOptions", "crc32c", "from_tensor",
           "snapshot_pieces", "to_tensor", "pb"]

"""numpy <-> sparsekv.v1.Tensor (raw little-endian bytes + dtype + shape, row-major)."""

import numpy as np

from ._proto import pb

DTYPE_UNSPECIFIED, FLOAT32, FLOAT16, BFLOAT16 = 0, 1, 2, 3
_BY_NAME = {"float32": FLOAT32, "fp32": FLOAT32, "float16": FLOAT16, "fp16": FLOAT16,
            "half": FLOAT16, "bfloat16": BFLOAT16, "bf16": BFLOAT16}
NAMES = {FLOAT32: "float32", FLOAT16: "float16", BFLOAT16: "bfloat16"}
SIZES = {FLOAT32: 4, FLOAT16: 2, BFLOAT16: 2}


def dtype_enum(dtype):
    """'float16' / 'fp16' / np.float16 / DType number -> DType number."""
    if dtype is None:
        return DTYPE_UNSPECIFIED
    if isinstance(dtype, (int, np.integer)) and not isinstance(dtype, bool):
        if int(dtype) not in (0, 1, 2, 3):
            raise ValueError("unknown DType number %d" % dtype)
        return int(dtype)
    if isinstance(dtype, str):
        key = dtype.lower().replace("dtype_", "")
        if key in _BY_NAME:
            return _BY_NAME[key]
        raise ValueError("unknown dtype %r (float32, float16 or bfloat16)" % dtype)
    nd = np.dtype(dtype)
    if nd == np.float32:
        return FLOAT32
    if nd == np.float16:
        return FLOAT16
    raise ValueError("unsupported numpy dtype %s (float32 or float16; bfloat16 by name)" % nd)


def bf16_bits(x):
    """float32 array -> uint16 bfloat16 bits, round to nearest even (NaN stays NaN)."""
    x = np.ascontiguousarray(np.asarray(x, dtype=np.float32))
    u = x.view(np.uint32).astype(np.uint64)
    r = ((u + 0x7FFF + ((u >> 16) & 1)) >> 16).astype(np.uint16)
    nan = np.isnan(x)
    if nan.any():
        r[nan] = ((u[nan] >> 16) | 0x40).astype(np.uint16)
    return r


def to_tensor(x, dtype=None):
    """numpy array (float16/float32; float64 and ints are sent as float32) -> Tensor.

    dtype: wire dtype (None: float16 arrays go as FLOAT16, everything else as FLOAT32;
    'bfloat16' rounds to bf16 on the client)."""
    a = np.asarray(x)
    if dtype is None:
        code = FLOAT16 if a.dtype == np.float16 else FLOAT32
    else:
        code = dtype_enum(dtype)
    if code == FLOAT32:
        data = np.ascontiguousarray(a, dtype="<f4").tobytes()
    elif code == FLOAT16:
        data = np.ascontiguousarray(a, dtype="<f2").tobytes()
    elif code == BFLOAT16:
        data = bf16_bits(a).astype("<u2").tobytes()
    else:
        raise ValueError("tensor dtype must be float32, float16 or bfloat16")
    t = pb.Tensor(dtype=code, data=data)
    t.shape.extend(int(s) for s in a.shape)
    return t


def from_tensor(t):
    """Tensor -> numpy array of its shape: float32 for FLOAT32 and BFLOAT16, float16 for
    FLOAT16. Raises ValueError when the byte length does not match the shape."""
    shape = tuple(int(s) for s in t.shape)
    n = int(np.prod(shape)) if shape else 1
    if t.dtype == FLOAT32:
        a = np.frombuffer(t.data, dtype="<f4").astype(np.float32)
    elif t.dtype == FLOAT16:
        a = np.frombuffer(t.data, dtype="<f2").astype(np.float16)
    elif t.dtype == BFLOAT16:
        a = (np.frombuffer(t.data, dtype="<u2").astype(np.uint32) << 16).view(np.float32)
    else:
        raise ValueError("tensor with dtype %d" % t.dtype)
    if a.size != n:
        raise ValueError("tensor data holds %d elements, shape %s needs %d" % (a.size, shape, n))
    return a.reshape(shape)

"""Parse and check a safetensors header without reading any tensor data.

File layout: 8-byte little-endian header length H, H bytes of JSON header, then the data
section. The JSON maps each tensor name to ``{dtype, shape, data_offsets: [begin, end]}`` with
offsets relative to the data section. We parse it ourselves so a truncated or lying file is
caught before a single tensor is read (a memory-mapped read past the end would crash the process).
"""

from __future__ import annotations

import json
import math
import struct
from dataclasses import dataclass
from pathlib import Path

import torch

from merge_engine.errors import CheckpointError

# safetensors dtype codes -> torch dtypes (the ones this torch build knows). The file format's
# own table: it spans integer and fp8 codes too; the dtypes a merge computes in are merge_engine.dtypes.
_DTYPE_NAMES = {
    "F64": "float64",
    "F32": "float32",
    "F16": "float16",
    "BF16": "bfloat16",
    "I64": "int64",
    "I32": "int32",
    "I16": "int16",
    "I8": "int8",
    "U64": "uint64",
    "U32": "uint32",
    "U16": "uint16",
    "U8": "uint8",
    "BOOL": "bool",
    "C64": "complex64",
    "F8_E4M3": "float8_e4m3fn",
    "F8_E5M2": "float8_e5m2",
    "F8_E8M0": "float8_e8m0fnu",
}
SAFETENSORS_DTYPES: dict[str, torch.dtype] = {
    code: getattr(torch, name) for code, name in _DTYPE_NAMES.items() if hasattr(torch, name)
}
MAX_HEADER_BYTES = 100 * 2**20  # the safetensors format's own limit


@dataclass(frozen=True)
class TensorInfo:
    """Where one tensor sits in a safetensors file (offsets into the data section)."""

    dtype: torch.dtype
    shape: tuple[int, ...]
    begin: int
    end: int

    @property
    def nbytes(self) -> int:
        return self.end - self.begin


def read_header(path: Path) -> dict[str, TensorInfo]:
    """Return ``{tensor name: TensorInfo}`` for ``path``, or raise CheckpointError.

    Checks: the file holds the full header; the header is a JSON object of well-formed entries;
    every entry's byte range lies inside the file and matches its dtype and shape.
    """
    fix = "re-download or re-export the checkpoint"
    try:
        size = path.stat().st_size
        with path.open("rb") as fh:
            prefix = fh.read(8)
            if len(prefix) < 8:
                raise CheckpointError(f"{path} is truncated ({size} bytes, less than a safetensors header); {fix}")
            (header_len,) = struct.unpack("<Q", prefix)
            if header_len > MAX_HEADER_BYTES:
                raise CheckpointError(f"{path} is not a safetensors file (header length {header_len}); {fix}")
            if 8 + header_len > size:
                raise CheckpointError(
                    f"{path} is truncated: its header needs {8 + header_len} bytes but the file has {size}; {fix}"
                )
            raw = fh.read(header_len)
    except OSError as exc:
        reason = exc.strerror or exc
        raise CheckpointError(f"cannot read {path}: {reason}; check the file and its permissions") from None
    try:
        header = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise CheckpointError(f"{path} has a corrupt safetensors header (not JSON); {fix}") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{path} has a corrupt safetensors header (not a JSON object); {fix}")

    data_size = size - 8 - header_len
    out: dict[str, TensorInfo] = {}
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        out[name] = _entry(path, name, entry, data_size, fix)
    return out


def _entry(path: Path, name: str, entry: object, data_size: int, fix: str) -> TensorInfo:
    try:
        code = entry["dtype"]  # type: ignore[index]
        shape = tuple(int(d) for d in entry["shape"])  # type: ignore[index]
        begin, end = (int(x) for x in entry["data_offsets"])  # type: ignore[index]
    except (TypeError, KeyError, ValueError):
        raise CheckpointError(f"{path} has a malformed header entry for tensor {name}; {fix}") from None
    if code not in SAFETENSORS_DTYPES:
        raise CheckpointError(
            f"tensor {name} in {path} has dtype {code}, which this torch build cannot load; "
            "convert the checkpoint to bf16/fp16/fp32"
        )
    if not 0 <= begin <= end or any(d < 0 for d in shape):
        raise CheckpointError(f"{path} has invalid offsets or shape for tensor {name}; {fix}")
    if end > data_size:
        raise CheckpointError(
            f"{path} is truncated: tensor {name} needs data up to byte {end} but the file holds {data_size}; {fix}"
        )
    dtype = SAFETENSORS_DTYPES[code]
    if end - begin != math.prod(shape) * dtype.itemsize:
        raise CheckpointError(
            f"{path} has a corrupt header: tensor {name} spans {end - begin} bytes, "
            f"not the {math.prod(shape) * dtype.itemsize} its shape {list(shape)} and dtype {code} need; {fix}"
        )
    return TensorInfo(dtype=dtype, shape=shape, begin=begin, end=end)

"""A bounded safetensors reader and an atomic writer.

Only a regular file is read, opened once: every length, offset and shape in the
header is checked against the file size before the data section of that same open
file is mapped; tensors come back as zero-copy read-only memmap views.
"""

from __future__ import annotations

import json
import math
import os
import struct
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping, NoReturn

import ml_dtypes
import numpy as np

from kiln.ir.errors import ModelFormatError
from kiln.ir.files import open_regular

# The reference implementation refuses headers above 100 MB; so do we, before reading one.
MAX_HEADER_BYTES = 100_000_000
MAX_DIMS = 8
# numpy (and torch) refuse arrays whose size in bytes, ignoring zero dims, does not fit an int64.
MAX_EXTENT_BYTES = 2**63 - 1

DTYPES: dict[str, np.dtype] = {
    "F64": np.dtype("<f8"),
    "F32": np.dtype("<f4"),
    "F16": np.dtype("<f2"),
    "BF16": np.dtype(ml_dtypes.bfloat16),
    "I64": np.dtype("<i8"),
    "I32": np.dtype("<i4"),
    "I16": np.dtype("<i2"),
    "I8": np.dtype("i1"),
    "U64": np.dtype("<u8"),
    "U32": np.dtype("<u4"),
    "U16": np.dtype("<u2"),
    "U8": np.dtype("u1"),
    "BOOL": np.dtype("?"),
    "F8_E4M3": np.dtype(ml_dtypes.float8_e4m3fn),
    "F8_E5M2": np.dtype(ml_dtypes.float8_e5m2),
}
_DTYPE_NAMES: dict[np.dtype, str] = {dtype: name for name, dtype in DTYPES.items()}


@dataclass(frozen=True)
class TensorInfo:
    """One header entry; ``begin``/``end`` are byte offsets into the data section."""

    name: str
    dtype_name: str
    dtype: np.dtype
    shape: tuple[int, ...]
    begin: int
    end: int

    @property
    def nbytes(self) -> int:
        return self.end - self.begin


def _reject_duplicate_keys(pairs: list[tuple[str, object]]) -> dict:
    result: dict = {}
    for key, value in pairs:
        if key in result:
            raise _DuplicateKey(key)
        result[key] = value
    return result


class _DuplicateKey(ValueError):
    def __init__(self, key: str):
        super().__init__(key)
        self.key = key


def _is_int(value: object) -> bool:
    # JSON true/false arrive as bool, which Python counts as int; a shape of `true` is not 1.
    return isinstance(value, int) and not isinstance(value, bool)


class SafetensorsFile:
    """A validated safetensors file, its data section mapped read-only (nothing is read until used).

    ``metadata`` is the ``__metadata__`` map (str -> str), ``tensors`` maps each
    name to its ``TensorInfo`` in header order, ``data_offset`` is where the data
    section starts in the file.
    """

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        with open_regular(self.path, "safetensors file") as handle:
            file_size = os.fstat(handle.fileno()).st_size
            if file_size < 8:
                self._fail(f"expected at least 8 bytes (the header length), found a {file_size}-byte file")
            (header_len,) = struct.unpack("<Q", handle.read(8))
            if header_len > file_size - 8:
                self._fail(
                    f"header length {header_len} runs past the end of the {file_size}-byte file; "
                    f"expected at most {file_size - 8}"
                )
            if header_len > MAX_HEADER_BYTES:
                self._fail(f"header length {header_len} exceeds the {MAX_HEADER_BYTES}-byte limit")
            header_bytes = handle.read(header_len)
            if len(header_bytes) != header_len:
                self._fail(f"expected a {header_len}-byte header, read {len(header_bytes)} bytes (file changed?)")
            self.data_offset = 8 + header_len
            self.data_size = file_size - self.data_offset
            self.metadata, self.tensors = self._parse_header(header_bytes)
            self._raw = self._map(handle)

    def _map(self, handle) -> np.ndarray:
        if self.data_size == 0:
            return np.empty(0, dtype=np.uint8)
        try:
            # The map holds its own reference to the open file: what was checked is what is read.
            return np.memmap(handle, dtype=np.uint8, mode="r", offset=self.data_offset, shape=(self.data_size,))
        except (ValueError, OSError) as err:
            self._fail(f"expected {self.data_size} data bytes to map, mapping failed ({err})")

    def _fail(self, message: str, tensor: str | None = None) -> NoReturn:
        where = f"{self.path}" if tensor is None else f"{self.path}: tensor {tensor!r}"
        raise ModelFormatError(
            f"{where}: {message}; the safetensors file is corrupt or truncated, re-create or re-download it"
        )

    def _parse_header(self, header_bytes: bytes) -> tuple[dict[str, str], dict[str, TensorInfo]]:
        try:
            text = header_bytes.decode("utf-8")
        except UnicodeDecodeError as err:
            self._fail(f"expected a UTF-8 JSON header, found invalid UTF-8 at byte {err.start}")
        try:
            header = json.loads(text, object_pairs_hook=_reject_duplicate_keys)
        except _DuplicateKey as err:
            self._fail(f"expected unique keys in the JSON header, found {err.key!r} twice")
        except (ValueError, RecursionError) as err:
            self._fail(f"expected a JSON header, found unparsable text ({str(err).splitlines()[0]})")
        if not isinstance(header, dict):
            self._fail(f"expected the header to be a JSON object, found {type(header).__name__}")

        # The reference writer may emit "__metadata__": null for no metadata.
        metadata = header.pop("__metadata__", None)
        if metadata is None:
            metadata = {}
        if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
            self._fail("expected __metadata__ to be an object of string values")

        tensors: dict[str, TensorInfo] = {}
        for name, entry in header.items():
            tensors[name] = self._parse_entry(name, entry)
        self._check_no_overlap(tensors)
        return dict(metadata), tensors

    def _parse_entry(self, name: str, entry: object) -> TensorInfo:
        if not isinstance(entry, dict):
            self._fail(f"expected an object with dtype/shape/data_offsets, found {type(entry).__name__}", name)
        for key in ("dtype", "shape", "data_offsets"):
            if key not in entry:
                self._fail(f"expected a {key!r} field, found keys {sorted(entry)}", name)
        dtype_name = entry["dtype"]
        if not isinstance(dtype_name, str) or dtype_name not in DTYPES:
            self._fail(f"expected dtype one of {', '.join(DTYPES)}, found {dtype_name!r}", name)
        shape = entry["shape"]
        if (
            not isinstance(shape, list)
            or len(shape) > MAX_DIMS
            or not all(_is_int(dim) and dim >= 0 for dim in shape)
        ):
            self._fail(f"expected shape to be a list of at most {MAX_DIMS} non-negative integers, found {shape!r}", name)
        if math.prod(max(dim, 1) for dim in shape) * DTYPES[dtype_name].itemsize > MAX_EXTENT_BYTES:
            self._fail(f"expected a shape whose size in bytes (zero dims aside) fits in 64 bits, found {shape!r}", name)
        offsets = entry["data_offsets"]
        if not isinstance(offsets, list) or len(offsets) != 2 or not all(_is_int(v) for v in offsets):
            self._fail(f"expected data_offsets to be [begin, end] integers, found {offsets!r}", name)
        begin, end = offsets
        if not 0 <= begin <= end <= self.data_size:
            self._fail(
                f"expected data_offsets with 0 <= begin <= end <= {self.data_size} (the data section size), "
                f"found [{begin}, {end}]",
                name,
            )
        dtype = DTYPES[dtype_name]
        # Python ints do not overflow, so a hostile shape cannot wrap around to match.
        expected = math.prod(shape) * dtype.itemsize
        if end - begin != expected:
            self._fail(
                f"expected {expected} bytes for {dtype_name}{shape}, found data_offsets spanning {end - begin}",
                name,
            )
        return TensorInfo(name, dtype_name, dtype, tuple(shape), begin, end)

    def _check_no_overlap(self, tensors: dict[str, TensorInfo]) -> None:
        # Empty tensors share no bytes with anything, wherever they claim to sit.
        ranges = sorted((info.begin, info.end, info.name) for info in tensors.values() if info.end > info.begin)
        for (_, prev_end, prev_name), (begin, end, name) in zip(ranges, ranges[1:]):
            if begin < prev_end:
                self._fail(
                    f"expected tensors not to overlap, found bytes [{begin}, {end}) overlapping "
                    f"{prev_name!r} which ends at {prev_end}",
                    name,
                )

    def __contains__(self, name: object) -> bool:
        return name in self.tensors

    def __len__(self) -> int:
        return len(self.tensors)

    def keys(self) -> list[str]:
        return list(self.tensors)

    def array(self, name: str) -> np.ndarray:
        """The tensor as a read-only array viewing the file's bytes (no copy)."""
        info = self.tensors.get(name)
        if info is None:
            raise ModelFormatError(f"{self.path}: no tensor named {name!r}; the file holds {len(self.tensors)} tensors")
        if info.begin == info.end:
            empty = np.empty(info.shape, dtype=info.dtype)
            empty.flags.writeable = False
            return empty
        return self._raw[info.begin : info.end].view(info.dtype).reshape(info.shape)

    def arrays(self) -> dict[str, np.ndarray]:
        return {name: self.array(name) for name in self.tensors}


def write_safetensors(
    path: str | os.PathLike,
    arrays: Mapping[str, np.ndarray],
    metadata: Mapping[str, str] | None = None,
) -> None:
    """Write ``arrays`` as a safetensors file, atomically (temp file + os.replace)."""
    path = Path(path)
    if metadata is not None and not all(isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()):
        raise TypeError("safetensors metadata must map str to str")
    prepared: list[tuple[str, str, np.ndarray]] = []
    for name, value in arrays.items():
        if not isinstance(name, str) or name == "__metadata__":
            raise ValueError(f"invalid safetensors tensor name {name!r}")
        array = np.asarray(value)
        dtype = array.dtype.newbyteorder("<") if array.dtype.byteorder == ">" else array.dtype
        dtype_name = _DTYPE_NAMES.get(dtype)
        if dtype_name is None:
            raise TypeError(f"tensor {name!r}: dtype {array.dtype} has no safetensors equivalent")
        prepared.append((name, dtype_name, np.asarray(array, dtype=dtype, order="C")))
    # Widest items first keeps every tensor aligned to its itemsize after the 8-aligned header.
    prepared.sort(key=lambda item: (-item[2].dtype.itemsize, item[0]))

    header: dict[str, object] = {}
    if metadata:
        header["__metadata__"] = dict(metadata)
    position = 0
    for name, dtype_name, array in prepared:
        header[name] = {"dtype": dtype_name, "shape": list(array.shape), "data_offsets": [position, position + array.nbytes]}
        position += array.nbytes
    header_bytes = json.dumps(header, separators=(",", ":")).encode("utf-8")
    header_bytes += b" " * (-len(header_bytes) % 8)

    fd, temp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(struct.pack("<Q", len(header_bytes)))
            handle.write(header_bytes)
            for _, _, array in prepared:
                if array.nbytes:
                    handle.write(array.reshape(-1).view(np.uint8).data)
            handle.flush()
            os.fsync(handle.fileno())
        # mkstemp creates the file 0600; a weights file should be readable like any other.
        os.chmod(temp_name, 0o644)
        os.replace(temp_name, path)
    except BaseException:
        try:
            os.unlink(temp_name)
        except FileNotFoundError:
            pass
        raise

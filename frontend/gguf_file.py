"""A bounded reader for GGUF files (versions 2 and 3).

The header is parsed here with struct over a read-only memory map of one regular
file (opened once, so what is hashed and read is the file that was checked), and
every count, length, dimension and offset is checked against the file size before
anything is allocated or looped over; tensor data stays in the map until asked for.
"""

from __future__ import annotations

import hashlib
import os
import struct
from dataclasses import dataclass
from typing import Any

import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, GGUFValueType
from gguf import quants as gguf_quants

from kiln.ir.errors import ModelFormatError
from kiln.ir.files import open_regular

GGUF_MAGIC = b"GGUF"
SUPPORTED_VERSIONS = (2, 3)
DEFAULT_ALIGNMENT = 32
MAX_DIMS = 4  # GGML_MAX_DIMS
MAX_ARRAY_NESTING = 4
# Floats, the legacy Q*_0 / Q*_1 and the K-quant types (Q4_K_M, Q5_K_M, Q6_K files hold those);
# the IQ and TQ types, whose blocks index codebooks, are not read yet.
DEQUANTIZABLE = (GGMLQuantizationType.F32, GGMLQuantizationType.F16, GGMLQuantizationType.BF16,
                 GGMLQuantizationType.Q8_0, GGMLQuantizationType.Q4_0, GGMLQuantizationType.Q4_1,
                 GGMLQuantizationType.Q5_0, GGMLQuantizationType.Q5_1, GGMLQuantizationType.Q2_K,
                 GGMLQuantizationType.Q3_K, GGMLQuantizationType.Q4_K, GGMLQuantizationType.Q5_K,
                 GGMLQuantizationType.Q6_K)

# struct format of each fixed-size scalar value type (all little-endian).
_SCALAR_FORMATS = {
    GGUFValueType.UINT8: "<B", GGUFValueType.INT8: "<b", GGUFValueType.UINT16: "<H",
    GGUFValueType.INT16: "<h", GGUFValueType.UINT32: "<I", GGUFValueType.INT32: "<i",
    GGUFValueType.FLOAT32: "<f", GGUFValueType.BOOL: "<B", GGUFValueType.UINT64: "<Q",
    GGUFValueType.INT64: "<q", GGUFValueType.FLOAT64: "<d",
}
_NUMPY_DTYPES = {
    GGUFValueType.UINT8: "<u1", GGUFValueType.INT8: "<i1", GGUFValueType.UINT16: "<u2",
    GGUFValueType.INT16: "<i2", GGUFValueType.UINT32: "<u4", GGUFValueType.INT32: "<i4",
    GGUFValueType.FLOAT32: "<f4", GGUFValueType.BOOL: "<u1", GGUFValueType.UINT64: "<u8",
    GGUFValueType.INT64: "<i8", GGUFValueType.FLOAT64: "<f8",
}
_INTEGER_TYPES = frozenset({GGUFValueType.UINT8, GGUFValueType.INT8, GGUFValueType.UINT16, GGUFValueType.INT16,
                            GGUFValueType.UINT32, GGUFValueType.INT32, GGUFValueType.UINT64, GGUFValueType.INT64})
_FLOAT_TYPES = frozenset({GGUFValueType.FLOAT32, GGUFValueType.FLOAT64})


def _min_value_size(value_type: GGUFValueType) -> int:
    """Fewest bytes one value of this type can take (strings and arrays: their length field)."""
    if value_type == GGUFValueType.STRING:
        return 8
    if value_type == GGUFValueType.ARRAY:
        return 12
    return struct.calcsize(_SCALAR_FORMATS[value_type])


# Well-known keys and the value kinds they must have. "<arch>" is replaced by general.architecture.
_KIND_INT, _KIND_FLOAT, _KIND_STR, _KIND_BOOL = "integer", "float", "string", "bool"
_KNOWN_KEYS = {
    "general.architecture": _KIND_STR,
    "general.name": _KIND_STR,
    "general.file_type": _KIND_INT,
    "general.quantization_version": _KIND_INT,
    "<arch>.block_count": _KIND_INT,
    "<arch>.context_length": _KIND_INT,
    "<arch>.embedding_length": _KIND_INT,
    "<arch>.feed_forward_length": _KIND_INT,
    "<arch>.vocab_size": _KIND_INT,
    "<arch>.attention.head_count": _KIND_INT,
    "<arch>.attention.key_length": _KIND_INT,
    "<arch>.attention.value_length": _KIND_INT,
    "<arch>.attention.layer_norm_rms_epsilon": _KIND_FLOAT,
    "<arch>.rope.freq_base": _KIND_FLOAT,
    "<arch>.rope.dimension_count": _KIND_INT,
    "tokenizer.ggml.model": _KIND_STR,
    "tokenizer.ggml.pre": _KIND_STR,
    "tokenizer.ggml.bos_token_id": _KIND_INT,
    "tokenizer.ggml.eos_token_id": _KIND_INT,
    "tokenizer.ggml.eot_token_id": _KIND_INT,
    "tokenizer.ggml.eom_token_id": _KIND_INT,
    "tokenizer.ggml.padding_token_id": _KIND_INT,
    "tokenizer.ggml.unknown_token_id": _KIND_INT,
    "tokenizer.ggml.add_bos_token": _KIND_BOOL,
    "tokenizer.ggml.add_eos_token": _KIND_BOOL,
    "tokenizer.chat_template": _KIND_STR,
}
_KNOWN_ARRAY_KEYS = {
    "tokenizer.ggml.tokens": _KIND_STR,
    "tokenizer.ggml.merges": _KIND_STR,
    "tokenizer.ggml.token_type": _KIND_INT,
    "tokenizer.ggml.scores": _KIND_FLOAT,
}


def _kind_of(value_type: GGUFValueType) -> str:
    if value_type in _INTEGER_TYPES:
        return _KIND_INT
    if value_type in _FLOAT_TYPES:
        return _KIND_FLOAT
    if value_type == GGUFValueType.STRING:
        return _KIND_STR
    if value_type == GGUFValueType.BOOL:
        return _KIND_BOOL
    return "array"


@dataclass(frozen=True)
class TensorInfo:
    """One tensor's entry: shape in numpy order (GGUF stores it innermost first); offset from the data start."""

    name: str
    shape: tuple[int, ...]
    ggml_type: GGMLQuantizationType
    offset: int
    nbytes: int

    @property
    def row_bytes(self) -> int:
        block_size, type_size = GGML_QUANT_SIZES[self.ggml_type]
        return (self.shape[-1] if self.shape else 1) // block_size * type_size


class _Cursor:
    """Reads little-endian values from a buffer, refusing any read past its end."""

    def __init__(self, gguf: "GGUFFile", buffer: memoryview) -> None:
        self.gguf = gguf
        self.buffer = buffer
        self.size = len(buffer)
        self.pos = 0

    def remaining(self) -> int:
        return self.size - self.pos

    def need(self, nbytes: int, field: str) -> None:
        if nbytes > self.remaining():
            self.gguf._fail(field, f"{nbytes} more bytes at offset {self.pos}",
                            f"{self.remaining()} (file truncated or length corrupt)")

    def scalar(self, fmt: str, field: str) -> Any:
        size = struct.calcsize(fmt)
        self.need(size, field)
        (value,) = struct.unpack_from(fmt, self.buffer, self.pos)
        self.pos += size
        return value

    def string(self, field: str) -> str:
        length = self.scalar("<Q", field + " (string length)")
        self.need(length, field)
        raw = bytes(self.buffer[self.pos:self.pos + length])
        self.pos += length
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError:
            self.gguf._fail(field, "a UTF-8 string", f"{length} bytes that are not UTF-8")

    def value_type(self, field: str) -> GGUFValueType:
        code = self.scalar("<I", field + " (value type)")
        try:
            return GGUFValueType(code)
        except ValueError:
            self.gguf._fail(field, "a GGUF value type 0..12", str(code))

    def value(self, value_type: GGUFValueType, field: str) -> Any:
        """A scalar or string; an array comes back as (element type, items)."""
        if value_type == GGUFValueType.STRING:
            return self.string(field)
        if value_type == GGUFValueType.ARRAY:
            return self.array(field, 0)
        value = self.scalar(_SCALAR_FORMATS[value_type], field)
        return bool(value) if value_type == GGUFValueType.BOOL else value

    def array(self, field: str, depth: int) -> tuple[GGUFValueType, list]:
        if depth >= MAX_ARRAY_NESTING:
            self.gguf._fail(field, f"arrays nested at most {MAX_ARRAY_NESTING} deep", "deeper nesting")
        element_type = self.value_type(field + " (array element type)")
        count = self.scalar("<Q", field + " (array length)")
        # Bound the count by the bytes left before looping or allocating anything.
        self.need(count * _min_value_size(element_type), f"{field} (array of {count} {element_type.name})")
        if element_type in _NUMPY_DTYPES:
            dtype = np.dtype(_NUMPY_DTYPES[element_type])
            values = np.frombuffer(self.buffer, dtype=dtype, count=count, offset=self.pos)
            self.pos += count * dtype.itemsize
            items = values.astype(bool).tolist() if element_type == GGUFValueType.BOOL else values.tolist()
            return element_type, items
        if element_type == GGUFValueType.ARRAY:
            # Nested arrays keep only their items; their element types are not recorded.
            return element_type, [self.array(f"{field}[{i}]", depth + 1)[1] for i in range(count)]
        return element_type, [self.string(f"{field}[{i}]") for i in range(count)]


class GGUFFile:
    """A parsed, validated GGUF file; tensor data is read lazily from a read-only memory map.

    metadata: key -> Python value (arrays become lists); metadata_types: key -> GGUFValueType,
    or (GGUFValueType.ARRAY, element type) for arrays. tensors: name -> TensorInfo, in file order.
    """

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = os.fspath(path)
        with open_regular(self.path, "GGUF file") as handle:
            file_size = os.fstat(handle.fileno()).st_size
            self.file_size = file_size
            if file_size < 24:
                self._fail("header", "at least 24 bytes (magic, version, counts)", f"a file of {file_size} bytes")
            try:
                # The map holds its own reference to the file: closing the handle keeps it valid.
                self._map = np.memmap(handle, dtype=np.uint8, mode="r", shape=(file_size,))
            except (OSError, ValueError) as err:
                raise ModelFormatError(f"{self.path}: cannot map the GGUF file ({err}); check its permissions") from None
        cursor = _Cursor(self, memoryview(self._map))

        magic = bytes(self._map[:4])
        if magic != GGUF_MAGIC:
            self._fail("magic", repr(GGUF_MAGIC), repr(magic))
        cursor.pos = 4
        self.version = cursor.scalar("<I", "version")
        if self.version not in SUPPORTED_VERSIONS:
            self._fail("version", f"one of {SUPPORTED_VERSIONS}", str(self.version))
        tensor_count = cursor.scalar("<Q", "tensor_count")
        kv_count = cursor.scalar("<Q", "kv_count")
        # Smallest possible entries: key len + type + 1-byte value; name len + n_dims + type + offset.
        cursor.need(kv_count * 13 + tensor_count * 24, f"kv_count {kv_count} and tensor_count {tensor_count}")

        self.metadata: dict[str, Any] = {}
        self.metadata_types: dict[str, Any] = {}
        for index in range(kv_count):
            key = cursor.string(f"metadata key #{index}")
            if key in self.metadata:
                self._fail(f"metadata key {key!r}", "unique metadata keys", "a duplicate")
            value_type = cursor.value_type(key)
            value = cursor.value(value_type, key)
            if value_type == GGUFValueType.ARRAY:
                element_type, value = value
                self.metadata_types[key] = (GGUFValueType.ARRAY, element_type)
            else:
                self.metadata_types[key] = value_type
            self.metadata[key] = value
        self._check_known_keys()

        self.alignment = self._read_alignment()
        infos = []
        seen: set[str] = set()
        for index in range(tensor_count):
            name = cursor.string(f"tensor #{index} name")
            if name in seen:
                self._fail(f"tensor {name!r}", "unique tensor names", "a duplicate")
            seen.add(name)
            n_dims = cursor.scalar("<I", f"tensor {name!r} n_dims")
            if n_dims > MAX_DIMS:
                self._fail(f"tensor {name!r} n_dims", f"at most {MAX_DIMS}", str(n_dims))
            dims = [cursor.scalar("<Q", f"tensor {name!r} dim {i}") for i in range(n_dims)]
            type_code = cursor.scalar("<I", f"tensor {name!r} type")
            try:
                ggml_type = GGMLQuantizationType(type_code)
            except ValueError:
                self._fail(f"tensor {name!r} type", "a known ggml type", str(type_code))
            if ggml_type not in GGML_QUANT_SIZES:
                self._fail(f"tensor {name!r} type", "a ggml type with a known block size", ggml_type.name)
            offset = cursor.scalar("<Q", f"tensor {name!r} offset")
            infos.append((name, dims, ggml_type, offset))

        header_end = cursor.pos
        self.data_offset = header_end + (-header_end) % self.alignment
        if tensor_count and self.data_offset > file_size:
            self._fail("tensor data", f"data section at offset {self.data_offset}", f"a file of {file_size} bytes")
        data_size = max(file_size - self.data_offset, 0)

        self.tensors: dict[str, TensorInfo] = {}
        for name, dims, ggml_type, offset in infos:
            self.tensors[name] = self._tensor_info(name, dims, ggml_type, offset, data_size)
        self._check_overlaps()

    def _fail(self, field: str, expected: str, found: str):
        raise ModelFormatError(f"{self.path}: GGUF {field}: expected {expected}, found {found}; "
                               "the file is damaged or not a GGUF model")

    def _check_known_keys(self) -> None:
        arch = self.metadata.get("general.architecture")
        for pattern, kind in _KNOWN_KEYS.items():
            if pattern.startswith("<arch>"):
                if not isinstance(arch, str):
                    continue
                key = arch + pattern[len("<arch>"):]
            else:
                key = pattern
            if key in self.metadata_types:
                found_type = self.metadata_types[key]
                found_kind = _kind_of(found_type) if not isinstance(found_type, tuple) else "array"
                if found_kind != kind:
                    article = "an" if kind[0] in "aeiou" else "a"
                    self._fail(f"metadata {key!r}", f"{article} {kind}", self._describe_type(key))
        for key, kind in _KNOWN_ARRAY_KEYS.items():
            if key in self.metadata_types:
                found_type = self.metadata_types[key]
                if not isinstance(found_type, tuple) or _kind_of(found_type[1]) != kind:
                    self._fail(f"metadata {key!r}", f"an array of {kind}", self._describe_type(key))

    def _describe_type(self, key: str) -> str:
        found = self.metadata_types[key]
        if isinstance(found, tuple):
            return f"an array of {found[1].name}"
        return f"a {found.name} value"

    def _read_alignment(self) -> int:
        if "general.alignment" not in self.metadata:
            return DEFAULT_ALIGNMENT
        value = self.metadata["general.alignment"]
        if self.metadata_types["general.alignment"] != GGUFValueType.UINT32:
            self._fail("metadata 'general.alignment'", "a UINT32", self._describe_type("general.alignment"))
        if value <= 0 or value & (value - 1):
            self._fail("metadata 'general.alignment'", "a positive power of two", str(value))
        return value

    def _tensor_info(self, name: str, dims: list[int], ggml_type: GGMLQuantizationType, offset: int,
                     data_size: int) -> TensorInfo:
        block_size, type_size = GGML_QUANT_SIZES[ggml_type]
        if 0 in dims:
            # A tensor with no elements holds nothing, and its other dims are then bounded by nothing.
            self._fail(f"tensor {name!r} dims", "dims of at least 1 (a tensor with elements)",
                       f"{list(dims)} (no elements)")
        inner = dims[0] if dims else 1
        if inner % block_size:
            self._fail(f"tensor {name!r} dim 0", f"a multiple of the {ggml_type.name} block size {block_size}", str(inner))
        n_elements = 1
        for dim in dims:
            n_elements *= dim  # Python ints: no overflow, and bounded just below
        nbytes = n_elements // block_size * type_size
        if offset % self.alignment:
            self._fail(f"tensor {name!r} offset", f"a multiple of the alignment {self.alignment}", str(offset))
        if offset + nbytes > data_size:
            self._fail(f"tensor {name!r} extent",
                       f"offset + size within the {data_size}-byte data section",
                       f"offset {offset} + {nbytes} bytes (out of range or file truncated)")
        return TensorInfo(name, tuple(reversed(dims)), ggml_type, offset, nbytes)

    def _check_overlaps(self) -> None:
        by_offset = sorted(self.tensors.values(), key=lambda t: (t.offset, t.nbytes))
        for before, after in zip(by_offset, by_offset[1:]):
            if after.offset < before.offset + before.nbytes:
                self._fail(f"tensor {after.name!r} offset",
                           f"no overlap with tensor {before.name!r} (ends at {before.offset + before.nbytes})",
                           str(after.offset))

    def sha256(self) -> str:
        """sha256 of the whole file, read through the same map the tensors come from."""
        return hashlib.sha256(memoryview(self._map)).hexdigest()

    @property
    def architecture(self) -> str | None:
        return self.metadata.get("general.architecture")

    def _info(self, name: str) -> TensorInfo:
        try:
            return self.tensors[name]
        except KeyError:
            raise ModelFormatError(f"{self.path}: GGUF has no tensor {name!r}; expected one of its "
                                   f"{len(self.tensors)} tensors") from None

    def raw(self, name: str) -> np.ndarray:
        """The tensor's bytes as stored, as a read-only uint8 view [*shape[:-1], row_bytes] of the map."""
        info = self._info(name)
        start = self.data_offset + info.offset
        flat = self._map[start:start + info.nbytes]
        outer = info.shape[:-1]
        return flat.reshape((*outer, info.row_bytes))

    def dequantize(self, name: str) -> np.ndarray:
        """The tensor as float32 in numpy order, for the DEQUANTIZABLE types (blocks by the gguf package)."""
        info = self._info(name)
        if info.ggml_type not in DEQUANTIZABLE:
            raise ModelFormatError(
                f"{self.path}: tensor {name!r} has ggml type {info.ggml_type.name}; kiln dequantizes only "
                f"{', '.join(t.name for t in DEQUANTIZABLE)}; quantize the original model to one of those "
                "(llama.cpp's llama-quantize, e.g. Q4_K_M)")
        raw = self.raw(name)
        if info.ggml_type == GGMLQuantizationType.F32:
            return np.array(raw.view("<f4"), dtype=np.float32).reshape(info.shape)
        if info.ggml_type == GGMLQuantizationType.F16:
            return raw.view("<f2").astype(np.float32).reshape(info.shape)
        if info.ggml_type == GGMLQuantizationType.BF16:
            # bf16 is the top half of an fp32.
            return (raw.view("<u2").astype(np.uint32) << 16).view(np.float32).reshape(info.shape)
        return np.asarray(gguf_quants.dequantize(raw, info.ggml_type), dtype=np.float32).reshape(info.shape)

"""Tests for kiln's bounded safetensors reader and writer.

Round trips are checked against the `safetensors` package; each malformed-file
test plants one specific defect and expects a one-line ModelFormatError.
"""

import json
import os
import struct

import ml_dtypes
import numpy as np
import pytest
import safetensors.numpy
import torch
from safetensors import safe_open
from safetensors.torch import save_file as torch_save_file

from kiln.frontend.safetensors_file import MAX_HEADER_BYTES, SafetensorsFile, write_safetensors
from kiln.ir.errors import ModelFormatError


def sample_arrays() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    return {
        "f64": rng.standard_normal((3, 2)),
        "f32": rng.standard_normal((4, 5)).astype(np.float32),
        "f16": rng.standard_normal((7,)).astype(np.float16),
        "bf16": rng.standard_normal((2, 3)).astype(ml_dtypes.bfloat16),
        "i64": rng.integers(-(2**40), 2**40, (2, 2), dtype=np.int64),
        "i32": rng.integers(-100, 100, (3,), dtype=np.int32),
        "i16": rng.integers(-100, 100, (1, 1, 3), dtype=np.int16),
        "i8": rng.integers(-100, 100, (5,), dtype=np.int8),
        "u8": rng.integers(0, 255, (2, 4), dtype=np.uint8),
        "bool": rng.integers(0, 2, (3, 3)).astype(bool),
        "scalar": np.array(2.5, dtype=np.float32),
        "empty": np.zeros((0, 3), dtype=np.float32),
    }


def write_raw(path, header, data: bytes = b"", header_len: int | None = None) -> None:
    """A file with exactly the given header (object, str or bytes) and data, defects included."""
    if isinstance(header, (dict, list)):
        header = json.dumps(header)
    if isinstance(header, str):
        header = header.encode("utf-8")
    length = len(header) if header_len is None else header_len
    path.write_bytes(struct.pack("<Q", length) + header + data)


def expect_error(path, *fragments: str) -> str:
    with pytest.raises(ModelFormatError) as info:
        SafetensorsFile(path)
    message = str(info.value)
    assert "\n" not in message
    assert str(path) in message
    for fragment in fragments:
        assert fragment in message, message
    return message


def entry(dtype="F32", shape=(2,), offsets=(0, 8)):
    return {"dtype": dtype, "shape": list(shape), "data_offsets": list(offsets)}


# --- round trips against the safetensors package ---------------------------------


def test_reads_file_written_by_safetensors_numpy(tmp_path):
    arrays = sample_arrays()
    path = tmp_path / "ref.safetensors"
    safetensors.numpy.save_file(arrays, str(path), metadata={"format": "np", "note": "x"})
    file = SafetensorsFile(path)
    assert file.metadata == {"format": "np", "note": "x"}
    assert set(file.tensors) == set(arrays)
    for name, expected in arrays.items():
        got = file.array(name)
        assert got.dtype == expected.dtype and got.shape == expected.shape, name
        np.testing.assert_array_equal(got, expected)
        assert file.tensors[name].shape == expected.shape


def test_reads_bf16_and_fp8_written_by_safetensors_torch(tmp_path):
    tensors = {
        "bf16": torch.randn(3, 4).to(torch.bfloat16),
        "e4m3": torch.randn(5).to(torch.float8_e4m3fn),
        "e5m2": torch.randn(2, 2).to(torch.float8_e5m2),
    }
    path = tmp_path / "torch.safetensors"
    torch_save_file(tensors, str(path))
    file = SafetensorsFile(path)
    assert file.tensors["bf16"].dtype_name == "BF16"
    assert file.array("e4m3").dtype == ml_dtypes.float8_e4m3fn
    assert file.array("e5m2").dtype == ml_dtypes.float8_e5m2
    for name, tensor in tensors.items():
        np.testing.assert_array_equal(file.array(name).astype(np.float32), tensor.float().numpy())


def test_written_file_reads_back_with_safetensors_package(tmp_path):
    arrays = sample_arrays()
    path = tmp_path / "kiln.safetensors"
    write_safetensors(path, arrays, metadata={"format": "kiln"})
    loaded = safetensors.numpy.load_file(str(path))
    assert set(loaded) == set(arrays)
    for name, expected in arrays.items():
        assert loaded[name].dtype == expected.dtype, name
        np.testing.assert_array_equal(loaded[name], expected)
    with safe_open(str(path), framework="numpy") as handle:
        assert handle.metadata() == {"format": "kiln"}
    # Our own reader agrees too, and every tensor starts at a multiple of its itemsize.
    file = SafetensorsFile(path)
    assert file.data_offset % 8 == 0
    for info in file.tensors.values():
        assert info.begin % info.dtype.itemsize == 0


def test_writer_normalises_big_endian_and_non_contiguous(tmp_path):
    big_endian = np.arange(6, dtype=">i4").reshape(2, 3)
    transposed = np.arange(12, dtype=np.float32).reshape(3, 4).T
    path = tmp_path / "x.safetensors"
    write_safetensors(path, {"be": big_endian, "t": transposed})
    loaded = safetensors.numpy.load_file(str(path))
    np.testing.assert_array_equal(loaded["be"], big_endian)
    np.testing.assert_array_equal(loaded["t"], transposed)


def test_arrays_are_read_only_zero_copy_views(tmp_path):
    path = tmp_path / "x.safetensors"
    safetensors.numpy.save_file({"w": np.arange(8, dtype=np.float32)}, str(path))
    file = SafetensorsFile(path)
    array = file.array("w")
    assert isinstance(array, np.memmap)
    assert not array.flags.owndata and not array.flags.writeable
    with pytest.raises(ValueError):
        array[0] = 1.0
    # Two reads of the same tensor view the same mapped bytes.
    assert np.shares_memory(array, file.array("w"))
    assert list(file.arrays()) == ["w"]
    with pytest.raises(ModelFormatError, match="no tensor named 'missing'"):
        file.array("missing")


def test_write_is_atomic_and_leaves_no_temp_files(tmp_path):
    path = tmp_path / "x.safetensors"
    write_safetensors(path, {"a": np.ones(3, np.float32)})
    write_safetensors(path, {"b": np.zeros(2, np.int64)})
    assert os.listdir(tmp_path) == ["x.safetensors"]
    assert list(safetensors.numpy.load_file(str(path))) == ["b"]
    with pytest.raises(TypeError):
        write_safetensors(path, {"c": np.array(["text"], dtype=object)})
    # The failed write neither replaced the old file nor left debris.
    assert os.listdir(tmp_path) == ["x.safetensors"]
    assert list(safetensors.numpy.load_file(str(path))) == ["b"]


def test_header_padding_and_no_tensors(tmp_path):
    path = tmp_path / "x.safetensors"
    write_raw(path, json.dumps({"__metadata__": {"a": "b"}}) + "    ")
    file = SafetensorsFile(path)
    assert file.metadata == {"a": "b"} and file.tensors == {} and file.arrays() == {}


# --- planted defects -------------------------------------------------------------------


def test_missing_file_directory_fifo_and_device(tmp_path):
    expect_error(tmp_path / "absent.safetensors", "not found", "safetensors file")
    expect_error(tmp_path, "found a directory")
    os.mkfifo(tmp_path / "fifo.safetensors")
    expect_error(tmp_path / "fifo.safetensors", "found a FIFO")  # refused without blocking on the open
    os.symlink("/dev/zero", tmp_path / "zero.safetensors")
    expect_error(tmp_path / "zero.safetensors", "found a device")


def test_null_metadata_means_none(tmp_path):
    path = tmp_path / "x.safetensors"
    write_raw(path, {"__metadata__": None, "w": entry()}, b"\0" * 8)
    assert SafetensorsFile(path).metadata == {}


def test_file_shorter_than_header_length_field(tmp_path):
    path = tmp_path / "short.safetensors"
    path.write_bytes(b"\x01\x02\x03")
    expect_error(path, "at least 8 bytes", "3-byte")


def test_bad_header_length_past_end_of_file(tmp_path):
    path = tmp_path / "x.safetensors"
    write_raw(path, "{}", header_len=1000)
    expect_error(path, "header length 1000", "at most 2")


def test_huge_header_length_is_rejected_without_reading(tmp_path):
    path = tmp_path / "x.safetensors"
    write_raw(path, "{}", header_len=2**64 - 1)
    expect_error(path, f"header length {2**64 - 1}")


def test_header_over_the_limit(tmp_path):
    # A sparse file big enough to hold the claimed header, so only the 100 MB cap can refuse it.
    path = tmp_path / "big.safetensors"
    with open(path, "wb") as handle:
        handle.write(struct.pack("<Q", MAX_HEADER_BYTES + 1))
        handle.truncate(MAX_HEADER_BYTES + 64)
    expect_error(path, "exceeds the 100000000-byte limit")


def test_non_json_header(tmp_path):
    path = tmp_path / "x.safetensors"
    write_raw(path, "{not json")
    expect_error(path, "expected a JSON header")


def test_invalid_utf8_header(tmp_path):
    path = tmp_path / "x.safetensors"
    write_raw(path, b'{"\xff": 1}')
    expect_error(path, "UTF-8")


def test_header_not_an_object(tmp_path):
    path = tmp_path / "x.safetensors"
    write_raw(path, [1, 2])
    expect_error(path, "JSON object", "list")


def test_deeply_nested_json(tmp_path):
    path = tmp_path / "x.safetensors"
    write_raw(path, "[" * 100_000 + "]" * 100_000)
    expect_error(path, "expected a JSON header")


def test_duplicate_tensor_names(tmp_path):
    path = tmp_path / "x.safetensors"
    one = json.dumps(entry())
    write_raw(path, '{"w": %s, "w": %s}' % (one, one), b"\0" * 8)
    expect_error(path, "'w' twice")


def test_duplicate_keys_inside_an_entry(tmp_path):
    path = tmp_path / "x.safetensors"
    write_raw(path, '{"w": {"dtype": "F32", "dtype": "I32", "shape": [2], "data_offsets": [0, 8]}}', b"\0" * 8)
    expect_error(path, "'dtype' twice")


@pytest.mark.parametrize("metadata", [{"n": 3}, [], "", 0], ids=["int-value", "list", "string", "zero"])
def test_bad_metadata(tmp_path, metadata):
    path = tmp_path / "x.safetensors"
    write_raw(path, {"__metadata__": metadata})
    expect_error(path, "__metadata__")


def test_unknown_dtype(tmp_path):
    path = tmp_path / "x.safetensors"
    write_raw(path, {"w": entry(dtype="F128")}, b"\0" * 8)
    expect_error(path, "tensor 'w'", "'F128'", "BF16")


@pytest.mark.parametrize(
    "shape",
    [[-2], [2.0], [0.5, 4], [True], ["2"], [1] * 9, 2],
    ids=["negative", "float", "fractional", "bool", "string", "nine-dims", "not-a-list"],
)
def test_bad_shape(tmp_path, shape):
    path = tmp_path / "x.safetensors"
    write_raw(path, {"w": {"dtype": "F32", "shape": shape, "data_offsets": [0, 8]}}, b"\0" * 8)
    expect_error(path, "tensor 'w'", "non-negative integers")


def test_missing_field(tmp_path):
    path = tmp_path / "x.safetensors"
    write_raw(path, {"w": {"dtype": "F32", "shape": [2]}}, b"\0" * 8)
    expect_error(path, "tensor 'w'", "'data_offsets'")


@pytest.mark.parametrize(
    "offsets",
    [[0, 16], [-8, 0], [8, 0], [0], [0, 8.0]],
    ids=["end-past-data", "negative", "begin-after-end", "one-value", "float"],
)
def test_offsets_out_of_range(tmp_path, offsets):
    path = tmp_path / "x.safetensors"
    write_raw(path, {"w": {"dtype": "F32", "shape": [2], "data_offsets": offsets}}, b"\0" * 8)
    expect_error(path, "tensor 'w'", "data_offsets")


def test_size_shape_mismatch(tmp_path):
    path = tmp_path / "x.safetensors"
    write_raw(path, {"w": entry(dtype="F32", shape=(3,), offsets=(0, 8))}, b"\0" * 16)
    expect_error(path, "tensor 'w'", "expected 12 bytes", "spanning 8")


def test_huge_shape_does_not_wrap_around(tmp_path):
    # 2**62 * 2**2 * 4 bytes would wrap to 0 in 64-bit arithmetic; it must not match an empty range.
    path = tmp_path / "x.safetensors"
    write_raw(path, {"w": entry(dtype="F32", shape=(2**62, 4), offsets=(0, 0))})
    expect_error(path, "tensor 'w'", "fits in 64 bits", str([2**62, 4]))
    # Just inside 64 bits, the byte count must still match the range exactly.
    write_raw(path, {"w": entry(dtype="F32", shape=(2**58, 4), offsets=(0, 0))})
    expect_error(path, "tensor 'w'", f"expected {2**62} bytes", "spanning 0")


@pytest.mark.parametrize("shape", [(0, 2**62), (2**40, 0, 2**22)])
def test_zero_dim_does_not_excuse_absurd_dims(tmp_path, shape):
    # No bytes, so the offsets match; numpy could not even describe the empty array.
    path = tmp_path / "x.safetensors"
    write_raw(path, {"w": entry(dtype="F32", shape=shape, offsets=(0, 0))})
    expect_error(path, "tensor 'w'", "fits in 64 bits")


def test_overlapping_tensors(tmp_path):
    path = tmp_path / "x.safetensors"
    header = {"a": entry(offsets=(0, 8)), "b": entry(offsets=(4, 12))}
    write_raw(path, header, b"\0" * 12)
    expect_error(path, "tensor 'b'", "overlap", "'a'")


def test_empty_tensors_may_share_a_position(tmp_path):
    path = tmp_path / "x.safetensors"
    header = {"a": entry(offsets=(0, 8)), "e": entry(shape=(0, 2), offsets=(8, 8)), "b": entry(offsets=(8, 16))}
    write_raw(path, header, np.arange(4, dtype=np.float32).tobytes())
    file = SafetensorsFile(path)
    assert file.array("e").shape == (0, 2)
    np.testing.assert_array_equal(file.array("b"), [2.0, 3.0])


def test_truncated_file(tmp_path):
    path = tmp_path / "x.safetensors"
    safetensors.numpy.save_file({"a": np.ones(4, np.float32), "b": np.ones(16, np.float32)}, str(path))
    data = path.read_bytes()
    path.write_bytes(data[:-5])
    expect_error(path, "data_offsets", "truncated")

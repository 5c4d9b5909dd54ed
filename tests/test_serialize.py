"""Tests for saving a module to a directory and loading it back (IR text + safetensors, no pickle).

Weights are compared with the arrays that went in and read independently with the
safetensors package; failed saves must leave an existing directory as it was.
"""

import json
import os
import struct

import ml_dtypes
import numpy as np
import pytest
import safetensors.numpy

from kiln.ir.errors import KilnError
from kiln.ir.graph import Module
from kiln.ir.printer import print_module
from kiln.ir.serialize import IR_FILE, WEIGHTS_FILE, load_module, save_module
from kiln.ir.symbolic import sym
from kiln.ir.types import TensorType

batch, seq = sym("batch"), sym("seq")


def sample_arrays() -> dict:
    rng = np.random.default_rng(0)
    return {
        "model.embed_tokens.weight": rng.standard_normal((16, 8)).astype(np.float32),
        "layers.0.norm.weight": rng.standard_normal(8).astype(np.float16),
        "layers.0.proj.weight": rng.standard_normal((8, 8)).astype(ml_dtypes.bfloat16),
        'odd "name" ünï': rng.standard_normal(8).astype(np.float64),
        "positions": rng.integers(-(2**40), 2**40, (4,), dtype=np.int64),
        "mask": rng.random((3, 3)) < 0.5,
        "scale": np.array(0.125, dtype=np.float32),
        "q4.blocks": rng.integers(0, 255, (2, 18), dtype=np.uint8),
    }


def build(arrays=None) -> Module:
    module = Module()
    module.metadata = {"config": {"hidden_size": 8, "eps": 1e-06}, "template": "a\nb {{ x }}", "k": [1, None]}
    arrays = sample_arrays() if arrays is None else arrays
    for name, array in arrays.items():
        module.add_weight(name, array)
    module.add_weight("lazy.weight", type=TensorType("f32", (8,)))  # declared, no array
    fn = module.add_function("forward")
    ids = fn.add_param("input_ids", TensorType("i64", (batch, seq)))
    h = fn.emit("embedding", fn.emit("weight", name="model.embed_tokens.weight"), ids)
    w = fn.emit("cast", fn.emit("weight", name="layers.0.norm.weight"), dtype="f32")
    fn.set_results([fn.emit("mul", h, w)])
    return module


def test_round_trip(tmp_path):
    module = build()
    path = tmp_path / "saved"
    save_module(module, str(path))
    loaded = load_module(str(path))
    assert print_module(loaded) == print_module(module)
    assert loaded.metadata == module.metadata
    assert set(loaded.weight_data) == set(sample_arrays())
    for name, array in sample_arrays().items():
        got = loaded.weight_data[name]
        assert got.dtype == array.dtype and got.shape == array.shape, name
        assert got.tobytes() == array.tobytes(), name  # bit-exact, NaN payloads and -0.0 included
    # the weights file is plain safetensors: read it with the reference reader
    independent = safetensors.numpy.load_file(str(path / WEIGHTS_FILE))
    for name, array in sample_arrays().items():
        np.testing.assert_array_equal(independent[name], array)
    assert (path / IR_FILE).read_text(encoding="utf-8") == print_module(module)


def test_save_replaces_existing_directory(tmp_path):
    path = tmp_path / "saved"
    save_module(build(), str(path))
    small = build({"model.embed_tokens.weight": np.zeros((16, 8), np.float32),
                   "layers.0.norm.weight": np.ones(8, np.float16)})
    save_module(small, str(path))
    loaded = load_module(str(path))
    assert set(loaded.weight_data) == {"model.embed_tokens.weight", "layers.0.norm.weight"}
    assert sorted(os.listdir(tmp_path)) == ["saved"]


def test_module_without_weights(tmp_path):
    module = Module()
    fn = module.add_function("f")
    x = fn.add_param("x", TensorType("f32", (seq,)))
    fn.set_results([fn.emit("neg", x)])
    save_module(module, str(tmp_path / "m"))
    assert print_module(load_module(str(tmp_path / "m"))) == print_module(module)


PICKLE_MARKERS = [b"\x80\x02", b"\x80\x03", b"\x80\x04", b"\x80\x05", b"cnumpy", b"ctorch", b"\x8c\x05numpy",
                  b"__reduce__", b"c__builtin__", b"\x8c\x08builtins", b"PK\x03\x04"]


def test_directory_holds_no_pickle(tmp_path):
    path = tmp_path / "saved"
    save_module(build(), str(path))
    assert sorted(os.listdir(path)) == sorted([IR_FILE, WEIGHTS_FILE])
    text = (path / IR_FILE).read_bytes()
    text.decode("utf-8")  # plain text
    raw = (path / WEIGHTS_FILE).read_bytes()
    # safetensors: u64 header length, JSON header, then exactly the tensor bytes it describes
    (header_len,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8:8 + header_len])
    data_len = len(raw) - 8 - header_len
    spans = sorted(tuple(v["data_offsets"]) for k, v in header.items() if k != "__metadata__")
    assert spans[0][0] == 0 and spans[-1][1] == data_len
    assert all(a[1] == b[0] for a, b in zip(spans, spans[1:]))
    for blob in (text, raw[:8 + header_len]):
        for marker in PICKLE_MARKERS:
            assert marker not in blob
    assert not raw.startswith(b"\x80") and not text.startswith(b"\x80")


def _snapshot(path):
    return {name: (path / name).read_bytes() for name in sorted(os.listdir(path))}


def test_failed_save_before_writing_leaves_directory_untouched(tmp_path):
    path = tmp_path / "saved"
    save_module(build(), str(path))
    before = _snapshot(path)
    bad = build()
    bad.weight_data["layers.0.norm.weight"] = np.array([object()] * 8)  # not serialisable
    with pytest.raises(KilnError):
        save_module(bad, str(path))
    assert _snapshot(path) == before
    assert sorted(os.listdir(tmp_path)) == ["saved"]


def test_failed_weight_write_leaves_directory_untouched(tmp_path, monkeypatch):
    path = tmp_path / "saved"
    save_module(build(), str(path))
    before = _snapshot(path)

    def broken_save_file(arrays, filename, metadata=None):
        with open(filename, "wb") as f:
            f.write(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(safetensors.numpy, "save_file", broken_save_file)
    with pytest.raises(OSError, match="disk full"):
        save_module(build({"model.embed_tokens.weight": np.zeros((16, 8), np.float32),
                           "layers.0.norm.weight": np.ones(8, np.float16)}), str(path))
    assert _snapshot(path) == before
    assert sorted(os.listdir(tmp_path)) == ["saved"]


def test_failed_rename_puts_old_directory_back(tmp_path, monkeypatch):
    """Where renameat2 is missing, the replacement is two renames; a failed second one restores the first."""
    import kiln.ir.files

    monkeypatch.setattr(kiln.ir.files, "_renameat2", lambda source, target, flags: None)
    path = tmp_path / "saved"
    save_module(build(), str(path))
    before = _snapshot(path)
    real_rename = os.rename
    calls = []

    def flaky_rename(src, dst):
        calls.append((src, dst))
        if len(calls) == 2:  # moving the new directory into place
            raise OSError("rename failed")
        return real_rename(src, dst)

    monkeypatch.setattr(os, "rename", flaky_rename)
    with pytest.raises(OSError, match="rename failed"):
        save_module(build(), str(path))
    monkeypatch.setattr(os, "rename", real_rename)
    assert _snapshot(path) == before
    assert sorted(os.listdir(tmp_path)) == ["saved"]


def test_failed_first_save_leaves_nothing(tmp_path, monkeypatch):
    monkeypatch.setattr(safetensors.numpy, "save_file",
                        lambda arrays, filename, metadata=None: (_ for _ in ()).throw(OSError("no space")))
    with pytest.raises(OSError, match="no space"):
        save_module(build(), str(tmp_path / "new"))
    assert os.listdir(tmp_path) == []


def test_invalid_module_is_not_saved(tmp_path):
    module = build()
    module.weight_data["undeclared"] = np.zeros(2, np.float32)
    with pytest.raises(KilnError, match="undeclared"):
        save_module(module, str(tmp_path / "m"))
    assert os.listdir(tmp_path) == []


# damaged directories -----------------------------------------------------------------------
@pytest.fixture
def saved(tmp_path):
    path = tmp_path / "saved"
    save_module(build(), str(path))
    return path


def _expect_kiln_error(path, *fragments):
    with pytest.raises(KilnError) as info:
        load_module(str(path))
    text = str(info.value)
    assert "\n" not in text
    for fragment in fragments:
        assert fragment in text, text


def test_load_truncated_ir(saved):
    text = (saved / IR_FILE).read_text(encoding="utf-8")
    (saved / IR_FILE).write_text(text[: len(text) // 2], encoding="utf-8")
    _expect_kiln_error(saved, IR_FILE)


def test_load_ir_with_bad_line(saved):
    text = (saved / IR_FILE).read_text(encoding="utf-8").replace("embedding(", "embeding(")
    (saved / IR_FILE).write_text(text, encoding="utf-8")
    _expect_kiln_error(saved, IR_FILE, "unknown op 'embeding'", "line ")


def test_load_binary_garbage_ir(saved):
    (saved / IR_FILE).write_bytes(b"\xff\xfe\x00\x80\x04garbage")
    _expect_kiln_error(saved, IR_FILE)


def test_load_empty_ir(saved):
    (saved / IR_FILE).write_bytes(b"")
    _expect_kiln_error(saved, "module {")


def test_load_missing_ir(saved):
    (saved / IR_FILE).unlink()
    _expect_kiln_error(saved, "no module.kir")


def test_load_truncated_weights(saved):
    raw = (saved / WEIGHTS_FILE).read_bytes()
    (saved / WEIGHTS_FILE).write_bytes(raw[: len(raw) - 10])
    _expect_kiln_error(saved, WEIGHTS_FILE)


def test_load_weights_with_huge_header_length(saved):
    raw = (saved / WEIGHTS_FILE).read_bytes()
    (saved / WEIGHTS_FILE).write_bytes(struct.pack("<Q", 2**60) + raw[8:])
    _expect_kiln_error(saved, WEIGHTS_FILE)


def test_load_weights_garbage(saved):
    (saved / WEIGHTS_FILE).write_bytes(b"\x00" * 3)
    _expect_kiln_error(saved, WEIGHTS_FILE)


def test_load_weight_not_in_module(saved):
    arrays = safetensors.numpy.load_file(str(saved / WEIGHTS_FILE))
    arrays["extra.weight"] = np.zeros(2, np.float32)
    safetensors.numpy.save_file(arrays, str(saved / WEIGHTS_FILE))
    _expect_kiln_error(saved, "'extra.weight' is not a weight of the module")


def test_load_weight_of_wrong_shape(saved):
    arrays = safetensors.numpy.load_file(str(saved / WEIGHTS_FILE))
    arrays["layers.0.norm.weight"] = np.zeros(7, np.float16)
    safetensors.numpy.save_file(arrays, str(saved / WEIGHTS_FILE))
    _expect_kiln_error(saved, "layers.0.norm.weight", "declared f16[8]")


def test_load_weight_of_wrong_dtype(saved):
    arrays = safetensors.numpy.load_file(str(saved / WEIGHTS_FILE))
    arrays["positions"] = arrays["positions"].astype(np.int32)
    safetensors.numpy.save_file(arrays, str(saved / WEIGHTS_FILE))
    _expect_kiln_error(saved, "positions", "declared i64[4]", "i32[4]")


@pytest.mark.parametrize("existing", ["file", "directory", "empty directory"])
def test_save_refuses_what_is_not_a_saved_module(tmp_path, existing):
    path = tmp_path / "mine"
    if existing == "file":
        path.write_text("precious")
    else:
        path.mkdir()
        if existing == "directory":
            (path / "notes.txt").write_text("precious")
    before = _snapshot(path) if path.is_dir() else path.read_text()
    with pytest.raises(KilnError, match="not a saved kiln module|is a file"):
        save_module(build(), str(path))
    assert (_snapshot(path) if path.is_dir() else path.read_text()) == before
    assert sorted(os.listdir(tmp_path)) == ["mine"]

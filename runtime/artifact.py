"""Read and check a compiled artifact directory; hand out exactly the bytes its manifest hashed.

An artifact is a directory with ``manifest.json`` (format version, versions of
kiln and the backend, target, model config, pipeline, KV plan, and ``files``:
the sha256 and size of every other file), weights in safetensors, the compiled
library, the tokenizer and the chat template.

:func:`open_artifact` validates the manifest (versions, target, types, ranges,
the KV plan's arithmetic) and that every file it names is a regular file of
the recorded size inside the directory; it reads no file's contents. Contents
are read only through :class:`ArtifactInfo`'s accessors, which check the hash
of the bytes they return (:meth:`~ArtifactInfo.read_bytes`), of the bytes
streamed to the caller (:meth:`~ArtifactInfo.open_stream`), or of a private
copy written while hashing (:meth:`~ArtifactInfo.private_copy`, for files a
native library opens by path). A file swapped after the check is therefore
never loaded unnoticed. Loading an artifact runs its native code: the hashes
guard against damage and tampering after compilation, not a malicious author.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import stat
import tempfile
from dataclasses import dataclass

from kiln.ir.errors import ArtifactError
from kiln.ir.files import open_regular, read_bytes, remove_stale
from kiln.ir.kv_cache import DECODE_STEP, STEP, STEP_INPUTS, KVCacheSpec

FORMAT_NAME = "kiln-artifact"
FORMAT_VERSION = 3  # 2: files carry {sha256, bytes}; every path in the manifest is one of them. 3: the KV-cache
# spec and one ragged step
MANIFEST = "manifest.json"
MAX_MANIFEST_BYTES = 16 * 2**20
PRIVATE_PREFIX = "kiln-load-"  # private copies: kiln-load-<pid>-<random> in the temporary directory
_STALE_COPY = re.compile(r"^kiln-load-(\d+)-")
_SHA256 = re.compile(r"[0-9a-f]{64}")


@dataclass(frozen=True)
class FileEntry:
    sha256: str
    size: int


class ArtifactInfo:
    """A checked artifact: its manifest and verified access to its files (nothing is read until asked)."""

    def __init__(self, path: str, manifest: dict, files: dict):
        self.path = path
        self.manifest = manifest
        self.files: dict[str, FileEntry] = files

    @property
    def backend(self) -> str:
        return self.manifest["backend"]

    def entry(self, name, field: str = "file") -> FileEntry:
        """The ``files`` entry of a name the manifest uses (``field`` says where, for the error)."""
        if not isinstance(name, str) or name not in self.files:
            raise ArtifactError(f"{self.path}: manifest field {field} names {name!r}, which is not among the "
                                f"artifact's hashed files; the artifact is damaged, recompile it")
        return self.files[name]

    def _mismatch(self, name: str) -> ArtifactError:
        return ArtifactError(f"{self.path}: {name} does not match its sha256 in the manifest; the artifact was "
                             f"modified or damaged, recompile it")

    def read_bytes(self, name: str, field: str = "file") -> bytes:
        """The whole file, checked against its hash."""
        entry = self.entry(name, field)
        data = read_bytes(os.path.join(self.path, name), f"artifact file {name}", entry.size, ArtifactError)
        if len(data) != entry.size or hashlib.sha256(data).hexdigest() != entry.sha256:
            raise self._mismatch(name)
        return data

    def read_text(self, name: str, field: str = "file") -> str:
        try:
            return self.read_bytes(name, field).decode("utf-8")
        except UnicodeDecodeError:
            raise ArtifactError(f"{self.path}: {name} is not UTF-8 text; recompile the artifact") from None

    def open_stream(self, name: str, field: str = "file") -> "VerifiedStream":
        """A reader over the file that hashes what it hands out; ``finish()`` checks the hash (call it
        before using what was read)."""
        entry = self.entry(name, field)
        handle = open_regular(os.path.join(self.path, name), f"artifact file {name}", entry.size, ArtifactError)
        return VerifiedStream(handle, entry, lambda: self._mismatch(name))

    def load_safetensors(self, name: str, convert=lambda tensor_name, array: array, wanted=None,
                         field: str = "file") -> dict:
        """The tensors of a safetensors file, streamed once from disk and each passed through ``convert``
        (e.g. onto a device) as it is read; the file's hash is checked before anything is returned.
        ``wanted``: the names to keep (all when None); each must be present."""
        with self.open_stream(name, field) as stream:
            tensors = _read_safetensors(stream, self.files[name].size, convert, wanted,
                                        lambda msg: ArtifactError(f"{self.path}: {name}: {msg}; recompile the artifact"))
            stream.finish()
        return tensors

    def private_copy(self, names, field: str = "file") -> "PrivateCopy":
        """Copy ``names`` into a new directory only this process's user can write, hashing the bytes as
        they are written; the copies are what was hashed, for libraries that open files by path."""
        entries = [(name, self.entry(name, field)) for name in names]
        copy = PrivateCopy()
        try:
            for name, entry in entries:
                with self.open_stream(name, field) as source, open(os.path.join(copy.path, name), "xb") as target:
                    while True:
                        block = source.read(4 * 2**20)
                        if not block:
                            break
                        target.write(block)
                    source.finish()
        except BaseException:
            copy.close()
            raise
        return copy


_SAFETENSORS_DTYPES = {"BOOL": "bool", "U8": "uint8", "I8": "int8", "U16": "uint16", "I16": "int16", "F16": "float16",
                       "U32": "uint32", "I32": "int32", "F32": "float32", "U64": "uint64", "I64": "int64",
                       "F64": "float64", "BF16": "bfloat16"}
MAX_SAFETENSORS_HEADER = 100 * 2**20
_SKIP_CHUNK = 2**20


def _read_safetensors(stream, size: int, convert, wanted, fail) -> dict:
    """Parse a safetensors file from a stream, in data order: header bounded by the file size, every tensor's
    byte range inside the data section, no overlaps or holes (the format's own rules)."""
    import ml_dtypes  # noqa: F401  - registers bfloat16 with numpy
    import numpy as np

    if size < 8:
        raise fail(f"{size} bytes is too short for a safetensors header")
    header_len = int.from_bytes(stream.read(8), "little")
    if header_len > min(size - 8, MAX_SAFETENSORS_HEADER):
        raise fail(f"header length {header_len:,} runs past the {size:,}-byte file")
    try:
        header = json.loads(stream.read(header_len).decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError):
        raise fail("the header is not valid JSON") from None
    if not isinstance(header, dict):
        raise fail("the header is not a JSON object")
    header.pop("__metadata__", None)
    entries = []
    for tensor_name, entry in header.items():
        try:
            dtype = np.dtype(_SAFETENSORS_DTYPES[entry["dtype"]])
            shape = tuple(entry["shape"])
            begin, end = entry["data_offsets"]
            if not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in (*shape, begin, end)):
                raise TypeError
        except (KeyError, TypeError, ValueError):
            raise fail(f"tensor {tensor_name!r} has a malformed entry") from None
        count = 1
        for d in shape:
            count *= d
        if end - begin != count * dtype.itemsize:
            raise fail(f"tensor {tensor_name!r}: {end - begin} bytes for shape {list(shape)} of {entry['dtype']}")
        entries.append((begin, end, tensor_name, dtype, shape))
    entries.sort(key=lambda e: e[:2])
    data_size = size - 8 - header_len
    position = 0
    missing = set(wanted or ()) - set(header)
    if missing:
        raise fail(f"missing the tensors {sorted(missing)[:5]}")
    tensors = {}
    scratch = None
    for begin, end, tensor_name, dtype, shape in entries:
        if begin != position or end > data_size:
            raise fail(f"tensor {tensor_name!r} occupies bytes [{begin}, {end}) of a {data_size}-byte data section "
                       f"where [{position}, ...) was expected")
        position = end
        if wanted is not None and tensor_name not in wanted:
            # hashed through one small buffer: a tensor-sized array per skipped tensor would leave the process
            # holding heap memory it no longer uses (glibc raises its mmap threshold after a large free)
            scratch = scratch if scratch is not None else memoryview(bytearray(_SKIP_CHUNK))
            remaining = end - begin
            while remaining:
                step = min(remaining, _SKIP_CHUNK)
                stream.readinto(scratch[:step])
                remaining -= step
            continue
        array = np.empty(shape, dtype=dtype)
        if array.size:
            stream.readinto(array.reshape(-1).view(np.uint8))
        tensors[tensor_name] = convert(tensor_name, array)
    if position != data_size:
        raise fail(f"{data_size - position} bytes after the last tensor")
    return tensors


class VerifiedStream:
    def __init__(self, handle, entry: FileEntry, mismatch):
        self._handle = handle
        self._entry = entry
        self._mismatch = mismatch
        self._digest = hashlib.sha256()
        self._count = 0

    def read(self, size: int = -1) -> bytes:
        remaining = self._entry.size - self._count
        block = self._handle.read(remaining if size < 0 else min(size, remaining))
        self._digest.update(block)
        self._count += len(block)
        return block

    def readinto(self, buffer) -> int:
        """Fill ``buffer`` (a writable bytes-like object) completely; a short file is a mismatch."""
        view = memoryview(buffer).cast("B")
        if self._count + len(view) > self._entry.size:
            raise self._mismatch()
        done = 0
        while done < len(view):
            n = self._handle.readinto(view[done:])
            if not n:
                raise self._mismatch()
            done += n
        self._digest.update(view)
        self._count += done
        return done

    def finish(self) -> None:
        """Hash the rest of the file too, and raise if the whole does not match the manifest."""
        while self.read(4 * 2**20):
            pass
        if self._handle.read(1) or self._count != self._entry.size or self._digest.hexdigest() != self._entry.sha256:
            raise self._mismatch()

    def close(self) -> None:
        self._handle.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


class PrivateCopy:
    """A directory of this process's own (mode 0700, named with its pid) removed by ``close()``; ones left by
    processes that died are removed the next time a copy is made."""

    def __init__(self):
        base = tempfile.gettempdir()
        remove_stale(base, _STALE_COPY)
        self.path = tempfile.mkdtemp(prefix=f"{PRIVATE_PREFIX}{os.getpid()}-", dir=base)

    def file(self, name: str) -> str:
        return os.path.join(self.path, name)

    def close(self) -> None:
        if self.path:
            shutil.rmtree(self.path, ignore_errors=True)
            self.path = None

    def __del__(self):
        self.close()


def is_artifact(path) -> bool:
    """Whether ``path`` is a directory holding a kiln manifest (the artifact may still be damaged)."""
    if not isinstance(path, (str, os.PathLike)):
        return False
    try:
        return os.path.isdir(path) and os.path.isfile(os.path.join(path, MANIFEST))
    except (OSError, ValueError):
        return False


def read_manifest(path: str) -> dict:
    file = os.path.join(path, MANIFEST)
    if os.path.islink(file):
        raise ArtifactError(f"{file}: the manifest is a symbolic link; an artifact holds only its own files")
    data = read_bytes(file, "artifact manifest", MAX_MANIFEST_BYTES, ArtifactError)
    try:
        manifest = json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as err:
        raise ArtifactError(f"{file}: not valid JSON ({_one_line(err)}); recompile the artifact") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT_NAME:
        found = manifest.get("format") if isinstance(manifest, dict) else type(manifest).__name__
        raise ArtifactError(f"{file}: not a kiln artifact manifest (format {found!r})")
    return manifest


def open_artifact(path) -> ArtifactInfo:
    """Check an artifact's manifest and files (versions, target, fields, that every named file is a regular
    file of its recorded size inside the directory) and describe it; reads no file's contents."""
    from kiln import __version__

    if not isinstance(path, (str, os.PathLike)) or not os.fspath(path):
        raise ArtifactError(f"expected an artifact directory path, got {path!r}")
    path = os.path.realpath(os.fspath(path))  # the directory may be reached through a link; its files may not
    if not os.path.isdir(path):
        raise ArtifactError(f"{path}: not a directory; expected an artifact written by `kiln compile`")
    manifest = read_manifest(path)
    version = manifest.get("format_version")
    if not isinstance(version, int) or isinstance(version, bool) or version > FORMAT_VERSION:
        raise ArtifactError(f"{path}: artifact format version {version!r} is newer than this kiln reads "
                            f"({FORMAT_VERSION}); upgrade kiln or recompile with this one")
    if version < FORMAT_VERSION:
        raise ArtifactError(f"{path}: artifact format version {version} is older than this kiln's "
                            f"{FORMAT_VERSION}; recompile it")
    built_with = manifest.get("kiln_version")
    if _minor(built_with) != _minor(__version__):
        raise ArtifactError(f"{path}: compiled by kiln {built_with}, this is kiln {__version__}; recompile it")
    from kiln.backends import BACKENDS, backend_version

    backend = manifest.get("backend")
    if not isinstance(backend, str) or backend not in BACKENDS:
        raise ArtifactError(f"{path}: manifest backend {backend!r} is not one of {', '.join(sorted(BACKENDS))}; "
                            f"recompile the artifact")
    installed = backend_version(backend)
    if manifest.get("backend_version") != installed:
        raise ArtifactError(f"{path}: compiled with {backend} {manifest.get('backend_version')}, installed is "
                            f"{installed}; recompile it or install that version")
    files = _check_files(path, manifest.get("files"))
    _check_manifest(path, manifest)
    info = ArtifactInfo(path, manifest, files)
    for field, name in _named_files(manifest):
        info.entry(name, field)
    return info


def _check_files(path: str, files) -> dict:
    if not isinstance(files, dict) or not files:
        raise ArtifactError(f"{path}: manifest field files is missing or empty; recompile the artifact")
    checked = {}
    for name, entry in files.items():
        if not isinstance(name, str) or os.path.basename(name) != name or name in (MANIFEST, "", ".", "..") \
                or "\x00" in name:
            raise ArtifactError(f"{path}: manifest names a file outside the artifact: {name!r}")
        if not (isinstance(entry, dict) and isinstance(entry.get("sha256"), str) and _SHA256.fullmatch(entry["sha256"])
                and _count(entry.get("bytes"))):
            raise ArtifactError(f"{path}: manifest files entry for {name} must be {{sha256: 64 hex digits, bytes: "
                                f"a count}}, found {entry!r:.80}; recompile the artifact")
        full = os.path.join(path, name)
        try:
            info = os.lstat(full)
        except FileNotFoundError:
            raise ArtifactError(f"{path}: {name} is missing; the artifact is incomplete, recompile it") from None
        except OSError as err:
            raise ArtifactError(f"{path}: cannot read {name} ({err.strerror}); check its permissions") from None
        if stat.S_ISLNK(info.st_mode):
            raise ArtifactError(f"{path}: {name} is a symbolic link; an artifact holds only its own files, "
                                f"recompile it")
        if not stat.S_ISREG(info.st_mode):
            raise ArtifactError(f"{path}: {name} is not a regular file; the artifact is damaged, recompile it")
        if info.st_size != entry["bytes"]:
            raise ArtifactError(f"{path}: {name} is {info.st_size:,} bytes, the manifest says {entry['bytes']:,}; "
                                f"the artifact was modified or damaged, recompile it")
        checked[name] = FileEntry(entry["sha256"], entry["bytes"])
    return checked


def _named_files(manifest: dict) -> list:
    """(field, file name) of every path the manifest holds; each must be one of ``files``."""
    named = []
    tokenizer = manifest.get("tokenizer")
    if isinstance(tokenizer, dict):
        named.append(("tokenizer.file", tokenizer.get("file")))
    if manifest.get("chat_template") is not None:
        named.append(("chat_template", manifest["chat_template"]))
    named.append(("module", manifest.get("module")))
    backend_info = manifest.get("backend_info")
    for field, name in (backend_info.get("files", {}) if isinstance(backend_info, dict) else {}).items():
        named.append((f"backend_info.files.{field}", name))
    return named


def _check_manifest(path: str, manifest: dict) -> None:
    """Types, ranges and consistency of every field the runtime reads, each failure one line."""

    def fail(field: str, expected: str, found) -> ArtifactError:
        return ArtifactError(f"{path}: manifest field {field} must be {expected}, found {found!r:.80}; the artifact "
                             f"is damaged, recompile it")

    if manifest.get("target") not in ("cpu", "cuda"):
        raise fail("target", "'cpu' or 'cuda'", manifest.get("target"))
    if not isinstance(manifest.get("backend_info"), dict) or not isinstance(manifest["backend_info"].get("files"),
                                                                              dict):
        raise fail("backend_info", "an object with files", manifest.get("backend_info"))
    model = manifest.get("model")
    if not isinstance(model, dict):
        raise fail("model", "an object", model)
    vocab = model.get("vocab_size")
    if not _count(vocab, minimum=1):
        raise fail("model.vocab_size", "a positive integer", vocab)
    if not isinstance(manifest.get("module"), str):
        raise fail("module", "a file name", manifest.get("module"))
    if manifest.get("embedding") is not None:  # an encoder: no KV cache nor step (runtime/embedding.py)
        from .embedding import check_embedding_manifest

        return check_embedding_manifest(manifest, fail)
    try:
        spec = KVCacheSpec.from_json(manifest.get("kv_cache"))
    except ValueError as err:
        raise ArtifactError(f"{path}: manifest field {_one_line(err)}; the artifact is damaged, recompile it") \
            from None
    step = manifest.get("step")
    expected = list(STEP_INPUTS) + [pool.name for pool in spec.pools()]
    if not (isinstance(step, dict) and step.get("function") == STEP and isinstance(step.get("inputs"), list)
            and [i.get("name") if isinstance(i, dict) else None for i in step["inputs"]] == expected
            and isinstance(step.get("functions"), list) and STEP in step["functions"]
            and all(f in (STEP, DECODE_STEP) for f in step["functions"])):
        raise fail("step", f"the step signature (function {STEP}, inputs {', '.join(expected)}, functions "
                           f"{STEP} and optionally {DECODE_STEP})", step)
    tokenizer = manifest.get("tokenizer")
    if tokenizer is not None:
        if not isinstance(tokenizer, dict):
            raise fail("tokenizer", "an object or null", tokenizer)
        for field in ("bos_token_id",):
            value = tokenizer.get(field)
            if value is not None and not (_count(value) and value < vocab):
                raise fail(f"tokenizer.{field}", f"null or a token id below the vocabulary size {vocab}", value)
        eos = tokenizer.get("eos_token_ids")
        if not isinstance(eos, list) or not all(_count(i) and i < vocab for i in eos):
            raise fail("tokenizer.eos_token_ids", f"a list of token ids below {vocab}", eos)
        if not isinstance(tokenizer.get("add_bos_token"), bool):
            raise fail("tokenizer.add_bos_token", "true or false", tokenizer.get("add_bos_token"))
        for field in ("bos_token", "eos_token"):
            if tokenizer.get(field) is not None and not isinstance(tokenizer[field], str):
                raise fail(f"tokenizer.{field}", "a string or null", tokenizer[field])
        if tokenizer.get("bos_token_id") is None and tokenizer["add_bos_token"]:
            raise fail("tokenizer.add_bos_token", "false when there is no bos_token_id", True)
    template = manifest.get("chat_template")
    if template is not None and not isinstance(template, str):
        raise fail("chat_template", "a file name or null", template)
    if template is not None and tokenizer is None:
        raise fail("chat_template", "null when there is no tokenizer", template)


def _count(value, minimum: int = 0) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= minimum


def _minor(version) -> tuple:
    parts = str(version).split(".")
    return tuple(parts[:2])


def _one_line(err) -> str:
    return " ".join(str(err).split())[:200]

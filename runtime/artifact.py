"""Read and check a compiled artifact directory before anything in it is loaded.

An artifact is a directory with ``manifest.json`` (format version, versions of
kiln and the backend, target, model config, pipeline, KV plan, the sha256 of
every other file), weights in safetensors, the compiled library, the tokenizer
and the chat template. :func:`open_artifact` checks the format version, the
kiln and backend versions, the target and every file's hash, in that order.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass

from kiln.ir.errors import ArtifactError

FORMAT_NAME = "kiln-artifact"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
MAX_MANIFEST_BYTES = 16 * 2**20


@dataclass
class ArtifactInfo:
    path: str
    manifest: dict

    def file(self, name: str) -> str:
        return os.path.join(self.path, name)

    @property
    def backend(self) -> str:
        return self.manifest["backend"]


def sha256_file(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


def is_artifact(path) -> bool:
    return isinstance(path, (str, os.PathLike)) and os.path.isfile(os.path.join(path, MANIFEST))


def read_manifest(path: str) -> dict:
    file = os.path.join(path, MANIFEST)
    if not os.path.isfile(file):
        raise ArtifactError(f"{path}: no {MANIFEST}; expected a directory written by `kiln compile`")
    if os.path.getsize(file) > MAX_MANIFEST_BYTES:
        raise ArtifactError(f"{file}: {os.path.getsize(file):,} bytes is too large for a manifest")
    try:
        with open(file, encoding="utf-8") as f:
            manifest = json.load(f)
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ArtifactError(f"{file}: not valid JSON ({err}); recompile the artifact") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT_NAME:
        raise ArtifactError(f"{file}: not a kiln artifact manifest (format {manifest.get('format')!r})"
                            if isinstance(manifest, dict) else f"{file}: not a kiln artifact manifest")
    return manifest


def open_artifact(path: str, *, check_hashes: bool = True) -> ArtifactInfo:
    """Check an artifact (versions, target, hashes) and describe it; loads nothing from it."""
    from kiln import __version__

    path = os.path.abspath(os.fspath(path))
    manifest = read_manifest(path)
    version = manifest.get("format_version")
    if not isinstance(version, int) or version > FORMAT_VERSION:
        raise ArtifactError(f"{path}: artifact format version {version} is newer than this kiln reads "
                            f"({FORMAT_VERSION}); upgrade kiln or recompile with this one")
    if version < FORMAT_VERSION:
        raise ArtifactError(f"{path}: artifact format version {version} is older than this kiln's "
                            f"{FORMAT_VERSION}; recompile it")
    built_with = manifest.get("kiln_version")
    if _minor(built_with) != _minor(__version__):
        raise ArtifactError(f"{path}: compiled by kiln {built_with}, this is kiln {__version__}; recompile it")
    from kiln.backends import backend_version

    backend = manifest.get("backend")
    installed = backend_version(backend)
    if manifest.get("backend_version") != installed:
        raise ArtifactError(f"{path}: compiled with {backend} {manifest.get('backend_version')}, installed is "
                            f"{installed}; recompile it or install that version")
    files = manifest.get("files")
    if not isinstance(files, dict) or not files:
        raise ArtifactError(f"{path}: manifest lists no files")
    for name, digest in files.items():
        if os.path.basename(name) != name or name in (MANIFEST, "", ".", ".."):
            raise ArtifactError(f"{path}: manifest names a file outside the artifact: {name!r}")
        full = os.path.join(path, name)
        if not os.path.isfile(full):
            raise ArtifactError(f"{path}: {name} is missing; the artifact is incomplete, recompile it")
        if check_hashes and sha256_file(full) != digest:
            raise ArtifactError(f"{path}: {name} does not match its sha256 in the manifest; the artifact was "
                                f"modified or damaged, recompile it")
    return ArtifactInfo(path, manifest)


def _minor(version) -> tuple:
    parts = str(version).split(".")
    return tuple(parts[:2])

"""Bounded reads of regular files, shared by every stage that reads a user's files.

A path may name a FIFO (open blocks), a device (``/dev/zero`` never ends) or a
file far larger than its kind ever is. Every read of a model file, artifact file
or text file goes through :func:`open_regular`: it opens without blocking,
checks on the open descriptor that it is a regular file (so a swap between
the check and the read is impossible) and bounds the size before reading.
"""

from __future__ import annotations

import hashlib
import os
import stat

from .errors import KilnError, ModelFormatError

KiB, MiB, GiB = 2**10, 2**20, 2**30
MAX_JSON_BYTES = 64 * MiB  # config.json, tokenizer_config.json, generation_config.json, manifests
MAX_TOKENIZER_BYTES = 512 * MiB  # tokenizer.json (large vocabularies run to tens of MB)
MAX_TEMPLATE_BYTES = 1 * MiB  # a chat template (real ones are a few KB)


def _describe(mode: int) -> str:
    if stat.S_ISDIR(mode):
        return "a directory"
    if stat.S_ISFIFO(mode):
        return "a FIFO (named pipe)"
    if stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
        return "a device"
    if stat.S_ISSOCK(mode):
        return "a socket"
    return "not a regular file"


def open_regular(path, what: str = "file", max_bytes: int | None = None, error: type[KilnError] = ModelFormatError):
    """Open ``path`` for binary reading if it is a regular file of at most ``max_bytes``; returns the
    file object (its ``fstat`` was checked, so what is read is that file)."""
    path = os.fspath(path)
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    except FileNotFoundError:
        raise error(f"{path}: {what} not found; check the path") from None
    except IsADirectoryError:
        raise error(f"{path}: expected a {what}, found a directory") from None
    except OSError as err:
        raise error(f"{path}: cannot open the {what} ({err.strerror or type(err).__name__})") from None
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise error(f"{path}: expected a {what} (a regular file), found {_describe(info.st_mode)}")
        if max_bytes is not None and info.st_size > max_bytes:
            raise error(f"{path}: the {what} is {info.st_size:,} bytes, more than the {max_bytes:,} a {what} may "
                        f"have; check that this is the right file")
        os.set_blocking(fd, True)
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise


def read_bytes(path, what: str = "file", max_bytes: int | None = None,
               error: type[KilnError] = ModelFormatError) -> bytes:
    """The whole content of a regular file of at most ``max_bytes``."""
    with open_regular(path, what, max_bytes, error) as f:
        data = f.read(max_bytes + 1) if max_bytes is not None else f.read()
    if max_bytes is not None and len(data) > max_bytes:  # it grew after the size check
        raise error(f"{os.fspath(path)}: the {what} grew past {max_bytes:,} bytes while being read")
    return data


def read_text(path, what: str = "file", max_bytes: int | None = None,
              error: type[KilnError] = ModelFormatError) -> str:
    """A regular file of at most ``max_bytes`` decoded as UTF-8 (one-line error otherwise)."""
    data = read_bytes(path, what, max_bytes, error)
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as err:
        raise error(f"{os.fspath(path)}: expected UTF-8 text in the {what}, found an undecodable byte at offset "
                    f"{err.start}") from None


def sha256_of(file, chunk: int = 4 * MiB, sink=None) -> str:
    """sha256 of an open binary file from its current position to the end; every chunk read is also
    passed to ``sink`` (a copy made while hashing holds exactly the hashed bytes)."""
    digest = hashlib.sha256()
    while True:
        block = file.read(chunk)
        if not block:
            return digest.hexdigest()
        digest.update(block)
        if sink is not None:
            sink(block)

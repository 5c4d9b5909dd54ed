"""Bounded reads of regular files, shared by every stage that reads a user's files.

A path may name a FIFO (open blocks), a device (``/dev/zero`` never ends) or a
file far larger than its kind ever is. Every read of a model file, artifact file
or text file goes through :func:`open_regular`: it opens without blocking,
checks on the open descriptor that it is a regular file (so a swap between
the check and the read is impossible) and bounds the size before reading.
"""

from __future__ import annotations

import ctypes
import errno
import functools
import hashlib
import os
import re
import shutil
import stat
import tempfile

from .errors import KilnError, ModelFormatError

MiB = 2**20
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
        raise error(f"{path}: file not found (expected a {what}); check the path") from None
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


# Writing a directory in place of another ----------------------------------------------------------------
# Outputs are staged in a temporary sibling named ``.<name>.kiln-tmp-<pid>-<random>`` and renamed into
# place; a killed process leaves its staging directory behind, and the next write beside it removes it.
STAGING_MARKER = ".kiln-tmp-"
_STALE = re.compile(r"^\..*\.kiln-(?:tmp|old)-(\d+)-")
_RENAME_NOREPLACE, _RENAME_EXCHANGE = 1, 2


def make_staging_directory(path: str) -> str:
    """A new empty directory beside ``path`` (same filesystem, so it can be renamed onto it); stale ones
    from processes that are gone are removed first."""
    parent = os.path.dirname(path)
    os.makedirs(parent, exist_ok=True)
    remove_stale(parent, _STALE)
    return tempfile.mkdtemp(prefix=f".{os.path.basename(path)}{STAGING_MARKER}{os.getpid()}-", dir=parent)


def check_replaceable(path: str, is_ours, what: str, error: type[KilnError]) -> None:
    """Refuse ``path`` unless it is free or an existing ``what`` (``is_ours(path)``): a user's own file or
    directory is never replaced."""
    if not path:
        raise error(f"the output path is empty; give a directory name for the {what}")
    if not os.path.lexists(path):
        return
    if os.path.islink(path):
        raise error(f"{path} is a symbolic link; give a new path, or the path of an existing {what} itself")
    if not os.path.isdir(path):
        raise error(f"{path} exists and is a file, not a {what}; choose another output path (kiln replaces only "
                    f"an existing {what})")
    if not is_ours(path):
        raise error(f"{path} exists and is not a {what}; choose another output path, kiln replaces only an "
                    f"existing {what} and leaves everything else untouched")


def install_directory(staged: str, path: str, is_ours, what: str, error: type[KilnError]) -> None:
    """Move the complete directory ``staged`` to ``path``: onto a free path, or atomically in place of an
    existing ``what`` (refused for anything else, checked again at the moment of the swap)."""
    check_replaceable(path, is_ours, what, error)
    os.chmod(staged, 0o777 & ~_umask())  # mkdtemp made it private; the result gets the user's usual mode
    if not os.path.lexists(path):
        if _renameat2(staged, path, _RENAME_NOREPLACE) is None:
            if os.path.lexists(path):  # no renameat2 here: refuse rather than let rename replace something
                raise error(f"{path} appeared while the {what} was being written; run again")
            os.rename(staged, path)
        return
    if _renameat2(staged, path, _RENAME_EXCHANGE) is not None:
        if not is_ours(staged):  # something else took its place since the check: put it back untouched
            _renameat2(staged, path, _RENAME_EXCHANGE)
            raise error(f"{path} changed while the {what} was being written and is no longer a {what}; left "
                        f"it untouched")
        shutil.rmtree(staged, ignore_errors=True)
        return
    old = tempfile.mkdtemp(prefix=f".{os.path.basename(path)}.kiln-old-{os.getpid()}-", dir=os.path.dirname(path))
    os.rmdir(old)
    os.rename(path, old)
    try:
        os.rename(staged, path)
    except BaseException:
        os.rename(old, path)
        raise
    shutil.rmtree(old, ignore_errors=True)


def _umask() -> int:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    return 0o022


def _renameat2(source: str, target: str, flags: int):
    """Linux renameat2; None where the C library, kernel or filesystem lacks it (the caller falls back)."""
    func = _libc_renameat2()
    if func is None:
        return None
    if func(-100, os.fsencode(source), -100, os.fsencode(target), flags) == 0:  # -100: AT_FDCWD
        return True
    err = ctypes.get_errno()
    if err in (errno.ENOSYS, errno.EINVAL, errno.ENOTSUP):
        return None
    raise OSError(err, os.strerror(err), target)


@functools.lru_cache(maxsize=1)
def _libc_renameat2():
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        func = libc.renameat2
    except (OSError, AttributeError):
        return None
    func.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    func.restype = ctypes.c_int
    return func


def remove_stale(directory: str, pattern: "re.Pattern") -> list:
    """Remove entries of ``directory`` whose names match ``pattern`` (group 1: the pid that made them) when
    that process is gone: kiln's own temporary files left by a killed process. Returns what was removed."""
    removed = []
    try:
        names = os.listdir(directory)
    except OSError:
        return removed
    for name in names:
        match = pattern.match(name)
        if not match or _alive(int(match.group(1))):
            continue
        full = os.path.join(directory, name)
        try:
            if stat.S_ISDIR(os.lstat(full).st_mode):
                shutil.rmtree(full, ignore_errors=True)
            else:
                os.unlink(full)
            removed.append(full)
        except OSError:
            pass
    return removed


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError, ValueError):
        return True
    return True


def memory_bytes() -> int:
    """This machine's physical memory, or its control group's limit when that is lower: what a compile may
    plan to allocate."""
    total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    for limit_file in ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory/memory.limit_in_bytes"):
        try:
            with open(limit_file, "rb") as f:
                text = f.read(64).strip()
        except OSError:
            continue
        if text.isdigit():
            total = min(total, int(text))
    return total

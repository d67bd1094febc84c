"""A workspace tree as one archive (uncompressed tar) for moving it between machines.

Packing walks the tree by directory file descriptors with ``O_NOFOLLOW``:
hidden entries are included, symlinks are stored as links (their target
text, never followed), modes and modification times are kept, owners are not
(the receiving side gives entries its own owner). FIFOs, sockets and devices
cannot travel and are left out (and named).

Unpacking trusts nothing in the archive. Every name is checked (relative, no
``..``, no empty or ``.`` component, no duplicates), only directories,
regular files and symlinks are accepted, every parent must be a directory the
archive itself created earlier (so a symlink can never be used as a path to
write through), files are created with ``O_EXCL | O_NOFOLLOW`` under
directory descriptors, and sizes and entry counts are limited. Set-id bits
never survive a trip: a file made set-id by a session must not become a
set-id file of whoever applies it.
"""

from __future__ import annotations

import hashlib
import os
import stat
import tarfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO

from devsilo.protocol import SiloError

_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
_FILE_FLAGS = os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK
_COPY = 1024 * 1024
DEFAULT_MAX_ENTRIES = 1_000_000
SETID_BITS = 0o6000


class ArchiveError(SiloError):
    """An archive is unsafe or malformed, or a tree cannot be packed; the message names the entry."""


@dataclass(frozen=True)
class PackResult:
    """What :func:`pack_tree` wrote: entries and bytes of file content, and what it left out."""

    entries: int
    file_bytes: int
    skipped: tuple[str, ...]


def pack_tree(root: Path, out: Path, *, skip: frozenset[str] = frozenset(),
              max_bytes: int | None = None) -> PackResult:
    """Write the tree under ``root`` (top-level names in ``skip`` left out) to ``out`` as a tar.

    The output depends only on the tree (sorted names, no owners, whole-second
    times), so packing the same tree twice gives the same bytes.
    """
    fd = os.open(root, _DIR_FLAGS)
    entries = file_bytes = 0
    skipped: list[str] = []
    try:
        with tarfile.open(out, "w", format=tarfile.PAX_FORMAT, encoding="utf-8",
                          errors="surrogateescape") as tar:
            for rel, st, kind, data in _walk(fd, "", skip):
                info = tarfile.TarInfo(rel)
                info.mode = stat.S_IMODE(st.st_mode)
                info.mtime = int(st.st_mtime)
                info.uid = info.gid = 0
                info.uname = info.gname = ""
                if kind == "other":
                    skipped.append(rel)
                    continue
                entries += 1
                if kind == "dir":
                    info.type = tarfile.DIRTYPE
                    tar.addfile(info)
                elif kind == "symlink":
                    info.type = tarfile.SYMTYPE
                    info.linkname = data if isinstance(data, str) else ""
                    tar.addfile(info)
                else:
                    assert isinstance(data, int)
                    with os.fdopen(data, "rb") as f:
                        info.size = os.fstat(f.fileno()).st_size
                        file_bytes += info.size
                        if max_bytes is not None and file_bytes > max_bytes:
                            raise ArchiveError(f"{root} holds more than {max_bytes} bytes of files; "
                                               "that is over the transfer limit")
                        tar.addfile(info, f)
    finally:
        os.close(fd)
    return PackResult(entries, file_bytes, tuple(skipped))


def _walk(dir_fd: int, prefix: str, skip: frozenset[str]) -> Iterator[
        tuple[str, os.stat_result, str, int | str | None]]:
    """(relative path, lstat, kind, open file fd or link text) for every entry, parents first."""
    with os.scandir(dir_fd) as it:
        names = sorted(e.name for e in it if e.name not in skip)
    for name in names:
        rel = prefix + name
        st = os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
        if stat.S_ISDIR(st.st_mode):
            yield rel, st, "dir", None
            sub = os.open(name, _DIR_FLAGS, dir_fd=dir_fd)
            try:
                yield from _walk(sub, rel + "/", frozenset())
            finally:
                os.close(sub)
        elif stat.S_ISLNK(st.st_mode):
            yield rel, st, "symlink", os.readlink(name, dir_fd=dir_fd)
        elif stat.S_ISREG(st.st_mode):
            ffd = os.open(name, _FILE_FLAGS, dir_fd=dir_fd)
            if not stat.S_ISREG(os.fstat(ffd).st_mode):
                os.close(ffd)
                raise ArchiveError(f"{rel} changed type while being packed; try again")
            yield rel, st, "file", ffd
        else:
            yield rel, st, "other", None


def hash_chunks(path: Path, chunk_size: int) -> tuple[int, str, tuple[str, ...]]:
    """(size, SHA-256 of the whole file, SHA-256 of every ``chunk_size`` piece)."""
    whole = hashlib.sha256()
    chunks: list[str] = []
    size = 0
    with open(path, "rb") as f:
        while piece := f.read(chunk_size):
            whole.update(piece)
            chunks.append(hashlib.sha256(piece).hexdigest())
            size += len(piece)
    return size, whole.hexdigest(), tuple(chunks)


def read_range(path: Path, offset: int, length: int) -> bytes:
    """``length`` bytes of ``path`` from ``offset`` (fewer at its end)."""
    with open(path, "rb") as f:
        f.seek(offset)
        return f.read(length)


def write_range(path: Path, offset: int, data: bytes, *, size: int | None = None) -> None:
    """Write ``data`` at ``offset`` of ``path`` (created when missing; ``size`` sets its length)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        if size is not None and os.fstat(fd).st_size != size:
            os.ftruncate(fd, size)
        view = memoryview(data)
        while view:
            view = view[os.pwrite(fd, view, offset + len(data) - len(view)):]
    finally:
        os.close(fd)


def file_sha256(path: Path) -> str:
    """SHA-256 of a whole file."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while piece := f.read(_COPY):
            h.update(piece)
    return h.hexdigest()


def _check_name(name: str) -> str:
    if not name or "\0" in name:
        raise ArchiveError(f"archive entry {name!r} has an empty or NUL-bearing name")
    if name.startswith("/"):
        raise ArchiveError(f"archive entry {name!r} is an absolute path")
    parts = name.rstrip("/").split("/")
    for part in parts:
        if part in ("", ".", ".."):
            raise ArchiveError(f"archive entry {name!r} has a {part or 'empty'!r} component "
                               "(path traversal is refused)")
    return "/".join(parts)


@dataclass(frozen=True)
class UnpackResult:
    """What :func:`unpack_tree` made."""

    entries: int
    file_bytes: int


def unpack_tree(archive: Path, dest: Path, *, max_bytes: int,
                max_entries: int = DEFAULT_MAX_ENTRIES) -> UnpackResult:
    """Extract ``archive`` into the empty directory ``dest``, refusing anything unsafe.

    Raises ArchiveError naming the first bad entry; whatever was extracted
    before it stays in ``dest`` for the caller to remove.
    """
    root_fd = os.open(dest, _DIR_FLAGS)
    dirs: dict[str, int] = {"": root_fd}  # directories this archive made, by path: open fds
    modes: list[tuple[str, int, int]] = []  # (dir path, mode, mtime) set last, deepest first
    seen: set[str] = set()
    total = count = 0
    try:
        try:
            tar = tarfile.open(archive, "r:", encoding="utf-8", errors="surrogateescape")  # noqa: SIM115
        except tarfile.TarError as e:
            raise ArchiveError(f"{archive.name} is not a readable tar archive: {e}") from e
        with tar:
            while True:
                try:
                    member = tar.next()
                except tarfile.TarError as e:
                    raise ArchiveError(f"archive is corrupt after {count} entries: {e}") from e
                if member is None:
                    break
                rel = _check_name(member.name)
                if rel in seen:
                    raise ArchiveError(f"archive entry {rel!r} appears twice")
                seen.add(rel)
                count += 1
                if count > max_entries:
                    raise ArchiveError(f"archive holds more than {max_entries} entries")
                parent, _, name = rel.rpartition("/")
                pfd = dirs.get(parent)
                if pfd is None:
                    raise ArchiveError(f"archive entry {rel!r} comes before (or without) its "
                                       f"directory {parent!r}, or that is not a directory")
                mode = member.mode & 0o7777 & ~SETID_BITS
                if member.isdir():
                    os.mkdir(name, 0o700, dir_fd=pfd)
                    dirs[rel] = os.open(name, _DIR_FLAGS, dir_fd=pfd)
                    modes.append((rel, mode, int(member.mtime)))
                elif member.issym():
                    os.symlink(member.linkname, name, dir_fd=pfd)
                    os.utime(name, (member.mtime, member.mtime), dir_fd=pfd, follow_symlinks=False)
                elif member.isreg():
                    total += member.size
                    if total > max_bytes:
                        raise ArchiveError(f"archive holds more than {max_bytes} bytes of files")
                    src = tar.extractfile(member)
                    assert src is not None
                    _write_file(pfd, name, src, member.size, mode, int(member.mtime), rel)
                else:
                    kind = "hard link" if member.islnk() else "device, FIFO or other special file"
                    raise ArchiveError(f"archive entry {rel!r} is a {kind}; only files, directories "
                                       "and symlinks travel")
        for rel, mode, mtime in sorted(modes, key=lambda m: -m[0].count("/")):
            os.fchmod(dirs[rel], mode)
            os.utime(dirs[rel], (mtime, mtime))
    finally:
        for fd in dirs.values():
            os.close(fd)
    return UnpackResult(count, total)


def _write_file(dir_fd: int, name: str, src: IO[bytes], size: int, mode: int, mtime: int,
                rel: str) -> None:
    fd = os.open(name, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600,
                 dir_fd=dir_fd)
    try:
        left = size
        while left:
            piece = src.read(min(_COPY, left))
            if not piece:
                raise ArchiveError(f"archive ends inside {rel!r}")
            view = memoryview(piece)
            while view:
                view = view[os.write(fd, view):]
            left -= len(piece)
        os.fchmod(fd, mode)
        os.utime(fd, (mtime, mtime))
    finally:
        os.close(fd)

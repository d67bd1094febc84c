"""Workspace lock and unlock: move a directory's contents into executor-owned storage and back.

Storage is a root-only (0700) directory per workspace::

    <store root>/<id>/
        state.json      phase and step, rewritten atomically (fsync) around every step
        manifest.json   the lock-time snapshot (every entry, hashes, modes, owners)
        originals/      a copy of every regular file at lock time, content-addressed
        files/          the workspace's contents while locked (what the sandbox mounts)
        after.json      the snapshot taken at unlock, before the files move back
        report.json     the change report of the last unlock

Every step is idempotent and the state records which step is done, so a
process killed at any point (SIGKILL included) is finished by running the
same operation again: moves are per top-level entry with ``rename(2)``
(atomic: an entry is either still at the path or already in the store), and
across filesystems each entry is copied to a temporary name, verified,
renamed into place, and only then removed from its source.

With ``storage="ext4"`` the ``files/`` directory is the mount point of a
per-workspace ext4 image (``image.ext4`` beside it) mounted only in the
executor's private mount namespace (see ``_ext4``). The image is made from the
tree (``mkfs.ext4 -d``, in C), synced, and checked against the lock's manifest
before any source is touched. Then, with the store on the workspace's
filesystem, the tree itself is renamed into ``held/`` (root-only, never
mounted in a sandbox; it stands in for ``originals/``), and unlock writes into
it only what sessions changed, keeping the originals of those for the report,
before renaming it back; with the store elsewhere, the sources are removed
and unlock copies the image's whole tree back out in one ``cp -a``. A tree
mkfs cannot reproduce (a top-level ``lost+found``, a kind of entry it drops, a
tree still changing) is copied in entry by entry instead. Otherwise the
contents are protected by file permissions only, and the warning says so.
"""

from __future__ import annotations

import ctypes
import errno
import hashlib
import json
import os
import secrets
import shutil
import signal
import stat
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from devsilo.protocol import SiloError
from devsilo.runtime._tree_archive import ArchiveError, pack_tree, unpack_tree

from ._ext4 import IMAGE, Ext4Error, create_image, image_size, mount_image, unmount_image
from ._risk import check_workspace
from ._snapshot import (
    _DIR_FLAGS,
    ChangeReport,
    Entry,
    WorkspaceSnapshot,
    diff,
    open_dir_nofollow,
    open_nofollow,
    original_path,
)

MARKER = ".devsilo-locked"
"""The file left at a locked workspace's path, naming the store and how to unlock."""
ROOT_ONLY_WARNING = (
    "workspace storage is a root-only directory on this host, not an ext4 image mounted only "
    "inside the sandbox: the contents are protected by file permissions alone, so any root "
    "process on this host can read and change them")
CRASH_ENV = "DEVSILO_TEST_CRASH_AFTER"
"""TEST ONLY: when set to a step name (or several, comma-separated), the process SIGKILLs itself
right after that step.

Crash tests use it to kill lock and unlock at exact points; it has no other use.
"""
_LOCK_STEPS = ("started", "snapshotted", "originals", "moved", "marked", "sealed")
_UNLOCK_STEPS = ("started", "opened", "measured", "owners", "unmarked", "restored", "moded")


class WorkspaceLockError(SiloError):
    """A workspace could not be locked or unlocked; the message says what to do."""


def _crash_point(step: str) -> None:
    """Kill this process right here when a crash test asked for this step (test-only hook)."""
    if step in os.environ.get(CRASH_ENV, "").split(","):
        os.kill(os.getpid(), signal.SIGKILL)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_atomic(path: Path, text: str) -> None:
    """Write, fsync, rename over, fsync the directory: a reader sees the old or the new file."""
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
    try:
        os.write(fd, text.encode())
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)
    _fsync_dir(path.parent)


def _lchown(path: Path, uid: int, gid: int) -> None:
    os.chown(path, uid, gid, follow_symlinks=False)


def _remove(path: Path) -> None:
    """Remove a file, symlink or whole tree without following symlinks; missing is fine."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    if stat.S_ISDIR(st.st_mode):
        shutil.rmtree(path)
    else:
        os.unlink(path)


def _copy_entry(src: Path, dst: Path) -> None:
    """Copy one entry (tree, file or symlink) with modes, owners and times; never follow links."""
    if os.geteuid() == 0:
        # GNU cp in one process: modes, owners, set-id bits, times, symlinks as links,
        # hard links kept together; per-file work in C rather than Python.
        done = subprocess.run(["cp", "-a", "--no-target-directory", "--", str(src), str(dst)],
                              capture_output=True, text=True, check=False)
        if done.returncode != 0:
            raise WorkspaceLockError(f"cannot copy {src} to {dst}: {done.stderr.strip()[:500]}")
        return
    if src.is_symlink():
        os.symlink(os.readlink(src), dst)
    elif src.is_dir():
        shutil.copytree(src, dst, symlinks=True)
    else:
        shutil.copy2(src, dst, follow_symlinks=False)
    # copytree/copy2 keep modes and times but not owners; files keep their owner.
    pairs = [(src, dst)]
    if src.is_dir() and not src.is_symlink():
        for dirpath, dirnames, filenames in os.walk(src):
            rel = Path(dirpath).relative_to(src)
            pairs += [(Path(dirpath) / n, dst / rel / n) for n in dirnames + filenames]
    for s, d in pairs:
        st = os.lstat(s)
        _lchown(d, st.st_uid, st.st_gid)
        if not stat.S_ISLNK(st.st_mode):
            os.chmod(d, stat.S_IMODE(st.st_mode))  # chown clears set-id bits; put them back


def _entry_manifest(parent: Path, name: str) -> set[tuple[Any, ...]]:
    """What a copy must reproduce of one top-level entry and everything below it.

    Type, mode, owner, and for files their size and modification time (which
    the copy carries over to the nanosecond), for symlinks their target: a
    copy cut short, or one of the wrong file, differs. Contents are not hashed
    again here: the lock's manifest holds every file's SHA-256, and the change
    report compares against it, so a copy that differed in content alone
    would show there as a modified file rather than pass unseen.
    """
    root = parent / name
    found: set[tuple[Any, ...]] = set()

    def add(path: Path, rel: str) -> os.stat_result:
        st = os.lstat(path)
        kind = stat.S_IFMT(st.st_mode)
        found.add((rel, kind, stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid,
                   st.st_size if stat.S_ISREG(kind) else None,
                   st.st_mtime_ns if stat.S_ISREG(kind) else None,
                   os.readlink(path) if stat.S_ISLNK(kind) else None))
        return st

    if stat.S_ISDIR(add(root, "").st_mode):
        for dirpath, dirnames, filenames in os.walk(root):
            base = Path(dirpath)
            for n in dirnames + filenames:
                add(base / n, str((base / n).relative_to(root)))
    return found


Meta = tuple[str, int, int, int, "int | None", "str | None"]
"""(type, mode, uid, gid, size of a file, target of a symlink): what a copy must reproduce."""


def _kind(mode: int) -> str:
    if stat.S_ISREG(mode):
        return "file"
    if stat.S_ISDIR(mode):
        return "dir"
    if stat.S_ISLNK(mode):
        return "symlink"
    return "other"


def _walk_tree(root: Path, visit: Callable[[int, str, str, os.stat_result], None], *,
               skip_top: frozenset[str] = frozenset()) -> None:
    """Call ``visit(dir_fd, name, rel, lstat)`` for every entry below ``root`` (not ``root``
    itself, nor the top-level names in ``skip_top``), a directory's entries before the
    directory, walking by directory descriptors opened ``O_NOFOLLOW``: symlinks are never
    followed."""

    def walk(dir_fd: int, prefix: str) -> None:
        with os.scandir(dir_fd) as it:
            found = [e for e in it if prefix or e.name not in skip_top]
        for e in found:
            st = e.stat(follow_symlinks=False)
            rel = prefix + e.name
            if stat.S_ISDIR(st.st_mode):
                sub = os.open(e.name, _DIR_FLAGS, dir_fd=dir_fd)
                try:
                    walk(sub, rel + "/")
                finally:
                    os.close(sub)
            visit(dir_fd, e.name, rel, st)

    fd = open_dir_nofollow(root)
    try:
        walk(fd, "")
    finally:
        os.close(fd)


def _tree_meta(root: Path, skip: frozenset[str] = frozenset()) -> dict[str, Meta]:
    """:data:`Meta` of every entry below ``root`` (not ``root`` itself), by relative path.

    One ``lstat`` per entry, no hashing; symlinks are read as links, never followed.
    """
    out: dict[str, Meta] = {}

    def add(dir_fd: int, name: str, rel: str, st: os.stat_result) -> None:
        kind = _kind(st.st_mode)
        out[rel] = (kind, stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid,
                    st.st_size if kind == "file" else None,
                    os.readlink(name, dir_fd=dir_fd) if kind == "symlink" else None)

    _walk_tree(root, add, skip_top=skip)
    return out


def _tree_times(root: Path) -> dict[str, tuple[int, int]]:
    """(atime, mtime) in nanoseconds of every entry below ``root``, walked as :func:`_tree_meta` does."""
    out: dict[str, tuple[int, int]] = {}

    def add(_dir_fd: int, _name: str, rel: str, st: os.stat_result) -> None:
        out[rel] = (st.st_atime_ns, st.st_mtime_ns)

    _walk_tree(root, add)
    return out


def _take_times(held: Path, image_times: dict[str, tuple[int, int]]) -> None:
    """Give entries of ``held`` the image's times where a session changed them (``touch``).

    The image was made with whole-second times (mkfs.ext4 -d), so an image
    time equal to the held one cut to the second is the lock-time time: the
    held (exact) one stays. Directories are done after what is in them.
    """
    def put_back(dir_fd: int, name: str, rel: str, st: os.stat_result) -> None:
        times = image_times.get(rel)
        if times is None or times[1] == st.st_mtime_ns:
            return
        if times[1] % 1_000_000_000 == 0 and times[1] == st.st_mtime_ns - st.st_mtime_ns % 1_000_000_000:
            return
        os.utime(name, ns=times, dir_fd=dir_fd, follow_symlinks=False)

    _walk_tree(held, put_back)


def _meta_of(entry: Entry) -> Meta:
    return (entry.type, entry.mode, entry.uid, entry.gid,
            entry.size if entry.type == "file" else None,
            entry.target if entry.type == "symlink" else None)


def _fix_image(src: Path, files: Path, snap: WorkspaceSnapshot, *, times: bool) -> None:
    """Put back what ``mkfs.ext4 -d`` (1.47) drops: set-id and sticky bits, and with ``times``
    the sub-second part of every entry's times (it keeps whole seconds), read from ``src``."""
    for rel, e in snap.entries.items():
        if e.type in ("file", "dir") and e.mode & 0o7000:
            os.chmod(files / rel, e.mode)  # the image is made from the tree; no session has run
    if not times:
        return

    def copy_times(_dir_fd: int, _name: str, rel: str, st: os.stat_result) -> None:
        if os.path.lexists(files / rel):
            os.utime(files / rel, ns=(st.st_atime_ns, st.st_mtime_ns), follow_symlinks=False)

    _walk_tree(src, copy_times, skip_top=frozenset({MARKER}))


def _syncfs(path: Path) -> None:
    """Write back everything dirty on the filesystem holding ``path`` (``syncfs(2)``; that one only)."""
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        if ctypes.CDLL(None, use_errno=True).syncfs(fd) != 0:
            raise OSError(ctypes.get_errno(), f"syncfs {path}: {os.strerror(ctypes.get_errno())}")
    finally:
        os.close(fd)


def _remove_entries(root: Path, *, skip: frozenset[str], step: str) -> None:
    """Remove every top-level entry of ``root`` but ``skip`` (without following symlinks)."""
    for i, name in enumerate(sorted(os.listdir(root))):
        if name not in skip:
            _remove(root / name)
            _crash_point(f"{step}.{i}")
    _fsync_dir(root)


def _move_entries(src_dir: Path, dst_dir: Path, *, skip: frozenset[str], step: str,
                  journal: Path) -> None:
    """Move every top-level entry of ``src_dir`` into ``dst_dir``, resumably.

    Same filesystem: one ``rename`` each, atomic, so a killed run leaves every
    entry on exactly one side. Across filesystems: the entry is copied to a
    partial name with a random part (no workspace entry can collide with it),
    verified, renamed into place, then removed from its source; ``journal``
    records which entry is in flight and whether its rename happened, so a
    rerun either drops the partial copy or finishes removing the source.
    """
    if journal.exists():
        inflight = json.loads(journal.read_text())
        if inflight["renamed"]:
            _remove(src_dir / inflight["name"])
        else:
            _remove(dst_dir / inflight["partial"])
        journal.unlink()
    for i, name in enumerate(sorted(os.listdir(src_dir))):
        if name in skip:
            continue
        src, dst = src_dir / name, dst_dir / name
        if os.path.lexists(dst):
            raise WorkspaceLockError(f"both {src} and {dst} exist; move one aside and run the "
                                     "command again")
        try:
            os.rename(src, dst)
        except OSError as e:
            if e.errno != errno.EXDEV:
                raise WorkspaceLockError(f"cannot move {src} to {dst}: {e.strerror}") from e
            partial = f".devsilo-partial-{secrets.token_hex(8)}"
            _write_atomic(journal, json.dumps({"name": name, "partial": partial,
                                               "renamed": False}))
            _copy_entry(src, dst_dir / partial)
            if _entry_manifest(src_dir, name) != _entry_manifest(dst_dir, partial):
                _remove(dst_dir / partial)
                journal.unlink()
                raise WorkspaceLockError(f"copy of {src} to {dst_dir} did not verify; "
                                         "run the command again") from e
            _crash_point(f"{step}.copied")
            os.rename(dst_dir / partial, dst)
            _write_atomic(journal, json.dumps({"name": name, "partial": partial,
                                               "renamed": True}))
            _crash_point(f"{step}.renamed")
            _remove(src)
            journal.unlink()
        _crash_point(f"{step}.{i}")


def _copy_out(files: Path, ws: Path, *, journal: Path, expected: dict[str, Meta]) -> None:
    """Copy an image's whole tree back into ``ws``, resumably; the image itself is left as it is.

    One ``cp -a`` of the tree into a partial directory inside ``ws`` (hard
    links across the whole tree kept together), checked against
    ``expected`` (failing that, against a walk of the image), written to
    disk, then each top-level entry renamed into place. The image still
    holds everything until the caller drops it, so nothing is removed from it
    entry by entry; ``journal`` records the partial directory and whether it
    is complete, so a rerun either drops it and copies again or finishes the
    renames.
    """
    inflight = json.loads(journal.read_text()) if journal.exists() else None
    if inflight is not None and not inflight["copied"]:
        _remove(ws / inflight["partial"])
        journal.unlink()
        inflight = None
    if inflight is None:
        for name in os.listdir(files):
            if os.path.lexists(ws / name):
                raise WorkspaceLockError(f"both {files / name} and {ws / name} exist; move the "
                                         "latter aside and run the command again")
        partial = ws / f".devsilo-partial-{secrets.token_hex(8)}"
        _write_atomic(journal, json.dumps({"partial": partial.name, "copied": False}))
        _copy_entry(files, partial)
        copied = _tree_meta(partial)
        if copied != expected and copied != _tree_meta(files):
            _remove(partial)
            journal.unlink()
            raise WorkspaceLockError(f"copy of {files} to {ws} did not verify; run the command again")
        _syncfs(partial)  # on disk before the image, the only other copy, can go
        _write_atomic(journal, json.dumps({"partial": partial.name, "copied": True}))
        _crash_point("unlock.move.copied")
    else:
        partial = ws / inflight["partial"]
    if os.path.lexists(partial):
        for i, name in enumerate(sorted(os.listdir(partial))):
            if os.path.lexists(ws / name):
                raise WorkspaceLockError(f"both {partial / name} and {ws / name} exist; move the "
                                         "latter aside and run the command again")
            os.rename(partial / name, ws / name)
            _crash_point(f"unlock.move.{i}")
        os.rmdir(partial)
    _fsync_dir(ws)
    journal.unlink()


def _keep_original(held: Path, rel: str, originals: Path, sha256: str) -> None:
    """Store the held (lock-time) content of ``rel`` under its hash, once."""
    dst = original_path(originals, sha256)
    if dst.exists():
        return
    dst.parent.mkdir(mode=0o700, exist_ok=True)
    tmp = originals / f".tmp-{secrets.token_hex(8)}"
    src = open_nofollow(held, rel)
    try:
        with open(tmp, "wb") as out:
            while chunk := os.read(src, 1024 * 1024):
                out.write(chunk)
    finally:
        os.close(src)
    os.replace(tmp, dst)


def _parent_fd(root: Path, rel: str) -> int | None:
    """The directory holding ``root/rel``, opened without following any symlink; None if gone."""
    fd = open_dir_nofollow(root)
    for part in rel.split("/")[:-1]:
        try:
            nxt = os.open(part, _DIR_FLAGS, dir_fd=fd)
        except OSError as e:
            os.close(fd)
            if e.errno in (errno.ENOENT, errno.ENOTDIR, errno.ELOOP):
                return None
            raise
        os.close(fd)
        fd = nxt
    return fd


def _remove_at(dir_fd: int, name: str) -> None:
    """Remove ``name`` in ``dir_fd`` (a whole tree for a directory), following no symlink."""
    try:
        st = os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
    except FileNotFoundError:
        return
    if stat.S_ISDIR(st.st_mode):
        shutil.rmtree(name, dir_fd=dir_fd)
    else:
        os.unlink(name, dir_fd=dir_fd)


def _apply_changes(files: Path, held: Path, incoming: Path, before: WorkspaceSnapshot,
                   after: WorkspaceSnapshot, expected: dict[str, Meta]) -> None:
    """Make ``held`` (the lock-time tree) equal to the image's tree at ``files``.

    Only what the session changed is written: removed entries go, new and
    changed ones are copied from the image (read by descriptors opened
    ``O_NOFOLLOW``) with the owner and mode unlock gives them, and entries
    changed only in mode get that mode. Paths are handled in sorted order
    (a directory before what is in it), and every path in ``held`` is reached
    through directories opened ``O_NOFOLLOW``: a directory the session turned
    into a symlink is replaced whole, so nothing below it is followed out.
    Files are written in ``incoming`` (same filesystem) and renamed into
    place, so each step can be done again after a crash.
    """
    _remove(incoming)
    incoming.mkdir(mode=0o700)
    for rel in sorted(before.entries.keys() | after.entries.keys()):
        b, a = before.entries.get(rel), after.entries.get(rel)
        same = (a is not None and b is not None and b.type == a.type and b.sha256 == a.sha256
                and b.target == a.target)
        if same and (a is None or b is None or a.type == "symlink" or expected[rel][1] == b.mode):
            continue  # held has it as it is (owners: unlock gives lock-time owners back)
        parent = _parent_fd(held, rel)
        if parent is None:
            continue  # under a directory that was removed or replaced: gone with it
        name = rel.rpartition("/")[2]
        try:
            if a is None:
                _remove_at(parent, name)
                continue
            _, mode, uid, gid, _, _ = expected[rel]
            if same:
                if a.type != "symlink" and b is not None and mode != b.mode:
                    os.chmod(name, mode, dir_fd=parent)  # not a symlink: it is held's own entry
                continue
            if a.type == "dir":
                try:
                    st = os.stat(name, dir_fd=parent, follow_symlinks=False)
                    if not stat.S_ISDIR(st.st_mode):
                        _remove_at(parent, name)
                        raise FileNotFoundError
                except FileNotFoundError:
                    os.mkdir(name, 0o700, dir_fd=parent)
                os.chown(name, uid, gid, dir_fd=parent, follow_symlinks=False)
                os.chmod(name, mode, dir_fd=parent)
                continue
            tmp = incoming / secrets.token_hex(8)
            if a.type == "file":
                src = open_nofollow(files, rel)
                try:
                    sst = os.fstat(src)
                    if not stat.S_ISREG(sst.st_mode):
                        raise WorkspaceLockError(f"{rel} changed type in the image during unlock")
                    with open(tmp, "wb") as out:
                        while chunk := os.read(src, 1024 * 1024):
                            out.write(chunk)
                        out.flush()
                        os.fchown(out.fileno(), uid, gid)
                        os.fchmod(out.fileno(), mode)
                        os.utime(out.fileno(), ns=(sst.st_atime_ns, sst.st_mtime_ns))
                finally:
                    os.close(src)
            else:
                sparent = _parent_fd(files, rel)
                if sparent is None:
                    raise WorkspaceLockError(f"{rel} vanished from the image during unlock")
                try:
                    sst = os.stat(name, dir_fd=sparent, follow_symlinks=False)
                    if a.type == "symlink":
                        os.symlink(os.readlink(name, dir_fd=sparent), tmp)
                    else:
                        os.mknod(tmp, sst.st_mode, sst.st_rdev)
                        os.chmod(tmp, mode)
                finally:
                    os.close(sparent)
                os.chown(tmp, uid, gid, follow_symlinks=False)
                os.utime(tmp, ns=(sst.st_atime_ns, sst.st_mtime_ns), follow_symlinks=False)
            try:
                st = os.stat(name, dir_fd=parent, follow_symlinks=False)
                if stat.S_ISDIR(st.st_mode):
                    _remove_at(parent, name)  # a directory the session replaced
            except FileNotFoundError:
                pass
            os.rename(tmp, name, dst_dir_fd=parent)
        finally:
            os.close(parent)
    _remove(incoming)


def _given_back(entry: Entry, old: Entry | None, before: WorkspaceSnapshot) -> tuple[int, int, int]:
    """The (uid, gid, mode) :func:`_give_back` gives an entry measured at unlock."""
    uid, gid = (old.uid, old.gid) if old else (before.root_uid, before.root_gid)
    if entry.type not in ("file", "dir"):
        return uid, gid, entry.mode
    kept = (old is not None and old.type == entry.type and old.mode == entry.mode
            and old.sha256 == entry.sha256)
    return uid, gid, entry.mode if kept else entry.mode & ~0o6000


def _given_back_meta(after: WorkspaceSnapshot, before: WorkspaceSnapshot) -> dict[str, Meta]:
    """:data:`Meta` of every entry once :func:`_give_back` is done with it."""
    out: dict[str, Meta] = {}
    for rel, e in after.entries.items():
        uid, gid, mode = _given_back(e, before.entries.get(rel), before)
        out[rel] = (e.type, mode, uid, gid, e.size if e.type == "file" else None,
                    e.target if e.type == "symlink" else None)
    return out


def _give_back(files: Path, rel: str, entry: Entry, old: Entry | None,
               before: WorkspaceSnapshot) -> None:
    """Give one entry its lock-time owner (new entries: the workspace's owner).

    Walks by directory descriptors with ``O_NOFOLLOW``, so a symlink in the
    tree cannot redirect the chown outside it. Set-id bits survive only on
    an entry that had exactly this mode and content at lock time: anything
    else the session marked set-id would otherwise become a set-id file of
    the user (or of root) on the host.
    """
    uid, gid, mode = _given_back(entry, old, before)
    if (uid, gid, mode) == (entry.uid, entry.gid, entry.mode):
        return  # already so (measured just before, with every session stopped)
    parent, _, name = rel.rpartition("/")
    try:
        dir_fd = open_dir_nofollow(files)
        for part in parent.split("/") if parent else []:
            nxt = os.open(part, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW, dir_fd=dir_fd)
            os.close(dir_fd)
            dir_fd = nxt
    except OSError:
        return  # gone since it was measured; nothing to give back
    try:
        os.chown(name, uid, gid, dir_fd=dir_fd, follow_symlinks=False)
        if entry.type not in ("file", "dir"):
            return
        flags = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
        fd = os.open(name, flags, dir_fd=dir_fd)
        try:
            os.fchmod(fd, mode)  # chown may have cleared set-id bits; set exactly what stays
        finally:
            os.close(fd)
    except FileNotFoundError:
        return
    finally:
        os.close(dir_fd)


@dataclass(frozen=True)
class LockedWorkspace:
    """A locked workspace: where its contents are and what the lock took."""

    path: Path
    id: str
    store_dir: Path
    files_dir: Path
    originals_dir: Path
    locked_at: float
    entries: int
    warning: str


STORAGE_KINDS = ("directory", "ext4")


class WorkspaceStore:
    """Executor-owned storage for locked workspaces under ``root`` (created 0700).

    ``storage`` is how new locks keep their files: ``directory`` (root-only
    directory, protected by permissions alone) or ``ext4`` (an image per
    workspace mounted at its ``files/`` in the executor's private mount
    namespace, see ``_ext4``); ``fallback_reason`` says why a directory is
    used where an image was wanted.
    """

    def __init__(self, root: Path, storage: str = "directory", fallback_reason: str | None = None) -> None:
        if storage not in STORAGE_KINDS:
            raise WorkspaceLockError(f"unknown workspace storage {storage!r}; use one of {STORAGE_KINDS}")
        self.root = root
        self.storage = storage
        self.fallback_reason = fallback_reason
        root.mkdir(parents=True, exist_ok=True)
        os.chmod(root, 0o700)

    def warnings_for(self, state: dict[str, Any] | None) -> tuple[str, ...]:
        """What a locked workspace's storage means for the user (none for an image)."""
        if state is not None and state.get("storage") == "ext4":
            return ()
        why = f" ({self.fallback_reason})" if self.fallback_reason else ""
        return (ROOT_ONLY_WARNING + why,)

    def ensure_image(self, sdir: Path, state: dict[str, Any], tree_bytes: int,
                     entries: int = 0) -> None:
        """Make (once) and mount (every time: mounts die with the executor) a workspace's image."""
        files = sdir / "files"
        if not state.get("image_ready"):
            unmount_image(files)
            create_image(sdir / IMAGE, image_size(tree_bytes), entries=entries)
            mount_image(sdir / IMAGE, files, fresh=True)
            state["image_ready"] = True
            _write_atomic(sdir / "state.json", json.dumps(state))
        else:
            mount_image(sdir / IMAGE, files)

    def check_mounted(self, files: Path) -> Path:
        """``files`` when its contents are there: an image that is not mounted would look empty."""
        if (files.parent / IMAGE).exists() and not os.path.ismount(files):
            raise WorkspaceLockError(f"the ext4 image of {files.parent.name} is not mounted on this executor "
                                     f"({self.fallback_reason or 'see its log'}); no session can use it "
                                     "until it is")
        return files

    def drop_image(self, sdir: Path) -> None:
        """Unmount and delete a workspace's image (after its files moved out)."""
        unmount_image(sdir / "files")
        (sdir / IMAGE).unlink(missing_ok=True)

    def remount(self) -> list[str]:
        """Mount the image of every workspace held in one (after a restart); return their ids.

        An image that cannot be mounted (no private namespace this time, a
        broken image) is named in the log by the caller and left alone: its
        workspace refuses sessions until it mounts, and nothing is lost.
        """
        done = []
        for state_file in sorted(self.root.glob("*/state.json")):
            try:
                st = json.loads(state_file.read_text())
            except (OSError, ValueError):
                continue
            image = state_file.parent / IMAGE
            if (st.get("storage") == "ext4" and st.get("image_ready") and image.exists()
                    and st.get("phase") in ("locking", "locked", "unlocking")):
                if self.storage != "ext4":
                    done.append(f"{state_file.parent.name}: not mounted ({self.fallback_reason})")
                    continue
                try:
                    mount_image(image, state_file.parent / "files")
                except Ext4Error as exc:
                    done.append(f"{state_file.parent.name}: not mounted ({exc})")
                    continue
                done.append(state_file.parent.name)
        return done

    def workspace_id(self, path: Path) -> str:
        """A stable id per resolved path, so lock and unlock find the same store after a crash."""
        digest = hashlib.sha256(os.fsencode(path)).hexdigest()[:16]
        return f"{path.name or 'root'}-{digest}"

    def store_dir(self, path: Path) -> Path:
        """The per-workspace storage directory."""
        return self.root / self.workspace_id(path.resolve())

    def originals_dir(self, path: Path) -> Path:
        """Where the lock-time originals are (for :meth:`ChangeReport.render`)."""
        return self.store_dir(path) / "originals"

    def state(self, path: Path) -> dict[str, Any] | None:
        """The recorded state of a workspace's lock, or None when it was never locked here."""
        f = self.store_dir(path) / "state.json"
        return json.loads(f.read_text()) if f.exists() else None

    def _set(self, sdir: Path, state: dict[str, Any], phase: str, step: str) -> None:
        state.update(phase=phase, step=step)
        _write_atomic(sdir / "state.json", json.dumps(state))
        _crash_point(f"{'lock' if phase in ('locking', 'locked') else 'unlock'}.{step}")

    # ---- lock -------------------------------------------------------------------------

    def lock(self, path: Path, *, state_dirs: list[Path]) -> LockedWorkspace:
        """Lock ``path``: snapshot, store originals, move the contents here, leave a marker.

        Refuses ``/``, system and home directories and anything overlapping a
        state directory (the risk list) or this store. Locking a locked
        workspace returns it unchanged; a lock that was killed is finished.
        """
        ws = check_workspace(str(path), state_dirs)
        store = self.root.resolve()
        if ws == store or ws.is_relative_to(store) or store.is_relative_to(ws):
            raise WorkspaceLockError(f"workspace {ws} overlaps the workspace store {store}")
        sdir = self.store_dir(ws)
        state = self.state(ws)
        if state and state["phase"] == "unlocking":
            raise WorkspaceLockError(f"{ws} is being unlocked; run unlock again to finish it")
        if state is None or state["phase"] == "unlocked":
            if os.path.lexists(ws / MARKER):
                raise WorkspaceLockError(
                    f"{ws} holds a {MARKER} file but this executor has no lock for it; "
                    "it is locked elsewhere, or remove the file if it is stale")
            if sdir.exists():
                shutil.rmtree(sdir)  # the previous lock's store, kept for its report
            sdir.mkdir(mode=0o700)
            os.chmod(sdir, 0o700)
            state = {"path": str(ws), "id": sdir.name, "storage": self.storage}
            self._set(sdir, state, "locking", "started")
        done = _LOCK_STEPS.index(state["step"])
        files, originals = sdir / "files", sdir / "originals"

        if done < _LOCK_STEPS.index("snapshotted"):
            # Nothing has moved yet, so a killed lock simply takes the snapshot again
            # (originals already stored are content-addressed and simply reused).
            originals.mkdir(mode=0o700, exist_ok=True)
            for stale in originals.glob(".tmp-*"):
                stale.unlink()  # a copy the killed run had not finished
            if self._holds(ws, sdir, state):
                # The tree itself is kept (renamed into held/, on its own filesystem): it holds
                # the originals, and unlock saves those of the files a session changed.
                state["held"] = True
            snap = WorkspaceSnapshot.take(ws, originals=None if state.get("held") else originals)
            _write_atomic(sdir / "manifest.json", snap.to_json())
            state.update(root_mode=snap.root_mode, root_uid=snap.root_uid,
                         root_gid=snap.root_gid, locked_at=snap.taken_at)
            self._set(sdir, state, "locking", "snapshotted")
        snap = WorkspaceSnapshot.from_json((sdir / "manifest.json").read_text())

        if done < _LOCK_STEPS.index("originals"):
            # The copies were written without a per-file fsync (one per file is what makes a
            # large tree slow); one sync makes them durable before anything is moved. An image
            # made from the tree is synced with them, in the same store, before any source goes.
            if state.get("held") or self._populates(ws, state):
                state["populate"] = "imaging"
            else:
                _syncfs(originals)
            self._set(sdir, state, "locking", "originals")

        populated = (done < _LOCK_STEPS.index("moved") and self._populates(ws, state)
                     and self._populate_image(ws, sdir, state, snap))
        if done < _LOCK_STEPS.index("moved") and not populated and state.get("held"):
            # No image from the tree, and the snapshot stored no originals: lock again from
            # the snapshot, this time with originals and entries copied in one by one.
            state.pop("held")
            self._set(sdir, state, "locking", "started")
            return self.lock(path, state_dirs=state_dirs)
        if populated:
            self._set(sdir, state, "locking", "moved")
        elif done < _LOCK_STEPS.index("moved"):
            files.mkdir(mode=0o700, exist_ok=True)
            if state.get("storage") == "ext4":
                self.ensure_image(sdir, state, sum(e.size for e in snap.entries.values()),
                                  len(snap.entries))
            # files/ stands for the workspace root: give it the root's owner and mode.
            _lchown(files, snap.root_uid, snap.root_gid)
            os.chmod(files, snap.root_mode)
            _move_entries(ws, files, skip=frozenset({MARKER}), step="lock.move",
                          journal=sdir / "moving.json")
            self._set(sdir, state, "locking", "moved")

        if done < _LOCK_STEPS.index("marked"):
            os.chmod(ws, 0o755)  # a rerun after "sealed" would otherwise find it read-only
            stamp = time.strftime("%Y-%m-%d %H:%M:%S %Z", time.localtime(state["locked_at"]))
            tmp = ws / f"{MARKER}.tmp"
            if os.path.lexists(tmp):
                os.unlink(tmp)  # left by a killed run; it is read-only
            tmp.write_text(
                f"This directory is locked by devsilo since {stamp}.\n"
                f"Its contents are in executor-owned storage at {files}\n"
                "(where only the sandbox works on them).\n"
                f"Run `silo workspace unlock {ws}` to get them back with a report of every "
                "change.\n")
            os.chmod(tmp, 0o444)
            os.replace(tmp, ws / MARKER)
            self._set(sdir, state, "locking", "marked")

        if done < _LOCK_STEPS.index("sealed"):
            os.chmod(ws, 0o555)
            self._set(sdir, state, "locking", "sealed")
        if state["phase"] != "locked":
            self._set(sdir, state, "locked", "sealed")
        return LockedWorkspace(path=ws, id=sdir.name, store_dir=sdir, files_dir=files,
                               originals_dir=originals, locked_at=state["locked_at"],
                               entries=len(snap.entries), warning=" ".join(self.warnings_for(state)))

    def _holds(self, ws: Path, sdir: Path, state: dict[str, Any]) -> bool:
        """Whether this lock keeps the tree itself in the store (an image made from it for sessions).

        For an image lock whose store is on the workspace's filesystem: the
        tree is then renamed into ``held/`` (root-only, never mounted in a
        sandbox, the same protection as the ``originals/`` every lock keeps),
        and unlock writes back only what sessions changed instead of copying
        every file out of the image.
        """
        return (self._populates(ws, state) and os.stat(ws).st_dev == os.stat(sdir).st_dev)

    @staticmethod
    def _populates(ws: Path, state: dict[str, Any]) -> bool:
        """Whether this lock makes its image from the tree (``mkfs.ext4 -d``) rather than copying in.

        Not for a tree with a top-level ``lost+found`` (mkfs leaves that one
        out), nor for a lock a previous version had begun copying into an
        empty image.
        """
        if state.get("storage") != "ext4" or state.get("populate_failed"):
            return False
        if "populate" in state:
            return True
        return not state.get("image_ready") and not os.path.lexists(ws / "lost+found")

    def _populate_image(self, ws: Path, sdir: Path, state: dict[str, Any],
                        snap: WorkspaceSnapshot) -> bool:
        """Move the tree into a new ext4 image made from it, resumably; False: copy it instead.

        ``state["populate"]`` journals the sub-steps: ``imaging`` (an image is
        being made; a killed run's half-made one is dropped by the rerun),
        ``imaged`` (the image is complete and on disk, nothing removed yet),
        ``verified`` (its tree matched the lock's manifest, or failing that a
        walk of the source itself, so the sources may go). Sources are
        removed only in ``verified``, entry by entry, and a rerun finishes
        removing them. An image mkfs cannot make, or one that does not
        verify (a tree still changing, a kind of entry mkfs does not copy),
        is dropped before any source is touched, and the lock falls back to
        copying entry by entry, each copy checked against its source then.
        """
        files, image = sdir / "files", sdir / IMAGE
        if state.get("populate", "imaging") == "imaging":
            state.update(populate="imaging")
            _write_atomic(sdir / "state.json", json.dumps(state))
            unmount_image(files)
            files.mkdir(mode=0o700, exist_ok=True)
            try:
                create_image(image, image_size(sum(e.size for e in snap.entries.values())),
                             source=ws, entries=len(snap.entries))
            except Ext4Error:
                return self._populate_failed(sdir, state)
            _syncfs(sdir)  # the originals too (the image is synced already): both before any source goes
            state.update(populate="imaged", image_ready=True)
            _write_atomic(sdir / "state.json", json.dumps(state))
            _crash_point("lock.move.imaged")
        mount_image(image, files)
        if state["populate"] == "imaged":
            lost = files / "lost+found"
            if "lost+found" not in snap.entries and lost.is_dir() and not lost.is_symlink() \
                    and not os.listdir(lost):
                lost.rmdir()  # mkfs made it; the tree had none
            # files/ stands for the workspace root: give it the root's owner and mode.
            _lchown(files, snap.root_uid, snap.root_gid)
            os.chmod(files, snap.root_mode)
            _fix_image(ws, files, snap, times=not state.get("held"))
            copied = _tree_meta(files)
            # A held tree must be what the manifest says; a copied one may be the tree as it is now.
            if copied != {rel: _meta_of(e) for rel, e in snap.entries.items()} \
                    and (state.get("held") or copied != _tree_meta(ws, skip=frozenset({MARKER}))):
                return self._populate_failed(sdir, state)  # neither the manifest nor the tree now
            _syncfs(files)  # the root's owner and mode, lost+found gone: on disk with the rest
            state.update(populate="verified")
            _write_atomic(sdir / "state.json", json.dumps(state))
            _crash_point("lock.move.verified")
        if state.get("held"):
            (sdir / "held").mkdir(mode=0o700, exist_ok=True)
            _move_entries(ws, sdir / "held", skip=frozenset({MARKER}), step="lock.move",
                          journal=sdir / "moving.json")
        else:
            _remove_entries(ws, skip=frozenset({MARKER}), step="lock.move")
        return True

    def _populate_failed(self, sdir: Path, state: dict[str, Any]) -> bool:
        """Drop an image made from the tree (nothing was removed); this lock copies instead."""
        self.drop_image(sdir)
        (sdir / f"{IMAGE}.tmp").unlink(missing_ok=True)
        _syncfs(sdir)  # the originals, which the "originals" step left to the image's sync
        state.pop("populate", None)
        state.update(populate_failed=True, image_ready=False)
        _write_atomic(sdir / "state.json", json.dumps(state))
        return False

    # ---- unlock -----------------------------------------------------------------------

    def unlock(self, path: Path) -> ChangeReport:
        """Move the contents back, restore owners and the directory's mode, report the changes.

        Owners recorded at lock are given back; entries the session added get
        the workspace root's owner. Modes are left as the session set them
        (mode changes are in the report). Unlocking an unlocked workspace
        returns the last report; a half-done lock is finished first.

        The caller stops every sandbox, shell and session on the workspace
        first: the tree is measured once and must not change under the moves.
        """
        ws = path.resolve()
        sdir = self.store_dir(ws)
        state = self.state(ws)
        if state is None:
            raise WorkspaceLockError(f"{ws} is not locked by this executor")
        if state["phase"] == "unlocked":
            return self._load_report(sdir)
        if state["phase"] == "locking":
            # The caller wants it back; finishing the lock first keeps one path through unlock.
            self.lock(ws, state_dirs=[])
            state = self.state(ws)
            assert state is not None
        if state["phase"] == "locked":
            self._set(sdir, state, "unlocking", "started")
        done = _UNLOCK_STEPS.index(state["step"])
        files = sdir / "files"
        before = WorkspaceSnapshot.from_json((sdir / "manifest.json").read_text())
        if state.get("storage") == "ext4" and done < _UNLOCK_STEPS.index("restored"):
            self.ensure_image(sdir, state, 0)  # mounted again if the executor restarted

        if done < _UNLOCK_STEPS.index("opened"):
            if not os.path.lexists(ws):
                # Renamed or removed while locked (the marker directory is the user's to
                # move): the contents come back where they were locked from.
                ws.mkdir(mode=0o700)
            elif not ws.is_dir() or ws.is_symlink():
                raise WorkspaceLockError(f"{ws} is no longer a directory; move it aside and "
                                         "run unlock again")
            os.chmod(ws, 0o700)  # writable for the moves back; the real mode comes last
            self._set(sdir, state, "unlocking", "opened")

        if done < _UNLOCK_STEPS.index("measured"):
            after = WorkspaceSnapshot.take(files)
            _write_atomic(sdir / "after.json", after.to_json())
            self._set(sdir, state, "unlocking", "measured")
        after = WorkspaceSnapshot.from_json((sdir / "after.json").read_text())

        if done < _UNLOCK_STEPS.index("owners"):
            for rel, entry in after.entries.items():
                _give_back(files, rel, entry, before.entries.get(rel), before)
            self._set(sdir, state, "unlocking", "owners")

        if done < _UNLOCK_STEPS.index("unmarked"):
            # The marker goes first, so a file of that name the session made comes back intact.
            for name in (MARKER, f"{MARKER}.tmp"):
                if os.path.lexists(ws / name):
                    os.unlink(ws / name)
            self._set(sdir, state, "unlocking", "unmarked")

        if done < _UNLOCK_STEPS.index("restored"):
            if state.get("held"):
                self._restore_held(sdir, state, ws, before, after)
            elif state.get("storage") == "ext4" and not (sdir / "moving.json").exists():
                _copy_out(files, ws, journal=sdir / "copying.json",
                          expected=_given_back_meta(after, before))
            else:
                _move_entries(files, ws, skip=frozenset(), step="unlock.move",
                              journal=sdir / "moving.json")
            self._set(sdir, state, "unlocking", "restored")

        if done < _UNLOCK_STEPS.index("moded"):
            if state.get("storage") == "ext4":
                self.drop_image(sdir)
            for left in ("held", "incoming"):
                _remove(sdir / left)  # emptied by the restore / scratch space
            _lchown(ws, before.root_uid, before.root_gid)
            os.chmod(ws, before.root_mode)
            self._set(sdir, state, "unlocking", "moded")

        report = diff(before, after)
        _write_atomic(sdir / "report.json", json.dumps({"after": after.to_json()}))
        self._set(sdir, state, "unlocked", "moded")
        return report

    def _restore_held(self, sdir: Path, state: dict[str, Any], ws: Path,
                      before: WorkspaceSnapshot, after: WorkspaceSnapshot) -> None:
        """Bring a held tree up to the image's and move it back into ``ws``, resumably.

        ``state["restore"]``: unset, the lock-time contents of every file a
        session modified or removed are stored in ``originals/`` (for the
        report) while ``held/`` is still untouched; ``kept``, the changes are
        applied to ``held/`` (each idempotent, so a rerun applies them again)
        and the result checked against the image's entries; ``applied``, the
        entries are renamed back into ``ws``. The image holds the session's
        tree until the caller drops it after that.
        """
        held, originals = sdir / "held", sdir / "originals"
        if state.get("restore") is None:
            for rel, b in before.entries.items():
                a = after.entries.get(rel)
                if b.type == "file" and b.sha256 and (a is None or a.sha256 != b.sha256):
                    _keep_original(held, rel, originals, b.sha256)
            _syncfs(originals)
            state["restore"] = "kept"
            _write_atomic(sdir / "state.json", json.dumps(state))
            _crash_point("unlock.move.kept")
        if state["restore"] == "kept":
            expected = _given_back_meta(after, before)
            _apply_changes(sdir / "files", held, sdir / "incoming", before, after, expected)
            _take_times(held, _tree_times(sdir / "files"))
            got = _tree_meta(held)
            if got != expected:
                wrong = sorted(k for k in got.keys() | expected.keys() if got.get(k) != expected.get(k))
                raise WorkspaceLockError(f"the workspace's files could not be brought up to date "
                                         f"({len(wrong)} entries differ, first {wrong[0]!r}); the "
                                         "image still holds them: run unlock again")
            _fsync_dir(held)
            _syncfs(held)  # the session's files written into held/ are on disk before the image goes
            state["restore"] = "applied"
            _write_atomic(sdir / "state.json", json.dumps(state))
            _crash_point("unlock.move.applied")
        _move_entries(held, ws, skip=frozenset(), step="unlock.move", journal=sdir / "moving.json")

    def _load_report(self, sdir: Path) -> ChangeReport:
        before = WorkspaceSnapshot.from_json((sdir / "manifest.json").read_text())
        after = WorkspaceSnapshot.from_json(json.loads((sdir / "report.json").read_text())["after"])
        return diff(before, after)


# ---- workspaces of other machines ------------------------------------------------------

_REMOTE_LOCK_STEPS = ("started", "fetched", "extracted", "snapshotted", "sealed")
_REMOTE_UNLOCK_STEPS = ("started", "measured", "reported", "packed", "cleared")
INCOMING = "incoming.tar"
"""The uploaded archive, once every chunk and the whole checked (removed after extraction)."""
RESULT = "result.tar"
"""The tree at unlock as an archive, kept until the next lock of the workspace for reruns."""


@dataclass(frozen=True)
class RemoteUnlock:
    """An uploaded workspace's unlock: the report and the result archive to send back."""

    report: ChangeReport
    report_text: str
    archive: Path
    transfer_id: str


class RemoteWorkspaces:
    """Workspaces of other machines, uploaded as archives and kept in a :class:`WorkspaceStore`.

    They are keyed by (origin host, path on that host), never by a path on
    this machine: nothing here ever touches the path itself. The steps are
    recorded like a local lock's, so every operation resumes after a crash.
    """

    def __init__(self, store: WorkspaceStore, *, max_bytes: int) -> None:
        self.store = store
        self.max_bytes = max_bytes

    def store_dir(self, host: str, path: str) -> Path:
        """The per-workspace storage directory of (host, path)."""
        digest = hashlib.sha256(f"{host}\0{path}".encode("utf-8", "surrogateescape")).hexdigest()[:16]
        name = "".join(c if c.isalnum() or c in "._-" else "_" for c in path.rstrip("/").rpartition("/")[2])
        return self.store.root / f"{name or 'root'}-r{digest}"

    def state(self, host: str, path: str) -> dict[str, Any] | None:
        """The recorded state of (host, path), or None when it was never locked here."""
        f = self.store_dir(host, path) / "state.json"
        return json.loads(f.read_text()) if f.exists() else None

    def records(self, phases: tuple[str, ...]) -> dict[tuple[str, str], tuple[str, Path]]:
        """(host, path) -> (user, files dir) of every uploaded workspace in ``phases``."""
        out: dict[tuple[str, str], tuple[str, Path]] = {}
        for state_file in self.store.root.glob("*-r*/state.json"):
            try:
                st = json.loads(state_file.read_text())
            except (OSError, ValueError):
                continue
            if st.get("origin") is not None and st.get("phase") in phases:
                out[(st["origin"], st["path"])] = (st["user"], state_file.parent / "files")
        return out

    # ---- lock ---------------------------------------------------------------------------

    def begin_lock(self, host: str, path: str, user: str, sha256: str) -> tuple[Path, dict[str, Any]]:
        """Start (or resume) locking an upload; return its store dir and state.

        The archive goes to ``<store dir>/incoming.tar`` (see :meth:`fetched`).
        Refuses a workspace another user holds or one being unlocked.
        """
        sdir = self.store_dir(host, path)
        state = self.state(host, path)
        if state is not None and state.get("user") != user and state["phase"] != "unlocked":
            raise WorkspaceLockError(f"{path} of {host} is held by another user on this executor; "
                                     "only they can lock or unlock it")
        if state is not None and state["phase"] == "unlocking":
            raise WorkspaceLockError(f"{path} of {host} is being unlocked; run unlock again to "
                                     "finish it first")
        if state is None or state["phase"] == "unlocked":
            if sdir.exists():
                shutil.rmtree(sdir)  # the previous lock's store, kept for its report and result
            sdir.mkdir(mode=0o700)
            state = {"path": path, "origin": host, "user": user, "id": sdir.name, "sha256": sha256}
            self.store._set(sdir, state, "locking", "started")
        return sdir, state

    def fetched(self, sdir: Path, state: dict[str, Any]) -> None:
        """Record that ``incoming.tar`` is complete and checked against the plan."""
        self.store._set(sdir, state, "locking", "fetched")

    def finish_lock(self, host: str, path: str) -> LockedWorkspace:
        """Extract the checked archive into storage, snapshot it, and mark it locked."""
        sdir = self.store_dir(host, path)
        state = self.state(host, path)
        if state is None or state["phase"] not in ("locking", "locked"):
            raise WorkspaceLockError(f"{path} of {host} has no upload being locked here")
        done = _REMOTE_LOCK_STEPS.index(state["step"])
        files, originals = sdir / "files", sdir / "originals"
        if done < _REMOTE_LOCK_STEPS.index("fetched"):
            raise WorkspaceLockError(f"the upload of {path} is not complete on this executor")
        if done < _REMOTE_LOCK_STEPS.index("extracted"):
            ext4 = self.store.storage == "ext4"
            target = files if ext4 else sdir / "files.partial"
            if ext4:
                state["storage"] = "ext4"
                files.mkdir(mode=0o755, exist_ok=True)
                self.store.ensure_image(sdir, state, (sdir / INCOMING).stat().st_size)
                for name in os.listdir(files):
                    _remove(files / name)  # what a killed extraction left
                os.chmod(files, 0o755)
            else:
                _remove(target)
                target.mkdir(mode=0o755)
            try:
                unpack_tree(sdir / INCOMING, target, max_bytes=self.max_bytes)
            except ArchiveError as e:
                if ext4:
                    self.store.drop_image(sdir)
                shutil.rmtree(sdir)  # nothing was locked: the next upload starts afresh
                raise WorkspaceLockError(f"upload of {path} refused: {e}") from e
            os.sync()
            if not ext4:
                _remove(files)
                os.rename(target, files)
            self.store._set(sdir, state, "locking", "extracted")
        if done < _REMOTE_LOCK_STEPS.index("snapshotted"):
            _remove(originals)
            originals.mkdir(mode=0o700)
            snap = WorkspaceSnapshot.take(files, originals=originals)
            _write_atomic(sdir / "manifest.json", snap.to_json())
            state.update(locked_at=snap.taken_at)
            self.store._set(sdir, state, "locking", "snapshotted")
        snap = WorkspaceSnapshot.from_json((sdir / "manifest.json").read_text())
        if done < _REMOTE_LOCK_STEPS.index("sealed"):
            if (sdir / INCOMING).exists():
                os.unlink(sdir / INCOMING)
            self.store._set(sdir, state, "locked", "sealed")
        return LockedWorkspace(path=Path(path), id=sdir.name, store_dir=sdir, files_dir=files,
                               originals_dir=originals, locked_at=state["locked_at"],
                               entries=len(snap.entries), warning=" ".join(self.store.warnings_for(state)))

    # ---- unlock -------------------------------------------------------------------------

    def unlock(self, host: str, path: str, user: str) -> RemoteUnlock:
        """Measure the tree, report every change, pack the result, and drop the stored files.

        The caller has ended every session on it. Running it again after it
        finished returns the same report and archive (until the next lock).
        """
        sdir = self.store_dir(host, path)
        state = self.state(host, path)
        if state is None:
            raise WorkspaceLockError(f"{path} of {host} is not locked on this executor")
        if state.get("user") != user:
            raise WorkspaceLockError(f"{path} of {host} is held by another user on this executor; "
                                     "only they can unlock it")
        if state["phase"] == "locking":
            if _REMOTE_LOCK_STEPS.index(state["step"]) < _REMOTE_LOCK_STEPS.index("fetched"):
                shutil.rmtree(sdir)  # never locked: nothing to give back
                raise WorkspaceLockError(f"{path} of {host} was never completely uploaded; nothing "
                                         "is locked (lock it again)")
            self.finish_lock(host, path)
            state = self.state(host, path)
            assert state is not None
        if state["phase"] == "locked":
            state["transfer_id"] = f"down-{secrets.token_hex(12)}"
            self.store._set(sdir, state, "unlocking", "started")
        done = _REMOTE_UNLOCK_STEPS.index(state["step"])
        files = sdir / "files"
        before = WorkspaceSnapshot.from_json((sdir / "manifest.json").read_text())
        if state.get("storage") == "ext4" and done < _REMOTE_UNLOCK_STEPS.index("cleared"):
            self.store.ensure_image(sdir, state, 0)  # mounted again if the executor restarted
        if done < _REMOTE_UNLOCK_STEPS.index("measured"):
            _write_atomic(sdir / "after.json", WorkspaceSnapshot.take(files).to_json())
            self.store._set(sdir, state, "unlocking", "measured")
        after = WorkspaceSnapshot.from_json((sdir / "after.json").read_text())
        report = diff(before, after)
        if done < _REMOTE_UNLOCK_STEPS.index("reported"):
            text = report.render(sdir / "originals", files)
            _write_atomic(sdir / "report.json", json.dumps({"after": after.to_json(), "text": text}))
            self.store._set(sdir, state, "unlocking", "reported")
        if done < _REMOTE_UNLOCK_STEPS.index("packed"):
            tmp = sdir / f"{RESULT}.partial"
            pack_tree(files, tmp)
            os.replace(tmp, sdir / RESULT)
            _fsync_dir(sdir)
            self.store._set(sdir, state, "unlocking", "packed")
        if done < _REMOTE_UNLOCK_STEPS.index("cleared"):
            if state.get("storage") == "ext4":
                self.store.drop_image(sdir)
            _remove(files)
            self.store._set(sdir, state, "unlocked", "cleared")
        text = json.loads((sdir / "report.json").read_text())["text"]
        return RemoteUnlock(report, text, sdir / RESULT, state["transfer_id"])

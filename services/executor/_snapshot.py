"""Workspace snapshots (a manifest of every entry) and the change report between two of them.

The tree is walked by directory file descriptors opened with ``O_NOFOLLOW``,
so a symlink planted anywhere in the tree (by the user or by a session) can
never make the walk, the hashing or the report read anything outside the
root: symlinks are recorded with their target text and never followed.
"""

from __future__ import annotations

import difflib
import hashlib
import json
import os
import secrets
import stat
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from devsilo.protocol import SiloError

from ._autoexec import auto_exec_reason

DIFF_LIMIT = 1024 * 1024
"""Files larger than this (either side) are summarised in one line, never diffed."""
_READ_CHUNK = 1024 * 1024
_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
# O_NONBLOCK: opening a FIFO swapped in for a file between stat and open must not hang.
_FILE_FLAGS = os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK


class SnapshotError(SiloError):
    """A workspace could not be walked or read safely."""


@dataclass(frozen=True)
class Entry:
    """One entry of a workspace: ``path`` is relative to the root, ``/``-separated."""

    path: str
    type: str  # "file", "dir", "symlink" or "other"
    mode: int  # permission bits only (stat.S_IMODE)
    uid: int
    gid: int
    size: int = 0
    sha256: str | None = None  # files only
    target: str | None = None  # symlinks only: the link text, never resolved


def _type_of(st: os.stat_result) -> str:
    if stat.S_ISREG(st.st_mode):
        return "file"
    if stat.S_ISDIR(st.st_mode):
        return "dir"
    if stat.S_ISLNK(st.st_mode):
        return "symlink"
    return "other"


def hash_fd(fd: int) -> str:
    """SHA-256 of everything readable from ``fd`` (from its current offset)."""
    h = hashlib.sha256()
    while chunk := os.read(fd, _READ_CHUNK):
        h.update(chunk)
    return h.hexdigest()


def open_dir_nofollow(root: Path) -> int:
    """Open ``root`` as a directory, refusing a symlink in its last component."""
    try:
        return os.open(root, _DIR_FLAGS)
    except OSError as e:
        raise SnapshotError(f"cannot open workspace directory {root}: {e.strerror}") from e


def open_nofollow(root: Path, relpath: str) -> int:
    """Open ``root/relpath`` for reading, following no symlink in any component below ``root``."""
    parts = relpath.split("/")
    fd = open_dir_nofollow(root)
    try:
        for name in parts[:-1]:
            nxt = os.open(name, _DIR_FLAGS, dir_fd=fd)
            os.close(fd)
            fd = nxt
        return os.open(parts[-1], _FILE_FLAGS, dir_fd=fd)
    finally:
        os.close(fd)


def _hash_and_store(fd: int, originals: Path | None) -> str:
    """Hash a file; with ``originals``, also store a copy under its hash in the same pass."""
    if originals is None:
        return hash_fd(fd)
    tmp = originals / f".tmp-{secrets.token_hex(8)}"
    h = hashlib.sha256()
    with open(tmp, "wb") as out:
        while chunk := os.read(fd, _READ_CHUNK):
            h.update(chunk)
            out.write(chunk)
    digest = h.hexdigest()
    dst = original_path(originals, digest)
    if dst.exists():
        tmp.unlink()  # same content seen before: one copy is enough
    else:
        dst.parent.mkdir(mode=0o700, exist_ok=True)
        os.replace(tmp, dst)
    return digest


def _walk(dir_fd: int, prefix: str, skip: frozenset[str] = frozenset(),
          originals: Path | None = None) -> Iterator[Entry]:
    with os.scandir(dir_fd) as it:
        names = sorted(e.name for e in it if e.name not in skip)
    for name in names:
        rel = f"{prefix}{name}"
        st = os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
        kind = _type_of(st)
        common: dict[str, Any] = {"path": rel, "mode": stat.S_IMODE(st.st_mode), "uid": st.st_uid, "gid": st.st_gid}
        if kind == "dir":
            sub = os.open(name, _DIR_FLAGS, dir_fd=dir_fd)
            try:
                yield Entry(type="dir", **common)
                yield from _walk(sub, rel + "/", originals=originals)
            finally:
                os.close(sub)
        elif kind == "symlink":
            yield Entry(type="symlink", size=st.st_size,
                        target=os.readlink(name, dir_fd=dir_fd), **common)
        elif kind == "file":
            fd = os.open(name, _FILE_FLAGS, dir_fd=dir_fd)
            try:
                fst = os.fstat(fd)
                if not stat.S_ISREG(fst.st_mode):
                    raise SnapshotError(f"{rel} changed type while being snapshotted; try again")
                digest = _hash_and_store(fd, originals)
                yield Entry(type="file", size=fst.st_size, sha256=digest, **common)
            finally:
                os.close(fd)
        else:
            # FIFOs, sockets, devices: recorded, never opened (opening a FIFO blocks).
            yield Entry(type="other", **common)


@dataclass
class WorkspaceSnapshot:
    """A manifest of every entry under a root (the root itself described by ``root_*``)."""

    root: str
    taken_at: float
    root_mode: int
    root_uid: int
    root_gid: int
    entries: dict[str, Entry] = field(default_factory=dict)

    @classmethod
    def take(cls, root: Path, *, skip: frozenset[str] = frozenset(),
             originals: Path | None = None) -> WorkspaceSnapshot:
        """Walk ``root`` (hidden entries too) without following any symlink.

        ``skip`` names top-level entries left out (the lock marker). With
        ``originals`` (an existing directory), every regular file is also
        copied there under its hash (:func:`original_path`) in the same read
        that hashes it, so the copy is exactly the content the manifest names.
        """
        fd = open_dir_nofollow(root)
        try:
            st = os.fstat(fd)
            snap = cls(root=str(root), taken_at=time.time(), root_mode=stat.S_IMODE(st.st_mode),
                       root_uid=st.st_uid, root_gid=st.st_gid)
            for entry in _walk(fd, "", skip, originals):
                snap.entries[entry.path] = entry
            return snap
        except FileNotFoundError as e:
            raise SnapshotError(f"an entry under {root} vanished while being snapshotted; "
                                "try again") from e
        finally:
            os.close(fd)

    def to_json(self) -> str:
        """Serialise (lone surrogates from undecodable file names survive as escapes)."""
        d = {"version": 1, "root": self.root, "taken_at": self.taken_at,
             "root_mode": self.root_mode, "root_uid": self.root_uid, "root_gid": self.root_gid,
             "entries": [{"path": e.path, "type": e.type, "mode": e.mode, "uid": e.uid,
                          "gid": e.gid, "size": e.size, "sha256": e.sha256, "target": e.target}
                         for e in self.entries.values()]}  # asdict() would deep-copy each: slow
        return json.dumps(d, separators=(",", ":"))

    @classmethod
    def from_json(cls, text: str) -> WorkspaceSnapshot:
        """Inverse of :meth:`to_json`."""
        d = json.loads(text)
        if d.get("version") != 1:
            raise SnapshotError(f"unknown snapshot version {d.get('version')!r}")
        snap = cls(root=d["root"], taken_at=d["taken_at"], root_mode=d["root_mode"],
                   root_uid=d["root_uid"], root_gid=d["root_gid"])
        for e in d["entries"]:
            snap.entries[e["path"]] = Entry(**e)
        return snap


KINDS = ("added", "modified", "deleted", "mode", "type", "retarget")
_TITLES = {"added": "Added", "modified": "Modified", "deleted": "Deleted",
           "mode": "Mode changed", "type": "Type changed", "retarget": "Symlink retargeted"}


@dataclass(frozen=True)
class Change:
    """One change to one path; a path edited and chmod-ed has two."""

    kind: str
    path: str
    before: Entry | None
    after: Entry | None

    def detail(self) -> str:
        """The one-line description shown under the kind's heading."""
        b, a = self.before, self.after
        if self.kind == "mode" and b and a:
            return f"{self.path}  {b.mode:04o} -> {a.mode:04o}"
        if self.kind == "type" and b and a:
            return f"{self.path}  {b.type} -> {a.type}"
        if self.kind == "retarget" and b and a:
            return f"{self.path}  {b.target} -> {a.target}"
        e = a or b
        if e and e.type == "symlink":
            return f"{self.path} -> {e.target}"
        return self.path + ("/" if e and e.type == "dir" else "")


def original_path(originals: Path, sha256: str) -> Path:
    """Where the stored original with this content hash lives (content-addressed)."""
    return originals / sha256[:2] / sha256


def _read_limited(fd: int) -> bytes:
    with os.fdopen(fd, "rb") as f:
        return f.read(DIFF_LIMIT + 1)


def _is_text(data: bytes) -> bool:
    if b"\0" in data[:8192]:
        return False
    try:
        data.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True


def _lines(text: str) -> list[str]:
    out = text.splitlines(keepends=True)
    if out and not out[-1].endswith("\n"):
        out[-1] += "\n\\ No newline at end of file\n"
    return out


@dataclass
class ChangeReport:
    """Every change between a lock-time snapshot and the tree at unlock."""

    changes: list[Change]

    @property
    def changed_paths(self) -> list[str]:
        """Distinct changed paths, sorted; ``Changes since lock: N`` counts these."""
        return sorted({c.path for c in self.changes})

    def auto_exec(self) -> list[tuple[str, str, str]]:
        """(path, kinds, reason) for every changed path that is an auto-exec surface."""
        out = []
        for path in self.changed_paths:
            reason = auto_exec_reason(path)
            if reason is not None:
                kinds = ", ".join(c.kind for c in self.changes if c.path == path)
                out.append((path, kinds, reason))
        return out

    @property
    def auto_exec_changed(self) -> bool:
        """True when any auto-exec surface changed: unlock then exits 3 unless ``--accept``."""
        return bool(self.auto_exec())

    def by_kind(self, kind: str) -> list[Change]:
        """The changes of one kind, in path order."""
        return [c for c in self.changes if c.kind == kind]

    def to_json(self) -> str:
        """The report for tools (``--json``)."""
        def ent(e: Entry | None) -> dict[str, Any] | None:
            return asdict(e) if e else None
        d: dict[str, Any] = {
            "changes_since_lock": len(self.changed_paths),
            "auto_exec_changed": self.auto_exec_changed,
            "auto_exec": [{"path": p, "kinds": k.split(", "), "reason": r}
                          for p, k, r in self.auto_exec()],
        }
        for kind in KINDS:
            d[kind] = [{"path": c.path, "before": ent(c.before), "after": ent(c.after)}
                       for c in self.by_kind(kind)]
        return json.dumps(d, indent=2)

    def _content_diff(self, c: Change, originals: Path, current_root: Path) -> str:
        """A unified diff, or one summary line for binary and large files."""
        b = c.before if c.before and c.before.type == "file" else None
        a = c.after if c.after and c.after.type == "file" else None
        old = new = b""
        if b and b.sha256:
            if b.size > DIFF_LIMIT:
                old = b"x" * (DIFF_LIMIT + 1)
            else:
                old = original_path(originals, b.sha256).read_bytes()
        if a:
            if a.size > DIFF_LIMIT:
                new = b"x" * (DIFF_LIMIT + 1)
            else:
                try:
                    new = _read_limited(open_nofollow(current_root, c.path))
                except OSError:
                    return f"File {c.path} could not be read at {current_root} to diff\n"
        sizes = {"added": f"({a.size if a else 0} bytes)",
                 "deleted": f"({b.size if b else 0} bytes)",
                 "modified": f"({b.size if b else 0} -> {a.size if a else 0} bytes)"}[c.kind]
        if len(old) > DIFF_LIMIT or len(new) > DIFF_LIMIT:
            return f"Large file {c.path} {c.kind} {sizes}, not shown\n"
        if not (_is_text(old) and _is_text(new)):
            return f"Binary file {c.path} {c.kind} {sizes}\n"
        diff = difflib.unified_diff(
            _lines(old.decode()), _lines(new.decode()),
            fromfile=f"a/{c.path}" if b else "/dev/null",
            tofile=f"b/{c.path}" if a else "/dev/null")
        return "".join(diff)

    def render(self, stored_originals: Path, current_root: Path) -> str:
        """The human report: auto-exec warnings first, the count, the lists, then the diffs.

        ``stored_originals`` is the lock's content-addressed originals
        directory; ``current_root`` is where the changed tree is now (the
        workspace after unlock). Files are read without following symlinks.
        """
        out: list[str] = []
        warnings = self.auto_exec()
        if warnings:
            out.append(f"WARNING: {len(warnings)} auto-exec surface(s) changed; "
                       "review them before you open, build or commit this project:\n")
            for path, kinds, reason in warnings:
                out.append(f"  {path} ({kinds}): {reason}\n")
            out.append("\n")
        out.append(f"Changes since lock: {len(self.changed_paths)}\n")
        for kind in KINDS:
            changes = self.by_kind(kind)
            if changes:
                out.append(f"{_TITLES[kind]} ({len(changes)}):\n")
                out.extend(f"  {c.detail()}\n" for c in changes)
        diffs = [self._content_diff(c, stored_originals, current_root)
                 for c in self.changes if c.kind in ("added", "modified", "deleted")
                 and ((c.before and c.before.type == "file") or (c.after and c.after.type == "file"))]
        diffs = [d for d in diffs if d]
        if diffs:
            out.append("\n")
            out.extend(diffs)
        return "".join(out)


def diff(before: WorkspaceSnapshot, after: Path | WorkspaceSnapshot) -> ChangeReport:
    """Compare a lock-time snapshot with a later tree (walked now) or a later snapshot.

    Owners are not compared: the executor hands the tree to the sandbox uid
    while locked, and unlock gives every entry its recorded owner back.
    """
    if isinstance(after, Path):
        after = WorkspaceSnapshot.take(after)
    changes: list[Change] = []
    for path in sorted(before.entries.keys() | after.entries.keys()):
        b, a = before.entries.get(path), after.entries.get(path)
        if b is None:
            changes.append(Change("added", path, None, a))
        elif a is None:
            changes.append(Change("deleted", path, b, None))
        elif a.type != b.type:
            changes.append(Change("type", path, b, a))
        else:
            if a.type == "file" and a.sha256 != b.sha256:
                changes.append(Change("modified", path, b, a))
            if a.type == "symlink" and a.target != b.target:
                changes.append(Change("retarget", path, b, a))
            if a.mode != b.mode and a.type != "symlink":
                changes.append(Change("mode", path, b, a))
    return ChangeReport(changes)

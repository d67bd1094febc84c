"""Locked workspaces in ext4 images mounted only in the executor's own mount namespace.

A root executor moves itself into a private mount namespace when it starts
(:func:`enter_private_mounts`, before any thread exists), as a slave of the
host's: its mounts never reach the host, and mounts the host makes later reach
it where the host's mounts are shared (systemd's default; where they are
private, a later host mount is seen only by an executor started after it). Each locked
workspace then gets its own sparse ext4 image (``mkfs.ext4``), loop-mounted
``nosuid,nodev`` at its ``files/`` directory in that namespace only: the
executor, the sandboxes it starts (they inherit the namespace) and nothing
else see the contents. Every other process on the host, whatever its uid,
finds an empty directory at that path, and the image file is root-only. The
mounts die with the executor; a restarted executor mounts the images again.

What it does not stop: root on the host can still enter the executor's
namespace or read the image file. A Docker daemon, which lives in the host's
namespace, cannot see the mount either, so the docker backend cannot serve a
workspace kept this way.
"""

from __future__ import annotations

import ctypes
import os
import shutil
import subprocess
from pathlib import Path

from devsilo.protocol import SiloError

CLONE_NEWNS = 0x00020000
MS_REC = 0x4000
MS_SLAVE = 1 << 19
IMAGE = "image.ext4"
MIN_IMAGE_BYTES = 1024 * 1024 * 1024
"""Images are sparse: this is room to grow (a disk quota), not disk used up front."""
HEADROOM = 4
"""An image holds at least this many times the workspace's bytes."""
INODE_RATIO = 16384
"""mkfs.ext4's default bytes per inode."""


class Ext4Error(SiloError):
    """An ext4 image could not be made, mounted or unmounted; the message says which and why."""


def enter_private_mounts() -> str | None:
    """Move this process into a private mount namespace; None on success, else why not.

    Call it while the process has a single thread: threads started earlier
    would stay in the host's namespace.
    """
    if os.geteuid() != 0:
        return "the executor does not run as root"
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.unshare(CLONE_NEWNS) != 0:
        return f"unshare(CLONE_NEWNS) failed: {os.strerror(ctypes.get_errno())}"
    # Slave: nothing mounted here propagates back to the host, while what the host mounts
    # later (a disk, a network share) still arrives here where the host's mounts are shared.
    if libc.mount(b"none", b"/", None, MS_REC | MS_SLAVE, None) != 0:
        return f"making / a slave mount failed: {os.strerror(ctypes.get_errno())}"
    return None


def ext4_unavailable(private_mounts: bool) -> str | None:
    """Why images cannot be used here (None: they can)."""
    if os.geteuid() != 0:
        return "the executor does not run as root"
    if not private_mounts:
        return "the executor has no private mount namespace"
    if shutil.which("mkfs.ext4") is None:
        return "mkfs.ext4 is not installed (e2fsprogs)"
    if not os.path.exists("/dev/loop-control"):
        return "no loop devices (/dev/loop-control is missing)"
    return None


def image_size(tree_bytes: int) -> int:
    """The (sparse) size of an image for a tree of ``tree_bytes``."""
    return max(MIN_IMAGE_BYTES, HEADROOM * tree_bytes + 256 * 1024 * 1024)


def _run(argv: list[str], what: str, timeout: float | None = 300) -> None:
    r = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, check=False)
    if r.returncode != 0:
        raise Ext4Error(f"{what} failed: {(r.stderr or r.stdout).strip()[:500]}")


def create_image(image: Path, size: int, source: Path | None = None, entries: int = 0) -> None:
    """Make a sparse ext4 image at ``image`` (replaced atomically; a half-made one never stays).

    ``source``: the image is populated with a copy of that directory's tree
    (``mkfs.ext4 -d``: e2fsprogs copies it in C, keeping types, modes with
    set-id bits, owners, times, symlinks as links, hard links and extended
    attributes; the source's top-level ``lost+found`` is not copied, so a
    caller must not pass a tree holding one). The image is fsynced before it
    takes its name: once it exists, its contents are on disk. It has room for
    at least twice ``entries`` files and directories (mkfs's default of one
    inode per 16 KiB runs out first on a tree of many small files).
    """
    tmp = image.with_name(image.name + ".tmp")
    tmp.unlink(missing_ok=True)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    try:
        os.ftruncate(fd, size)
    finally:
        os.close(fd)
    populate = ["-d", str(source)] if source is not None else []
    inodes = ["-N", str(2 * entries + 1024)] if 2 * entries + 1024 > size // INODE_RATIO else []
    _run(["mkfs.ext4", "-q", "-F", "-m", "0", "-L", "devsilo-ws", *inodes, *populate, str(tmp)],
         f"mkfs.ext4 on {tmp}", timeout=None if source is not None else 300)  # a copy takes what it takes
    if source is not None:
        fd = os.open(tmp, os.O_RDONLY | os.O_CLOEXEC)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    os.replace(tmp, image)


def mount_image(image: Path, at: Path, *, fresh: bool = False) -> None:
    """Loop-mount ``image`` at ``at`` (nosuid, nodev) unless it is mounted there already.

    ``fresh``: the image was just made, so its ``lost+found`` (which mkfs
    creates) goes; later mounts leave a ``lost+found`` alone, as the tree's own.
    """
    at.mkdir(mode=0o700, exist_ok=True)
    if not os.path.ismount(at):
        _run(["mount", "-t", "ext4", "-o", "loop,nosuid,nodev", str(image), str(at)], f"mounting {image}")
    lost = at / "lost+found"
    if fresh and lost.is_dir() and not any(lost.iterdir()):
        lost.rmdir()


def unmount_image(at: Path) -> None:
    """Unmount ``at`` if something is mounted there (the loop device is freed with it)."""
    if os.path.ismount(at):
        _run(["umount", str(at)], f"unmounting {at}")

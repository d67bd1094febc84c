"""Locked workspaces kept in ext4 images mounted only in the executor's own mount namespace."""

from __future__ import annotations

import json
import os
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import pytest
from devsilo.executor._service import workspace_store
from devsilo.executor._workspace_lock import ROOT_ONLY_WARNING
from devsilo.testing import Stack

pytestmark = pytest.mark.skipif(
    os.geteuid() != 0 or shutil.which("mkfs.ext4") is None or not os.path.exists("/dev/loop-control"),
    reason="needs root, mkfs.ext4 and loop devices")


def silo(stack: Stack, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "devsilo.cli", "--state-dir", str(stack.state_dir), *args],
                          capture_output=True, text=True, timeout=120, check=False)


def test_a_locked_workspace_is_an_image_nobody_outside_the_executor_sees(stack: Stack, tmp_path: Path) -> None:
    ws = tmp_path / "proj"
    (ws / "src").mkdir(parents=True)
    (ws / "src" / "app.py").write_text("print('v1')\n")
    (ws / ".hidden").write_text("h\n")
    os.symlink("/etc/passwd", ws / "out")
    lock = silo(stack, "workspace", "lock", str(ws))
    assert lock.returncode == 0, lock.stdout + lock.stderr
    assert "in an ext4 image mounted only in the executor's namespace" in lock.stdout
    assert "root-only directory" not in lock.stdout  # no fallback warning

    (store,) = [d for d in (stack.state_dir.parent / "workspaces-executor").iterdir() if d.name.startswith("proj-")]
    # This process is root, in the host's mount namespace: it finds an empty directory...
    assert os.listdir(store / "files") == []
    assert not os.path.ismount(store / "files")
    assert str(store / "files") not in Path("/proc/self/mountinfo").read_text()
    # ...and a root-only image holding the files.
    assert (store / "image.ext4").stat().st_mode & 0o777 == 0o600
    assert sorted(os.listdir(ws)) == [".devsilo-locked"]

    script = tmp_path / "s.json"
    script.write_text(json.dumps({"responses": [
        {"tool_calls": [{"name": "Bash", "input": {
            "command": "grep -c ' /workspace ' /proc/self/mountinfo; cat src/app.py; echo v2 > src/app.py"}}]},
        {"tool_calls": [{"name": "Exit", "input": {"message": "ok"}}]}]}))
    run = silo(stack, "run", "--headless", "--script", str(script), "--workspace", str(ws), "--prompt", "go")
    assert run.returncode == 0, run.stdout + run.stderr
    assert "print('v1')" in run.stdout  # the sandbox sees the files the host cannot

    unlock = silo(stack, "workspace", "unlock", str(ws))
    assert unlock.returncode == 0, unlock.stdout + unlock.stderr
    assert "Changes since lock: 1" in unlock.stdout and "+v2" in unlock.stdout
    assert (ws / "src" / "app.py").read_text() == "v2\n"
    assert (ws / ".hidden").read_text() == "h\n" and os.readlink(ws / "out") == "/etc/passwd"
    assert not (store / "image.ext4").exists()  # the image goes with the unlock


def test_the_root_only_directory_says_why_it_is_used(tmp_path: Path) -> None:
    class Log:
        def info(self, *_: object, **__: object) -> None:
            return None

    chosen = workspace_store({"workspace_store": str(tmp_path / "a"), "workspace_storage": "directory"}, "e", Log())
    assert chosen.storage == "directory"
    assert chosen.warnings_for({"storage": "directory"}) == (
        ROOT_ONLY_WARNING + " (the operator chose workspace_storage=directory)",)
    no_ns = workspace_store({"workspace_store": str(tmp_path / "b"),
                             "private_mounts_error": "unshare(CLONE_NEWNS) failed: EPERM"}, "e", Log())
    assert no_ns.storage == "directory"
    assert "no ext4 image: unshare(CLONE_NEWNS) failed: EPERM" in no_ns.warnings_for(None)[0]
    assert workspace_store({"workspace_store": str(tmp_path / "c"), "private_mounts": True}, "e",
                           Log()).storage == "ext4"


def test_an_image_this_executor_cannot_mount_loses_nothing(tmp_path: Path) -> None:
    from devsilo.executor._ext4 import Ext4Error
    from devsilo.executor._workspace_lock import WorkspaceLockError, WorkspaceStore

    store = WorkspaceStore(tmp_path / "store", "directory", "no private mount namespace")
    ws = tmp_path / "ws"
    ws.mkdir()
    (ws / "f").write_text("x\n")
    locked = store.lock(ws, state_dirs=[])
    # As if it had been locked into an image by an executor that had a private namespace.
    state = json.loads((locked.store_dir / "state.json").read_text())
    state.update(storage="ext4", image_ready=True)
    (locked.store_dir / "state.json").write_text(json.dumps(state))
    (locked.store_dir / "image.ext4").write_bytes(b"not an ext4 image")

    assert store.remount() == [f"{locked.id}: not mounted (no private mount namespace)"]
    with pytest.raises(WorkspaceLockError, match="is not mounted on this executor"):
        store.check_mounted(locked.files_dir)
    with pytest.raises(Ext4Error, match="mounting"):
        store.unlock(ws)
    assert (locked.files_dir / "f").read_text() == "x\n" and (locked.store_dir / "image.ext4").exists()


def test_a_host_mount_made_after_the_executor_started_still_reaches_sessions(tmp_path: Path) -> None:
    shared = tmp_path / "shared"
    shared.mkdir()
    subprocess.run(["mount", "--bind", str(shared), str(shared)], check=True)
    try:
        subprocess.run(["mount", "--make-shared", str(shared)], check=True)
        stack = Stack(tmp_path / "state")
        stack.start()
        try:
            (shared / "later").mkdir()
            subprocess.run(["mount", "-t", "tmpfs", "late-disk", str(shared / "later")], check=True)
            (shared / "later" / "on-the-new-disk.txt").write_text("here\n")
            script = tmp_path / "s.json"
            script.write_text(json.dumps({"responses": [
                {"tool_calls": [{"name": "Bash", "input": {"command": "cat on-the-new-disk.txt"}}]},
                {"tool_calls": [{"name": "Exit", "input": {"message": "ok"}}]}]}))
            run = silo(stack, "run", "--headless", "--script", str(script), "--workspace",
                       str(shared / "later"), "--prompt", "go")
            assert run.returncode == 0, run.stdout + run.stderr
            assert "here" in run.stdout  # the executor's namespace received the host's new mount
        finally:
            stack.stop()
    finally:
        subprocess.run(["umount", "-R", str(shared)], check=False)


# ---- lock and unlock with ext4 storage, killed at every new step, in private mount namespaces ----

_OP = """
import json, os, sys
from pathlib import Path
from devsilo.executor._snapshot import WorkspaceSnapshot
from devsilo.executor._workspace_lock import WorkspaceStore
store = WorkspaceStore(Path(sys.argv[1]), "ext4")
ws, op = Path(sys.argv[2]), sys.argv[3]
if op == "lock":
    store.lock(ws, state_dirs=[])
elif op == "unlock":
    store.unlock(ws)
else:
    sdir = store.store_dir(ws)
    store.ensure_image(sdir, store.state(ws), 0)
    files = sdir / "files"
    if op == "session":  # what a session might leave, as another uid
        (files / "notes.txt").write_text("changed\\n")
        os.chown(files / "notes.txt", 5000, 5000)
        os.chmod(files / "notes.txt", 0o4755)
        (files / "new").write_text("#!/bin/sh\\n")
        os.chown(files / "new", 5000, 5000)
        os.chmod(files / "new", 0o6755)
        (files / "d1" / "gone.txt").unlink()
        # A directory turned into a link out of the tree: unlock must not follow it.
        for f in (files / "d1" / "sub").iterdir():
            f.unlink()
        (files / "d1" / "sub").rmdir()
        os.symlink(sys.argv[4], files / "d1" / "sub")
        (files / "newdir").mkdir()
        (files / "newdir" / "inner.txt").write_text("inner\\n")
        os.chmod(files / "run.sh", 0o700)
        os.utime(files / "tool", ns=(1_700_000_000_555_000_000, 1_700_000_000_555_000_000))
    snap = WorkspaceSnapshot.take(files)
    print(json.dumps({p: [e.type, e.mode, e.uid, e.gid, e.sha256, e.target]
                      for p, e in snap.entries.items()}))
"""


def ext4_op(store: Path, ws: Path, op: str, crash: str | None = None, *extra: str,
            path: str | None = None) -> str:
    """Run one operation in a child with its own mount namespace (its mounts die with it,
    as an executor's do), SIGKILLed right after ``crash`` when given."""
    from devsilo.executor._workspace_lock import CRASH_ENV

    env = {k: v for k, v in os.environ.items() if k != CRASH_ENV}
    if crash:
        env[CRASH_ENV] = crash
    if path:
        env["PATH"] = path
    proc = subprocess.run(["unshare", "-m", "--propagation", "private", sys.executable, "-c", _OP,
                           str(store), str(ws), op, *extra], env=env, capture_output=True, text=True,
                          timeout=120, check=False)
    if crash:
        assert proc.returncode == -9, proc.stderr
    else:
        assert proc.returncode == 0, proc.stderr
    return proc.stdout


def ext4_tree(tmp: Path) -> Path:
    """Hidden files, an outside symlink, exec and set-gid bits, owners, a hard link, a FIFO."""
    ws = tmp / "ws"
    (ws / "d1" / "sub").mkdir(parents=True)
    os.chown(ws, 1000, 1000)
    (ws / ".hidden").write_text("hidden\n")
    (ws / "notes.txt").write_text("notes\n")
    (ws / "run.sh").write_text("#!/bin/sh\n")
    os.chmod(ws / "run.sh", 0o755)
    (ws / "tool").write_text("#!/bin/sh\n")
    os.chmod(ws / "tool", 0o2755)
    (ws / "d1" / "gone.txt").write_text("doomed\n")
    (ws / "d1" / "sub" / "owned").write_bytes(bytes(range(256)) * 40)
    os.chown(ws / "d1" / "sub" / "owned", 1234, 4321)
    os.link(ws / "d1" / "sub" / "owned", ws / "d1" / "hard")
    os.symlink("/etc/passwd", ws / "link_out")
    os.mkfifo(ws / "d1" / "fifo")
    os.utime(ws / "notes.txt", ns=(1_600_000_000_123_456_789, 1_600_000_000_123_456_789))
    return ws


def as_json(state: dict[str, object]) -> dict[str, object]:
    return json.loads(json.dumps(state))


def ws_state(root: Path) -> dict[str, object]:
    from devsilo.executor._snapshot import WorkspaceSnapshot

    snap = WorkspaceSnapshot.take(root)
    return as_json({p: [e.type, e.mode, e.uid, e.gid, e.sha256, e.target] for p, e in snap.entries.items()})


@pytest.fixture(params=["same-fs", "other-fs"])
def store_root(request: pytest.FixtureRequest, tmp_path: Path) -> object:
    """A store on the workspace's filesystem (the tree is held there, renamed) or on tmpfs
    (the tree is copied into the image and back out)."""
    if request.param == "same-fs":
        yield tmp_path / "store"
        return
    shm = Path("/dev/shm")
    if not shm.is_dir() or os.stat(shm).st_dev == os.stat(tmp_path).st_dev:
        pytest.skip("no second filesystem")
    root = shm / f"devsilo-test-{os.getpid()}-{tmp_path.name}"
    yield root
    shutil.rmtree(root, ignore_errors=True)


@pytest.mark.parametrize("lock_step,unlock_step", [
    (None, None),
    ("lock.move.imaged", "unlock.move.kept"),
    ("lock.move.verified", "unlock.move.applied"),
    ("lock.move.2", "unlock.move.copied"),
    ("lock.moved", "unlock.move.1"),
    ("lock.originals", "unlock.restored"),
])
def test_an_image_lock_killed_anywhere_completes_on_rerun(tmp_path: Path, store_root: Path,
                                                          lock_step: str | None,
                                                          unlock_step: str | None) -> None:
    from devsilo.executor._workspace_lock import MARKER, WorkspaceStore

    ws = ext4_tree(tmp_path)
    original = ws_state(ws)
    mtime = os.stat(ws / "notes.txt").st_mtime_ns
    store = store_root
    held = os.stat(tmp_path).st_dev == os.stat(store.parent).st_dev
    unlock_steps = ({"unlock.move.kept", "unlock.move.applied"} if held else {"unlock.move.copied"})
    if lock_step:
        ext4_op(store, ws, "lock", lock_step)
    ext4_op(store, ws, "lock")
    assert os.listdir(ws) == [MARKER]
    assert json.loads(ext4_op(store, ws, "show")) == original  # the image holds the tree exactly
    (sdir,) = [d for d in store.iterdir()]
    state = json.loads((sdir / "state.json").read_text())
    assert state["populate"] == "verified" and state.get("held", False) == held
    assert sorted(os.listdir(sdir)) == sorted(
        ["files", "image.ext4", "manifest.json", "originals", "state.json"] + (["held"] if held else []))
    if unlock_step and (unlock_step in unlock_steps or not unlock_step.startswith("unlock.move.")
                        or unlock_step == "unlock.move.1"):
        ext4_op(store, ws, "unlock", unlock_step)
    ext4_op(store, ws, "unlock")
    assert WorkspaceStore(store, "ext4").unlock(ws).changes == []
    assert ws_state(ws) == original
    assert os.stat(ws / "notes.txt").st_mtime_ns == mtime  # times kept to the nanosecond
    assert os.stat(ws / "d1" / "hard").st_ino == os.stat(ws / "d1" / "sub" / "owned").st_ino
    assert stat.S_ISFIFO(os.lstat(ws / "d1" / "fifo").st_mode)
    assert (os.stat(ws).st_uid, stat.S_IMODE(os.stat(ws).st_mode)) == (1000, 0o755)
    assert sorted(os.listdir(sdir)) == ["after.json", "files", "manifest.json", "originals", "report.json",
                                       "state.json"]


def test_an_image_unlock_gives_back_owners_and_follows_no_link(tmp_path: Path, store_root: Path) -> None:
    from devsilo.executor._workspace_lock import WorkspaceStore

    ws = ext4_tree(tmp_path)
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "owned").write_text("precious\n")
    store = store_root
    mtime_hard = os.stat(ws / "d1" / "hard").st_mtime_ns
    ext4_op(store, ws, "lock")
    ext4_op(store, ws, "session", None, str(outside))
    ext4_op(store, ws, "unlock")
    report = WorkspaceStore(store, "ext4").unlock(ws)
    assert report.changed_paths == ["d1/gone.txt", "d1/sub", "d1/sub/owned", "new", "newdir",
                                    "newdir/inner.txt", "notes.txt", "run.sh"]
    assert [c.detail() for c in report.by_kind("mode")] == ["notes.txt  0644 -> 4755",
                                                            "run.sh  0755 -> 0700"]
    st = os.stat(ws / "notes.txt")
    assert (st.st_uid, stat.S_IMODE(st.st_mode)) == (0, 0o755)  # its lock-time owner; set-id gone
    st = os.stat(ws / "new")
    assert (st.st_uid, stat.S_IMODE(st.st_mode)) == (1000, 0o755)  # the workspace's owner
    assert stat.S_IMODE(os.stat(ws / "tool").st_mode) == 0o2755  # set-id at lock, untouched: kept
    assert stat.S_IMODE(os.stat(ws / "run.sh").st_mode) == 0o700
    assert os.stat(ws / "tool").st_mtime_ns == 1_700_000_000_555_000_000  # touched: comes back
    assert os.stat(ws / "d1" / "hard").st_mtime_ns == mtime_hard  # untouched: exactly as locked
    assert (ws / "notes.txt").read_text() == "changed\n"
    assert os.readlink(ws / "d1" / "sub") == str(outside)
    assert (outside / "owned").read_text() == "precious\n"  # never followed
    assert (ws / "newdir" / "inner.txt").read_text() == "inner\n"
    assert (ws / "d1" / "hard").read_bytes() == bytes(range(256)) * 40
    assert not (ws / "d1" / "gone.txt").exists()
    text = report.render(store / report_dir(store), ws)
    assert "-notes" in text and "+changed" in text and "-doomed" in text


def report_dir(store: Path) -> str:
    (sdir,) = [d for d in store.iterdir()]
    return f"{sdir.name}/originals"


def test_a_tree_with_its_own_lost_and_found_is_copied_into_an_empty_image(tmp_path: Path) -> None:
    ws = ext4_tree(tmp_path)  # store on the same filesystem, but mkfs -d would leave lost+found out
    (ws / "lost+found").mkdir()
    (ws / "lost+found" / "mine").write_text("kept\n")
    original = ws_state(ws)
    store = tmp_path / "store"
    ext4_op(store, ws, "lock")
    (sdir,) = [d for d in store.iterdir()]
    assert "populate" not in json.loads((sdir / "state.json").read_text())  # mkfs -d would drop it
    assert json.loads(ext4_op(store, ws, "show")) == original
    ext4_op(store, ws, "unlock")
    assert ws_state(ws) == original


def test_a_lock_killed_while_the_image_was_being_made_makes_it_again(tmp_path: Path) -> None:
    ws = ext4_tree(tmp_path)
    original = ws_state(ws)
    store = tmp_path / "store"
    ext4_op(store, ws, "lock", "lock.originals")  # the next thing is mkfs -d
    (sdir,) = [d for d in store.iterdir()]
    assert json.loads((sdir / "state.json").read_text())["populate"] == "imaging"
    (sdir / "image.ext4.tmp").write_bytes(b"half an image")  # where mkfs was killed
    ext4_op(store, ws, "lock")
    assert not (sdir / "image.ext4.tmp").exists()
    assert json.loads(ext4_op(store, ws, "show")) == original
    ext4_op(store, ws, "unlock")
    assert ws_state(ws) == original


def test_a_tree_mkfs_cannot_copy_is_copied_in_entry_by_entry(tmp_path: Path) -> None:
    """mkfs.ext4 -d failing (here a wrapper that refuses -d) loses nothing: the lock starts
    again from the snapshot, with originals, and copies the entries into an empty image."""
    real = shutil.which("mkfs.ext4")
    assert real is not None
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "mkfs.ext4").write_text(
        "#!/bin/sh\nfor a in \"$@\"; do [ \"$a\" = -d ] && { echo 'no -d here' >&2; exit 1; }; done\n"
        f"exec {real} \"$@\"\n")
    os.chmod(bin_dir / "mkfs.ext4", 0o755)
    ws = ext4_tree(tmp_path)
    original = ws_state(ws)
    store = tmp_path / "store"
    ext4_op(store, ws, "lock", path=f"{bin_dir}:{os.environ['PATH']}")
    (sdir,) = [d for d in store.iterdir()]
    state = json.loads((sdir / "state.json").read_text())
    assert state["populate_failed"] and "held" not in state and state["phase"] == "locked"
    assert os.listdir(sdir / "originals")  # this lock stored originals
    assert json.loads(ext4_op(store, ws, "show")) == original
    ext4_op(store, ws, "unlock")
    assert ws_state(ws) == original

"""Locked workspaces kept in ext4 images mounted only in the executor's own mount namespace."""

from __future__ import annotations

import json
import os
import shutil
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

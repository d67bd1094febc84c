"""The archive a workspace travels in, the transfer plan, and who may use an uploaded workspace."""

from __future__ import annotations

import io
import os
import tarfile
from pathlib import Path

import pytest
from devsilo.executor._workspace_lock import (
    INCOMING,
    RemoteWorkspaces,
    WorkspaceLockError,
    WorkspaceStore,
)
from devsilo.protocol import TransferPlan
from devsilo.runtime._tree_archive import (
    ArchiveError,
    file_sha256,
    hash_chunks,
    pack_tree,
    unpack_tree,
)
from pydantic import ValidationError


def make_tree(root: Path) -> None:
    (root / "src" / ".hid").mkdir(parents=True)
    (root / "src" / "a.py").write_text("print(1)\n")
    (root / "src" / ".hid" / "x").write_bytes(bytes(range(256)))
    (root / "run.sh").write_text("#!/bin/sh\n")
    (root / "run.sh").chmod(0o755)
    os.symlink("/etc/passwd", root / "out")
    os.symlink("src/a.py", root / "in")
    (root / "ro").mkdir()
    (root / "ro" / "f").write_text("f\n")
    (root / "ro").chmod(0o555)
    os.mkfifo(root / "fifo")


def listing(root: Path) -> dict[str, tuple[str, int, str]]:
    out = {}
    for p in sorted(root.rglob("*")):
        rel = str(p.relative_to(root))
        st = p.lstat()
        if p.is_symlink():
            out[rel] = ("link", 0, os.readlink(p))
        elif p.is_dir():
            out[rel] = ("dir", st.st_mode & 0o7777, "")
        elif p.is_file():
            out[rel] = ("file", st.st_mode & 0o7777, file_sha256(p))
    return out


def test_a_tree_round_trips_with_hidden_files_links_and_modes_and_leaves_fifos_out(tmp_path: Path) -> None:
    src, dst = tmp_path / "src", tmp_path / "dst"
    src.mkdir()
    dst.mkdir()
    make_tree(src)
    packed = pack_tree(src, tmp_path / "a.tar")
    assert packed.skipped == ("fifo",)
    unpack_tree(tmp_path / "a.tar", dst, max_bytes=1 << 20)
    assert "fifo" not in listing(src)  # listing() shows files, dirs and links only
    assert listing(dst) == listing(src)
    assert not (dst / "fifo").exists()
    assert os.readlink(dst / "out") == "/etc/passwd"  # recorded, never followed


def test_packing_the_same_tree_twice_gives_the_same_bytes(tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    make_tree(src)
    pack_tree(src, tmp_path / "1.tar")
    pack_tree(src, tmp_path / "2.tar")
    assert file_sha256(tmp_path / "1.tar") == file_sha256(tmp_path / "2.tar")


def _tar(tmp_path: Path, *members: tuple[str, bytes, str]) -> Path:
    """(name, tar type, link target or content) members into an archive."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for name, kind, extra in members:
            info = tarfile.TarInfo(name)
            info.type = kind
            info.mode = 0o6755 if name == "setid" else 0o644
            if kind == tarfile.REGTYPE:
                info.size = len(extra)
                tar.addfile(info, io.BytesIO(extra.encode()))
            else:
                info.linkname = extra
                tar.addfile(info)
    path = tmp_path / "in.tar"
    path.write_bytes(buf.getvalue())
    return path


@pytest.mark.parametrize(("members", "message"), [
    ((("../x", tarfile.REGTYPE, "x"),), "'..' component"),
    ((("a/../../x", tarfile.REGTYPE, "x"),), "'..' component"),
    ((("/abs", tarfile.REGTYPE, "x"),), "absolute path"),
    ((("l", tarfile.SYMTYPE, "/tmp"), ("l/x", tarfile.REGTYPE, "x")), "comes before (or without)"),
    ((("d/x", tarfile.REGTYPE, "x"),), "comes before (or without)"),
    ((("h", tarfile.LNKTYPE, "/etc/shadow"),), "hard link"),
    ((("dev", tarfile.CHRTYPE, ""),), "device, FIFO"),
    ((("x", tarfile.REGTYPE, "1"), ("x", tarfile.REGTYPE, "2")), "appears twice"),
])
def test_unsafe_archives_are_refused_naming_the_entry(tmp_path: Path, members: tuple[tuple[str, bytes, str], ...],
                                                      message: str) -> None:
    dest = tmp_path / "dest"
    dest.mkdir()
    with pytest.raises(ArchiveError, match="archive entry") as e:
        unpack_tree(_tar(tmp_path, *members), dest, max_bytes=1 << 20)
    assert message in str(e.value)
    assert not (tmp_path / "x").exists()


def test_size_limit_and_set_id_bits(tmp_path: Path) -> None:
    dest = tmp_path / "dest"
    dest.mkdir()
    with pytest.raises(ArchiveError, match="more than 3 bytes"):
        unpack_tree(_tar(tmp_path, ("big", tarfile.REGTYPE, "1234")), dest, max_bytes=3)
    dest2 = tmp_path / "dest2"
    dest2.mkdir()
    unpack_tree(_tar(tmp_path, ("setid", tarfile.REGTYPE, "x")), dest2, max_bytes=10)
    assert (dest2 / "setid").stat().st_mode & 0o7777 == 0o755


def test_a_plan_must_list_exactly_one_hash_per_chunk() -> None:
    with pytest.raises(ValidationError, match="are 3 chunks, the plan lists 2"):
        TransferPlan(transfer_id="t", size=9000, sha256="0" * 64, chunk_size=4096, chunk_sha256=("0" * 64,) * 2)
    assert TransferPlan(transfer_id="t", size=9000, sha256="0" * 64, chunk_size=4096,
                        chunk_sha256=("0" * 64,) * 3).chunk_len(2) == 808


def _locked_upload(tmp_path: Path, user: str) -> RemoteWorkspaces:
    src = tmp_path / "src"
    src.mkdir()
    (src / "f").write_text("hello\n")
    remote = RemoteWorkspaces(WorkspaceStore(tmp_path / "store"), max_bytes=1 << 20)
    pack_tree(src, tmp_path / "a.tar")
    sdir, state = remote.begin_lock("laptop", "/home/u/p", user, hash_chunks(tmp_path / "a.tar", 4096)[1])
    (tmp_path / "a.tar").rename(sdir / INCOMING)
    remote.fetched(sdir, state)
    remote.finish_lock("laptop", "/home/u/p")
    return remote


def test_an_upload_another_user_holds_is_refused(tmp_path: Path) -> None:
    remote = _locked_upload(tmp_path, "alice")
    with pytest.raises(WorkspaceLockError, match="held by another user"):
        remote.begin_lock("laptop", "/home/u/p", "bob", "0" * 64)
    with pytest.raises(WorkspaceLockError, match="held by another user"):
        remote.unlock("laptop", "/home/u/p", "bob")
    assert remote.records(("locked",))[("laptop", "/home/u/p")][0] == "alice"


def test_unlocking_an_upload_twice_gives_the_same_report_and_archive(tmp_path: Path) -> None:
    remote = _locked_upload(tmp_path, "alice")
    files = remote.records(("locked",))[("laptop", "/home/u/p")][1]
    (files / "f").write_text("changed\n")
    first = remote.unlock("laptop", "/home/u/p", "alice")
    again = remote.unlock("laptop", "/home/u/p", "alice")
    assert first.report_text == again.report_text and "Changes since lock: 1" in first.report_text
    assert first.transfer_id == again.transfer_id
    assert file_sha256(first.archive) == file_sha256(again.archive)
    assert not files.exists()


def test_the_pool_sends_sessions_on_an_uploaded_workspace_to_its_holder_only() -> None:
    from devsilo.protocol import ExecutorAnnounce, RemoteLock
    from devsilo.runtime._pool import PoolView

    def ann(eid: str, free: int, remote: tuple[RemoteLock, ...] = ()) -> ExecutorAnnounce:
        return ExecutorAnnounce(executor_id=eid, instance="i", host="server", backends=("bwrap",),
                                capacity=4, free=free, remote_locked=remote)

    pool = PoolView()
    pool.update(ann("roomy", 4))
    pool.update(ann("holder", 1, (RemoteLock(host="laptop", path="/home/u/p", user="u"),)))
    assert pool.remote_holder("laptop", "/home/u/p") == ("holder", "u")
    assert pool.remote_holder("desktop", "/home/u/p") is None  # same path, another machine
    assert [a.executor_id for a in pool.candidates("bwrap", host="laptop", workspace="/home/u/p")] == ["holder"]
    assert pool.candidates("bwrap", host="laptop", workspace="/home/u/other") == []  # no executor on laptop
    assert pool.host_of("roomy") == "server"


def test_the_gateway_refuses_an_upload_for_a_workspace_another_user_holds() -> None:
    import asyncio
    from types import SimpleNamespace

    from devsilo.gateway._transfers import WorkspaceTransfers
    from devsilo.protocol import ExecutorAnnounce, GrantError, RemoteLock
    from devsilo.protocol.client import WorkspaceUpload
    from devsilo.runtime._pool import PoolView

    pool = PoolView()
    pool.update(ExecutorAnnounce(executor_id="e1", instance="i", host="server", backends=("bwrap",), capacity=4,
                                 free=4, remote_locked=(RemoteLock(host="laptop", path="/p", user="alice"),)))
    gw = SimpleNamespace(ctx=SimpleNamespace(options={}), pool=pool, bus=None)
    transfers = WorkspaceTransfers(gw)  # type: ignore[arg-type]
    plan = TransferPlan(transfer_id="t", size=10, sha256="0" * 64, chunk_size=4096, chunk_sha256=("0" * 64,))
    with pytest.raises(GrantError, match="/p of laptop is locked by another user"):
        asyncio.run(transfers.begin("bob", WorkspaceUpload(path="/p", workspace_host="laptop", plan=plan)))

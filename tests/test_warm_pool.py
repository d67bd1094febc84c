"""The warm bwrap pool: sandboxes started on placeholders, a lease attaches the real workspace.

Every sandbox here is a real bwrap, and the attach is the real new mount
API (open_tree, setns, move_mount) through the mounter process. Root only:
only real root may attach a mount inside another mount namespace.
"""

from __future__ import annotations

import asyncio
import os
import signal
import statistics
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import pytest
import pytest_asyncio
from devsilo.executor._mounter import Attach, Mounter, MountError
from devsilo.executor._sandbox import BwrapSandbox, prepare_workspace_ownership, probe
from devsilo.executor._spec import RELAY_SOCKET, WORKSPACE, SandboxLimits, SandboxSpec
from devsilo.executor._warm import WarmPool

SANDBOX_UID = SANDBOX_GID = 64123

pytestmark = [
    pytest.mark.skipif(os.geteuid() != 0, reason="attaching mounts in a sandbox needs root"),
    pytest.mark.skipif(
        os.geteuid() == 0 and probe() is not None, reason="bwrap does not work here"
    ),
]

# umount2 from inside, by ctypes: prints the errno's name (or "ok").
_UMOUNT = (
    "import ctypes, errno, sys; libc = ctypes.CDLL(None, use_errno=True); "
    "r = libc.umount2(sys.argv[1].encode(), int(sys.argv[2])); "
    "print('ok' if r == 0 else errno.errorcode[ctypes.get_errno()])"
)
# mount(2) from inside: remount the workspace read-only (MS_REMOUNT | MS_BIND | MS_RDONLY).
_REMOUNT = (
    "import ctypes, errno; libc = ctypes.CDLL(None, use_errno=True); "
    "r = libc.mount(None, b'" + WORKSPACE + "', None, ctypes.c_ulong(0x20 | 0x1000 | 0x1), None); "
    "print('ok' if r == 0 else errno.errorcode[ctypes.get_errno()])"
)
_RELAY_HELLO = (
    "import socket; s = socket.socket(socket.AF_UNIX); s.connect('" + RELAY_SOCKET + "'); "
    "print(s.recv(100).decode())"
)


def _template(scratch: Path) -> Callable[[], SandboxSpec]:
    def make_spec() -> SandboxSpec:
        return SandboxSpec(
            session_id="warm",
            workspace=Path("/nonexistent"),  # the pool gives each slot its own
            sandbox_uid=SANDBOX_UID,
            sandbox_gid=SANDBOX_GID,
            scratch_root=scratch,
        )

    return make_spec


def _session(
    pool: WarmPool, name: str, tmp_path: Path, relay: Path | None = None, **fields: object
) -> SandboxSpec:
    ws = tmp_path / name
    ws.mkdir()
    (ws / "README").write_text(f"the project of {name}\n")
    prepare_workspace_ownership(ws, SANDBOX_UID, SANDBOX_GID)
    spec = pool.make_spec()
    return SandboxSpec(
        session_id=name,
        workspace=ws,
        sandbox_uid=spec.sandbox_uid,
        sandbox_gid=spec.sandbox_gid,
        scratch_root=spec.scratch_root,
        relay_socket=relay,
        **fields,  # type: ignore[arg-type]
    )


async def _relay_listener(path: Path, greeting: bytes) -> asyncio.Server:
    """A stand-in for the session's relay: greets every connection and hangs up."""

    async def greet(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(greeting)
        await writer.drain()
        writer.close()

    server = await asyncio.start_unix_server(greet, path=str(path))
    os.chown(path, SANDBOX_UID, SANDBOX_GID)
    os.chmod(path, 0o600)
    return server


def _children() -> set[int]:
    """Pids of this process's live children."""
    me = str(os.getpid())
    found = set()
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        fields = stat.rsplit(")", 1)[1].split()
        if fields[1] == me and fields[0] != "Z":
            found.add(int(entry))
    return found


@pytest_asyncio.fixture
async def pool(tmp_path: Path) -> AsyncIterator[WarmPool]:
    p = WarmPool(_template(tmp_path / "scratch"), 2)
    await p.start()
    await p.wait_ready()
    try:
        yield p
    finally:
        await p.close()


async def test_take_gives_the_sessions_workspace_read_write(pool: WarmPool, tmp_path: Path) -> None:
    spec = _session(pool, "alice", tmp_path)
    sandbox = await pool.take(spec)
    try:
        assert isinstance(sandbox, BwrapSandbox)
        assert sandbox.workspace == spec.workspace
        assert pool.stats.warm_leases == 1 and pool.stats.cold_leases == 0
        assert (await sandbox.helper.read("README")).content == b"the project of alice\n"
        r = await sandbox.helper.exec("echo made inside > made && cat README && pwd && ls -a")
        assert r.exit_code == 0, r.stderr
        assert r.stdout.splitlines() == [
            "the project of alice",
            WORKSPACE,
            ".",
            "..",
            "README",
            "made",
        ]
        await sandbox.helper.write("sub/written.txt", b"via the helper\n")
        made = spec.workspace / "made"
        assert made.read_text() == "made inside\n"
        assert made.stat().st_uid == SANDBOX_UID and made.stat().st_gid == SANDBOX_GID
        assert (spec.workspace / "sub" / "written.txt").read_bytes() == b"via the helper\n"
        # Mounted as bwrap mounts its binds: no setuid, no devices.
        mounts = await sandbox.helper.exec(f"grep ' {WORKSPACE} ' /proc/self/mountinfo")
        top = mounts.stdout.splitlines()[-1]
        assert str(spec.workspace) in top and "nosuid" in top and "nodev" in top
    finally:
        await sandbox.close()


async def test_the_relay_socket_is_the_sessions_own(pool: WarmPool, tmp_path: Path) -> None:
    relay = tmp_path / "relay.sock"
    server = await _relay_listener(relay, b"relay of bob")
    try:
        sandbox = await pool.take(_session(pool, "bob", tmp_path, relay=relay))
        try:
            r = await sandbox.helper.exec(f'python3 -c "{_RELAY_HELLO}"')
            assert r.exit_code == 0, r.stderr
            assert r.stdout.strip() == "relay of bob"
        finally:
            await sandbox.close()
    finally:
        server.close()
        await server.wait_closed()


async def test_two_sessions_see_only_their_own_workspace(pool: WarmPool, tmp_path: Path) -> None:
    a_spec, b_spec = _session(pool, "a", tmp_path), _session(pool, "b", tmp_path)
    a, b = await asyncio.gather(pool.take(a_spec), pool.take(b_spec))
    try:
        assert pool.stats.warm_leases == 2
        await a.helper.exec("echo from a > note")
        await b.helper.exec("echo from b > note")
        assert (a_spec.workspace / "note").read_text() == "from a\n"
        assert (b_spec.workspace / "note").read_text() == "from b\n"
        for sandbox, own, other in ((a, a_spec, b_spec), (b, b_spec, a_spec)):
            r = await sandbox.helper.exec("cat README; cat /proc/self/mountinfo")
            assert r.stdout.startswith(f"the project of {own.workspace.name}\n")
            assert str(other.workspace) not in r.stdout
    finally:
        await asyncio.gather(a.close(), b.close())


async def test_the_sandbox_user_cannot_take_the_workspace_off(
    pool: WarmPool, tmp_path: Path
) -> None:
    spec = _session(pool, "carol", tmp_path)
    sandbox = await pool.take(spec)
    try:
        for flags in (0, 2):  # plain, and MNT_DETACH
            r = await sandbox.helper.exec(f'python3 -c "{_UMOUNT}" {WORKSPACE} {flags}')
            assert r.stdout.strip() == "EPERM", r
        r = await sandbox.helper.exec(f'python3 -c "{_UMOUNT}" {RELAY_SOCKET} 0')
        assert r.stdout.strip() == "EPERM", r
        r = await sandbox.helper.exec(f'python3 -c "{_REMOUNT}"')
        assert r.stdout.strip() == "EPERM", r
        r = await sandbox.helper.exec(f"mount --bind /tmp {WORKSPACE}")
        assert r.exit_code != 0
        await sandbox.helper.write("still-writable", b"yes")
        assert (await sandbox.helper.read("README")).content == b"the project of carol\n"
    finally:
        await sandbox.close()


async def test_take_latency_against_a_cold_start(tmp_path: Path) -> None:
    runs = 8
    warm: list[float] = []
    async with WarmPool(_template(tmp_path / "scratch"), 1) as pool:
        for i in range(runs):
            await pool.wait_ready()
            spec = _session(pool, f"warm{i}", tmp_path)
            started = time.perf_counter()
            sandbox = await pool.take(spec)
            warm.append(time.perf_counter() - started)
            await sandbox.close()
        assert pool.stats.warm_leases == runs
        cold: list[float] = []
        for i in range(runs):
            spec = _session(pool, f"cold{i}", tmp_path)
            started = time.perf_counter()
            sandbox = BwrapSandbox(spec)
            await sandbox.start()
            cold.append(time.perf_counter() - started)
            await sandbox.close()
    print(
        f"\nwarm take(): p50 {statistics.median(warm) * 1000:.2f} ms, "
        f"max {max(warm) * 1000:.2f} ms; "
        f"cold start: p50 {statistics.median(cold) * 1000:.2f} ms, "
        f"max {max(cold) * 1000:.2f} ms ({runs} each)"
    )


async def test_the_pool_refills_after_a_take(pool: WarmPool, tmp_path: Path) -> None:
    starts = pool.stats.starts
    sandbox = await pool.take(_session(pool, "dave", tmp_path))
    try:
        assert pool.ready == 1
        await pool.wait_ready(timeout=10)
        assert pool.ready == 2
        assert pool.stats.starts == starts + 1
    finally:
        await sandbox.close()


async def test_a_dead_warm_sandbox_is_skipped(pool: WarmPool, tmp_path: Path) -> None:
    dead = pool._ready[0].sandbox  # killed on purpose below
    assert dead.init_pid is not None
    os.kill(dead.init_pid, signal.SIGKILL)
    await asyncio.sleep(0.2)
    sandbox = await pool.take(_session(pool, "erin", tmp_path))
    try:
        assert sandbox is not dead
        assert pool.stats.discarded == 1 and pool.stats.warm_leases == 1
        assert (await sandbox.helper.read("README")).content == b"the project of erin\n"
    finally:
        await sandbox.close()


async def test_unfit_sessions_are_cold_started(pool: WarmPool, tmp_path: Path) -> None:
    reference = tmp_path / "reference.txt"
    reference.write_text("docs\n")
    reading = _session(pool, "frank", tmp_path, allow_read=(reference,))
    assert pool.unfit(reading) == "read allow-list paths are bound when a sandbox starts"
    limited = _session(pool, "grace", tmp_path, limits=SandboxLimits(memory_bytes=512 * 1024**2))
    assert "limits" in (pool.unfit(limited) or "")
    assert pool.unfit(_session(pool, "heidi", tmp_path)) is None
    assert await pool.try_take(reading) is None
    sandbox = await pool.take(reading)
    try:
        assert pool.stats.cold_leases == 1 and pool.stats.warm_leases == 0
        assert pool.ready == 2  # no warm sandbox was used up
        assert (await sandbox.helper.read(str(reference))).content == b"docs\n"
    finally:
        await sandbox.close()


async def test_an_attach_over_anything_but_the_placeholder_is_refused(
    pool: WarmPool, tmp_path: Path
) -> None:
    spec = _session(pool, "ivan", tmp_path)
    sandbox = await pool.take(spec)
    try:
        assert sandbox.init_pid is not None
        pidfd = os.pidfd_open(sandbox.init_pid)
        other = os.open(tmp_path, os.O_PATH | os.O_DIRECTORY)
        st = os.stat(tmp_path / "scratch")
        mounter = Mounter()
        await mounter.start()
        try:
            with pytest.raises(MountError, match="not its placeholder") as caught:
                await mounter.attach(
                    pidfd, [Attach(other, WORKSPACE, expect=(st.st_dev, st.st_ino))]
                )
            assert caught.value.errno is not None
        finally:
            await mounter.close()
            os.close(other)
            os.close(pidfd)
        assert (await sandbox.helper.read("README")).content == b"the project of ivan\n"
    finally:
        await sandbox.close()


async def test_close_leaves_nothing_behind(tmp_path: Path) -> None:
    before = _children()
    scratch = tmp_path / "scratch"
    pool = WarmPool(_template(scratch), 2)
    await pool.start()
    await pool.wait_ready()
    leased = await pool.take(_session(pool, "judy", tmp_path))
    await pool.wait_ready()
    mounter_pid = pool._mounter.pid  # checked gone below
    assert mounter_pid is not None and mounter_pid in _children()
    assert len(_children() - before) == 4  # three bwraps and the mounter
    await leased.close()
    await pool.close()
    await pool.close()  # idempotent
    assert _children() - before == set()
    assert list(scratch.iterdir()) == []
    with pytest.raises(ProcessLookupError):
        os.kill(mounter_pid, 0)


async def test_a_dead_mounter_is_started_again(pool: WarmPool, tmp_path: Path) -> None:
    mounter = pool._mounter  # the test kills its process on purpose
    first = mounter.pid
    assert first is not None
    os.kill(first, signal.SIGKILL)
    for _ in range(100):
        if mounter.pid is None:
            break
        await asyncio.sleep(0.02)
    sandbox = await pool.take(_session(pool, "judy", tmp_path))
    try:
        assert pool.stats.warm_leases == 1
        assert mounter.pid not in (None, first)
        assert (await sandbox.helper.read("README")).content == b"the project of judy\n"
    finally:
        await sandbox.close()

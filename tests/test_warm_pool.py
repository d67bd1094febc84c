"""The warm pools: sandboxes started before their session, handed to it at lease.

Every sandbox here is real. bwrap and docker with runc: started on
placeholders, the lease attaches the session's workspace and relay socket
with the real new mount API (open_tree, setns, move_mount) through the
mounter process. gVisor and docker with runsc: started on the (locked)
workspace they serve, the lease hands the warm sandbox's relay socket to the
session's relay. The docker variants run on this module's own dockerd. Root
only: only real root may attach a mount inside another mount namespace, and
runsc and dockerd need it anyway.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import os
import signal
import statistics
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import pytest_asyncio
from devsilo.executor._backends import BACKENDS
from devsilo.executor._mounter import Attach, Mounter, MountError
from devsilo.executor._relay import SessionRelay, read_preamble
from devsilo.executor._sandbox import BwrapSandbox, Sandbox, prepare_workspace_ownership, probe
from devsilo.executor._spec import HOME, RELAY_SOCKET, WORKSPACE, SandboxLimits, SandboxSpec
from devsilo.executor._warm import WarmPool, WarmPools, attaches
from devsilo.testing import Stack
from devsilo.testing._attacks import ATTACKS, BOMB_LIMITS, Bait, plant_bait, run_attack
from devsilo.testing._nats import init_state

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


# -- gVisor and Docker ----------------------------------------------------------------
#
# The same pool on the other real backends: a private dockerd for the docker
# variants (runc attaches the workspace like bwrap; runsc and gvisor keep warm
# sandboxes keyed by their workspace and hand over the relay socket).

_WARM_VARIANTS = [
    pytest.param(("gvisor", "gvisor", {}), id="gvisor"),
    pytest.param(("docker-runc", "docker", {"runtime": "runc"}), id="docker-runc"),
    pytest.param(("docker-runsc", "docker", {"runtime": "runsc"}), id="docker-runsc"),
]
_WARM_ATTACKS = (
    "list_host_ssh_dir",
    "list_state_dir",
    "read_other_workspace",
    "read_other_scratch",
    "enter_host_process_root",
    "follow_workspace_symlink",
    "write_root_dir",
    "write_host_bait_dir",
    "setuid_binary",
    "mount_tmpfs",
    "unmount_proc",
    "unshare_user_namespace",
    "setns_into_init",
    "ptrace_host_process",
    "keyctl",
    "bpf",
    "io_uring",
    "raw_socket",
    "create_device_node",
    "write_sys",
    "connect_host_loopback",
    "connect_nats",
    "connect_test_network",
)
"""A good part of the battery (tests/test_attacks.py runs all of it cold): the reads and
writes out of the workspace, including the scratch of another warm sandbox of the same
pool, mount and namespace calls, the kernel interfaces and the network. Not the bombs:
their verdict rests on how long the host takes to answer, a timing threshold; the limits
of a warm sandbox are checked without one below."""
# Forks sleeping children until the pids limit refuses one; prints how many and the errno.
_FORK_UNTIL_REFUSED = (
    "import errno, os, time\n"
    "kids, err = [], None\n"
    "for _ in range(1000):\n"
    "    try:\n"
    "        pid = os.fork()\n"
    "    except OSError as exc:\n"
    "        err = errno.errorcode[exc.errno]\n"
    "        break\n"
    "    if pid == 0:\n"
    "        time.sleep(60)\n"
    "        os._exit(0)\n"
    "    kids.append(pid)\n"
    "for pid in kids:\n"
    "    os.kill(pid, 9)\n"
    "    os.waitpid(pid, 0)\n"
    "print(len(kids), err)\n"
)
_EGRESS_FETCH = (
    "import urllib.request; "
    "print(urllib.request.urlopen('http://example.test/', timeout=10).read().decode())"
)


@dataclasses.dataclass
class Variant:
    """A backend under test, its settings, and how to list the sandboxes it has running."""

    name: str
    backend: str
    config: dict[str, Any]
    dockerd: Any = None

    @property
    def attaches(self) -> bool:
        return attaches(self.backend, self.config)

    def sandbox_id(self, sandbox: Sandbox) -> str:
        """The container's name (docker) or runsc container id (gvisor)."""
        found = getattr(sandbox, "container_name" if self.backend == "docker" else "container_id")
        assert isinstance(found, str)
        return found

    def running(self, scratch: Path) -> set[str]:
        """Ids of the sandboxes of this backend running now."""
        if self.backend == "docker":
            return set(self.dockerd.containers())
        state = scratch / "runsc"
        if not state.exists():
            return set()
        listed = subprocess.run(
            ["runsc", f"--root={state}", "list", "-quiet"],
            capture_output=True,
            check=True,
            text=True,
        )
        return set(listed.stdout.split())


@pytest.fixture(scope="module")
def dockerd(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    """This module's own dockerd with the base image; stopped even on failure."""
    if not os.access("/usr/sbin/dockerd", os.X_OK):
        pytest.skip("dockerd is not installed (apt-get install docker.io)")
    pytest.importorskip("docker", reason="the docker SDK is not installed")
    from devsilo.testing._dockerd import Dockerd

    with Dockerd(tmp_path_factory.mktemp("dockerd")) as daemon:
        daemon.build_base_image()
        yield daemon


@pytest.fixture(scope="module", params=_WARM_VARIANTS)
def variant(request: pytest.FixtureRequest) -> Variant:
    """gvisor, docker-runc or docker-runsc; skipped when it does not work here."""
    name, backend, settings = request.param
    config = dict(settings)
    daemon = None
    if backend == "docker":
        daemon = request.getfixturevalue("dockerd")
        config["docker_url"] = daemon.url
    reason = BACKENDS[backend].probe(**config)
    if reason is not None:
        pytest.skip(f"{name}: {reason}")
    return Variant(name, backend, config, daemon)


def _workspace(tmp_path: Path, name: str) -> Path:
    ws = tmp_path / name
    ws.mkdir()
    (ws / "README").write_text(f"the project of {name}\n")
    prepare_workspace_ownership(ws, SANDBOX_UID, SANDBOX_GID)
    return ws


def _spec_on(workspace: Path, scratch: Path, session: str, **fields: Any) -> SandboxSpec:
    return SandboxSpec(
        session_id=session,
        workspace=workspace,
        sandbox_uid=SANDBOX_UID,
        sandbox_gid=SANDBOX_GID,
        scratch_root=scratch,
        **fields,
    )


@contextlib.asynccontextmanager
async def _warm_pool(
    variant: Variant, workspace: Path, scratch: Path, size: int = 1, **fields: Any
) -> AsyncIterator[WarmPool]:
    """A full pool of ``variant`` whose template is on ``workspace`` (keyed pools need it)."""
    pool = WarmPool(
        lambda: _spec_on(workspace, scratch, "warm", **fields),
        size,
        backend=variant.backend,
        **variant.config,
    )
    await pool.start()
    try:
        await pool.wait_ready(timeout=120)
        yield pool
    finally:
        await pool.close()


@contextlib.asynccontextmanager
async def _egress(seen: list[str]) -> AsyncIterator[tuple[str, int]]:
    """A stand-in egress: records each relayed session id, answers one HTTP request."""

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        preamble = await read_preamble(reader)
        seen.append(preamble.session_id)
        if preamble.kind == "tcp":
            await reader.readuntil(b"\r\n\r\n")
            body = f"egress saw {preamble.session_id}".encode()
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body))
            await writer.drain()
        writer.close()

    server = await asyncio.start_server(serve, "127.0.0.1", 0)
    try:
        yield "127.0.0.1", server.sockets[0].getsockname()[1]
    finally:
        server.close()
        await server.wait_closed()


async def test_a_fitting_session_gets_a_started_sandbox_on_its_own_workspace(
    variant: Variant, tmp_path: Path
) -> None:
    alice = _workspace(tmp_path, "alice")
    bob = _workspace(tmp_path, "bob")
    (bob / "secret.txt").write_text("bob's secret\n")
    scratch = tmp_path / "scratch"
    async with _warm_pool(variant, alice, scratch) as pool:
        running_before = variant.running(scratch)
        # Written after the warm sandbox started: a lease sees the workspace as it is now.
        (alice / "late.txt").write_text("written after the warm start\n")
        sandbox = await pool.take(_spec_on(alice, scratch, "alice-1"))
        try:
            assert pool.stats.warm_leases == 1 and pool.stats.cold_leases == 0
            assert variant.sandbox_id(sandbox) in running_before  # started before the lease
            assert "warm-" in variant.sandbox_id(sandbox)
            hello = await sandbox.helper.hello()
            assert hello.workspace == WORKSPACE and hello.uid != 0
            assert (await sandbox.helper.read("README")).content == b"the project of alice\n"
            late = await sandbox.helper.read(f"{WORKSPACE}/late.txt")
            assert late.content == b"written after the warm start\n"
            r = await sandbox.helper.exec("echo made inside > made && cat README && ls -a")
            assert r.exit_code == 0, r.stderr
            assert r.stdout.splitlines()[0] == "the project of alice"
            assert "secret.txt" not in r.stdout
            await sandbox.helper.write("sub/written.txt", b"via the helper\n")
            made = alice / "made"
            assert made.read_text() == "made inside\n"
            assert made.stat().st_uid == SANDBOX_UID
            assert (alice / "sub" / "written.txt").read_bytes() == b"via the helper\n"
            r = await sandbox.helper.exec(
                f"cat {bob}/secret.txt; grep -rs 'secret' / --include=secret.txt 2>/dev/null; true"
            )
            assert "bob's secret" not in r.stdout + r.stderr
            assert not (bob / "made").exists()
        finally:
            await sandbox.close()


async def test_two_warm_sessions_see_only_their_own_workspace(
    variant: Variant, tmp_path: Path
) -> None:
    if not variant.attaches:
        pytest.skip(f"{variant.name} keeps warm sandboxes per workspace: see the cold test")
    a_ws, b_ws = _workspace(tmp_path, "a"), _workspace(tmp_path, "b")
    scratch = tmp_path / "scratch"
    async with _warm_pool(variant, a_ws, scratch, size=2) as pool:
        a, b = await asyncio.gather(
            pool.take(_spec_on(a_ws, scratch, "a")), pool.take(_spec_on(b_ws, scratch, "b"))
        )
        try:
            assert pool.stats.warm_leases == 2
            await a.helper.exec("echo from a > note")
            await b.helper.exec("echo from b > note")
            assert (a_ws / "note").read_text() == "from a\n"
            assert (b_ws / "note").read_text() == "from b\n"
            for sandbox, own, other in ((a, a_ws, b_ws), (b, b_ws, a_ws)):
                r = await sandbox.helper.exec("cat README; cat /proc/self/mountinfo")
                assert r.stdout.startswith(f"the project of {own.name}\n")
                assert str(other) not in r.stdout
        finally:
            await asyncio.gather(a.close(), b.close())


async def test_the_ownership_warning_says_how_the_workspace_is_at_lease(
    variant: Variant, tmp_path: Path
) -> None:
    workspace = tmp_path / "handed-over-late"
    workspace.mkdir()
    (workspace / "README").write_text("the project of handed-over-late\n")  # root's, for now
    link = tmp_path / "link-to-it"  # the same workspace, named otherwise by its session
    link.symlink_to(workspace)
    scratch = tmp_path / "scratch"
    async with _warm_pool(variant, workspace, scratch, size=2) as pool:
        unowned = await pool.take(_spec_on(link, scratch, "first"))
        try:
            assert pool.stats.warm_leases == 1
            warning = (
                f"sandbox uid {SANDBOX_UID} does not own {link}: commands cannot write it "
                "(see prepare_workspace_ownership)"
            )
            assert [w for w in getattr(unowned, "warnings", []) if "does not own" in w] == [warning]
        finally:
            await unowned.close()
        # As the executor does before each lease.
        prepare_workspace_ownership(workspace, SANDBOX_UID, SANDBOX_GID)
        owned = await pool.take(_spec_on(workspace, scratch, "second"))
        try:
            assert pool.stats.warm_leases == 2
            assert [w for w in getattr(owned, "warnings", []) if "does not own" in w] == []
            await owned.helper.write("now-writable", b"yes")
        finally:
            await owned.close()


async def test_the_relay_route_is_the_leasing_sessions(variant: Variant, tmp_path: Path) -> None:
    workspace = _workspace(tmp_path, "carol")
    scratch = tmp_path / "scratch"
    seen: list[str] = []
    async with _egress(seen) as egress, _warm_pool(variant, workspace, scratch) as pool:
        relay = SessionRelay("carol-1", tmp_path / "carol-1.sock", egress, uid=SANDBOX_UID)
        await relay.start()
        try:
            spec = _spec_on(workspace, scratch, "carol-1", relay_socket=relay.socket_path)
            sandbox = await pool.take(spec, relay)
            try:
                assert pool.stats.warm_leases == 1
                r = await sandbox.helper.exec(f'python3 -I -S -c "{_EGRESS_FETCH}"')
                assert r.exit_code == 0, r.stderr
                assert r.stdout.strip() == "egress saw carol-1"
            finally:
                await sandbox.close()
        finally:
            await relay.close()
    assert seen == ["carol-1"]
    assert relay.stats.refused == 0


async def test_before_its_lease_the_relay_socket_goes_nowhere(
    variant: Variant, tmp_path: Path
) -> None:
    workspace = _workspace(tmp_path, "dora")
    scratch = tmp_path / "scratch"
    async with _warm_pool(variant, workspace, scratch) as pool:
        waiting = pool._ready[0].sandbox  # a warm sandbox nobody leased: look from inside
        r = await waiting.helper.exec(f'python3 -c "{_RELAY_HELLO}"')
        assert r.exit_code != 0
        assert "ConnectionRefusedError" in r.stderr or "PermissionError" in r.stderr, r.stderr


async def test_the_pool_refills_and_never_hands_out_a_sandbox_twice(
    variant: Variant, tmp_path: Path
) -> None:
    workspace = _workspace(tmp_path, "erin")
    scratch = tmp_path / "scratch"
    async with _warm_pool(variant, workspace, scratch) as pool:
        first = await pool.take(_spec_on(workspace, scratch, "erin-1"))
        first_id = variant.sandbox_id(first)
        assert pool.ready == 0
        await pool.wait_ready(timeout=120)
        assert pool.ready == 1 and pool.stats.starts == 2
        await first.helper.exec("echo left by erin-1 > $HOME/mine")
        await first.close()
        assert first_id not in variant.running(scratch)  # closed for good, not returned
        second = await pool.take(_spec_on(workspace, scratch, "erin-2"))
        try:
            assert pool.stats.warm_leases == 2
            assert variant.sandbox_id(second) != first_id
            r = await second.helper.exec("cat $HOME/mine")
            assert r.exit_code != 0  # a fresh scratch home: nothing of erin-1's
        finally:
            await second.close()


async def test_unfit_sessions_start_cold_and_use_no_warm_sandbox(
    variant: Variant, tmp_path: Path
) -> None:
    workspace = _workspace(tmp_path, "frank")
    other = _workspace(tmp_path, "grace")
    reference = tmp_path / "reference.txt"
    reference.write_text("docs\n")
    scratch = tmp_path / "scratch"
    async with _warm_pool(variant, workspace, scratch) as pool:
        reading = _spec_on(workspace, scratch, "frank-1", allow_read=(reference,))
        assert pool.unfit(reading) == "read allow-list paths are bound when a sandbox starts"
        limited = _spec_on(
            workspace, scratch, "frank-2", limits=SandboxLimits(memory_bytes=512 * 1024**2)
        )
        assert "limits" in (pool.unfit(limited) or "")
        elsewhere = _spec_on(other, scratch, "grace-1")
        if variant.attaches:
            assert pool.unfit(elsewhere) is None
        else:
            assert "start on their workspace" in (pool.unfit(elsewhere) or "")
        cold_cases = [reading] if variant.attaches else [reading, elsewhere]
        for spec in cold_cases:
            sandbox = await pool.take(spec)
            try:
                assert "warm-" not in variant.sandbox_id(sandbox)
                own = (await sandbox.helper.read("README")).content.decode()
                assert own == f"the project of {spec.workspace.name}\n"
            finally:
                await sandbox.close()
        assert pool.stats.cold_leases == len(cold_cases) and pool.stats.warm_leases == 0
        assert pool.ready == 1  # no warm sandbox was used up


async def test_closing_the_executors_pools_leaves_no_sandbox_behind(
    variant: Variant, tmp_path: Path
) -> None:
    workspace = _workspace(tmp_path, "heidi")
    scratch = tmp_path / "scratch"
    pools = WarmPools(
        lambda ws: _spec_on(ws or scratch, scratch, "warm"),
        {variant.backend: 1},
        {variant.backend: variant.config},
        [variant.backend],
    )
    await pools.start()
    try:
        await pools.track(workspace)
        assert pools.problems == {}
        (pool,) = pools.pools()
        await pool.wait_ready(timeout=120)
        assert pools.ready() == {variant.backend: 1}
        sandbox = await pools.try_take(variant.backend, _spec_on(workspace, scratch, "heidi-1"))
        assert sandbox is not None
        await pool.wait_ready(timeout=120)
        assert len(variant.running(scratch)) == 2  # the leased one and its replacement
        await sandbox.close()
    finally:
        await pools.close()
    await pools.close()  # idempotent
    for _ in range(50):  # a leased slot's directory goes when its sandbox's process is gone
        if not list(scratch.glob("warm-*")):
            break
        await asyncio.sleep(0.1)
    assert variant.running(scratch) == set()
    assert list(scratch.glob("warm-*")) == []
    assert [p.name for p in scratch.iterdir() if p.name != "runsc"] == []


@pytest.fixture(scope="module")
def bait(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Bait]:
    """The attack battery's bait: host secrets, listeners, a test network, a host process."""
    state = init_state(tmp_path_factory.mktemp("warm-attack-state") / "state")
    with plant_bait(
        tmp_path_factory.mktemp("bait"), state_dir=state.root, state_file=state.roster_path
    ) as planted:
        yield planted


# -- through the executor service ---------------------------------------------------------

_SESSION_SCRIPT = {
    "responses": [
        {
            "tool_calls": [
                {"name": "Bash", "input": {"command": "cat README; echo made > made.txt"}}
            ]
        },
        {"tool_calls": [{"name": "Exit", "input": {"message": "done"}}]},
    ]
}


def _silo(stack: Stack, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "devsilo.cli", "--state-dir", str(stack.state_dir), *args],
        capture_output=True,
        text=True,
        timeout=180,
        check=False,
    )


def _wait_for_metric(stack: Stack, name: str, labels: str, wanted: float) -> None:
    """Poll the executor's metric until it reads ``wanted`` (the announce loop sets it each second)."""
    for _ in range(600):
        if stack.metric("executor", name, labels) == wanted:
            return
        time.sleep(0.1)
    raise AssertionError(f"{name}{{{labels}}} never reached {wanted}: {stack.metrics('executor')}")


def _descendants(pid: int) -> list[str]:
    """Command lines of every process below ``pid``."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            with contextlib.suppress(OSError, IndexError):
                ppid = int(Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()[1])
                children.setdefault(ppid, []).append(int(entry))
    found, todo = [], list(children.get(pid, []))
    while todo:
        p = todo.pop()
        with contextlib.suppress(OSError):
            found.append(Path(f"/proc/{p}/cmdline").read_bytes().replace(b"\0", b" ").decode())
        todo += children.get(p, [])
    return found


def _run_session(stack: Stack, tmp_path: Path, workspace: Path, backend: str) -> None:
    script = tmp_path / "script.json"
    script.write_text(json.dumps(_SESSION_SCRIPT))
    r = _silo(stack, "run", "--headless", "--script", str(script), "--workspace", str(workspace),
              "--sandbox", backend, "--prompt", "go", "--json")  # fmt: skip
    assert r.returncode == 0, r.stdout + r.stderr
    bash = [json.loads(line) for line in r.stdout.splitlines()]
    results = [e["data"] for e in bash if e["kind"] == "tool_result"]
    assert results[0]["content"].startswith(f"the project of {workspace.name}"), results


def test_the_executor_leases_warm_gvisor_sandboxes_on_a_locked_workspace(
    stack: Stack, tmp_path: Path
) -> None:
    reason = BACKENDS["gvisor"].probe()
    if reason is not None:
        pytest.skip(f"gvisor: {reason}")
    workspace = tmp_path / "locked"
    workspace.mkdir()
    (workspace / "README").write_text("the project of locked\n")
    warm = ("silo_sandboxes_warm", 'backend="gvisor"')
    leases = ("silo_sandbox_leases_total", 'backend="gvisor",kind="warm"')
    before = stack.metric("executor", *leases)
    r = _silo(stack, "workspace", "lock", str(workspace))
    assert r.returncode == 0, r.stdout + r.stderr
    _wait_for_metric(stack, *warm, 1.0)  # announced too: the same count
    _run_session(stack, tmp_path, workspace, "gvisor")
    assert stack.metric("executor", *leases) == before + 1
    _wait_for_metric(stack, *warm, 1.0)  # refilled
    r = _silo(stack, "workspace", "unlock", str(workspace), "--accept")
    assert r.returncode == 0, r.stdout + r.stderr
    assert (workspace / "made.txt").read_text() == "made\n"
    _wait_for_metric(stack, *warm, 0.0)  # its warm sandboxes went with the lock
    executor = stack.live_pid("executor")
    assert executor is not None
    assert [c for c in _descendants(executor) if "runsc" in c] == []


def test_the_executor_leases_warm_docker_sandboxes_and_leaves_no_container(
    dockerd: Any, tmp_path: Path
) -> None:
    options = {"backends": "bwrap,docker", "docker_url": dockerd.url, "docker_runtime": "runc",
               "warm": {"bwrap": 1, "docker": 1}}  # fmt: skip
    stack = Stack(
        tmp_path / "state", services={"executor": {"role": "executor", "options": options}}
    )
    stack.start()
    try:
        workspace = _workspace(tmp_path, "dockered")
        warm = ("silo_sandboxes_warm", 'backend="docker"')
        _wait_for_metric(stack, *warm, 1.0)
        (waiting,) = dockerd.containers()
        _run_session(stack, tmp_path, workspace, "docker")
        leases = 'backend="docker",kind="warm"'
        assert stack.metric("executor", "silo_sandbox_leases_total", leases) == 1.0
        assert (workspace / "made.txt").read_text() == "made\n"
        _wait_for_metric(stack, *warm, 1.0)
        assert waiting not in dockerd.containers()  # used once, closed with its session
    finally:
        stack.stop()
    assert dockerd.containers() == []


def _probed(request: pytest.FixtureRequest, param: tuple[str, str, dict[str, Any]]) -> Variant:
    """The variant with its settings (docker: the module's daemon); skipped when its backend cannot run."""
    name, backend, settings = param
    config = dict(settings)
    if backend == "docker":
        config["docker_url"] = request.getfixturevalue("dockerd").url
    reason = BACKENDS[backend].probe(**config)
    if reason is not None:
        pytest.skip(f"{name}: {reason}")
    return Variant(name, backend, config)


@pytest.mark.parametrize(
    "any_variant",
    [pytest.param(("bwrap", "bwrap", {}), id="bwrap"), *_WARM_VARIANTS],
)
async def test_a_warm_sandbox_keeps_the_pids_limit_it_was_started_with(
    any_variant: tuple[str, str, dict[str, Any]],
    request: pytest.FixtureRequest,
    tmp_path: Path,
) -> None:
    variant = _probed(request, any_variant)
    workspace = _workspace(tmp_path, "forker")
    scratch = tmp_path / "scratch"
    limits = SandboxLimits(pids=32)  # memory at its default: this is about pids alone
    async with _warm_pool(variant, workspace, scratch, limits=limits) as pool:
        sandbox = await pool.take(_spec_on(workspace, scratch, "forker", limits=limits))
        try:
            assert pool.stats.warm_leases == 1
            script = tmp_path / "forker" / "fork.py"
            script.write_text(_FORK_UNTIL_REFUSED)
            r = await sandbox.helper.exec("python3 -I -S fork.py", timeout_ms=120_000)
            assert r.exit_code == 0, r.stderr
            forked, err = r.stdout.split()
            assert err == "EAGAIN", r.stdout
            assert int(forked) < limits.pids
            assert (await sandbox.helper.exec("echo still here")).stdout == "still here\n"
        finally:
            await sandbox.close()


# -- the attack battery in a warm sandbox (last: its sandboxes live until the module ends) ------

@pytest.fixture(scope="module", params=[pytest.param(("bwrap", "bwrap", {}), id="bwrap"), *_WARM_VARIANTS])
def attack_variant(request: pytest.FixtureRequest) -> Variant:
    """The backend the warm attack battery runs on (docker with the module's daemon)."""
    return _probed(request, request.param)


@dataclasses.dataclass
class WarmAttacker:
    """A sandbox leased from a warm pool for the attacker's session, and the bait aimed from it."""

    sandbox: Sandbox
    bait: Bait


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def warm_attacker(attack_variant: Variant, bait: Bait,
                        tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[WarmAttacker]:
    """One warm sandbox leased for the attacker, per backend, that every warm attack runs in."""
    root = tmp_path_factory.mktemp(f"warm-attack-{attack_variant.name}")
    victim = _workspace(root, "victim")
    (victim / "secret.txt").write_text(bait.secret + "\n")
    workspace = _workspace(root, "attacker")
    aimed = dataclasses.replace(bait, other_workspace_file=str(victim / "secret.txt"))
    aimed.arm_workspace(workspace)
    async with _warm_pool(attack_variant, workspace, root / "scratch", size=2, limits=BOMB_LIMITS) as pool:
        # The other warm sandbox of the pool, still waiting for its session, is the victim
        # whose scratch home the attacker goes for.
        waiting = pool._ready[1].sandbox
        await waiting.helper.write(f"{HOME}/secret.txt", bait.secret.encode() + b"\n")
        victim_scratch = getattr(waiting, "scratch_dir", None)  # every real backend has one
        assert victim_scratch is not None
        victim_home = Path(victim_scratch) / "home" / "secret.txt"
        assert victim_home.exists()
        aimed.other_scratch_file = str(victim_home)
        sandbox = await pool.take(_spec_on(workspace, root / "scratch", "attacker", limits=BOMB_LIMITS))
        try:
            assert pool.stats.warm_leases == 1
            yield WarmAttacker(sandbox, aimed)
        finally:
            await sandbox.close()


@pytest.mark.asyncio(loop_scope="module")
@pytest.mark.parametrize("attack_name", _WARM_ATTACKS)
async def test_attacks_fail_in_a_warm_sandbox(attack_name: str, warm_attacker: WarmAttacker) -> None:
    """Each attack in turn in the same leased warm sandbox, as one agent's commands would run."""
    (attack,) = [a for a in ATTACKS if a.name == attack_name]
    outcome = await run_attack(warm_attacker.sandbox, attack, warm_attacker.bait)
    if outcome.verdict == "not-applicable":
        pytest.skip(f"{attack.name}: {outcome.detail}")
    assert outcome.blocked, f"{attack.name} ({attack.goal}): {outcome.verdict}: {outcome.detail}"

"""The docker sandbox backend, for real: a private dockerd, runtimes runc and runsc.

The module starts its own daemon (own data root, exec root, socket; no
iptables, no bridge) and builds the base image once with ``docker import``;
both are gone at the end even when a test fails. Every sandbox runs as the
unused host uid 64123. Start latencies are measured and printed, not asserted.
"""

from __future__ import annotations

import contextlib
import os
import socket
import statistics
import threading
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest

if os.geteuid() != 0:
    pytest.skip(
        "the docker sandbox tests start their own dockerd: run as root", allow_module_level=True
    )
if not os.access("/usr/sbin/dockerd", os.X_OK):
    pytest.skip("dockerd is not installed (apt-get install docker.io)", allow_module_level=True)
pytest.importorskip("docker", reason="the docker SDK is not installed (pip install docker)")

import pytest_asyncio
from devsilo.executor._docker import DockerSandbox, probe
from devsilo.executor._sandbox import prepare_workspace_ownership
from devsilo.executor._spec import (
    CA_CERT,
    HOME,
    RELAY_SOCKET,
    TMP,
    WORKSPACE,
    SandboxLimits,
    SandboxSpec,
)
from devsilo.protocol import SandboxError
from devsilo.testing._dockerd import Dockerd, runsc_path

SANDBOX_UID = SANDBOX_GID = 64123

RUNTIMES = [
    pytest.param("runc", id="runc"),
    pytest.param(
        "runsc",
        id="runsc",
        marks=pytest.mark.skipif(
            runsc_path() is None, reason="runsc (gVisor) is not installed: apt-get install runsc"
        ),
    ),
]

# Start latencies seen by every test, printed by test_start_latency.
_LATENCIES: dict[str, list[float]] = {}


@pytest.fixture(scope="module")
def dockerd(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Dockerd]:
    """This module's own dockerd with the base image imported; stopped even on failure."""
    daemon = Dockerd(tmp_path_factory.mktemp("dockerd"))
    daemon.start()
    try:
        daemon.build_base_image()
        yield daemon
    finally:
        daemon.stop()


@pytest.fixture(params=RUNTIMES)
def runtime(request: pytest.FixtureRequest) -> str:
    """The Docker runtime under test."""
    name: str = request.param
    return name


@pytest.fixture
def workspace(tmp_path: Path) -> Path:
    """A small workspace the sandbox uid may write."""
    ws = tmp_path / "ws"
    ws.mkdir()
    (ws / "README").write_text("the user's project\n")
    prepare_workspace_ownership(ws, SANDBOX_UID, SANDBOX_GID)
    return ws


def make_spec(tmp_path: Path, workspace: Path, **extra: Any) -> SandboxSpec:
    """A spec for ``workspace`` with scratch under ``tmp_path``."""
    return SandboxSpec(
        session_id="test-session",
        workspace=workspace,
        sandbox_uid=SANDBOX_UID,
        sandbox_gid=SANDBOX_GID,
        scratch_root=tmp_path / "scratch",
        **extra,
    )


async def started(
    spec: SandboxSpec, runtime: str, dockerd: Dockerd, **config: Any
) -> DockerSandbox:
    """A started docker sandbox; its start latency goes into ``_LATENCIES``."""
    sb = DockerSandbox(spec, runtime=runtime, docker_url=dockerd.url, **config)
    await sb.start()
    _LATENCIES.setdefault(runtime, []).append(sb.timings["total"])
    return sb


@pytest_asyncio.fixture
async def sandbox(
    dockerd: Dockerd, runtime: str, workspace: Path, tmp_path: Path
) -> AsyncIterator[DockerSandbox]:
    """A started sandbox on ``workspace``; closed after the test."""
    sb = await started(make_spec(tmp_path, workspace), runtime, dockerd)
    try:
        yield sb
    finally:
        await sb.close()


# -- the sandbox works --------------------------------------------------------


async def test_start_answers_hello_as_the_sandbox_uid(sandbox: DockerSandbox) -> None:
    hello = await sandbox.helper.hello()
    assert (hello.uid, hello.gid) == (SANDBOX_UID, SANDBOX_GID)
    assert hello.uid != 0
    assert (hello.cwd, hello.workspace) == (WORKSPACE, WORKSPACE)
    assert sandbox.warnings == []


async def test_exec_round_trip(sandbox: DockerSandbox) -> None:
    result = await sandbox.helper.exec("echo out; echo err >&2; exit 3")
    assert (result.stdout, result.stderr, result.exit_code) == ("out\n", "err\n", 3)
    result = await sandbox.helper.exec('id -u; id -un; echo "$HOME $TMPDIR $HTTPS_PROXY"; pwd')
    assert result.stdout.splitlines() == [
        str(SANDBOX_UID),
        "silo",
        f"{HOME} {TMP} http://127.0.0.1:3128",
        WORKSPACE,
    ]


async def test_written_files_land_in_the_workspace_owned_by_the_sandbox_uid(
    sandbox: DockerSandbox, workspace: Path
) -> None:
    result = await sandbox.helper.exec("echo made > made.txt && mkdir -p sub && echo x > sub/y")
    assert result.exit_code == 0, result.stderr
    await sandbox.helper.write("blob.bin", b"\x00\xffbinary")
    assert (workspace / "made.txt").read_text() == "made\n"
    assert (workspace / "blob.bin").read_bytes() == b"\x00\xffbinary"
    for name in ("made.txt", "sub", "sub/y", "blob.bin"):
        st = (workspace / name).stat()
        assert (st.st_uid, st.st_gid) == (SANDBOX_UID, SANDBOX_GID), name
    # Scratch: the sandbox's own, 0700, on the host while it runs.
    assert sandbox.scratch_dir is not None
    for sub in ("home", "tmp"):
        st = (sandbox.scratch_dir / sub).stat()
        assert (st.st_uid, st.st_mode & 0o777) == (SANDBOX_UID, 0o700)
    result = await sandbox.helper.exec(f"echo h > {HOME}/h && echo t > {TMP}/t")
    assert result.exit_code == 0, result.stderr
    assert (sandbox.scratch_dir / "home" / "h").read_text() == "h\n"


async def test_host_paths_are_not_visible(
    sandbox: DockerSandbox, dockerd: Dockerd, tmp_path: Path
) -> None:
    planted = tmp_path / "outside-secret"
    planted.write_text("secret\n")
    paths = [
        "/root",
        "/work",
        "/work/main",
        "/etc/shadow",
        "/var/run/docker.sock",
        str(dockerd.socket_path),
        str(planted),
        str(tmp_path),
        "/sys/kernel",
        "/sys/fs/cgroup",
    ]
    script = "; ".join(f'[ -e "{p}" ] && echo "visible: {p}"' for p in paths) + "; true"
    result = await sandbox.helper.exec(script)
    assert result.stdout == ""
    result = await sandbox.helper.exec("cat /etc/passwd")
    assert "silo:x:64123:64123" in result.stdout and "root:x:0:0" in result.stdout


async def test_usr_root_and_machinery_are_read_only(sandbox: DockerSandbox) -> None:
    for target in ("/usr/devsilo-x", "/devsilo-x", "/etc/passwd", "/.devsilo/helper.py",
                   "/.devsilo/run/x", "/sys/x"):  # fmt: skip
        result = await sandbox.helper.exec(f"echo x > {target}")
        assert result.exit_code != 0, f"could write {target}"
    assert not Path("/usr/devsilo-x").exists()


async def test_no_network_but_loopback(sandbox: DockerSandbox) -> None:
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    listener.bind(("127.0.0.1", 0))
    listener.listen(8)
    listener.settimeout(0.2)
    port = listener.getsockname()[1]
    probe_script = (
        "import socket\n"
        "print(sorted(name for _, name in socket.if_nameindex()))\n"
        "try:\n"
        f"    socket.create_connection(('127.0.0.1', {port}), timeout=3)\n"
        "    print('reached the host')\n"
        "except OSError as exc:\n"
        "    print('refused', exc.errno)\n"
        # The sandbox's own loopback works.
        "srv = socket.socket(); srv.bind(('127.0.0.1', 0)); srv.listen(1)\n"
        "socket.create_connection(srv.getsockname(), timeout=3).close()\n"
        "print('own loopback ok')\n"
    )
    try:
        result = await sandbox.helper.exec(f'python3 -I -c "{probe_script}"')
        assert result.exit_code == 0, result.stderr
        lines = result.stdout.splitlines()
        assert lines[0] == "['lo']"
        assert lines[1].startswith("refused")
        assert lines[2] == "own loopback ok"
        with pytest.raises(TimeoutError):
            listener.accept()
    finally:
        listener.close()


async def test_confinement_settings(sandbox: DockerSandbox, dockerd: Dockerd, runtime: str) -> None:
    client = dockerd.client()
    try:
        attrs = client.containers.get(sandbox.container_id).attrs
    finally:
        client.close()
    host = attrs["HostConfig"]
    limits = SandboxLimits()
    assert host["NetworkMode"] == "none"
    assert host["CapDrop"] == ["ALL"] and not host["CapAdd"] and not host["Privileged"]
    assert host["ReadonlyRootfs"] is True
    assert "no-new-privileges" in host["SecurityOpt"]
    assert any(opt.startswith("seccomp=") for opt in host["SecurityOpt"])
    assert host["Runtime"] == runtime
    assert (host["Memory"], host["MemorySwap"]) == (limits.memory_bytes, limits.memory_bytes)
    assert host["NanoCpus"] == int(limits.cpus * 1e9)
    if runtime == "runc":
        assert host["PidsLimit"] == limits.pids
    else:
        # gVisor's own tasks are what the host cgroup counts; the sandbox's
        # processes are limited inside (see DockerSandbox._pids_limits).
        assert host["PidsLimit"] >= 4096
        assert host["Ulimits"] == [{"Name": "nproc", "Soft": limits.pids, "Hard": limits.pids}]
    assert attrs["Config"]["User"] == f"{SANDBOX_UID}:{SANDBOX_GID}"
    # The seccomp profile is in force: no new user namespace, no io_uring.
    result = await sandbox.helper.exec(
        "unshare -U true 2>/dev/null && echo unshared; "
        "python3 -I -c 'import ctypes,os; l=ctypes.CDLL(None,use_errno=True); "
        "b=ctypes.create_string_buffer(120); "
        "print(l.syscall(425,1,b), os.strerror(ctypes.get_errno()))'"
    )
    assert "unshared" not in result.stdout
    assert result.stdout.startswith("-1 ")


async def test_relay_socket_ca_cert_and_read_allow_list(
    dockerd: Dockerd, runtime: str, workspace: Path, tmp_path: Path
) -> None:
    relay_path = tmp_path / "relay.sock"
    relay = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    relay.bind(str(relay_path))
    os.chown(relay_path, SANDBOX_UID, SANDBOX_GID)
    relay.listen(1)
    relay.settimeout(15)
    got: list[bytes] = []

    def serve() -> None:
        # A listener closed after a failed test is no error of this thread's.
        with contextlib.suppress(OSError):
            conn, _ = relay.accept()
            with conn:
                got.append(conn.recv(100))
                conn.sendall(b"pong")

    server = threading.Thread(target=serve, daemon=True)
    server.start()
    shared = tmp_path / "shared"
    shared.mkdir()
    (shared / "doc.txt").write_text("readable\n")
    trust = tmp_path / "trust"
    trust.mkdir()
    (trust / "ca.pem").write_bytes(b"-----BEGIN CERTIFICATE-----\ntest\n")
    spec = make_spec(
        tmp_path, workspace,
        relay_socket=relay_path, trust_dir=trust,
        allow_read=(shared,),
    )  # fmt: skip
    sb = await started(spec, runtime, dockerd)
    try:
        talk = (
            "import socket; s = socket.socket(socket.AF_UNIX); "
            f"s.connect('{RELAY_SOCKET}'); s.sendall(b'ping'); print(s.recv(10).decode())"
        )
        result = await sb.helper.exec(
            f'python3 -I -c "{talk}"; cat {CA_CERT}; echo $SSL_CERT_FILE; cat {shared}/doc.txt; '
            f"echo x > {shared}/new || echo read-only"
        )
        assert result.stdout.splitlines() == [
            "pong",
            "-----BEGIN CERTIFICATE-----",
            "test",
            CA_CERT,
            "readable",
            "read-only",
        ], result.stderr
        assert got == [b"ping"]
        assert not (shared / "new").exists()
    finally:
        await sb.close()
        relay.close()
        server.join(5)


async def test_process_and_memory_limits_hold(
    dockerd: Dockerd, runtime: str, workspace: Path, tmp_path: Path
) -> None:
    limits = SandboxLimits(pids=64, memory_bytes=256 * 1024**2)
    sb = await started(make_spec(tmp_path, workspace, limits=limits), runtime, dockerd)
    forks = (
        "import os, time\n"
        "n = 0\n"
        "for _ in range(200):\n"
        "    try:\n"
        "        if os.fork() == 0:\n"
        "            time.sleep(3); os._exit(0)\n"
        "        n += 1\n"
        "    except OSError as exc:\n"
        "        print('stopped', n, exc.errno); break\n"
    )
    try:
        result = await sb.helper.exec(f'python3 -I -c "{forks}"', timeout_ms=60_000)
        stopped, count, err = result.stdout.split()
        assert (stopped, err) == ("stopped", "11") and int(count) < 64  # EAGAIN
        alive = await sb.helper.exec("echo alive")
        assert alive.stdout == "alive\n"
        # 512 MiB against a 256 MiB limit: under runc the kernel kills the
        # command; under runsc the host kills gVisor itself, ending the sandbox.
        try:
            result = await sb.helper.exec(
                "python3 -I -c 'print(len(bytearray(512 * 2**20)))'", timeout_ms=60_000
            )
            assert result.exit_code != 0 and "536870912" not in result.stdout
            survived = True
        except SandboxError:
            survived = False
        assert survived == (runtime == "runc")
    finally:
        await sb.close()
    assert dockerd.containers() == []


# -- it leaves nothing behind -------------------------------------------------


async def test_close_leaves_no_container_and_no_scratch(
    dockerd: Dockerd, runtime: str, workspace: Path, tmp_path: Path
) -> None:
    sb = await started(make_spec(tmp_path, workspace), runtime, dockerd)
    scratch = sb.scratch_dir
    assert scratch is not None and scratch.exists()
    assert dockerd.containers() == [sb.container_name]
    await sb.helper.exec("sleep 300 >/dev/null 2>&1 &")  # a straggler for close to stop
    await sb.close()
    assert dockerd.containers() == []
    assert not scratch.exists()
    assert list((tmp_path / "scratch").iterdir()) == []
    await sb.close()  # idempotent
    with pytest.raises(SandboxError):
        sb.helper  # noqa: B018


async def test_failed_start_leaves_nothing_and_says_why(
    dockerd: Dockerd, runtime: str, workspace: Path, tmp_path: Path
) -> None:
    sb = DockerSandbox(
        make_spec(tmp_path, workspace), runtime=runtime, docker_url=dockerd.url,
        image="devsilo/no-such-image:1",
    )  # fmt: skip
    with pytest.raises(SandboxError, match="did not start.*no-such-image"):
        await sb.start()
    assert dockerd.containers() == []
    assert list((tmp_path / "scratch").iterdir()) == []
    with pytest.raises(SandboxError, match="never host root"):
        await DockerSandbox(
            SandboxSpec("s", workspace, 0, 0, tmp_path / "scratch"), docker_url=dockerd.url
        ).start()
    with pytest.raises(SandboxError, match="unknown docker sandbox settings: colour"):
        DockerSandbox(make_spec(tmp_path, workspace), colour="blue")


def test_probe(dockerd: Dockerd) -> None:
    assert probe(runtime="runc", docker_url=dockerd.url) is None
    if "runsc" in dockerd.runtimes:
        assert probe(runtime="runsc", docker_url=dockerd.url) is None
    reason = probe(runtime="kata", docker_url=dockerd.url)
    assert reason is not None and reason.startswith("runtime kata not configured in the daemon")
    assert probe(docker_url="unix:///nonexistent/docker.sock") == (
        "no Docker daemon at unix:///nonexistent/docker.sock"
    )
    reason = probe(docker_url="tcp://10.0.0.1:2375")
    assert reason is not None and "not a local unix socket" in reason


# -- numbers --------------------------------------------------------------------


@pytest.mark.parametrize("rounds", [5])
async def test_start_latency(
    dockerd: Dockerd, runtime: str, workspace: Path, tmp_path: Path, rounds: int,
    capsys: pytest.CaptureFixture[str],
) -> None:  # fmt: skip
    """Cold start to helper ready, and exec round trip; printed, not asserted."""
    starts, closes, steps = [], [], []
    for _ in range(rounds):
        sb = await started(make_spec(tmp_path, workspace), runtime, dockerd)
        try:
            starts.append(sb.timings["total"])
            steps.append(dict(sb.timings))
            trips = []
            for _ in range(5):
                began = time.perf_counter()
                await sb.helper.exec("true")
                trips.append(time.perf_counter() - began)
        finally:
            began = time.perf_counter()
            await sb.close()
            closes.append(time.perf_counter() - began)
    assert dockerd.containers() == []

    def ms(values: list[float]) -> str:
        return f"p50 {statistics.median(values) * 1000:.0f} ms (min {min(values) * 1000:.0f})"

    parts = {k: statistics.median(s[k] for s in steps) * 1000 for k in steps[0]}
    with capsys.disabled():
        print(
            f"\n[docker/{runtime}] start to helper ready {ms(starts)}; "
            + ", ".join(f"{k} {v:.0f}" for k, v in parts.items())
            + f" ms; exec true round trip {ms(trips)}; close {ms(closes)}; "
            f"all starts this module: {ms(_LATENCIES.get(runtime, starts))}"
        )

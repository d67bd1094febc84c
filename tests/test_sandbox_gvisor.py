"""The gVisor sandbox, for real: runsc runs the helper in an OCI bundle.

The backend needs root (runsc maps the sandbox user to the unused host uid
64123 here) and a working runsc; without either the module is skipped with
the probe's reason. Start latency is measured apart (see the report in the
commit), never asserted here.
"""

from __future__ import annotations

import asyncio
import json
import os
import shlex
import shutil
import signal
import socket
import subprocess
import tempfile
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import pytest_asyncio
from devsilo.executor._backends import get_backend
from devsilo.executor._gvisor import GvisorSandbox, probe
from devsilo.executor._relay import SessionRelay, read_preamble
from devsilo.executor._sandbox import prepare_workspace_ownership
from devsilo.executor._spec import (
    CA_CERT,
    HOME,
    INNER_UID,
    TMP,
    WORKSPACE,
    SandboxLimits,
    SandboxSpec,
)
from devsilo.protocol import SandboxError

SANDBOX_UID = SANDBOX_GID = 64123

_WHY_NOT = probe() if os.geteuid() == 0 else "the gvisor backend needs root"
pytestmark = pytest.mark.skipif(_WHY_NOT is not None, reason=f"gvisor unavailable: {_WHY_NOT}")


def _spec(tmp_path: Path, workspace: Path, **kw: object) -> SandboxSpec:
    return SandboxSpec(
        session_id="sess-1",
        workspace=workspace,
        sandbox_uid=SANDBOX_UID,
        sandbox_gid=SANDBOX_GID,
        scratch_root=tmp_path / "scratch",
        **kw,  # type: ignore[arg-type]
    )


@pytest.fixture
def workspace(tmp_path: Path) -> Path:
    """A small workspace the sandbox uid owns."""
    ws = tmp_path / "ws"
    ws.mkdir()
    (ws / "README").write_text("the user's project\n")
    prepare_workspace_ownership(ws, SANDBOX_UID, SANDBOX_GID)
    return ws


@pytest_asyncio.fixture
async def sandbox(workspace: Path, tmp_path: Path) -> AsyncIterator[GvisorSandbox]:
    """A started gVisor sandbox on ``workspace``; closed after the test."""
    sb = GvisorSandbox(_spec(tmp_path, workspace))
    await sb.start()
    try:
        yield sb
    finally:
        await sb.close()


async def _python(sb: GvisorSandbox, code: str) -> str:
    """Run a Python snippet inside; its stdout (it must succeed)."""
    result = await sb.helper.exec(f"python3 -I -S -c {shlex.quote(code)}")
    assert result.exit_code == 0, result.stderr
    return result.stdout


def _marked_processes(*marks: str) -> list[int]:
    """Host pids whose argv names one of ``marks`` (exactly, or as part of a path)."""
    found = []
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            with open(f"/proc/{entry.name}/cmdline", "rb") as f:
                argv = f.read().decode(errors="replace").split("\0")
        except OSError:
            continue
        if any(a == m or (m.endswith("/") and m in a) for a in argv for m in marks):
            found.append(int(entry.name))
    return found


def _runsc_list(state_dir: Path) -> list[str]:
    out = subprocess.run(
        ["runsc", f"--root={state_dir}", "list", "-quiet"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    return out.split()


def _cgroup_dirs(sb: GvisorSandbox) -> list[Path]:
    rel = f"{sb.cgroup_parent}/{sb.container_id}"
    return [d / rel for d in Path("/sys/fs/cgroup").iterdir() if (d / rel).exists()]


# -- the helper ---------------------------------------------------------------


async def test_the_helper_says_hello_as_the_sandbox_user_in_the_workspace(
    sandbox: GvisorSandbox,
) -> None:
    info = await sandbox.helper.hello()
    assert (info.uid, info.gid, info.cwd, info.workspace) == (
        INNER_UID,
        INNER_UID,
        WORKSPACE,
        WORKSPACE,
    )


async def test_exec_round_trip(sandbox: GvisorSandbox) -> None:
    result = await sandbox.helper.exec("echo out; echo err >&2; exit 3")
    assert (result.stdout, result.stderr, result.exit_code) == ("out\n", "err\n", 3)
    assert not (result.timed_out or result.cancelled or result.truncated)
    # The environment every backend sets.
    env = await sandbox.helper.exec("echo $HOME $TMPDIR $HTTPS_PROXY")
    assert env.stdout == f"{HOME} {TMP} http://127.0.0.1:3128\n"


# -- files and ownership -------------------------------------------------------


async def test_files_made_inside_appear_on_the_host_owned_by_the_sandbox_uid(
    sandbox: GvisorSandbox, workspace: Path
) -> None:
    result = await sandbox.helper.exec("id -u; echo made inside > inside.txt; mkdir -p d/e")
    assert result.stdout == f"{INNER_UID}\n", result.stderr
    await sandbox.helper.write("written/by/helper.bin", b"\x00\xffbytes")
    assert (workspace / "inside.txt").read_text() == "made inside\n"
    assert (workspace / "written/by/helper.bin").read_bytes() == b"\x00\xffbytes"
    for made in ("inside.txt", "d", "d/e", "written/by/helper.bin"):
        st = (workspace / made).stat()
        assert (st.st_uid, st.st_gid) == (SANDBOX_UID, SANDBOX_GID), made
    # And the host's files are the user's inside too.
    assert await _python(sandbox, "import os; print(os.stat('README').st_uid)") == f"{INNER_UID}\n"


async def test_scratch_home_and_tmp_are_private_writable_and_removed(
    workspace: Path, tmp_path: Path
) -> None:
    sb = GvisorSandbox(_spec(tmp_path, workspace))
    await sb.start()
    try:
        out = await _python(
            sb,
            (
                "import os\n"
                f"for d in ({HOME!r}, {TMP!r}):\n"
                "    st = os.stat(d)\n"
                "    open(d + '/f', 'w').write('x')\n"
                "    print(oct(st.st_mode & 0o777), st.st_uid)\n"
            ),
        )
        assert out == f"0o700 {INNER_UID}\n" * 2
        scratch = sb.scratch_dir
        assert scratch is not None
        for sub in ("home", "tmp"):
            assert (scratch / sub / "f").stat().st_uid == SANDBOX_UID
    finally:
        await sb.close()
    assert not scratch.exists()


# -- what is visible -------------------------------------------------------------


async def test_nothing_else_of_the_host_is_visible(sandbox: GvisorSandbox, tmp_path: Path) -> None:
    secret = tmp_path / "secret.txt"
    secret.write_text("host secret\n")
    out = await _python(
        sandbox,
        (
            "import os, json\n"
            f"paths = ['/root', '/work', '/etc/shadow', '/var', '/opt', {str(secret)!r}]\n"
            "print(json.dumps([[p, os.path.exists(p)] for p in paths]))\n"
            "print(json.dumps(sorted(os.listdir('/'))))\n"
        ),
    )
    exists, top = (json.loads(line) for line in out.splitlines())
    assert [p for p, there in exists if there] == []
    aliases = [
        n for n in ("bin", "sbin", "lib", "lib32", "lib64", "libx32") if os.path.exists(f"/{n}")
    ]
    assert top == sorted(
        [".devsilo", "dev", "etc", "home", "proc", "sys", "tmp", "usr", "workspace", *aliases]
    )


async def test_writing_outside_workspace_and_scratch_fails(sandbox: GvisorSandbox) -> None:
    targets = ["/usr/pwned", "/pwned", "/etc/pwned", "/.devsilo/pwned", "/home/pwned"]
    script = "; ".join(f"(echo x > {t}) 2>/dev/null && echo wrote {t}" for t in targets)
    result = await sandbox.helper.exec(script + "; true")
    assert result.stdout == ""
    # Not even as a file the gofer made somewhere on the host.
    assert not Path("/usr/pwned").exists()


async def test_allow_listed_paths_are_readable_but_not_writable(
    workspace: Path, tmp_path: Path
) -> None:
    # One below the sandbox's own /tmp (mounted over its scratch tmp), one
    # elsewhere (a mount point in the bundle's root), one a single file.
    shared = tmp_path / "shared"
    shared.mkdir()
    (shared / "notes.txt").write_text("shared notes\n")
    elsewhere = Path(tempfile.mkdtemp(prefix="devsilo-gvisor-test-", dir="/var/tmp"))
    try:
        (elsewhere / "data.txt").write_text("data\n")
        single = elsewhere / "single.txt"
        single.write_text("single\n")
        # Owned by the sandbox uid: only the read-only mounts stand in the way.
        for tree in (shared, elsewhere):
            prepare_workspace_ownership(tree, SANDBOX_UID, SANDBOX_GID)
        sb = GvisorSandbox(
            _spec(tmp_path, workspace, allow_read=(shared, elsewhere / "data.txt", single))
        )
        await sb.start()
        try:
            result = await sb.helper.exec(
                f"cat {shared}/notes.txt {elsewhere}/data.txt {single}; "
                f"for f in {shared}/new {elsewhere}/data.txt {single}; do "
                "(echo x >> $f) 2>&1 | grep -c 'Read-only file system'; done"
            )
            assert result.stdout == "shared notes\ndata\nsingle\n1\n1\n1\n", result.stderr
        finally:
            await sb.close()
        assert not (shared / "new").exists()
        assert single.read_text() == "single\n"
    finally:
        shutil.rmtree(elsewhere)


def test_an_allow_list_entry_covering_the_sandbox_is_refused(
    workspace: Path, tmp_path: Path
) -> None:
    for bad in (Path("/usr"), Path("/"), Path("/etc"), Path("/etc/passwd")):
        sb = GvisorSandbox(_spec(tmp_path, workspace, allow_read=(bad,)))
        with pytest.raises(SandboxError, match="would cover"):
            asyncio.run(sb.start())


# -- network and privileges -------------------------------------------------------


async def test_only_loopback_and_no_way_to_the_host(sandbox: GvisorSandbox) -> None:
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    listener.bind(("127.0.0.1", 0))
    listener.listen()
    listener.setblocking(False)
    port = listener.getsockname()[1]
    try:
        out = await _python(
            sandbox,
            (
                "import socket, threading\n"
                "print([l.split(':')[0].strip() for l in open('/proc/net/dev').readlines()[2:]])\n"
                "try:\n"
                f"    socket.create_connection(('127.0.0.1', {port}), timeout=2); print('host')\n"
                "except OSError as e: print(type(e).__name__)\n"
                # Loopback itself works: the helper's proxy listens there.
                "srv = socket.create_server(('127.0.0.1', 0)); p = srv.getsockname()[1]\n"
                "threading.Thread(target=lambda: srv.accept()[0].sendall(b'lo'), daemon=True).start()\n"
                "print(socket.create_connection(('127.0.0.1', p)).recv(2).decode())\n"
            ),
        )
        with pytest.raises(BlockingIOError):
            listener.accept()
    finally:
        listener.close()
    assert out == "['lo']\nConnectionRefusedError\nlo\n"


async def test_no_capabilities_no_new_privileges_and_dangerous_calls_refused(
    sandbox: GvisorSandbox,
) -> None:
    caps = await sandbox.helper.exec("grep -E '^Cap(Eff|Prm|Bnd):' /proc/self/status")
    assert caps.stdout.split()[1::2] == ["0000000000000000"] * 3
    out = await _python(
        sandbox,
        (
            "import ctypes, errno, socket\n"
            "libc = ctypes.CDLL(None, use_errno=True)\n"
            "print(libc.prctl(39, 0, 0, 0, 0))\n"  # PR_GET_NO_NEW_PRIVS
            "for flag in (0x10000000, 0x20000, 0x40000000):\n"  # NEWUSER, NEWNS, NEWNET
            "    print(libc.unshare(flag), errno.errorcode[ctypes.get_errno()])\n"
            "for fam, typ in ((socket.AF_INET, socket.SOCK_RAW), (socket.AF_PACKET, socket.SOCK_DGRAM)):\n"
            "    try: socket.socket(fam, typ); print('socket')\n"
            "    except PermissionError: print('EPERM')\n"
        ),
    )
    assert out.split("\n") == ["1", "-1 EPERM", "-1 EPERM", "-1 EPERM", "EPERM", "EPERM", ""]


# -- relay, CA and limits ------------------------------------------------------------


async def test_the_helper_proxy_and_resolver_reach_the_egress_through_the_relay(
    workspace: Path, tmp_path: Path
) -> None:
    seen: list[tuple[str, str]] = []

    async def egress(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        preamble = await read_preamble(reader)
        seen.append((preamble.session_id, preamble.kind))
        if preamble.kind == "tcp":
            await reader.readuntil(b"\r\n\r\n")
            writer.write(
                b"HTTP/1.1 200 OK\r\nContent-Length: 17\r\nConnection: close\r\n\r\n"
                b"hello from egress"
            )
            await writer.drain()
        writer.close()

    server = await asyncio.start_server(egress, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    relay = SessionRelay("sess-1", tmp_path / "relay.sock", ("127.0.0.1", port), uid=SANDBOX_UID)
    await relay.start()
    pem = b"-----BEGIN CERTIFICATE-----\nTEST\n-----END CERTIFICATE-----\n"
    trust = tmp_path / "trust"
    trust.mkdir()
    (trust / "ca.pem").write_bytes(pem)
    sb = GvisorSandbox(_spec(tmp_path, workspace, relay_socket=relay.socket_path, trust_dir=trust))
    try:
        await sb.start()
        out = await _python(
            sb,
            (
                "import os, socket, urllib.request\n"
                # HTTP_PROXY points at the helper, which relays to the egress.
                "print(urllib.request.urlopen('http://example.test/', timeout=10).read().decode())\n"
                "try:\n"
                "    socket.getaddrinfo('example.test', 80)\n"
                "except OSError:\n"
                "    print('unresolved')\n"
                f"print(open({CA_CERT!r}).read() == {pem.decode()!r}, os.environ['SSL_CERT_FILE'])\n"
            ),
        )
    finally:
        await sb.close()
        await relay.close()
        server.close()
    # The stand-in egress answers DNS with nothing: the query got there, though.
    assert out == f"hello from egress\nunresolved\nTrue {CA_CERT}\n"
    assert ("sess-1", "tcp") in seen and ("sess-1", "dns") in seen
    # Nothing but the sandbox (through runsc's gofer, as root) came in.
    assert relay.stats.refused == 0


async def test_limits_reach_the_cgroup_and_stop_a_fork_bomb(
    workspace: Path, tmp_path: Path
) -> None:
    limits = SandboxLimits(memory_bytes=768 * 1024**2, cpus=0.5, pids=40)
    sb = GvisorSandbox(_spec(tmp_path, workspace, limits=limits))
    await sb.start()
    try:
        dirs = {d.parent.parent.parent.name: d for d in _cgroup_dirs(sb)}
        if "memory" in dirs:  # cgroup v1, as on this machine
            mem = (dirs["memory"] / "memory.limit_in_bytes").read_text()
            assert int(mem) == limits.memory_bytes
            assert (dirs["cpu"] / "cpu.cfs_quota_us").read_text().strip() == "50000"
            assert int((dirs["pids"] / "pids.max").read_text()) > limits.pids
        rlimit = "import resource; print(resource.getrlimit(resource.RLIMIT_NPROC))"
        assert await _python(sb, rlimit) == "(40, 40)\n"
        bomb = await _python(
            sb,
            (
                "import os, signal, time\n"
                "kids = []\n"
                "try:\n"
                "    for _ in range(80):\n"
                "        pid = os.fork()\n"
                "        if pid == 0:\n"
                "            time.sleep(30)\n"
                "            os._exit(0)\n"
                "        kids.append(pid)\n"
                "    print('unlimited')\n"
                "except BlockingIOError:\n"
                "    print('stopped')\n"
                "for pid in kids:\n"
                "    os.kill(pid, signal.SIGKILL)\n"
                "    os.waitpid(pid, 0)\n"
                "print(len(kids))\n"
            ),
        )
        verdict, forked = bomb.split()
        assert verdict == "stopped" and int(forked) < limits.pids
        # The sandbox survives its own fork bomb.
        assert (await sb.helper.exec("echo alive")).stdout == "alive\n"
    finally:
        await sb.close()


# -- closing -------------------------------------------------------------------------


async def test_close_leaves_no_process_container_cgroup_or_scratch(
    workspace: Path, tmp_path: Path
) -> None:
    sb = GvisorSandbox(_spec(tmp_path, workspace))
    await sb.start()
    scratch = sb.scratch_dir
    assert scratch is not None
    await sb.helper.exec("(setsid sleep 300 &) ; sleep 300 & echo started")
    assert _runsc_list(sb.state_dir) == [sb.container_id]
    assert _marked_processes(sb.container_id, f"{scratch}/")
    assert _cgroup_dirs(sb)
    await sb.close()
    await sb.close()  # idempotent
    assert _marked_processes(sb.container_id, f"{scratch}/") == []
    assert _runsc_list(sb.state_dir) == []
    assert _cgroup_dirs(sb) == []
    assert not scratch.exists()
    assert [p.name for p in (tmp_path / "scratch").iterdir()] == ["runsc"]
    with pytest.raises(SandboxError, match="not running"):
        sb.helper  # noqa: B018


async def test_close_cleans_up_after_runsc_was_killed(workspace: Path, tmp_path: Path) -> None:
    sb = GvisorSandbox(_spec(tmp_path, workspace))
    await sb.start()
    scratch = sb.scratch_dir
    assert sb.pid is not None and scratch is not None
    os.kill(sb.pid, signal.SIGKILL)
    await sb.close()
    assert _marked_processes(sb.container_id, f"{scratch}/") == []
    assert _runsc_list(sb.state_dir) == []
    assert _cgroup_dirs(sb) == []
    assert not scratch.exists()


async def test_a_sandbox_that_cannot_start_says_why_and_leaves_nothing(
    workspace: Path, tmp_path: Path
) -> None:
    sb = GvisorSandbox(_spec(tmp_path, workspace), platform="no-such-platform")
    with pytest.raises(
        SandboxError, match=r"did not start(.|\n)*unknown platform: no-such-platform"
    ):
        await sb.start()
    assert [p.name for p in (tmp_path / "scratch").iterdir()] == ["runsc"]
    assert _runsc_list(sb.state_dir) == []
    assert _marked_processes(sb.container_id) == []


async def test_a_missing_workspace_is_refused(tmp_path: Path) -> None:
    sb = GvisorSandbox(_spec(tmp_path, tmp_path / "nowhere"))
    with pytest.raises(SandboxError, match="nowhere is not a directory"):
        await sb.start()


# -- probe and registry -----------------------------------------------------------------


def test_probe_says_why_not() -> None:
    assert probe() is None
    assert probe(runsc="/nonexistent/runsc") == "runsc not installed (apt-get install runsc)"


def test_the_registry_makes_gvisor_sandboxes(workspace: Path, tmp_path: Path) -> None:
    backend = get_backend("gvisor")
    assert backend.probe() is None
    sb = backend.create(_spec(tmp_path, workspace), platform="ptrace")
    assert isinstance(sb, GvisorSandbox) and sb.backend == "gvisor"
